"""`saliency check`: the one command for CI: explain, evaluate with gates, compare with a baseline run with gates,
and always write the report (OUT/index.html) whose banner names each failed gate.

Its explain options are explain's own (the same generated command, minus --report, --json and --shard), so
everything `saliency explain` takes works here too; the gates are added on top. Exit code: a step that could not
run (1 or 2) > a failed gate (4) > failed inputs or unscored maps (3) > 0 (pipeline/check.py). No torch at
import time.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from saliency_cli.cli import explain as explain_cli
from saliency_cli.cli.console import Progress, err, warn
from saliency_cli.cli.evaluate import parse_bounds
from saliency_cli.errors import ExitCode, UsageError

GATES = "Gates and baseline"
DROPPED = ("report", "json_out", "shard")  # the report is always written; one process checks the whole run

Metrics = Annotated[str | None, typer.Option(metavar="NAME[,NAME...]", rich_help_panel=GATES, show_default=False,
                                             help="Metrics to evaluate besides the gated ones (see `saliency "
                                             "evaluate --list-metrics`)")]
FailUnder = Annotated[list[str] | None, typer.Option(metavar="METRIC=X", rich_help_panel=GATES, show_default=False,
                                                     help="Exit 4 when a method's mean of METRIC is below X "
                                                     "(repeatable)")]
FailOver = Annotated[list[str] | None, typer.Option(metavar="METRIC=X", rich_help_panel=GATES, show_default=False,
                                                    help="Exit 4 when a method's mean of METRIC is above X "
                                                    "(repeatable)")]
BaselineRun = Annotated[Path | None, typer.Option(metavar="DIR", rich_help_panel=GATES, show_default=False,
                                                  help="An earlier run folder (explain or check) to compare the "
                                                  "maps with")]
MinSpearman = Annotated[float | None, typer.Option(metavar="X", rich_help_panel=GATES, show_default=False,
                                                   help="Exit 4 when any image's Spearman correlation with its "
                                                   "--baseline-run map is below X")]
MinIou = Annotated[float | None, typer.Option(metavar="X", rich_help_panel=GATES, show_default=False,
                                              help="Exit 4 when any image's top-10 % IoU with its --baseline-run "
                                              "map is below X")]
OWN = {"metrics": (Metrics, None), "fail_under": (FailUnder, None), "fail_over": (FailOver, None),
       "baseline_run": (BaselineRun, None), "min_spearman": (MinSpearman, None), "min_iou": (MinIou, None)}


def check_options(gates: dict[str, Any], explain_args: dict[str, Any]) -> Any:
    """The library's CheckOptions from this command's gate options and explain's -o, --device, --batch-size."""
    from saliency_cli.cli import options as o
    from saliency_cli.pipeline.check import CheckOptions

    metrics = [n.strip() for n in (gates["metrics"] or "").split(",") if n.strip()]
    if gates["metrics"] is not None and not metrics:
        raise UsageError(f"--metrics {gates['metrics']!r}: give at least one name")
    return CheckOptions(run=Path(str(explain_args["out"])), metrics=metrics,
                        fail_under=parse_bounds(gates["fail_under"], "--fail-under"),
                        fail_over=parse_bounds(gates["fail_over"], "--fail-over"), baseline=gates["baseline_run"],
                        min_spearman=gates["min_spearman"], min_iou=gates["min_iou"],
                        device=str(explain_args.get("device", "auto")),
                        batch_size=o.parse_batch_size(str(explain_args.get("batch_size", "auto"))))


def check(run_explain: Callable[..., None], explain_args: dict[str, Any], gates: dict[str, Any]) -> None:
    """Check the options, explain (explain's own command: its output, its failures), then gate and report."""
    from saliency_cli import api
    from saliency_cli.pipeline.check import check_options as validate

    opts = check_options(gates, explain_args)
    validate(opts)  # usage errors before anything is explained
    inputs_failed = False
    try:
        run_explain(**explain_args)
    except typer.Exit as e:
        if e.exit_code != ExitCode.PARTIAL:
            raise
        inputs_failed = True
    quiet = bool(explain_args.get("quiet"))
    progress = Progress("checking", enabled=not quiet, unit="maps")
    try:
        result = api.check(opts, inputs_failed=inputs_failed, on_progress=progress.update)
    finally:
        progress.stop()
    for w in result.warnings + result.report.warnings:
        warn(w)
    for line in result.broken:
        err.print(f"saliency: error: {line}", markup=False)
    for line in result.gates:
        err.print(f"saliency: gate failed: {line}", markup=False)
    if result.exit_code or not quiet:
        err.print(f"{result.verdict()}; report: {result.report.path}", markup=False)
    if result.exit_code:
        raise typer.Exit(result.exit_code)


def build_command() -> Callable[..., None]:
    """explain's command (its options, generated from the settings table) plus the gate options."""
    run_explain = explain_cli.build_command()
    params = [p for p in inspect.signature(run_explain).parameters.values() if p.name not in DROPPED]
    taken = {p.name for p in params}
    for name, (annotation, default) in OWN.items():
        assert name not in taken, name  # a new explain option of the same name would shadow a gate
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                        annotation=annotation))

    def command(**kwargs: Any) -> None:
        gates = {name: kwargs.pop(name) for name in OWN}
        check(run_explain, kwargs, gates)

    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in params}
    command.__doc__ = CHECK_HELP
    return command


CHECK_HELP = """Explain, evaluate and compare with a baseline run, with gates, for CI; always writes OUT/index.html.

Takes every option of `saliency explain`. The report's banner names each failed gate. Exit: 0 passed, 4 a gate
failed, 3 an input failed or a map could not be scored (no gate failed), 1 or 2 a step could not run."""
