"""What every method shares: the registry, the call context, noise draws and a streaming sample mean.

A method is a pure function

    fn(oracle, x, target, *, generators, ctx, **hyper) -> Attribution

x: (B, C, H, W) normalised inputs on the model's device; target: (B,) class indices; generators: one
`torch.Generator` per image, on x's device, seeded from (run seed, image bytes); ctx: input bounds and the run
seed. It returns a raw, signed (B, C, H, W) float32 map; reduction and display are done elsewhere.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from saliency_cli.oracle import GradientOracle


@dataclass
class Context:
    """What a method may need besides the inputs: the valid input range and the run seed."""

    lo: torch.Tensor  # (C, 1, 1) smallest valid normalised value per channel (pixel value 0)
    hi: torch.Tensor  # (C, 1, 1) largest valid normalised value per channel (pixel value 1)
    seed: int = 0

    def to(self, device: torch.device) -> Context:
        return Context(lo=self.lo.to(device), hi=self.hi.to(device), seed=self.seed)


@dataclass
class Attribution:
    """maps: (B, C, H, W) float32. stats: per-image numbers for the manifest, each a (B,) tensor."""

    maps: torch.Tensor
    stats: dict[str, torch.Tensor] = field(default_factory=dict)


MethodFn = Callable[..., Attribution]


@dataclass(frozen=True)
class Method:
    """A registered method and its metadata (listed by `saliency methods`)."""

    name: str
    fn: MethodFn
    summary: str
    paper: str
    defaults: dict[str, Any]
    stochastic: bool
    cost: Callable[[dict[str, Any]], int]  # forward/backward passes per image for these hyper-parameters
    reduce: str = "abs-sum"  # default channel reduction for display and .npy
    needs_gradients: bool = True
    cheap: dict[str, Any] = field(default_factory=dict)  # settings recommended where the defaults are slow


REGISTRY: dict[str, Method] = {}


def register(name: str, *, summary: str, paper: str, defaults: dict[str, Any], stochastic: bool,
             cost: Callable[[dict[str, Any]], int], reduce: str = "abs-sum", needs_gradients: bool = True,
             cheap: dict[str, Any] | None = None) -> Callable[[MethodFn], MethodFn]:
    """Register `fn` under its CLI name."""

    def wrap(fn: MethodFn) -> MethodFn:
        if name in REGISTRY:
            raise ValueError(f"method {name!r} registered twice")
        REGISTRY[name] = Method(name, fn, summary, paper, dict(defaults), stochastic, cost, reduce,
                                needs_gradients, dict(cheap or {}))
        return fn

    return wrap


# -- noise ------------------------------------------------------------------------------------------------
def relative_sigma(x: torch.Tensor, noise: float) -> torch.Tensor:
    """Absolute noise std per image: `noise * (max - min)` of each image in model input space. (B,)"""
    flat = x.flatten(1)
    return noise * (flat.amax(1) - flat.amin(1))


def gaussian(generators: list[torch.Generator], n: int, like: torch.Tensor) -> torch.Tensor:
    """Standard normal draws, n per image, each image from its own generator: (B, n, C, H, W).

    One call per image (not per sample), so an image's noise does not depend on its batch.
    """
    shape = (n, *like.shape[1:])
    return torch.stack([torch.randn(shape, generator=g, device=like.device, dtype=torch.float32)
                        for g in generators])


def expand_target(target: torch.Tensor, n: int) -> torch.Tensor:
    """(B,) -> (B*n,), each target repeated for its n samples."""
    return target.repeat_interleave(n)


# -- streaming statistics over samples ---------------------------------------------------------------------
class SampleStats:
    """Streaming mean and variance over samples (Chan/Welford merge of chunks), dropping non-finite samples.

    update(values (B, k, ...)) adds k samples per image. Samples with any NaN/Inf are left out and counted.
    """

    def __init__(self) -> None:
        self.count: torch.Tensor | None = None  # (B,)
        self.mean: torch.Tensor | None = None  # (B, ...)
        self.m2: torch.Tensor | None = None
        self.dropped: torch.Tensor | None = None

    def update(self, values: torch.Tensor) -> None:
        values = values.float()
        b, k = values.shape[:2]
        ok = torch.isfinite(values.reshape(b, k, -1)).all(-1)  # (B, k)
        w = ok.to(values.dtype).view(b, k, *([1] * (values.dim() - 2)))
        clean = torch.where(w.bool(), values, torch.zeros((), dtype=values.dtype, device=values.device))
        n_new = ok.sum(1).to(values.dtype)  # (B,)
        shape = (b, *([1] * (values.dim() - 2)))
        mean_new = clean.sum(1) / n_new.clamp(min=1).view(shape)
        m2_new = (w * (clean - mean_new[:, None]) ** 2).sum(1)
        dropped_new = (k - ok.sum(1)).to(torch.int64)
        if self.count is None:
            self.count, self.mean, self.m2, self.dropped = n_new, mean_new, m2_new, dropped_new
            return
        assert self.mean is not None and self.m2 is not None and self.dropped is not None
        n = self.count + n_new
        frac = (n_new / n.clamp(min=1)).view(shape)
        delta = mean_new - self.mean
        self.mean = self.mean + delta * frac
        self.m2 = self.m2 + m2_new + delta**2 * (self.count * frac.flatten()).view(shape)
        self.count = n
        self.dropped = self.dropped + dropped_new

    def _n(self) -> torch.Tensor:
        assert self.count is not None and self.mean is not None
        return self.count.clamp(min=1).view(-1, *([1] * (self.mean.dim() - 1)))

    @property
    def variance(self) -> torch.Tensor:
        """Population variance (divides by the number of finite samples)."""
        assert self.m2 is not None
        return self.m2 / self._n()

    @property
    def mean_square(self) -> torch.Tensor:
        assert self.mean is not None
        return self.variance + self.mean**2

    def result(self, maps: torch.Tensor, **stats: torch.Tensor) -> Attribution:
        """Package maps with the dropped-sample count; images whose samples were all dropped become NaN."""
        assert self.count is not None and self.dropped is not None
        empty = (self.count == 0).view(-1, *([1] * (maps.dim() - 1)))
        maps = torch.where(empty, torch.full_like(maps, float("nan")), maps)
        return Attribution(maps, {"dropped_samples": self.dropped, **stats})


def sample_chunks(n: int, batch_images: int, batch_size: int) -> Iterator[slice]:
    """Slices over n samples per image so that one chunk of all images holds at most about `batch_size` inputs,
    in chunks of equal size (50 samples at 8 per chunk: 7 chunks of 7-8, not 6 of 8 and a tail of 2)."""
    most = max(1, batch_size // max(1, batch_images))
    chunks = math.ceil(n / most)
    bounds = [i * n // chunks for i in range(chunks + 1)]
    for start, stop in zip(bounds[:-1], bounds[1:], strict=True):
        yield slice(start, stop)


def stream_gradients(oracle: GradientOracle, points: torch.Tensor, target: torch.Tensor,
                     stats: SampleStats, transform: Callable[[torch.Tensor, slice], torch.Tensor] | None = None
                     ) -> None:
    """Gradients at `points` (B, N, C, H, W) for each image's target, fed chunk by chunk into `stats`.

    transform(g, sl) may turn the (B, k, C, H, W) gradients of samples `sl` into what is accumulated.
    """
    b, n = points.shape[:2]
    for sl in sample_chunks(n, b, oracle.batch_size):
        chunk = points[:, sl]  # (B, k, C, H, W)
        k = chunk.shape[1]
        g, _ = oracle.gradients(chunk.reshape(b * k, *chunk.shape[2:]), expand_target(target, k))
        g = g.view(b, k, *chunk.shape[2:])  # (B*k, C, H, W) -> (B, k, C, H, W)
        stats.update(transform(g, sl) if transform is not None else g)


def gauss_legendre(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Nodes and weights of n-point Gauss-Legendre quadrature on [0, 1] (weights sum to 1)."""
    import numpy as np

    nodes, weights = np.polynomial.legendre.leggauss(n)
    return torch.tensor((nodes + 1) / 2, dtype=torch.float64), torch.tensor(weights / 2, dtype=torch.float64)


