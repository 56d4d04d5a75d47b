"""The SmoothGrad family: `smoothgrad`, `smoothgrad-sq`, `vargrad` (Smilkov 2017; Hooker 2019; Adebayo 2018).

All three draw N Gaussian samples x + e_n, e_n ~ N(0, sigma^2), sigma = noise * (max(x) - min(x)), and
accumulate the gradients at them in one streaming (Welford) pass; they differ only in the statistic kept.
"""

from __future__ import annotations

import torch

from saliency_cli.methods.base import (
    Attribution,
    MethodContext,
    SampleStats,
    gaussian,
    register,
    relative_sigma,
    sample_result,
    stream_gradients,
)
from saliency_cli.oracle import GradientOracle

DEFAULTS = {"noise": 0.15, "samples": 50}
PAPER = "Smilkov et al. 2017, arXiv:1706.03825"


def noisy_gradient_stats(oracle: GradientOracle, x: torch.Tensor, target: torch.Tensor,
                         generators: list[torch.Generator], noise: float, samples: int,
                         ) -> tuple[SampleStats, torch.Tensor]:
    """Streaming statistics of g(x + e_n) over n = 1..samples, and the absolute sigma per image (B,)."""
    sigma = relative_sigma(x, noise)  # (B,)
    eps = gaussian(generators, samples, x) * sigma.view(-1, 1, 1, 1, 1)  # (B, N, C, H, W)
    stats = SampleStats()
    stream_gradients(oracle, x[:, None] + eps, target, stats)
    return stats, sigma


@register("smoothgrad", summary="Mean gradient over Gaussian input noise", paper=PAPER, defaults=DEFAULTS,
          stochastic=True, cost=lambda h: h["samples"])
def smoothgrad(oracle: GradientOracle, x: torch.Tensor, target: torch.Tensor, *,
               generators: list[torch.Generator], ctx: MethodContext, noise: float, samples: int) -> Attribution:
    """mean_n g(x + e_n). (B, C, H, W)"""
    stats, sigma = noisy_gradient_stats(oracle, x, target, generators, noise, samples)
    assert stats.mean is not None
    return sample_result(stats, stats.mean, sigma=sigma)


@register("smoothgrad-sq", summary="Mean squared gradient over Gaussian input noise",
          paper="Hooker et al. 2019, arXiv:1806.10758", defaults=DEFAULTS, stochastic=True,
          cost=lambda h: h["samples"], reduce="sum")
def smoothgrad_sq(oracle: GradientOracle, x: torch.Tensor, target: torch.Tensor, *,
                  generators: list[torch.Generator], ctx: MethodContext, noise: float, samples: int) -> Attribution:
    """mean_n g(x + e_n)^2. (B, C, H, W), non-negative."""
    stats, sigma = noisy_gradient_stats(oracle, x, target, generators, noise, samples)
    return sample_result(stats, stats.mean_square, sigma=sigma)


@register("vargrad", summary="Variance of the gradient over Gaussian input noise",
          paper="Adebayo et al. 2018, arXiv:1810.03307", defaults=DEFAULTS, stochastic=True,
          cost=lambda h: h["samples"], reduce="sum")
def vargrad(oracle: GradientOracle, x: torch.Tensor, target: torch.Tensor, *,
            generators: list[torch.Generator], ctx: MethodContext, noise: float, samples: int) -> Attribution:
    """mean_n g^2 - (mean_n g)^2, from a Welford accumulator. (B, C, H, W), non-negative."""
    stats, sigma = noisy_gradient_stats(oracle, x, target, generators, noise, samples)
    return sample_result(stats, stats.variance, sigma=sigma)
