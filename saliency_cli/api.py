"""The Python face of saliency: what the commands call, usable without the command line.

    from saliency_cli.api import ExplainOptions, explain
    info = explain(ExplainOptions(inputs=["photos/"], methods=["fusiongrad"], out=Path("out")))
    maps = attribute(model, x, method="smoothgrad", samples=50)  # an nn.Module and a (B, C, H, W) tensor

explain() and evaluate() run the engines in pipeline/; attribute() explains tensors in memory (also as
`saliency_cli.attribute`); list_methods(), list_metrics() and describe_model() give what `saliency methods`,
`saliency evaluate --list-metrics` and `saliency info` show.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from saliency_cli.pipeline.plan import ExplainOptions

if TYPE_CHECKING:
    import torch

    from saliency_cli.models import LoadedModel
    from saliency_cli.pipeline.evaluate import EvaluateOptions, Evaluation

__all__ = ["EvaluateOptions", "Evaluation", "ExplainOptions", "attribute", "compare", "describe_model", "evaluate",
           "explain", "list_methods", "list_metrics", "report", "versions"]


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
    uses) go to `on_warning` before anything is loaded.

    `opts.model` may also be an in-memory `nn.Module` or `LoadedModel`: it is used where it is (device `auto`
    takes its device) and left unchanged; a plain module needs `opts.data_overrides` with input_size, mean and
    std (a timm model brings its own). run.json then records `{"kind": "module", "name", "sha256"}`, the sha256
    of its state dict, so changed weights redo the work."""
    from dataclasses import replace

    from saliency_cli.pipeline.explain import ExplainRun
    from saliency_cli.pipeline.tensors import InMemory

    if not isinstance(opts.model, (str, InMemory)):
        opts = replace(opts, model=InMemory(opts.model))  # never deep-copied into run.json's options
    run = ExplainRun(opts, on_record=on_record, on_start=on_start, echo=echo, on_warning=on_warning)
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
                   overrides: dict[str, Any] | None = None, labels_file: str | None = None,
                   options: dict[str, Any] | None = None) -> dict[str, Any]:
    """The resolved model (`saliency info`): source, data config, class count, labels, parameters, device.
    options: the model options of `load_model` (num_classes, in_chans, img_size, model_kwargs, weights)."""
    from saliency_cli.models import attach_default_labels, load_model, resolve_device
    from saliency_cli.models import num_classes as class_count

    dev = resolve_device(device)
    loaded = load_model(model, checkpoint=checkpoint, device=dev, labels_file=labels_file, overrides=overrides,
                        options=options)
    num_classes = class_count(loaded)
    attach_default_labels(loaded, num_classes)
    parameters = sum(p.numel() for p in loaded.module.parameters())
    described = {"model": loaded.source, "data_config": loaded.data_config, "num_classes": num_classes,
                 "labels": "yes" if loaded.labels else "no", "parameters": parameters,
                 "device": str(dev), "versions": versions()}
    if loaded.data_config.get("crop_mode") == "processor":
        from saliency_cli.models import describe_processor

        described["preprocessing"] = describe_processor(loaded.data_config)
    return described


def data_config_from(processor: Any) -> dict[str, Any]:
    """The data config of a Hugging Face image processor (e.g. `AutoImageProcessor.from_pretrained(folder)`), for
    `attribute(model, x, data_config=...)` and `explain(model=..., data_overrides=...)`: its input size and the
    mean and std of its pixel mapping; `data.preprocess` with it runs the processor's PIL backend itself."""
    from saliency_cli.models import data_config_from as from_processor

    return from_processor(processor)