def quadrature(rule: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Points a_k in [0, 1] and weights w_k (summing to 1) of an n-point rule for integral_0^1 h(a) da."""
    k = torch.arange(n, dtype=torch.float64)
    if rule == "gausslegendre":
        return gauss_legendre(n)
    if rule == "riemann-left":
        return k / n, torch.full((n,), 1.0 / n, dtype=torch.float64)
    if rule == "riemann-right":
        return (k + 1) / n, torch.full((n,), 1.0 / n, dtype=torch.float64)
    if rule == "riemann-middle":
        return (k + 0.5) / n, torch.full((n,), 1.0 / n, dtype=torch.float64)
    if rule == "trapezoid":
        if n < 2:
            raise ValueError("the trapezoid rule needs at least 2 points")
        w = torch.full((n,), 1.0 / (n - 1), dtype=torch.float64)
        w[0] = w[-1] = 0.5 / (n - 1)
        return k / (n - 1), w
    raise ValueError(f"unknown quadrature {rule!r}")


QUADRATURES = ("gausslegendre", "riemann-left", "riemann-right", "riemann-middle", "trapezoid")
BASELINES = ("black", "mean", "blur", "uniform")


def baseline(x: torch.Tensor, kind: str, ctx: Context, generators: list[torch.Generator]) -> torch.Tensor:
    """Reference inputs defined in pixel space, then normalised like x: (B, C, H, W).

    black: pixel value 0. mean: the normalisation mean colour (0 in normalised space). blur: the image under a
    Gaussian blur (sigma 5 % of its side; blur commutes with the per-channel affine normalisation). uniform:
    uniform random pixels from each image's generator.
    """
    if kind == "black":
        return ctx.lo.expand_as(x[0]).expand_as(x).clone()
    if kind == "mean":
        return torch.zeros_like(x)
    if kind == "blur":
        from torchvision.transforms.functional import gaussian_blur

        sigma = max(1.0, 0.05 * min(x.shape[-2:]))
        size = 2 * math.ceil(3 * sigma) + 1
        return gaussian_blur(x, [size, size], [sigma, sigma])
    if kind == "uniform":
        u = torch.stack([torch.rand(x.shape[1:], generator=g, device=x.device) for g in generators])
        return ctx.lo + u * (ctx.hi - ctx.lo)
    raise ValueError(f"unknown baseline {kind!r}")
