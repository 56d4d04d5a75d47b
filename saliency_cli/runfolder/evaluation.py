"""The result of an evaluation and its files: evaluation.json, evaluation.csv and PNG plots (matplotlib, Agg).

- evaluation.json: `{"images": [{"image", "method", "metrics": {...}, ...}], "summary": {method: {metric:
  {"mean", "ci95", "n"}}}, "curves": ..., "randomization": ..., "perturbation": ..., ...}`
- evaluation.csv: one row per image and method (kind `image`), then per method one row of means (kind
  `mean`) and one of 95 % CI half-widths (kind `ci95`).
- evaluation_plots/: `curve_<metric>.png` (deletion, insertion, aupc: mean curve per method with its 95 %
  band), `sanity_randomization.png`, `sanity_perturbation.png`, `bar_<metric>.png` (method means, CI bars).

Every file is written to a temporary name and renamed. `pipeline/evaluate.py` builds the `Evaluation`; this
module writes its files and reads evaluation.json back (`read_result`).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from saliency_cli.metrics import METRICS, SANITY_CHECKS, higher_is_better
from saliency_cli.writers import finite, jsonable, write_bytes

PLOT_DIR = "evaluation_plots"
EVALUATION = "evaluation.json"


def read_result(path: Path, warnings: list[str]) -> dict[str, Any] | None:
    """A result file (evaluation.json, comparison.json) as a dict; None, with a warning, when it cannot be read."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        warnings.append(f"{path}: cannot read it ({e})")
        return None
    return data if isinstance(data, dict) else None
CURVE_PLOTS = ("deletion", "insertion", "aupc")


@dataclass
class Failure:
    """A gate that failed: the mean of `metric` for `method` is on the wrong side of `bound`."""

    metric: str
    method: str
    value: float | None
    bound: float
    kind: str  # "under" (--fail-under) or "over" (--fail-over)

    def message(self) -> str:
        if self.value is None:
            return f"{self.metric}: no value for {self.method} (gate --fail-{self.kind} {self.metric}={self.bound:g})"
        sign = "<" if self.kind == "under" else ">"
        return f"{self.metric} of {self.method} is {self.value:.4g} {sign} {self.bound:g} (--fail-{self.kind})"


@dataclass
class Evaluation:
    """The result: rows per image and method, summaries, mean curves, sanity curves, gate failures."""

    images: list[dict[str, Any]]
    summary: dict[str, dict[str, dict[str, Any]]]
    curves: dict[str, dict[str, Any]]
    sanity: dict[str, dict[str, dict[str, Any]]]
    metrics: list[str]
    timing: dict[str, float]
    failures: list[Failure]
    warnings: list[str]
    info: dict[str, Any]
    out: Path
    files: dict[str, str] = field(default_factory=dict)
    errors: list[dict[str, Any]] = field(default_factory=list)  # rows that could not be scored, with the reason
    scored: int = 0  # rows scored
    carried: dict[str, dict[str, Any]] = field(default_factory=dict)  # metric -> its metadata, from an earlier run

    def higher_is_better(self, name: str) -> bool:
        """Whether a larger value of metric or sanity check `name` is better."""
        return higher_is_better(name)

    def to_json(self) -> dict[str, Any]:
        meta = {name: self.carried.get(name) or _metadata(name, self.info)
                for name in self.metrics + list(self.sanity)}
        return {"runs": self.info["runs"], "options": self.info["options"], "metrics": meta,
                "images": self.images, "summary": self.summary, "curves": self.curves, **self.sanity,
                "seconds_per_image": self.timing, "gates": [f.__dict__ | {"message": f.message()}
                                                             for f in self.failures],
                "warnings": self.warnings, "errors": self.errors, "scored": self.scored}


def _metadata(name: str, info: dict[str, Any]) -> dict[str, Any]:
    if name in METRICS:
        m = METRICS[name]
        opts = info["metric_options"].get(name, m.defaults)
        return {"higher_is_better": m.higher_is_better, "summary": m.summary, "paper": m.paper,
                "options": opts, "forward_passes_per_image": m.cost(opts)}
    s = SANITY_CHECKS[name]
    opts = info["sanity_options"].get(name, s.defaults)
    return {"higher_is_better": s.higher_is_better, "summary": s.summary, "paper": s.paper,
            "options": jsonable(opts), "map_recomputations_per_image": s.cost(opts)}


def csv_text(ev: Evaluation) -> str:
    names = ev.metrics + list(ev.sanity)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["kind", "run", "image", "method", "target", *names])
    for row in ev.images:
        w.writerow(["image", row["run"], row["image"], row["method"], row["target"],
                    *[_num(row["metrics"].get(n)) for n in names]])
    for label, per in ev.summary.items():
        for kind in ("mean", "ci95", "n"):
            w.writerow([kind, "", "", label, "", *[_num((per.get(n) or {}).get(kind)) for n in names]])
    return buf.getvalue()


