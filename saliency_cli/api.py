"""The Python face of saliency: what the commands call, usable without the command line.

    from saliency_cli.api import ExplainOptions, explain
    info = explain(ExplainOptions(inputs=["photos/"], methods=["fusiongrad"], out=Path("out")))

explain() and evaluate() run the engines in pipeline/; list_methods(), list_metrics() and describe_model()
give what `saliency methods`, `saliency evaluate --list-metrics` and `saliency info` show.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import IO, TYPE_CHECKING, Any

from saliency_cli.pipeline.plan import ExplainOptions

if TYPE_CHECKING:
    from saliency_cli.pipeline.evaluate import EvaluateOptions, Evaluation

__all__ = ["EvaluateOptions", "Evaluation", "ExplainOptions", "describe_model", "evaluate", "explain",
           "list_methods", "list_metrics", "versions"]


def __getattr__(name: str) -> Any:
    """EvaluateOptions and Evaluation, imported on first use (they bring torch)."""
    if name in ("EvaluateOptions", "Evaluation"):
        from saliency_cli.pipeline import evaluate as engine

        return getattr(engine, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def explain(opts: ExplainOptions, on_record: Callable[[dict[str, Any]], None] | None = None,
            on_start: Callable[[int], None] | None = None, echo: IO[str] | None = None,
            on_warning: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run `saliency explain`; returns run.json's content (with `counts`). Warnings (options no chosen method
    uses) go to `on_warning` before anything is loaded."""
    from saliency_cli.pipeline.explain import ExplainRun

    run = ExplainRun(opts, on_record=on_record, on_start=on_start, echo=echo)
    for warning in run.warnings:
        if on_warning is not None:
            on_warning(warning)
    return run.run()


def evaluate(opts: EvaluateOptions, on_progress: Callable[[int, int], None] | None = None) -> Evaluation:
    """Run `saliency evaluate`: score the maps of explain runs, write evaluation.json/.csv and plots."""
    from saliency_cli.pipeline.evaluate import evaluate_runs

    return evaluate_runs(opts, on_progress)


def list_methods() -> list[dict[str, Any]]:
    """Every registered method: summary, paper, defaults, settings rows, cost per image (and with --cheap)."""
    from saliency_cli.methods import METHODS

    return [{"name": m.name, "summary": m.summary, "paper": m.paper, "defaults": m.defaults,
             "settings": {s.name: s.describe() for s in m.settings},
             "stochastic": m.stochastic, "cost": m.cost(m.defaults), "reduce": m.reduce,
             "needs_gradients": m.needs_gradients, "cheap": m.cheap,
             "cheap_cost": m.cost({**m.defaults, **m.cheap}) if m.cheap else None}
            for m in METHODS.values()]


def list_metrics() -> list[dict[str, Any]]:
    """Every metric and sanity check with its direction, cost and paper."""
    from saliency_cli.metrics import metric_rows

    return metric_rows()


def versions() -> dict[str, str]:
    from saliency_cli.pipeline.explain import versions as run_versions

    return run_versions()


def describe_model(model: str = "default", *, checkpoint: str | None = None, device: str = "auto",
                   overrides: dict[str, Any] | None = None, labels_file: str | None = None) -> dict[str, Any]:
    """The resolved model (`saliency info`): source, data config, class count, labels, parameters, device."""
    import torch

    from saliency_cli.models import attach_default_labels, load_model, resolve_device

    dev = resolve_device(device)
    loaded = load_model(model, checkpoint=checkpoint, device=dev, labels_file=labels_file, overrides=overrides)
    c, h, w = loaded.data_config["input_size"]
    with torch.no_grad():
        num_classes = loaded.module(torch.zeros(1, c, h, w, device=dev)).shape[-1]
    attach_default_labels(loaded, num_classes)
    parameters = sum(p.numel() for p in loaded.module.parameters())
    return {"model": loaded.source, "data_config": loaded.data_config, "num_classes": num_classes,
            "labels": "yes" if loaded.labels else "no", "parameters": parameters,
            "device": str(dev), "versions": versions()}
