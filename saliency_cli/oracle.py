"""The gradient oracle: the only place in saliency that calls autograd or writes a model's parameters.

Every method asks it for `d score_y / d x` of many inputs at once. It runs the model in eval mode with the
parameters' `requires_grad` switched off (restored afterwards), pushes the inputs through in chunks of at most
`batch_size`, and gets all input gradients of a chunk from one backward pass of the summed target scores. That
is exact because, in eval mode, the samples of a batch do not interact.

The passes may run on a private fast copy of the model (`fast_copy`): every eval-mode BatchNorm that follows a
convolution folded into it, channels_last where the device gains. It shares all other tensors with the model,
never writes them, and refolds from the model's current values whenever they change, so parameter edits (weight
noise, randomisation checks) keep their exact noise model. On the CPU it halves the cost of a pass of the bundled
model (benchmarks/bench_floor.py), with gradients on average as close to an fp64 reference as the model's own
(README: Speed).
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import chain
from typing import Any, cast

import torch

from saliency_cli.errors import first_line

SCORES = ("logit", "prob", "logprob")


@contextlib.contextmanager
def frozen(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode and `requires_grad=False` on every parameter for the duration; both restored after."""
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    modules = list(model.modules())
    modes = [m.training for m in modules]  # per module: a model may mix train and eval submodules
    try:
        for p in params:
            p.requires_grad_(False)
        model.eval()
        yield
    finally:
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)
        for m, mode in zip(modules, modes, strict=True):
            m.training = mode


def _is_oom(error: BaseException) -> bool:
    kinds = tuple(k for k in (getattr(torch, "OutOfMemoryError", None), getattr(torch.cuda, "OutOfMemoryError", None))
                  if isinstance(k, type))
    return isinstance(error, kinds) or "out of memory" in str(error).lower()


def default_batch_size(device: torch.device) -> int:
    """Inputs per forward/backward when `--batch-size auto`. On a 2-core CPU, chunks of at most 16 images of
    224 px ran fastest per sample (36 ms, against 40 at 8 and 52 at 50; benchmarks/bench_explain.py); GPUs start
    large and back off on OOM."""
    return {"cpu": 16, "mps": 16}.get(device.type, 64)


def channels_last_gains(device: torch.device) -> bool:
    """Whether the fast copy runs channels_last on this kind of device. Measured on the CPU (2 cores, oneDNN,
    bundled model, 16 inputs of 224 px: folded + channels_last took 0.72x the time of folded NCHW and 0.46x
    that of the plain model; benchmarks/bench_floor.py); on CUDA it is cuDNN's preferred layout for
    convolutions with tensor cores (benchmarks/bench_gpu.py measures it); MPS is not measured: off there."""
    return device.type in ("cpu", "cuda")


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`x` on `device`. To a CUDA device the copy goes through pinned memory and does not block the host (the
    caching host allocator keeps the pinned block alive until the copy is done); elsewhere it is `x.to(device)`,
    which returns x itself when it is already there."""
    if device.type == "cuda" and x.device.type == "cpu":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


# -- a private fast copy: eval-mode BatchNorm folded into the convolution before it -----------------------------
FOLD_CHECK_TOLERANCE = 1e-3  # largest relative difference of the copy's logits from the model's, else no fold


def _conv_types() -> tuple[type, ...]:
    """Convolutions whose output is linear in (weight, bias), so a per-channel scale folds into them exactly."""
    kinds: list[type] = [torch.nn.Conv2d]
    with contextlib.suppress(ImportError):
        from timm.layers.conv2d_same import Conv2dSame, Conv2dSameExport

        kinds += [Conv2dSame, Conv2dSameExport]
    return tuple(kinds)


def _bn_types() -> tuple[type, ...]:
    kinds: list[type] = [torch.nn.BatchNorm2d]
    with contextlib.suppress(ImportError):
        from timm.layers import BatchNormAct2d

        kinds.append(BatchNormAct2d)
    return tuple(kinds)


def _traced(module: torch.nn.Module) -> Any:
    """torch.fx graph of `module` with convolutions, BatchNorms and timm's own no-trace modules as leaves."""
    import torch.fx

    leaves: tuple[type, ...] = _conv_types() + _bn_types()
    wrapped: tuple[Callable[..., Any], ...] = ()
    with contextlib.suppress(ImportError):
        from timm.layers import _fx  # timm's own leaf modules and untraceable functions

        leaves += tuple(_fx.get_notrace_modules())
        wrapped = tuple(f for f in _fx.get_notrace_functions() if callable(f))

    class Tracer(torch.fx.Tracer):
        def is_leaf_module(self, m: torch.nn.Module, qualname: str) -> bool:
            return isinstance(m, leaves) or super().is_leaf_module(m, qualname)

    return Tracer(autowrap_functions=wrapped).trace(module)


