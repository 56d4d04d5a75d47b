"""The base attribution a smoother averages over its noise (`--base`): one generic wrapper, not a method per pair.

SmoothGrad (and its -sq/var variants), NoiseGrad, FusionGrad and AdaptGrad average *an attribution* over input
or weight noise; their papers use the gradient and call the smoothing method-agnostic (the NoiseGrad paper
evaluates NoiseGrad++ = FusionGrad over integrated gradients, the AdaptGrad paper an IG variant). At a noisy
point z (an input sample, or the clean input under a noisy model) the base is

    gradient               A(z) = g(z)                                          1 gradient pass per point
    input-x-gradient       A(z) = z * g(z)                                      1
    integrated-gradients   A(z) = (z - z') * sum_k w_k g(z' + a_k (z - z'))     steps
    ggig                   GGIG's map of z from z' (path points, then ascent)   steps * iterations

with g the gradient of the target score and z' the baseline of the *clean* image x, `data.baseline(x, kind)`,
shared by all of x's noisy points (as Captum's NoiseTunnel repeats the baselines it is given). The baseline is
made before any noise is drawn; only `uniform` draws from the image's generator, so with it the noise draws
differ from a gradient-base run's. The base's own settings (--steps, --baseline, --quadrature, --iterations,
--step-size, --ggig-reduce) default to that method's defaults. IG as a base skips the method's completeness
check (its two extra forward passes), so its cost per point is `steps`, not `steps + 2`.

`gradient` makes exactly the oracle calls the smoothers made before `--base` existed (same chunks, same order),
so their maps are unchanged bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from saliency_cli.data import baseline as make_baseline
from saliency_cli.methods.base import MethodContext, expand_target, sample_chunks
from saliency_cli.methods.ggig import GGIG_DEFAULTS, ggig_map
from saliency_cli.methods.integrated_gradients import IG_DEFAULTS, path_integral
from saliency_cli.methods.settings import BASES
from saliency_cli.oracle import GradientOracle


class Points(Protocol):
    """What `stream_base` reads: a (R, N, C, H, W) tensor, or anything that stands for one and gives
    `points[:, sl]` (base.NoisyPoints, which draws its noise chunk by chunk)."""

    @property
    def shape(self) -> tuple[int, ...]: ...

    def __getitem__(self, index: tuple[slice, slice]) -> torch.Tensor: ...


BASE_DEFAULTS: dict[str, dict[str, Any]] = {"gradient": {}, "input-x-gradient": {},
                                            "integrated-gradients": IG_DEFAULTS, "ggig": GGIG_DEFAULTS}


def base_hyper(base: str, hyper: dict[str, Any]) -> dict[str, Any]:
    """The base's own settings: its defaults, overridden by those in `hyper` (which may hold anything else)."""
    if base not in BASES:
        raise ValueError(f"base must be one of {BASES}, not {base!r}")
    defaults = BASE_DEFAULTS[base]
    return {k: hyper.get(k, v) for k, v in defaults.items()}


def base_cost(hyper: dict[str, Any]) -> int:
    """Gradient passes per noisy point of the base named by hyper["base"] (default gradient) at its settings."""
    base = str(hyper.get("base", "gradient"))
    h = base_hyper(base, hyper)
    if base == "integrated-gradients":
        return int(h["steps"])
    if base == "ggig":
        return int(h["steps"]) * int(h["iterations"])
    return 1


def base_width(base: str, hyper: dict[str, Any]) -> int:
    """Model inputs evaluated together per noisy point (the path points of IG and GGIG, else 1)."""
    return int(base_hyper(base, hyper)["steps"]) if base in ("integrated-gradients", "ggig") else 1


