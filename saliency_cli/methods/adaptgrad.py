"""AdaptGrad (Zhou, Ma, Wang, Shi; arXiv:2410.07711, NeurIPS 2025): SmoothGrad with a per-element sigma.

Each element gets the largest Gaussian noise that keeps a sample inside the valid input range with confidence
c: the distance to the nearer bound is `t_i = min(x_i - lo_i, hi_i - x_i)` and `P(|e_i| < t_i) = c` gives
`sigma_i = t_i / (sqrt(2) erfinv(c))` (c = 0.95: t / 1.96). The bounds are per channel, from the model's mean
and std (the reference uses one global ImageNet range; per channel is what the principle says). Elements at a
bound get zero noise; that is the method, not a bug.

`--base` averages another attribution than the gradient (methods/base_attribution.py); `-n auto` draws rounds of
samples until two independent halves agree (methods/convergence.py).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from saliency_cli.methods.base import (
    Attribution,
    MethodContext,
    NoisyPoints,
    SampleStats,
    register,
    sample_result,
)
from saliency_cli.methods.base_attribution import base_cost, check_base_options, prepare_base, stream_base
from saliency_cli.methods.convergence import mean_of, sample_rounds
from saliency_cli.methods.smoothgrad import sample_count, smoother_width
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
          paper=PAPER, defaults={"confidence": 0.95, "samples": 50, "base": "gradient", "converge": 0.95,
                                 "max_samples": 400},
          stochastic=True, cost=lambda h: (sample_count(h) + 1) * base_cost(h), reduce="abs-sum",
          width=lambda h: smoother_width(h, extra=1))
def adaptgrad(oracle: GradientOracle, x: torch.Tensor, target: torch.Tensor, *,
              generators: list[torch.Generator], ctx: MethodContext, confidence: float, samples: int | str,
              base: str = "gradient", converge: float = 0.95, max_samples: int = 400,
              **base_options: Any) -> Attribution:
    """(A(x) + sum_n A(x + e_n)) / (N + 1), e_n,i ~ N(0, sigma_i^2), sigma from `adaptive_sigma`, A the base
    attribution (default the gradient; `--base integrated-gradients` is the AdaptGrad paper's IG variant).
    (B, C, H, W)

    The clean attribution is averaged in as the reference does (N + 1 in all); with `-n auto` it is part of the
    estimate but of neither half, and samples_used counts the N noisy samples.
    stats: sigma_mean (B,), the mean per-element sigma of each image; dropped_samples.
    """
    check_base_options(base, base_options)
    prepared = prepare_base(base, x, generators, ctx, base_options)  # the baseline first, then the noise
    sigma = adaptive_sigma(x, ctx.bounds.lo.to(x.device), ctx.bounds.hi.to(x.device), confidence)  # (B, C, H, W)
    sigma_mean = sigma.flatten(1).mean(1)
    if samples == "auto":
        result = sample_rounds(oracle, x, target, generators, prepared, sigma[:, None], mean_of,
                               converge=float(converge), cap=int(max_samples), clean_first=True)
        result.stats["sigma_mean"] = sigma_mean
        return result
    # (B, N+1, C, H, W), the clean input first, the noise drawn chunk by chunk
    points = NoisyPoints(x, generators, int(samples), sigma[:, None], clean_first=True)
    stats = SampleStats()
    stream_base(oracle, points, target, prepared, lambda a, sl: stats.update(a))
    assert stats.mean is not None
    return sample_result(stats, stats.mean, sigma_mean=sigma_mean)
