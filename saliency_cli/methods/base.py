"""What every method shares: the registry, the call context, noise draws, chunked gradient streams, baselines.

A method is a pure function

    fn(oracle, x, target, *, generators, ctx, **hyper) -> Attribution

x: (B, C, H, W) normalised inputs on the model's device; target: (B,) class indices; generators: one
`torch.Generator` per image, on x's device, seeded from (run seed, image bytes); ctx: input bounds and the run
seed and the metric scorer. It returns a raw, signed (B, C, H, W) float32 map; reduction and display are done elsewhere.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from saliency_cli.data import InputRange
from saliency_cli.methods.settings import BASELINES, CONVERGENCE_SETTINGS, NOISE_UNITS, QUADRATURES, SETTINGS, Setting
from saliency_cli.numerics import SampleStats, gauss_legendre, quadrature
from saliency_cli.oracle import GradientOracle

__all__ = ["BASELINES", "QUADRATURES", "Attribution", "InputRange", "METHODS", "Method", "MethodContext",
           "NoisyPoints", "SampleStats", "expand_target", "gaussian", "gauss_legendre", "noise_sigma", "noise_stats",
           "quadrature", "register", "relative_sigma", "sample_chunks", "sample_result", "stream_gradients"]


@dataclass
class MethodContext:
    """What a method may need besides its inputs.

    bounds: the valid range of the normalised input, per channel. seed: the run seed, for draws that every
    image of a run shares (the noisy models of noisegrad). scorer: how a method that tunes itself against a
    quality metric scores candidate maps (SmoothTaylor's adaptive noising); the pipeline passes the metric
    registry's `score_maps`, so a method never imports the metrics.
    """

    bounds: InputRange
    seed: int = 0
    scorer: Scorer | None = None

    def to(self, device: torch.device) -> MethodContext:
        return MethodContext(self.bounds.to(device), self.seed, self.scorer)


@dataclass
class Attribution:
    """maps: (B, C, H, W) float32. stats: per-image numbers for the manifest, each a (B,) tensor.

    display: an optional (B, H, W) map that cannot be computed from `maps` alone, picked by the channel
    reduction `mean-abs-sum`: the mean over the averaged explanations of each one's `sum_c |A_c|` (the display
    of the NoiseGrad/FusionGrad reference code, which needs every noisy model's own map)."""

    maps: torch.Tensor
    stats: dict[str, torch.Tensor] = field(default_factory=dict)
    display: torch.Tensor | None = None


MethodFn = Callable[..., Attribution]
# scorer(metric name, oracle, x (B, C, H, W), target (B,), maps (B, C, H, W) or (B, H, W)) -> (B,) values
Scorer = Callable[[str, GradientOracle, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Method:
    """A registered method and its metadata (listed by `saliency methods`).

    defaults: the value of each hyper-parameter (every key is a row of `settings.SETTINGS`). cost(hyper): model
    passes per image at those settings. width(hyper): inputs per image the method sends to the oracle in one
    call (smoothgrad: its samples; noisegrad: 1 per noisy model; mask: its chains; ggig: its path points);
    None means its cost. The pipeline groups `batch_size // width` images so that every oracle call is full
    (`oracle_width`). A method resolves its own `auto` settings per image (never from the other images of a
    run), and its cost counts the passes that takes.
    """

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
    width: Callable[[dict[str, Any]], int] | None = None  # inputs per image in one oracle call; None: cost

    def oracle_width(self, hyper: dict[str, Any]) -> int:
        """Inputs per image in one oracle call at these settings (at least 1)."""
        return max(1, int((self.width or self.cost)(hyper)))

    @property
    def settings(self) -> list[Setting]:
        return [SETTINGS[k] for k in self.defaults]

    def uses(self, base: str | None = None) -> set[str]:
        """The settings this method reads: its own and, over a base other than the gradient (`--base`), the
        base method's (e.g. integrated-gradients' steps, baseline, quadrature)."""
        names = set(self.defaults)
        if "base" in self.defaults and base not in (None, "gradient") and base in METHODS:
            names |= set(METHODS[base].defaults)
        return names

    def hyper_for(self, given: dict[str, Any], cheap: bool = False) -> dict[str, Any]:
        """The hyper-parameters of a call: defaults < `cheap` (with --cheap) < given, for the method's own
        settings; over another base, that base's defaults < its cheap settings < given for the base's settings;
        `converge`/`max_samples` only when a sample count is `auto`. `given` may hold anything (a manifest's
        params, the command line's options): other keys are ignored."""
        own = {k: v for k, v in given.items() if v is not None and k in self.defaults}
        hyper = {**self.defaults, **(self.cheap if cheap else {}), **own}
        base = hyper.get("base")
        if "base" in self.defaults and base not in (None, "gradient"):
            if base not in METHODS:
                raise ValueError(f"unknown base {base!r}")
            b = METHODS[base]
            hyper.update({**b.defaults, **(b.cheap if cheap else {}),
                          **{k: v for k, v in given.items() if v is not None and k in b.defaults}})
        if "auto" not in (hyper.get("samples"), hyper.get("models")):
            for k in CONVERGENCE_SETTINGS:
                hyper.pop(k, None)
        return hyper


METHODS: dict[str, Method] = {}


def register(name: str, *, summary: str, paper: str, defaults: dict[str, Any], stochastic: bool,
             cost: Callable[[dict[str, Any]], int], reduce: str = "abs-sum", needs_gradients: bool = True,
             cheap: dict[str, Any] | None = None,
             width: Callable[[dict[str, Any]], int] | None = None) -> Callable[[MethodFn], MethodFn]:
    """Register `fn` under its CLI name. Every hyper-parameter must have a row in the settings table."""

    def wrap(fn: MethodFn) -> MethodFn:
        if name in METHODS:
            raise ValueError(f"method {name!r} registered twice")
        missing = [k for k in defaults if k not in SETTINGS]
        if missing:
            raise ValueError(f"method {name!r}: no settings row for {', '.join(missing)} (methods/settings.py)")
        METHODS[name] = Method(name, fn, summary, paper, dict(defaults), stochastic, cost, reduce,
                               needs_gradients, dict(cheap or {}), width)
        return fn

    return wrap


def sample_result(stats: SampleStats, maps: torch.Tensor, **extra: torch.Tensor) -> Attribution:
    """The attribution of a sampled estimate: NaN maps where every sample was dropped, the dropped count."""
    return Attribution(*stats.result(maps, **extra))


# -- noise ------------------------------------------------------------------------------------------------
def relative_sigma(x: torch.Tensor, noise: float) -> torch.Tensor:
    """Absolute noise std per image: `noise * (max - min)` of each image in model input space. (B,)"""
    flat = x.flatten(1)
    return noise * (flat.amax(1) - flat.amin(1))


def noise_sigma(x: torch.Tensor, noise: float, unit: str = "relative") -> torch.Tensor:
    """The absolute noise std of each image (B,), in model-input units, from `--noise` in `unit`: `relative`,
    noise * (max(x) - min(x)) of the image (the SmoothGrad paper's convention); `absolute`, noise itself (as
    Captum's `stdevs`, and the FusionGrad/SmoothTaylor references' 0.4 and 0.5)."""
    if unit == "relative":
        return relative_sigma(x, noise)
    if unit == "absolute":
        return torch.full((x.shape[0],), float(noise), dtype=torch.float32, device=x.device)
    raise ValueError(f"noise_unit must be one of {NOISE_UNITS}, not {unit!r}")


def noise_stats(x: torch.Tensor, sigma: torch.Tensor) -> dict[str, torch.Tensor]:
    """The noise of each image in both units, for the manifest: sigma (absolute std), noise_absolute (the same)
    and noise_relative = sigma / (max(x) - min(x)). (B,) each."""
    flat = x.flatten(1)
    span = (flat.amax(1) - flat.amin(1)).clamp(min=torch.finfo(torch.float32).tiny)
    return {"sigma": sigma, "noise_absolute": sigma.clone(), "noise_relative": sigma / span}


def gaussian(generators: list[torch.Generator], n: int, like: torch.Tensor) -> torch.Tensor:
    """Standard normal draws, n per image, each image from its own generator: (B, n, C, H, W).

    One call per image (not per sample), so an image's noise does not depend on its batch.
    """
    shape = (n, *like.shape[1:])
    return torch.stack([torch.randn(shape, generator=g, device=like.device, dtype=torch.float32)
                        for g in generators])


class NoisyPoints:
    """`x[:, None] + scale * e`, e standard normal, n samples per image, drawn on demand: it stands for the
    (B, n, C, H, W) tensor (or (B, n+1, ...) with the clean input first) of which the chunked gradient loops read
    `points[:, sl]` slice after slice, so memory is bounded by a chunk and not by `-n`.

    Each image draws from its own generator in blocks of BLOCK samples, in order, whatever the chunks: the noise
    is a function of (generator, n) alone. On the CPU it equals one `torch.randn` of all n samples (`gaussian`)
    when a sample's size is a multiple of 16, as model inputs are (3 x 224 x 224, 3 x 32 x 32, ...).
    scale: (B, 1, 1, 1, 1) per image or (B, 1, C, H, W) per element.
    """

    BLOCK = 16

    def __init__(self, x: torch.Tensor, generators: list[torch.Generator], n: int, scale: torch.Tensor,
                 clean_first: bool = False) -> None:
        self.x, self.generators, self.n, self.scale, self.clean_first = x, generators, int(n), scale, clean_first
        self.shape = (x.shape[0], self.n + int(clean_first), *x.shape[1:])
        self.buffer = x.new_empty((x.shape[0], 0, *x.shape[1:]))  # drawn, not yet read: (B, m, C, H, W)
        self.drawn = 0  # noise samples drawn per image
        self.read = 0  # positions read so far (the clean input counts as one)

    def _draw(self, k: int) -> None:
        """Append at least k samples per image to the buffer, BLOCK at a time."""
        blocks: list[torch.Tensor] = []
        while self.buffer.shape[1] + sum(b.shape[1] for b in blocks) < k and self.drawn < self.n:
            m = min(self.BLOCK, self.n - self.drawn)
            shape = (m, *self.x.shape[1:])
            blocks.append(torch.stack([torch.randn(shape, generator=g, device=self.x.device, dtype=torch.float32)
                                       for g in self.generators]))
            self.drawn += m
        if blocks:
            self.buffer = torch.cat([self.buffer, *blocks], dim=1)

    def __getitem__(self, index: tuple[slice, slice]) -> torch.Tensor:
        rows, sl = index
        if rows != slice(None) or sl.step not in (None, 1) or sl.start != self.read:
            raise IndexError("NoisyPoints are read in order, as points[:, start:stop] with start = the last stop")
        stop = min(sl.stop, self.shape[1])
        parts = []
        if self.clean_first and self.read == 0 and stop > 0:
            parts.append(self.x[:, None])
            self.read = 1
        k = stop - self.read
        if k > 0:
            self._draw(k)
            e, self.buffer = self.buffer[:, :k], self.buffer[:, k:]
            parts.append(self.x[:, None] + e * self.scale)
            self.read = stop
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]

    def window(self, start: int, n: int) -> _Window:
        """Positions start .. start+n-1 as points of their own (FusionGrad: noisy model m's N inputs)."""
        return _Window(self, start, n)


class _Window:
    def __init__(self, points: NoisyPoints, start: int, n: int) -> None:
        self.points, self.start = points, start
        self.shape = (points.shape[0], n, *points.shape[2:])

    def __getitem__(self, index: tuple[slice, slice]) -> torch.Tensor:
        rows, sl = index
        return self.points[rows, slice(self.start + sl.start, self.start + min(sl.stop, self.shape[1]))]


def expand_target(target: torch.Tensor, n: int) -> torch.Tensor:
    """(B,) -> (B*n,), each target repeated for its n samples."""
    return target.repeat_interleave(n)


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