def base_attribution(oracle: GradientOracle, points: torch.Tensor, target: torch.Tensor, base: str, *,
                     reference: torch.Tensor | None = None, **hyper: Any) -> torch.Tensor:
    """The base attribution A(z) of every point: points (N, C, H, W), target (N,), reference (N, C, H, W) the
    baseline z' of each point (path bases only); hyper: the base's settings (missing ones: its defaults).
    -> (N, C, H, W) float32, in the base's units (gradient: score per input unit; IG: score)."""
    h = base_hyper(base, hyper)
    if base in ("gradient", "input-x-gradient"):
        g, _ = oracle.gradients(points, target)
        return g if base == "gradient" else points * g
    if reference is None:
        raise ValueError(f"base {base!r} needs the reference input of each point")
    if base == "integrated-gradients":
        return path_integral(oracle, points, target, reference, int(h["steps"]), str(h["quadrature"]))
    return ggig_map(oracle, points, target, reference, steps=int(h["steps"]), iterations=int(h["iterations"]),
                    step_size=float(h["step_size"]), ggig_reduce=str(h["ggig_reduce"])).maps


@dataclass
class Base:
    """A base attribution made ready for one batch of images: its name, its settings and, for path bases, the
    reference of every image (B, C, H, W)."""

    name: str = "gradient"
    hyper: dict[str, Any] = field(default_factory=dict)
    reference: torch.Tensor | None = None

    @property
    def width(self) -> int:
        return base_width(self.name, self.hyper)

    def __call__(self, oracle: GradientOracle, points: torch.Tensor, target: torch.Tensor,
                 rows: torch.Tensor | None = None) -> torch.Tensor:
        """A at points (R, k, C, H, W) of the batch's images `rows` (R,) (all images when None) with their
        targets (R,) -> (R, k, C, H, W)."""
        r, k = points.shape[:2]
        ref = self.reference
        if ref is not None:
            ref = (ref if rows is None else ref[rows]).repeat_interleave(k, 0)  # (R, C, H, W) -> (R*k, C, H, W)
        a = base_attribution(oracle, points.reshape(r * k, *points.shape[2:]), expand_target(target, k),
                             self.name, reference=ref, **self.hyper)
        return a.view(r, k, *points.shape[2:])  # (R*k, C, H, W) -> (R, k, C, H, W)


def prepare_base(base: str, x: torch.Tensor, generators: list[torch.Generator], ctx: MethodContext,
                 hyper: dict[str, Any]) -> Base:
    """The `Base` of a batch x (B, C, H, W): the base's settings from `hyper` (a smoother's extra keywords) and,
    for IG and GGIG, the reference of every image, `data.baseline(x, hyper["baseline"])`, made now (before the
    smoother draws its noise)."""
    h = base_hyper(base, hyper)
    ref = None
    if base in ("integrated-gradients", "ggig"):
        ref = make_baseline(x, str(h["baseline"]), ctx.bounds, generators)
    return Base(base, h, ref)


def stream_base(oracle: GradientOracle, points: torch.Tensor | Points, target: torch.Tensor, base: Base,
                consume: Callable[[torch.Tensor, slice], None], rows: torch.Tensor | None = None) -> None:
    """A at points (R, N, C, H, W) of images `rows` chunk by chunk: `consume(a (R, k, C, H, W), samples sl)`.

    A chunk of all R images holds about `oracle.batch_size / width` points, so that one chunk is about one
    oracle batch of model inputs whatever the base (the gradient's chunks are those of `stream_gradients`)."""
    r, n = points.shape[:2]
    for sl in sample_chunks(n, r, max(1, oracle.batch_size // base.width)):
        consume(base(oracle, points[:, sl], target, rows), sl)


def check_base_options(base: str, options: dict[str, Any]) -> None:
    """A smoother's extra keywords must be settings of some base (a typo is an error, not silently ignored)."""
    known = set().union(*(set(d) for d in BASE_DEFAULTS.values()))
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(f"unexpected keyword(s) {', '.join(unknown)} (not a setting of any --base)")
    if base not in BASES:
        raise ValueError(f"base must be one of {BASES}, not {base!r}")
