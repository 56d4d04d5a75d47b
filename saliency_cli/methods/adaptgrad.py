"""AdaptGrad (Zhou, Ma, Wang, Shi; arXiv:2410.07711, NeurIPS 2025): SmoothGrad with a per-element sigma.

Each element gets the largest Gaussian noise that keeps a sample inside the valid input range with confidence
c: the distance to the nearer bound is `t_i = min(x_i - lo_i, hi_i - x_i)` and `P(|e_i| < t_i) = c` gives
`sigma_i = t_i / (sqrt(2) erfinv(c))` (c = 0.95: t / 1.96). The bounds are per channel, from the model's mean
and std (the reference uses one global ImageNet range; per channel is what the principle says). Elements at a
bound get zero noise; that is the method, not a bug.
"""

from __future__ import annotations

import math

import torch

from saliency_cli.methods.base import (
    Attribution,
    MethodContext,
    SampleStats,
    gaussian,
    register,
    sample_result,
    stream_gradients,
)
from saliency_cli.oracle import GradientOracle

PAPER = "Zhou, Ma, Wang, Shi 2024, arXiv:2410.07711 (NeurIPS 2025)"


def adaptive_sigma(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, confidence: float) -> torch.Tensor:
    """Per-element noise std `min(x - lo, hi - x) / (sqrt(2) erfinv(c))`: (B, C, H, W), in x's units.

    lo, hi: (C, 1, 1) per-channel bounds of the normalised input. Elements outside the range (none after our
    preprocessing) get zero noise rather than a negative std.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence {confidence}: must be between 0 and 1")
    z = math.sqrt(2.0) * torch.special.erfinv(torch.tensor(float(confidence), dtype=torch.float64)).item()
    t = torch.minimum(x - lo, hi - x).clamp(min=0)
    return t / z


@register("adaptgrad", summary="SmoothGrad with per-element noise that stays in the valid input range",
          paper=PAPER, defaults={"confidence": 0.95, "samples": 50}, stochastic=True,
          cost=lambda h: int(h["samples"]) + 1, reduce="abs-sum")
def adaptgrad(oracle: GradientOracle, x: torch.Tensor, target: torch.Tensor, *,
              generators: list[torch.Generator], ctx: MethodContext, confidence: float, samples: int) -> Attribution:
    """(g(x) + sum_n g(x + e_n)) / (N + 1), e_n,i ~ N(0, sigma_i^2), sigma from `adaptive_sigma`. (B, C, H, W)

    The clean gradient is averaged in as the reference does (N + 1 gradients in all).
    stats: sigma_mean (B,), the mean per-element sigma of each image; dropped_samples.
    """
    sigma = adaptive_sigma(x, ctx.bounds.lo.to(x.device), ctx.bounds.hi.to(x.device), confidence)  # (B, C, H, W)
    eps = gaussian(generators, int(samples), x) * sigma[:, None]  # (B, N, C, H, W)
    points = torch.cat([x[:, None], x[:, None] + eps], dim=1)  # (B, N+1, C, H, W): the clean input first
    stats = SampleStats()
    stream_gradients(oracle, points, target, stats)
    assert stats.mean is not None
    return sample_result(stats, stats.mean, sigma_mean=sigma.flatten(1).mean(1))
