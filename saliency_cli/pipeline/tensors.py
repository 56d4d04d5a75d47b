"""Tensors in, maps out (`saliency_cli.attribute`), and what `explain` shares with it: models given in memory
and the oracle and device rules.

`attribute_tensors` runs one registered method as `saliency explain` does: the same validation and defaults
(plan.make_jobs), the same oracle and chunking, one generator per image, the same context (a method resolves
its `auto` settings, e.g. weight noise, on each image itself). So a deterministic method gives the command
line's map for the same preprocessed image, and a stochastic one does too when given the generator seed the
command line derived for the image, `data.image_seed(run seed, sha256 of the file's bytes)` (run.json's
`options.seed`, the manifest's `sha256`).
"""

from __future__ import annotations

import hashlib
import operator
from collections.abc import Sequence
from typing import Any

import torch

from saliency_cli.data import InputRange, image_seed, input_bounds
from saliency_cli.errors import UsageError
from saliency_cli.methods import METHODS
from saliency_cli.methods.base import Attribution, MethodContext
from saliency_cli.metrics import score_maps
from saliency_cli.models import (
    LoadedModel,
    LogitsOnly,
    in_memory_model,
    load_model,
    module_data_config,
    module_probability,
    resolve_device,
)
from saliency_cli.numerics import seeded_generator
from saliency_cli.oracle import GradientOracle, checked_fast_copy, default_batch_size
from saliency_cli.pipeline.plan import ExplainOptions, Job, make_jobs, validate


class InMemory:
    """A model object carried in ExplainOptions.model. `dataclasses.asdict` (run.json's options) deep-copies
    every field, which would copy the whole model: this wrapper copies as itself and prints as the model's name."""

    def __init__(self, model: torch.nn.Module | LoadedModel) -> None:
        self.model = model

    def __deepcopy__(self, memo: dict[int, Any]) -> InMemory:
        return self

    def __repr__(self) -> str:
        inner = self.model.module if isinstance(self.model, LoadedModel) else self.model
        return f"<in-memory {type(inner).__name__}>"


def _given(model: Any) -> Any:
    return model.model if isinstance(model, InMemory) else model


def _module_device(module: torch.nn.Module) -> torch.device | None:
    for t in module.parameters():
        return t.device
    for b in module.buffers():
        return b.device
    return None