def _pairs_in_graph(module: torch.nn.Module) -> list[tuple[str, str]]:
    import torch.fx

    convs, bns = _conv_types(), _bn_types()
    calls = [n for n in _traced(module).nodes if n.op == "call_module"]
    counts: dict[str, int] = {}
    for n in calls:
        counts[str(n.target)] = counts.get(str(n.target), 0) + 1
    pairs = []
    for n in calls:
        src = n.args[0] if n.args else None
        if type(module.get_submodule(str(n.target))) not in bns or len(n.args) != 1 or n.kwargs:
            continue
        if not isinstance(src, torch.fx.Node) or src.op != "call_module":
            continue
        if type(module.get_submodule(str(src.target))) not in convs:
            continue
        if len(src.users) == 1 and counts[str(n.target)] == 1 and counts[str(src.target)] == 1:
            pairs.append((str(src.target), str(n.target)))
    return pairs


def _foldable_pairs(module: torch.nn.Module, prefix: str = "") -> list[tuple[str, str]]:
    """(conv name, BatchNorm name) pairs where the BatchNorm's only input is the convolution's output and that
    output has no other use, each module called once: found on a torch.fx trace with both kinds as leaves.
    Exact types only (a weight-standardising Conv2d subclass, say, must not be folded). A module fx cannot
    trace (a wrapper that inspects its outputs, data-dependent control flow) is searched child by child."""
    try:
        return [(prefix + c, prefix + b) for c, b in _pairs_in_graph(module)]
    except Exception:  # noqa: BLE001 - fx raises many kinds of errors on code it cannot trace
        if isinstance(module, _conv_types() + _bn_types()):
            return []
        return [pair for name, child in module.named_children()
                for pair in _foldable_pairs(child, f"{prefix}{name}.")]


class _AfterFold(torch.nn.Module):
    """What is left of a BatchNorm once folded: nothing (Identity) or, for timm's BatchNormAct2d, its drop and
    activation."""

    def __init__(self, bn: torch.nn.Module) -> None:
        super().__init__()
        self.drop = getattr(bn, "drop", torch.nn.Identity())
        self.act = getattr(bn, "act", torch.nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(x))


