"""`saliency check`: one step for CI over a finished explain run: evaluate with gates, compare against a baseline
run with gates, and always write the report, whose banner says which gate failed and why.

    run folder -> evaluate (the gated metrics and --metrics; pipeline/evaluate.py, its own gates)
               -> compare with the baseline run (pipeline/compare.py, its per-image gates)
               -> report (pipeline/report.py): OUT/index.html with a verdict banner
               -> exit code: a step that could not run (its own code: 1 or 2) > a failed gate (4) > failed inputs
                  or unscored maps (3) > 0

Nothing here reads the run folders itself: the evaluate, compare and report engines do. The explain step is the
caller's (`api.check` runs `api.explain` first; the CLI runs the `explain` command), which says whether inputs
failed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from saliency_cli.errors import ExitCode, SaliencyError, UsageError, counted

Progress = Callable[[int, int], None]


@dataclass
class CheckOptions:
    """run: the explain run folder to check. metrics: metrics to evaluate besides the gated ones (no metric and
    no gate: no evaluation). fail_under / fail_over: metric -> bound on each method's mean (as `saliency evaluate`).
    baseline: a run folder of an earlier explain (or check) to compare with; min_spearman / min_iou: per-image
    bounds of that comparison (as `saliency compare --fail-under`). The report goes to run/index.html."""

    run: Path
    metrics: list[str] = field(default_factory=list)
    fail_under: dict[str, float] = field(default_factory=dict)
    fail_over: dict[str, float] = field(default_factory=dict)
    baseline: Path | None = None
    min_spearman: float | None = None
    min_iou: float | None = None
    device: str = "auto"
    batch_size: int | None = None

    @property
    def compare_bounds(self) -> dict[str, float]:
        bounds = {"spearman": self.min_spearman, "iou": self.min_iou}
        return {name: bound for name, bound in bounds.items() if bound is not None}

    @property
    def evaluates(self) -> bool:
        return bool(self.metrics or self.fail_under or self.fail_over)


@dataclass
class CheckResult:
    """What the check found: each failed gate's message (`evaluate: ...`, `baseline: ...`), the steps that could
    not run, whether inputs failed or maps could not be scored, the engines' results, the report and the exit
    code."""

    gates: list[str]
    broken: list[str]
    inputs_failed: bool
    unscored: int
    evaluation: Any = None
    comparison: Any = None
    report: Any = None
    exit_code: int = int(ExitCode.OK)
    passed: list[str] = field(default_factory=list)  # the gates that held
    warnings: list[str] = field(default_factory=list)

    def verdict(self) -> str:
        """One line: passed, or failed with what failed."""
        parts = []
        if self.broken:
            parts.append(f"{counted(len(self.broken), 'step')} could not run")
        if self.gates:
            parts.append(f"{counted(len(self.gates), 'gate')} failed")
        if self.inputs_failed:
            parts.append("some inputs failed (see the failed maps)")
        if self.unscored:
            parts.append(f"{counted(self.unscored, 'map')} could not be scored")
        if not parts:
            held = f"{counted(len(self.passed), 'gate')} held" if self.passed else "no gate"
            return f"saliency check passed ({held})"
        return f"saliency check failed, exit {self.exit_code}: " + "; ".join(parts)


def _evaluate_options(opts: CheckOptions) -> Any:
    from saliency_cli.pipeline.evaluate import EvaluateOptions

    # metrics=[] (not None): evaluate the gated metrics and --metrics only, not evaluate's default set
    return EvaluateOptions(runs=[Path(opts.run)], metrics=list(opts.metrics), fail_under=dict(opts.fail_under),
                           fail_over=dict(opts.fail_over), device=opts.device, batch_size=opts.batch_size,
                           out=Path(opts.run))


def _compare_options(opts: CheckOptions, run_b: Path) -> Any:
    from saliency_cli.pipeline.compare import CompareOptions

    return CompareOptions(run_a=Path(opts.baseline or "."), run_b=run_b, out=Path(opts.run),
                          fail_under=opts.compare_bounds)


def check_options(opts: CheckOptions) -> None:
    """Usage errors before anything is explained: metric and gate names, the bounds, the baseline run folder."""
    from saliency_cli.pipeline import compare, evaluate

    if opts.evaluates:
        evaluate.select(_evaluate_options(opts))
    if opts.compare_bounds and opts.baseline is None:
        raise UsageError("--min-spearman/--min-iou compare with a baseline run: give --baseline-run DIR")
    if opts.baseline is not None:
        if Path(opts.baseline).resolve() == Path(opts.run).resolve():
            raise UsageError(f"--baseline-run {opts.baseline} is the folder being checked (-o); give an earlier run")
        compare.check_options(_compare_options(opts, Path(opts.baseline)))  # the baseline is a run folder


def _step(broken: list[str], name: str, fn: Callable[[], Any]) -> tuple[Any, int]:
    """Run one engine; a SaliencyError becomes a line in `broken` and its exit code (the report is still written)."""
    try:
        return fn(), 0
    except SaliencyError as e:
        broken.append(f"{name} could not run: {e}")
        return None, int(e.exit_code)


def run_check(opts: CheckOptions, *, inputs_failed: bool = False, on_progress: Progress | None = None) -> CheckResult:
    """Evaluate and compare the finished run `opts.run` with their gates, then write its report; see the module
    docstring for the exit code. `inputs_failed`: the explain step recorded failed inputs (exit 3)."""
    from saliency_cli.pipeline.compare import compare_runs
    from saliency_cli.pipeline.evaluate import evaluate_runs

    check_options(opts)
    res = CheckResult(gates=[], broken=[], inputs_failed=inputs_failed, unscored=0)
    codes = []
    if opts.evaluates:
        res.evaluation, code = _step(res.broken, "evaluate", lambda: evaluate_runs(_evaluate_options(opts),
                                                                                   on_progress))
        codes.append(code)
        if res.evaluation is not None:
            res.gates += [f"evaluate: {f.message()}" for f in res.evaluation.failures]
            res.unscored = len(res.evaluation.errors)
            res.warnings += res.evaluation.warnings
            res.passed += _held_evaluate(opts, res.evaluation.failures)
    if opts.baseline is not None:
        res.comparison, code = _step(res.broken, "compare with the baseline",
                                     lambda: compare_runs(_compare_options(opts, Path(opts.run)), on_progress))
        codes.append(code)
        if res.comparison is not None:
            res.gates += [f"--min-{f.metric} against {opts.baseline}: {f.message()}" for f in res.comparison.failures]
            res.warnings += res.comparison.warnings
            failed = {f.metric for f in res.comparison.failures}
            res.passed += [f"--min-{m} {b:g}" for m, b in opts.compare_bounds.items() if m not in failed]
    broken_code = max(codes, default=0)
    res.exit_code = (broken_code or (int(ExitCode.GATE) if res.gates else 0)
                     or (int(ExitCode.PARTIAL) if inputs_failed or res.unscored else int(ExitCode.OK)))
    res.report = write_report(opts, res)
    return res


def _held_evaluate(opts: CheckOptions, failures: list[Any]) -> list[str]:
    failed = {(f.kind, f.metric) for f in failures}
    return [f"--fail-{kind} {metric}={bound:g}" for kind, bounds in (("under", opts.fail_under),
                                                                    ("over", opts.fail_over))
            for metric, bound in bounds.items() if (kind, metric) not in failed]


def write_report(opts: CheckOptions, res: CheckResult) -> Any:
    """OUT/index.html over the checked run, with the verdict banner (and the comparison when there is one)."""
    from saliency_cli.pipeline.report import ReportOptions, build_report

    banner = {"title": res.verdict(), "ok": res.exit_code == 0, "lines": [*res.broken, *res.gates],
              "held": res.passed}
    comparison = Path(res.comparison.files["json"]) if res.comparison is not None else None
    return build_report(ReportOptions(runs=[Path(opts.run)], out=Path(opts.run), comparison=comparison,
                                      banner=banner))