def _same_device(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def run_device(opts: ExplainOptions, local_rank: int | None = None) -> torch.device:
    """The device of a run: `opts.device` resolved, or for an in-memory model the device it is on (it is never
    moved; `auto` takes its device, anything else must name it). Under a launcher (torchrun, Slurm) `auto`
    means the GPU of the process's local rank, `cuda:LOCAL_RANK`, when there are GPUs."""
    model = _given(opts.model)
    if isinstance(model, str):
        if opts.device == "auto" and local_rank is not None and torch.cuda.is_available():
            return torch.device(f"cuda:{local_rank % torch.cuda.device_count()}")
        return resolve_device(opts.device)
    module = model.module if isinstance(model, LoadedModel) else model
    own = _module_device(module) if isinstance(module, torch.nn.Module) else None
    if own is None:
        return resolve_device(opts.device)
    if opts.device != "auto" and not _same_device(resolve_device(opts.device), own):
        raise UsageError(f"device {opts.device!r}: the in-memory model is on {own}; move it there first (it is "
                         "never moved for you) or leave device 'auto'")
    return own


def load_run_model(opts: ExplainOptions, device: torch.device) -> LoadedModel:
    """The run's model: `load_model` for a model spec (once per run: its files are hashed here), or an in-memory
    nn.Module / LoadedModel as it is (models.in_memory_model; `opts.data_overrides` completes its data config)."""
    model = _given(opts.model)
    if isinstance(model, str):
        return load_model(model, checkpoint=opts.checkpoint, device=device, overrides=opts.data_overrides,
                          labels_file=opts.labels_file, options=opts.model_options)
    given = [name for name, value in (("checkpoint", opts.checkpoint), ("model_options", opts.model_options))
             if value]
    if given:
        raise UsageError(f"{' and '.join(given)} go with a model name, not an in-memory model")
    return in_memory_model(model, data_config=opts.data_overrides, labels_file=opts.labels_file,
                           how="give ExplainOptions(data_overrides={'input_size': ..., 'mean': ..., 'std': ...})")


# -- attribute ----------------------------------------------------------------------------------------------
def tensor_digest(x: torch.Tensor) -> str:
    """The sha256 of one image tensor's shape and float32 bytes: what an in-memory image's noise derives from."""
    t = x.detach().to("cpu", torch.float32).contiguous()
    return hashlib.sha256(f"{tuple(t.shape)}:".encode() + t.numpy().tobytes()).hexdigest()


def method_job(method: str, settings: dict[str, Any], *, seed: int, batch_size: int | None, score: str,
               precision: str) -> Job:
    """The job of one method at `settings` (defaults for the rest), checked as `saliency explain` checks them:
    each value against its row of the settings table; a name the method does not take is a UsageError listing
    the ones it does."""
    if method not in METHODS:
        raise UsageError(f"method {method!r} is not a method (one of {', '.join(sorted(METHODS))})")
    m = METHODS[method]
    unknown = sorted(set(settings) - set(m.defaults))
    if unknown:
        raise UsageError(f"{method} has no setting {', '.join(unknown)}; its settings: "
                         f"{', '.join(m.defaults) or 'none'}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise UsageError(f"seed must be a whole number, not {seed!r}")
    noise = settings.get("noise")
    levels = None if noise is None else list(noise) if isinstance(noise, (list, tuple)) else [noise]
    if levels is not None and len(levels) != 1:
        raise UsageError("noise: one level per call (a sweep is one call per level)")
    opts = ExplainOptions(inputs=[], methods=[method], noise=levels, seed=seed, batch_size=batch_size, score=score,
                          precision=precision, hyper={k: v for k, v in settings.items() if k != "noise"})
    validate(opts, METHODS)
    (job,) = make_jobs(opts, METHODS)
    return job


def _as_range(bounds: Any, channels: int) -> InputRange:
    """`bounds` as an InputRange: one already, or (lo, hi) with a number or one value per channel each."""
    if isinstance(bounds, InputRange):
        return bounds
    try:
        lo, hi = (torch.as_tensor(b, dtype=torch.float32).reshape(-1, 1, 1) for b in bounds)
    except (TypeError, ValueError, RuntimeError):
        raise UsageError("bounds: expected (lo, hi), each a number or one number per channel") from None
    if lo.shape[0] not in (1, channels) or hi.shape[0] not in (1, channels) or not bool((lo < hi).all()):
        raise UsageError(f"bounds: expected lo < hi, each a number or {channels} numbers (one per channel)")
    return InputRange(lo.expand(channels, 1, 1).clone(), hi.expand(channels, 1, 1).clone())


def _model_and_range(model: Any, x: torch.Tensor, data_config: dict[str, Any] | None,
                     bounds: Any) -> tuple[torch.nn.Module, InputRange]:
    """The module to run (outputs reduced to logits) and the valid range of the normalised input: `bounds`, or
    the mean and std of `data_config`, of a LoadedModel's data config or of a timm model's own."""
    if data_config is not None and bounds is not None:
        raise UsageError("give data_config or bounds, not both")
    cfg: dict[str, Any] | None
    if isinstance(model, LoadedModel):
        module, cfg = model.module, model.data_config
    elif isinstance(model, torch.nn.Module):
        module, cfg = LogitsOnly(model), module_data_config(model)
    else:
        raise UsageError(f"model: expected an nn.Module or a LoadedModel, not {type(model).__name__}")
    c = x.shape[1]
    if bounds is not None:
        return module, _as_range(bounds, c)
    cfg = data_config if data_config is not None else cfg
    if cfg is None:
        raise UsageError(f"the {type(model).__name__} carries no preprocessing, and methods need the valid range of "
                         "its input: give data_config={'mean': ..., 'std': ...} (per channel, as the model was "
                         "trained) or bounds=(lo, hi) in normalised units")
    if "mean" not in cfg or "std" not in cfg:
        raise UsageError("data_config: give at least mean and std (per channel)")
    mean, std = (tuple(float(v) for v in (cfg[k] if isinstance(cfg[k], (list, tuple)) else [cfg[k]]))
                 for k in ("mean", "std"))
    if len(mean) not in (1, c) or len(std) not in (1, c) or min(std) <= 0:
        raise UsageError(f"data_config: mean and std need 1 or {c} values (x has {c} channels), std positive")
    return module, _as_range(input_bounds({"mean": mean, "std": std}), c)


def _targets(target: Any, oracle: GradientOracle, x: torch.Tensor, module: torch.nn.Module) -> torch.Tensor:
    """(B,) class indices: the top-1 class of each image (None; as explain's `pred`), one class for all, or one
    per image; checked against the model's class count."""
    b = x.shape[0]
    if target is None:
        return oracle.logits(x).softmax(1).argmax(1)
    t = torch.as_tensor(target)
    if t.dtype in (torch.bool, torch.float16, torch.bfloat16, torch.float32, torch.float64) or t.ndim > 1:
        raise UsageError(f"target: expected None, a class index or {b} class indices, not {target!r}")
    t = t.to(device=x.device, dtype=torch.long).expand(b) if t.ndim == 0 else t.to(x.device, torch.long)
    if t.shape != (b,):
        raise UsageError(f"target: {t.shape[0]} class indices for {b} images")
    inner = module.model if isinstance(module, LogitsOnly) else module
    k = getattr(inner, "num_classes", None)
    if not isinstance(k, int) or k < 1:
        k = int(oracle.logits(x[:1]).shape[1])
    if int(t.min()) < 0 or int(t.max()) >= k:
        raise UsageError(f"target: class indices go from 0 to {k - 1} for this model")
    return t


def _image_seeds(image_seeds: Any, seed: int, x: torch.Tensor) -> list[int]:
    """One generator seed per image: those given, or each derived from the run seed and the image's values."""
    b = x.shape[0]
    if image_seeds is None:
        return [image_seed(seed, tensor_digest(x[i])) for i in range(b)]
    given = image_seeds.tolist() if isinstance(image_seeds, torch.Tensor) else list(image_seeds)
    try:
        seeds = [operator.index(s) for s in given if not isinstance(s, bool)]
    except TypeError:
        seeds = []
    if len(seeds) != b or len(given) != b:
        raise UsageError(f"image_seeds: expected {b} whole numbers (one per image), got {len(given)} values")
    return seeds


def _oracle(module: torch.nn.Module, x: torch.Tensor, *, batch_size: int | None, score: str, precision: str,
            fast: bool, probability: str = "softmax") -> GradientOracle:
    """The oracle as `saliency explain` builds it: with `fast`, passes on a private copy with BatchNorm folded
    (oracle.fast_copy, checked on the same two seeded random inputs of the input size as explain's)."""
    device = x.device
    copy = None
    if fast:
        copy, _ = checked_fast_copy(module, device, tuple(x.shape[1:]))
    return GradientOracle(module, batch_size=batch_size or default_batch_size(device), score=score,
                          precision=precision, auto_backoff=batch_size is None, fast=copy, probability=probability)


def attribute_tensors(model: torch.nn.Module | LoadedModel, x: torch.Tensor, method: str = "fusiongrad", *,
                      target: Any = None, seed: int = 0, image_seeds: Sequence[int] | torch.Tensor | None = None,
                      batch_size: int | None = None, score: str = "logit", precision: str = "fp32",
                      data_config: dict[str, Any] | None = None, bounds: Any = None, fast: bool = True,
                      settings: dict[str, Any] | None = None) -> Attribution:
    """The raw maps (B, C, H, W) float32 and per-image stats of `method` for the images `x` (B, C, H, W),
    normalised as the model expects, both on x's device. The model runs on its own device and is left as it was
    (modes, flags and weights restored). See `api.attribute` for the arguments."""
    job = method_job(method, {k: v for k, v in (settings or {}).items() if v is not None}, seed=seed,
                     batch_size=batch_size, score=score, precision=precision)
    if not isinstance(x, torch.Tensor) or x.ndim != 4 or not x.is_floating_point() or 0 in x.shape:
        raise UsageError("x: expected a non-empty float tensor of images (B, C, H, W)")
    module, input_range = _model_and_range(model, x, data_config, bounds)
    device = _module_device(module) or x.device
    if precision == "fp16" and device.type == "cpu":
        raise UsageError("precision fp16 needs a GPU; use bf16 or fp32 on the CPU")
    xd = x.detach().to(device=device, dtype=torch.float32)
    oracle = _oracle(module, xd, batch_size=batch_size, score=score, precision=precision, fast=fast,
                     probability=module_probability(model))
    input_range = input_range.to(device)
    ctx = MethodContext(input_range, seed=seed,
                        scorer=lambda metric, o, xs, t, maps: score_maps(metric, o, xs, t, maps, input_range))
    targets = _targets(target, oracle, xd, module)
    generators = [seeded_generator(s, device) for s in _image_seeds(image_seeds, seed, xd)]
    result = job.method.fn(oracle, xd, targets, generators=generators, ctx=ctx, **job.hyper)
    return Attribution(result.maps.float().to(x.device), {k: v.to(x.device) for k, v in result.stats.items()})