@dataclass
class _Fold:
    """One folded (conv, BatchNorm) pair: the private conv of the copy and the model's own modules, whose current
    tensors are the source of its weight and bias."""

    conv: torch.nn.Conv2d
    src_conv: torch.nn.Conv2d
    src_bn: torch.nn.BatchNorm2d
    stamp: tuple[tuple[int, int], ...] = ()

    def sources(self) -> list[torch.Tensor | None]:
        bn = self.src_bn
        return [self.src_conv.weight, self.src_conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var]

    def current(self) -> tuple[tuple[int, int], ...]:
        return tuple((id(t), t._version) for t in self.sources() if t is not None)

    def refold(self) -> None:
        """weight = W * s, bias = (b - mean) * s + beta with s = gamma / sqrt(var + eps), per output channel, from
        the model's current values, written in place. The per-channel vectors are computed in float64 (float32
        on MPS); the weight is one multiplication in its own dtype (one rounding more than an fp64 product, and
        a third of its time: 8 ms against 25 ms for the bundled model's 49 pairs on the CPU)."""
        w, b, gamma, beta, mean, var = self.sources()
        assert w is not None and mean is not None and var is not None
        wide = torch.float32 if w.device.type == "mps" else torch.float64
        with torch.no_grad():
            scale = torch.rsqrt(var.to(wide) + self.src_bn.eps)
            if gamma is not None:
                scale = scale * gamma.to(wide)
            shift = -mean.to(wide) * scale if b is None else (b.to(wide) - mean.to(wide)) * scale
            if beta is not None:
                shift = shift + beta.to(wide)
            assert self.conv.bias is not None  # made by _fold_into
            torch.mul(w, scale.to(w.dtype).view(-1, *([1] * (w.dim() - 1))), out=self.conv.weight)
            self.conv.bias.copy_(shift)
        self.stamp = self.current()


class FastModel:
    """A private copy of a model for the oracle's passes: eval mode, every eval-mode BatchNorm that follows a
    convolution folded into it (an exact affine map: the same function up to float32 rounding), optionally
    channels_last. It shares every other parameter and buffer with the model (only the folded convolutions'
    weights are its own, and edits of the model are seen at once); the folded weights are recomputed from the
    model's tensors whenever one of them changed (`sync`, called before every pass), so weight-noise edits stay
    exact. The model object itself is never modified."""

    def __init__(self, module: torch.nn.Module, folds: list[_Fold], channels_last: bool) -> None:
        self.module = module
        self.folds = folds
        self.channels_last = channels_last

    def sync(self, force: bool = False) -> None:
        """Refold every pair whose source tensors changed (in-place writes bump a tensor's version), or every
        pair with `force` (while parameters are being edited: a write through `.data` bumps no version)."""
        for fold in self.folds:
            if force or fold.stamp != fold.current():
                fold.refold()

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """The input in the copy's memory format."""
        if self.channels_last and x.dim() == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x