def _num(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def write_reports(ev: Evaluation, out: Path, *, plots: bool = True, suffix: str = "") -> dict[str, str]:
    """Write the JSON, the CSV and (with `plots`) the PNGs under `out`; returns {what: path}. The values of an
    earlier evaluation.json there are carried over first (`carry_over`), and every plot that the new JSON does
    not back is removed. suffix: a shard's `.shard-I-of-N`, so that shards scoring one folder never write one
    file."""
    files: dict[str, str] = {}
    earlier_path = out / f"evaluation{suffix}.json"
    if earlier_path.is_file():
        carry_over(ev, read_result(earlier_path, ev.warnings))
    path = out / f"evaluation{suffix}.json"
    write_bytes(path, json.dumps(finite(ev.to_json()), indent=2, default=str, allow_nan=False).encode())
    files["json"] = str(path)
    path = out / f"evaluation{suffix}.csv"
    write_bytes(path, csv_text(ev).encode())
    files["csv"] = str(path)
    written = write_plots(ev, out / f"{PLOT_DIR}{suffix}") if plots else {}
    files.update(written)
    for stale in sorted((out / f"{PLOT_DIR}{suffix}").glob("*.png")):
        if str(stale) not in written.values():
            stale.unlink(missing_ok=True)
    return files


# -- evaluations add up ----------------------------------------------------------------------------------------
def _entry_id(entry: dict[str, Any]) -> tuple[str, str, str, str]:
    """A per-image row's map: run folder (by name: the folder may have moved), key, method label, target."""
    return Path(str(entry.get("run"))).name, str(entry.get("key")), str(entry.get("method")), str(entry.get("target"))


def carry_over(ev: Evaluation, earlier: dict[str, Any] | None) -> None:
    """Keep an earlier evaluation's values of the metrics not computed now, for the maps that did not change
    (same run, key, method label and target, and the same .npy sha256); values of maps that changed or are gone
    are dropped, with one warning. Summaries, mean curves and sanity sections follow the kept values."""
    if not earlier:
        return
    now = set(ev.metrics) | set(ev.sanity)
    meta = {k: v for k, v in (earlier.get("metrics") or {}).items() if k not in now and isinstance(v, dict)}
    if not meta:
        return
    rows = {_entry_id(e): e for e in ev.images}
    kept: dict[str, dict[str, int]] = {name: {} for name in meta}  # metric -> label -> values kept
    dropped, changed = 0, 0
    for entry in earlier.get("images") or []:
        values = {k: v for k, v in (entry.get("metrics") or {}).items() if k in meta and v is not None}
        row = rows.get(_entry_id(entry))
        if row is None or not entry.get("npy_sha256") or entry.get("npy_sha256") != row.get("npy_sha256"):
            dropped += len(values)
            changed += bool(values)
            continue
        for name, value in values.items():
            row["metrics"][name] = value
            kept[name][row["method"]] = kept[name].get(row["method"], 0) + 1
    if dropped:
        ev.warnings.append(f"dropped {dropped} earlier metric value(s) of {changed} map(s) that changed or are gone "
                           "since the last evaluate")
    for name in [n for n in meta if kept[n]]:
        # the options of the evaluate that computed it (baseline, device, ...), not this one's
        with_options = meta[name].get("evaluated_with") or earlier.get("options")
        _carry_metric(ev, earlier, name, {**meta[name], "evaluated_with": with_options}, kept[name])


def _carry_metric(ev: Evaluation, earlier: dict[str, Any], name: str, meta: dict[str, Any],
                  kept: dict[str, int]) -> None:
    """One carried metric: its column, its summaries, and the earlier mean curves and sanity sections of the
    method labels whose maps all kept their values."""
    from saliency_cli.numerics import mean_ci95

    ev.carried[name] = meta
    section = earlier.get(name)
    if name in SANITY_CHECKS:
        ev.sanity[name] = {}  # its column; the per-label section below when every map of the label kept its value
    else:
        ev.metrics.append(name)
    for e in ev.images:
        e["metrics"].setdefault(name, None)
    for label in ev.summary:
        values = [e["metrics"][name] for e in ev.images if e["method"] == label and e["metrics"][name] is not None]
        ev.summary[label][name] = mean_ci95(values)
    total = {label: sum(1 for e in ev.images if e["method"] == label) for label in ev.summary}
    whole = {label for label, n in kept.items() if n == total.get(label)}
    curves = (earlier.get("curves") or {}).get(name)
    if isinstance(curves, dict):
        methods = {k: v for k, v in (curves.get("methods") or {}).items() if k in whole}
        if methods:
            ev.curves[name] = {**curves, "methods": methods}
    if name in SANITY_CHECKS and isinstance(section, dict):
        ev.sanity[name] = {k: v for k, v in section.items() if k in whole}


# -- plots ------------------------------------------------------------------------------------------------
Save = Callable[[Any, str], None]  # save(figure, plot name)


def _figure_bytes(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def _arrow(metric: str) -> str:
    return "higher is better" if higher_is_better(metric) else "lower is better"


def write_plots(ev: Evaluation, folder: Path) -> dict[str, str]:
    """Curve, sanity and bar plots; returns {plot name: path}."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure  # a Figure without pyplot: no global state, thread-safe

    written: dict[str, str] = {}

    def save(fig: Any, name: str) -> None:
        path = folder / f"{name}.png"
        write_bytes(path, _figure_bytes(fig))
        written[name] = str(path)

    _curve_plots(ev, Figure, save)
    _randomization_plot(ev, Figure, save)
    _perturbation_plot(ev, Figure, save)
    _bar_plots(ev, Figure, save)
    return written


def _curve_plots(ev: Evaluation, figure: Callable[..., Any], save: Save) -> None:
    """curve_<metric>: the mean curve of every method, its 95 % band, the method's score in the legend."""
    for metric in CURVE_PLOTS:
        data = ev.curves.get(metric)
        if not data:
            continue
        fig = figure(figsize=(5.5, 4))
        ax = fig.add_subplot()
        x = data["x"]
        for label, c in data["methods"].items():
            mean = c["mean"]
            if len(mean) != len(x):
                continue
            score = (ev.summary.get(label, {}).get(metric) or {}).get("mean")
            line = ax.plot(x, mean, label=f"{label} ({score:.3f})" if score is not None else label)[0]
            if all(v is not None for v in c["ci95"]):
                lo = [m - h for m, h in zip(mean, c["ci95"], strict=True)]
                hi = [m + h for m, h in zip(mean, c["ci95"], strict=True)]
                ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.15, linewidth=0)
        ax.set(title=f"{metric} ({_arrow(metric)})", xlabel=data["x_label"], ylabel=data["y_label"])
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        save(fig, f"curve_{metric}")


def _randomization_plot(ev: Evaluation, figure: Callable[..., Any], save: Save) -> None:
    rnd = ev.sanity.get("randomization")
    if not rnd:
        return
    fig = figure(figsize=(max(5.5, 0.45 * max(len(v["stages"]) for v in rnd.values()) + 2), 4))
    ax = fig.add_subplot()
    for label, v in rnd.items():
        ax.plot(range(len(v["mean"])), v["mean"], marker="o", label=label)
    stages = next(iter(rnd.values()))["stages"]
    ax.set_xticks(range(len(stages)), stages, rotation=60, ha="right", fontsize=7)
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.set(title="cascading randomization (low is good)", xlabel="re-drawn down to",
           ylabel="Spearman with the clean map")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    save(fig, "sanity_randomization")


def _perturbation_plot(ev: Evaluation, figure: Callable[..., Any], save: Save) -> None:
    pert = ev.sanity.get("perturbation")
    if not pert:
        return
    fig = figure(figsize=(5.5, 4))
    ax = fig.add_subplot()
    for label, v in pert.items():
        t = [100 * s for s in v["t"]]
        line = ax.plot(t, v["similarity"]["mean"], marker="o", label=f"{label}: map similarity")[0]
        ax.plot(t, v["probability"]["mean"], linestyle="--", color=line.get_color(),
                label=f"{label}: class probability")
    ax.set(title="model perturbation (map should follow the probability)", xlabel="weight noise (% of std)",
           ylabel="Spearman with clean map / probability")
    ax.set_xscale("symlog", linthresh=1)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    save(fig, "sanity_perturbation")


def _bar_plots(ev: Evaluation, figure: Callable[..., Any], save: Save) -> None:
    """bar_<metric>: every method's mean with its 95 % CI."""
    for metric in ev.metrics + list(ev.sanity):
        labels, means, errs = [], [], []
        for label, per in ev.summary.items():
            s = per.get(metric) or {}
            if s.get("mean") is None:
                continue
            labels.append(label)
            means.append(s["mean"])
            errs.append(s["ci95"] or 0.0)
        if not labels:
            continue
        fig = figure(figsize=(max(4.0, 0.9 * len(labels) + 2), 3.6))
        ax = fig.add_subplot()
        ax.bar(range(len(labels)), means, yerr=errs, capsize=4, color="tab:blue", alpha=0.8)
        ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
        ax.set(title=f"{metric} ({_arrow(metric)}); bars: 95 % CI", ylabel=metric)
        ax.grid(axis="y", alpha=0.3)
        save(fig, f"bar_{metric}")
