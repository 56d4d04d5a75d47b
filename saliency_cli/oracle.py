"""The gradient oracle: the only place in saliency that calls autograd or writes a model's parameters.

Every method asks it for `d score_y / d x` of many inputs at once. It runs the model in eval mode with the
parameters' `requires_grad` switched off (restored afterwards), pushes the inputs through in chunks of at most
`batch_size`, and gets all input gradients of a chunk from one backward pass of the summed target scores. That
is exact because, in eval mode, the samples of a batch do not interact.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

import torch

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


class GradientOracle:
    """Batched forward/backward over a classifier.

    batch_size: the most inputs per forward/backward. With `auto_backoff`, a chunk that runs out of device
    memory is retried at half the size (and the smaller size is kept). precision: `fp32`, or `bf16`/`fp16`
    for autocast; gradients and scores are always returned in float32.
    """

    def __init__(self, model: torch.nn.Module, *, batch_size: int = 16, score: str = "logit",
                 precision: str = "fp32", auto_backoff: bool = False) -> None:
        if score not in SCORES:
            raise ValueError(f"score must be one of {SCORES}")
        self.model = model
        self.batch_size = max(1, int(batch_size))
        self.score = score
        self.precision = precision
        self.auto_backoff = auto_backoff
        self.passes = 0  # forward passes run, counted per input

    # -- plumbing ---------------------------------------------------------------------------------------
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

    def _select(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        if self.score == "prob":
            logits = logits.softmax(-1)
        elif self.score == "logprob":
            logits = logits.log_softmax(-1)
        return logits.gather(1, target.view(-1, 1)).squeeze(1)

    # -- the oracle -------------------------------------------------------------------------------------
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Model outputs for `x` (N, C, H, W), no gradients, float32: (N, K)."""
        out: list[torch.Tensor] = []

        def run(a: int, b: int) -> None:
            with torch.no_grad(), self._autocast(x.device):
                out.append(self.model(x[a:b]).float())

        with frozen(self.model):
            self._chunked(x.shape[0], run)
        return torch.cat(out)

    def scores(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The target score of every input, no gradients: (N,)."""
        return self._select(self.logits(x), target)

    def probabilities(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Softmax probability of the target class for every input: (N,)."""
        return self.logits(x).softmax(-1).gather(1, target.view(-1, 1)).squeeze(1)

    def gradients(self, x: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`d score_target / d x` for every input of `x` (N, C, H, W) and its score (N,), both float32.

        target: (N,) class indices on x's device. One backward per chunk of the summed scores.
        """
        grads = torch.empty(x.shape, dtype=torch.float32, device=x.device)
        scores = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)

        def run(a: int, b: int) -> None:
            xc = x[a:b].detach().requires_grad_(True)
            with torch.enable_grad(), self._autocast(x.device):
                s = self._select(self.model(xc), target[a:b])
            (g,) = torch.autograd.grad(s.sum(), xc)
            grads[a:b] = g
            scores[a:b] = s.detach()

        with frozen(self.model):
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
        `finally`. Buffers (e.g. BatchNorm running statistics) are never touched."""
        params = list(self.model.parameters())
        clean = [p.detach().clone() for p in params]
        try:
            yield ParameterEditor(params, clean)
        finally:
            with torch.no_grad():
                for p, p0 in zip(params, clean, strict=True):
                    p.copy_(p0)


class ParameterEditor:
    """Edits of a model's parameters from their clean values `p0` (see `GradientOracle.parameters_edited`)."""

    def __init__(self, params: list[torch.nn.Parameter], clean: list[torch.Tensor]) -> None:
        self.params = params
        self.clean = clean
        self._clean_of = {id(p): p0 for p, p0 in zip(params, clean, strict=True)}

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

    def redraw(self, params: list[torch.nn.Parameter], generator: torch.Generator) -> None:
        """Each of `params` re-drawn as N(mean(p0), std(p0)^2) elementwise: a re-initialisation that keeps the
        tensor's scale (cascading randomisation)."""
        with torch.no_grad():
            for p in params:
                p0 = self._clean_of.get(id(p), p.detach())
                mean, std = p0.float().mean(), p0.float().std(unbiased=False)
                draw = torch.randn(p.shape, generator=generator, device=p.device, dtype=torch.float32)
                p.copy_((mean + std * draw).to(p.dtype))