def _private_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A deep copy of the module tree that shares every parameter and buffer tensor with `model`."""
    memo: dict[int, Any] = {id(t): t for t in chain(model.parameters(), model.buffers())}
    clone = copy.deepcopy(model, memo)
    clone.eval()
    return clone


def _fold_into(clone: torch.nn.Module, model: torch.nn.Module, pairs: list[tuple[str, str]],
               channels_last: bool) -> list[_Fold]:
    folds = []
    for conv_name, bn_name in pairs:
        conv = cast(torch.nn.Conv2d, clone.get_submodule(conv_name))
        src_conv = cast(torch.nn.Conv2d, model.get_submodule(conv_name))
        src_bn = cast(torch.nn.BatchNorm2d, model.get_submodule(bn_name))
        if src_bn.running_mean is None or src_bn.running_var is None:
            continue  # batch statistics even in eval mode: not an affine map
        weight = torch.empty_like(src_conv.weight)
        if channels_last and weight.dim() == 4:
            weight = weight.contiguous(memory_format=torch.channels_last)
        conv.weight = torch.nn.Parameter(weight, requires_grad=False)
        conv.bias = torch.nn.Parameter(torch.empty(weight.shape[0], dtype=weight.dtype, device=weight.device),
                                       requires_grad=False)
        clone.set_submodule(bn_name, _AfterFold(clone.get_submodule(bn_name)))
        fold = _Fold(conv, src_conv, src_bn)
        fold.refold()
        folds.append(fold)
    clone.eval()  # the modules put in place of the BatchNorms too
    return folds


def _largest_difference(a: torch.nn.Module, b: torch.nn.Module, x: torch.Tensor,
                        prepare: Callable[[torch.Tensor], torch.Tensor]) -> float:
    """max |a(x) - b(x)| / max |b(x)| in eval mode, without gradients (b is the reference)."""
    with frozen(b), torch.no_grad():
        ref = b(x).float()
        out = a(prepare(x)).float()
    return float((out - ref).abs().max() / ref.abs().max().clamp(min=torch.finfo(torch.float32).tiny))


def checked_fast_copy(model: torch.nn.Module, device: torch.device,
                      input_size: tuple[int, ...] | list[int] | None) -> tuple[FastModel | None, dict[str, Any]]:
    """`fast_copy` as every engine builds it (explain, the tensor API, evaluate's recomputed maps): channels_last
    where the device gains, checked on the same two seeded random inputs of the model's input size, so the three
    compute a map with the same model."""
    example = None
    if input_size:
        example = torch.randn((2, *input_size), generator=torch.Generator().manual_seed(0)).to(device)
    return fast_copy(model, channels_last=channels_last_gains(device), example=example)


def fast_copy(model: torch.nn.Module, *, channels_last: bool = False,
              example: torch.Tensor | None = None) -> tuple[FastModel | None, dict[str, Any]]:
    """A `FastModel` of `model` (every foldable BatchNorm folded; channels_last if asked) and what was done:
    {"folded": pairs folded, "channels_last", "max_rel_diff": the copy's logits against the model's on
    `example` (when given), "reason": why there is no copy}. None when there is nothing to fold, the model
    cannot be traced or copied, or the copy fails its check (relative difference above FOLD_CHECK_TOLERANCE):
    the oracle then runs the model itself. The model is left as it was."""
    info: dict[str, Any] = {"folded": 0, "channels_last": False, "max_rel_diff": None, "reason": None}
    try:
        pairs = _foldable_pairs(model)
        clone = _private_copy(model) if pairs else model
        folds = _fold_into(clone, model, pairs, channels_last) if pairs else []
    except Exception as e:  # noqa: BLE001 - a model fx cannot trace (or deepcopy cannot copy) is run as it is
        info["reason"] = f"not folded: {first_line(e)}"
        return None, info
    if not folds:  # channels_last alone is not worth a copy: the model's own weights stay as they are
        info["reason"] = "no BatchNorm after a convolution"
        return None, info
    fast = FastModel(clone, folds, channels_last)
    if example is not None:
        try:
            diff = _largest_difference(clone, model, example, fast.prepare)
        except Exception as e:  # noqa: BLE001 - e.g. a model that does not take this input: run it as it is
            info["reason"] = f"check failed: {first_line(e)}"
            return None, info
        info["max_rel_diff"] = diff
        if not diff <= FOLD_CHECK_TOLERANCE:
            info["reason"] = f"check failed: relative difference {diff:.1e}"
            return None, info
    info.update(folded=len(folds), channels_last=channels_last)
    return fast, info


class GradientOracle:
    """Batched forward/backward over a classifier.

    batch_size: the most inputs per forward/backward. With `auto_backoff`, a chunk that runs out of device
    memory is retried at half the size (and the smaller size is kept). precision: `fp32`, or `bf16`/`fp16`
    for autocast; gradients and scores are always returned in float32. fast: a private `FastModel` of `model`
    (`fast_copy`) that runs every pass instead of the model (parameter edits of the model reach it: it refolds).
    compile: wrap the network in `torch.compile` once, on first use. `model` is always the user's object: its
    parameters are the ones `parameters_edited` writes. probability: how `prob` and `logprob` scores are taken
    from the logits: `softmax`, or `sigmoid` for a multi-label model.
    """

    def __init__(self, model: torch.nn.Module, *, batch_size: int = 16, score: str = "logit",
                 precision: str = "fp32", auto_backoff: bool = False, fast: FastModel | None = None,
                 compile: bool = False, probability: str = "softmax") -> None:
        if score not in SCORES:
            raise ValueError(f"score must be one of {SCORES}")
        self.model = model
        self.fast = fast
        self.batch_size = max(1, int(batch_size))
        self.score = score
        self.sigmoid = probability == "sigmoid"
        self.precision = precision
        self.auto_backoff = auto_backoff
        self.compile = compile
        self._compiled: Callable[[torch.Tensor], torch.Tensor] | None = None
        self._editing = False  # inside parameters_edited: the fast copy refolds before every pass
        self.passes = 0  # forward passes run, counted per input

    # -- plumbing ---------------------------------------------------------------------------------------
    def _net(self) -> tuple[torch.nn.Module, Callable[[torch.Tensor], torch.Tensor]]:
        """The module to freeze and the callable that runs a chunk: the fast copy (refolded if the model's
        tensors changed) or the model, behind `torch.compile` when asked (compiled once per oracle)."""
        module = self.model
        if self.fast is not None:
            self.fast.sync(force=self._editing)
            module = self.fast.module
        if not self.compile:
            return module, module
        if self._compiled is None:
            self._compiled = torch.compile(module)
        return module, self._compiled

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.fast is None else self.fast.prepare(x)

    def _autocast(self, device: torch.device) -> contextlib.AbstractContextManager[None]:
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(device_type=device.type, dtype=dtype)

    def _chunked(self, n: int, run: Callable[[int, int], None]) -> None:
        """run(start, stop) over n inputs in chunks of at most batch_size, of equal size: 50 inputs at 16 go
        as 12-13 per chunk, not 16, 16, 16 and a tail of 2 (which cost 13 % more time on the CPU)."""
        start = 0
        while start < n:
            remaining = n - start
            stop = start + math.ceil(remaining / math.ceil(remaining / self.batch_size))
            try:
                run(start, stop)
            except Exception as e:
                if not (self.auto_backoff and _is_oom(e) and self.batch_size > 1):
                    raise
                self.batch_size = max(1, self.batch_size // 2)
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                continue
            self.passes += stop - start
            start = stop

    def class_probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """The class probabilities (N, K) of logits (N, K): softmax, or sigmoid for a multi-label model."""
        logits = logits.float()
        return logits.sigmoid() if self.sigmoid else logits.softmax(-1)

    def _select(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        if self.score == "prob":
            logits = self.class_probabilities(logits)
        elif self.score == "logprob":
            logits = torch.nn.functional.logsigmoid(logits) if self.sigmoid else logits.log_softmax(-1)
        return logits.gather(1, target.view(-1, 1)).squeeze(1)

    # -- the oracle -------------------------------------------------------------------------------------
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Model outputs for `x` (N, C, H, W), no gradients, float32: (N, K)."""
        out: list[torch.Tensor] = []
        module, net = self._net()

        def run(a: int, b: int) -> None:
            with torch.no_grad(), self._autocast(x.device):
                out.append(net(self._input(x[a:b])).float())

        with frozen(module):
            self._chunked(x.shape[0], run)
        return torch.cat(out)

    def scores(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The target score of every input, no gradients: (N,)."""
        return self._select(self.logits(x), target)

    def probabilities(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Probability of the target class for every input (softmax, or sigmoid for a multi-label model): (N,)."""
        return self.class_probabilities(self.logits(x)).gather(1, target.view(-1, 1)).squeeze(1)

    def gradients(self, x: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`d score_target / d x` for every input of `x` (N, C, H, W) and its score (N,), both float32.

        target: (N,) class indices on x's device. One backward per chunk of the summed scores.
        """
        grads = torch.empty(x.shape, dtype=torch.float32, device=x.device)
        scores = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)

        module, net = self._net()

        def run(a: int, b: int) -> None:
            xc = self._input(x[a:b]).detach().requires_grad_(True)
            with torch.enable_grad(), self._autocast(x.device):
                s = self._select(net(xc), target[a:b])
            (g,) = torch.autograd.grad(s.sum(), xc)
            grads[a:b] = g
            scores[a:b] = s.detach()

        with frozen(module):
            self._chunked(x.shape[0], run)
        return grads, scores

    def parameter_device(self) -> torch.device | None:
        """Where the model's parameters live (None: the model exposes none, e.g. a frozen TorchScript module)."""
        for p in self.model.parameters():
            return p.device
        return None

    @contextlib.contextmanager
    def parameters_edited(self) -> Iterator[ParameterEditor]:
        """Write the model's parameters for the duration, always undone: yields a `ParameterEditor` over one clean
        copy of every parameter taken on entry (so edits never compound); the clean values are written back in
        `finally`. Buffers (e.g. BatchNorm running statistics) are only touched by `reset_layer`, which saves the
        buffers of each module it resets first; those are written back in `finally` too. A fast copy refolds its
        BatchNorms from the edited values before every pass in between (and from the clean ones after), so weight
        noise keeps its model: noise on the convolution weights and on BatchNorm's gamma and beta, separately."""
        params = list(self.model.parameters())
        clean = [p.detach().clone() for p in params]
        editor = ParameterEditor(params, clean)
        editing, self._editing = self._editing, True
        try:
            yield editor
        finally:
            self._editing = editing
            with torch.no_grad():
                for p, p0 in zip(params, clean, strict=True):
                    p.copy_(p0)
                for b, b0 in editor.saved_buffers.values():
                    b.copy_(b0)


class ParameterEditor:
    """Edits of a model's parameters from their clean values `p0` (see `GradientOracle.parameters_edited`)."""

    def __init__(self, params: list[torch.nn.Parameter], clean: list[torch.Tensor]) -> None:
        self.params = params
        self.clean = clean
        self._clean_of = {id(p): p0 for p, p0 in zip(params, clean, strict=True)}
        self.saved_buffers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id -> (buffer, value on entry)

    @property
    def device(self) -> torch.device | None:
        return self.params[0].device if self.params else None

    def scale_by_noise(self, generator: torch.Generator, s: float) -> None:
        """Every parameter `p = p0 * eta`, `eta ~ N(1, s^2)` elementwise (NoiseGrad's noisy model). s = 0 gives p0."""
        with torch.no_grad():
            for p, p0 in zip(self.params, self.clean, strict=True):
                # Two kernels per parameter (draw eta in place, then p = p0 * eta) and one temporary: the draw is on
                # the critical path, and this took 13 ms instead of 21 ms for `p0 + p0 * randn * s` on the bundled
                # model (2 idle CPU cores).
                eta = torch.empty_like(p0).normal_(1.0, s, generator=generator)
                torch.mul(p0, eta, out=p)

    def add_scaled_noise(self, generator: torch.Generator, t: float) -> None:
        """Every parameter tensor `W = W0 + t * std(W0) * N(0, 1)` (GGIG's model-perturbation check)."""
        with torch.no_grad():
            for p, p0 in zip(self.params, self.clean, strict=True):
                std = p0.float().std(unbiased=False)
                draw = torch.randn(p0.shape, generator=generator, device=p0.device, dtype=torch.float32)
                p.copy_((p0.float() + float(t) * std * draw).to(p.dtype))

    def reset_layer(self, module: torch.nn.Module, seed: int) -> None:
        """Re-initialise `module` with its own initialiser, `module.reset_parameters()` (cascading model-parameter
        randomisation, Adebayo et al. 2018; Quantus's MPRT), and its running statistics with
        `reset_running_stats()` where it has them (BatchNorm: mean 0, var 1, count 0). The initialisers draw from
        torch's global generators, so the draw runs inside `torch.random.fork_rng` (CPU and every CUDA device)
        seeded with `seed`: the result is a function of (seed, module) and the caller's global RNG state is as
        before. The module's buffers are saved on the first reset and restored with the parameters."""
        with torch.no_grad():
            for b in module.buffers():  # a module's reset_parameters may reset its children's buffers too
                self.saved_buffers.setdefault(id(b), (b, b.detach().clone()))
        cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(int(seed))
            reset = getattr(module, "reset_parameters", None)
            if callable(reset):
                reset()
            stats = getattr(module, "reset_running_stats", None)
            if callable(stats) and getattr(module, "track_running_stats", False):
                stats()