def attribute(model: torch.nn.Module | LoadedModel, x: torch.Tensor, method: str = "fusiongrad",
              target: int | Sequence[int] | torch.Tensor | None = None, seed: int = 0, batch_size: int | None = None,
              *, image_seeds: Sequence[int] | torch.Tensor | None = None, data_config: dict[str, Any] | None = None,
              bounds: Any = None, score: str = "logit", precision: str = "fp32", fast: bool = True,
              return_stats: bool = False,
              **settings: Any) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Attribution maps of a batch of images in memory, as `saliency explain` computes them.

    model: an `nn.Module` (outputs: logits, or a tuple/dict holding them) or a LoadedModel, on any device; it
    runs there, in eval mode, and is left exactly as it was (mode, requires_grad flags, weights). x: (B, C, H, W)
    images normalised as the model expects, on any device. method: a registered method (`saliency methods`).
    target: None (each image's top-1 class), a class index, or one index per image. seed: the run seed (the
    noisy models of noisegrad/fusiongrad; each image's generator seed derives from it and the image's values).
    image_seeds: one generator seed per image instead, e.g. the command line's for an image file,
    `data.image_seed(seed, sha256 of the file)`. batch_size: most inputs per forward/backward (None: the
    device's default, halved on out-of-memory). data_config or bounds: the valid input range, needed for a plain
    module (a timm model and a LoadedModel carry their data config): `{"mean": ..., "std": ...}` per channel, or
    `(lo, hi)` in normalised units. settings: the method's hyper-parameters by name (`samples=50`,
    `noise=0.15`, `weight_noise="auto"`, ...), checked as the command line checks them; weight noise `auto`
    is calibrated on each image alone (stats["weight_noise"] gives each image's s). score, precision and fast
    are explain's --score, --precision and --fast (passes on a private copy with BatchNorm folded: the module's
    maps within float32 rounding).

    Returns the raw, signed maps (B, C, H, W) float32 on x's device (no channel reduction), and with
    `return_stats` also the per-image stats (each (B,)) that the manifest records.
    """
    from saliency_cli.pipeline.tensors import attribute_tensors

    result = attribute_tensors(model, x, method, target=target, seed=seed, image_seeds=image_seeds,
                               batch_size=batch_size, score=score, precision=precision, data_config=data_config,
                               bounds=bounds, fast=fast, settings=settings)
    return (result.maps, result.stats) if return_stats else result.maps


def report(runs: list[Path], *, out: Path | None = None, comparison: Path | None = None, page_size: int = 50,
           thumb_size: int = 160, link: bool = False, on_progress: Callable[[int, int], None] | None = None,
           images: Path | None = None) -> Any:
    """Run `saliency report`: write out/index.html (default: the first run folder) and out/thumbs/ over explain
    run folders, with copies under out/files/ of the linked files that lie outside `out` (`link`: link them
    where they are instead); returns a pipeline.report.Report (the page's path, row, thumbnail and error
    counts)."""
    from saliency_cli.pipeline.report import ReportOptions, build_report

    opts = ReportOptions(runs=list(runs), out=out, comparison=comparison, page_size=page_size, thumb_size=thumb_size,
                         link=link, images=images)
    return build_report(opts, on_progress)


def compare(run_a: Path, run_b: Path, *, out: Path | None = None, fail_under: dict[str, float] | None = None,
            strips: int = 5, pool: int = 56, top: float = 0.1,
            on_progress: Callable[[int, int], None] | None = None) -> Any:
    """Run `saliency compare`: per shared image and method, the Spearman correlation and top-region IoU of two
    runs' maps; writes comparison.json, .csv and strips to out (default: run_b); returns a
    pipeline.compare.Comparison (pairs sorted most changed first, gate failures)."""
    from saliency_cli.pipeline.compare import CompareOptions, compare_runs

    opts = CompareOptions(run_a=run_a, run_b=run_b, out=out, fail_under=dict(fail_under or {}), strips=strips,
                          pool=pool, top=top)
    return compare_runs(opts, on_progress)


def merge(folder: Path) -> dict[str, Any]:
    """`saliency merge`: one manifest.jsonl and run.json from the parts a sharded run wrote (idempotent)."""
    from saliency_cli.runfolder.parts import merge_folder

    return merge_folder(Path(folder))
