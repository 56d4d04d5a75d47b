"""Reports of an evaluation: evaluation.json, evaluation.csv and PNG plots (matplotlib, Agg backend).

- evaluation.json: `{"images": [{"image", "method", "metrics": {...}, ...}], "summary": {method: {metric:
  {"mean", "ci95", "n"}}}, "curves": ..., "randomization": ..., "perturbation": ..., ...}`
- evaluation.csv: one row per image and method (kind `image`), then per method one row of means (kind
  `mean`) and one of 95 % CI half-widths (kind `ci95`).
- evaluation_plots/: `curve_<metric>.png` (deletion, insertion, aupc: mean curve per method with its 95 %
  band), `sanity_randomization.png`, `sanity_perturbation.png`, `bar_<metric>.png` (method means, CI bars).

Every file is written to a temporary name and renamed.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from saliency_cli.writers import write_bytes

if TYPE_CHECKING:
    from saliency_cli.evaluate.run import Evaluation

PLOT_DIR = "evaluation_plots"
CURVE_PLOTS = ("deletion", "insertion", "aupc")


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


def finite(value: Any) -> Any:
    """A copy of nested lists/dicts with NaN and infinities as None (JSON has no NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value


def _num(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def write_reports(ev: Evaluation, out: Path, *, plots: bool = True) -> dict[str, str]:
    """Write the JSON, the CSV and (with `plots`) the PNGs under `out`; returns {what: path}."""
    files: dict[str, str] = {}
    path = out / "evaluation.json"
    write_bytes(path, json.dumps(finite(ev.to_json()), indent=2, default=str, allow_nan=False).encode())
    files["json"] = str(path)
    path = out / "evaluation.csv"
    write_bytes(path, csv_text(ev).encode())
    files["csv"] = str(path)
    if plots:
        for name, p in write_plots(ev, out / PLOT_DIR).items():
            files[name] = p
    return files


def _figure_bytes(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


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

    for metric in CURVE_PLOTS:
        data = ev.curves.get(metric)
        if not data:
            continue
        fig = Figure(figsize=(5.5, 4))
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
        arrow = "higher is better" if _higher(ev, metric) else "lower is better"
        ax.set(title=f"{metric} ({arrow})", xlabel=data["x_label"], ylabel=data["y_label"])
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        save(fig, f"curve_{metric}")

    rnd = ev.sanity.get("randomization")
    if rnd:
        fig = Figure(figsize=(max(5.5, 0.45 * max(len(v["stages"]) for v in rnd.values()) + 2), 4))
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

    pert = ev.sanity.get("perturbation")
    if pert:
        fig = Figure(figsize=(5.5, 4))
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
        fig = Figure(figsize=(max(4.0, 0.9 * len(labels) + 2), 3.6))
        ax = fig.add_subplot()
        ax.bar(range(len(labels)), means, yerr=errs, capsize=4, color="tab:blue", alpha=0.8)
        ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
        arrow = "higher is better" if _higher(ev, metric) else "lower is better"
        ax.set(title=f"{metric} ({arrow}); bars: 95 % CI", ylabel=metric)
        ax.grid(axis="y", alpha=0.3)
        save(fig, f"bar_{metric}")
    return written


def _higher(ev: Evaluation, metric: str) -> bool:
    from saliency_cli.evaluate.run import higher_is_better

    return higher_is_better(metric)
