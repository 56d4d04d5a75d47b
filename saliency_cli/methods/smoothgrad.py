"""The SmoothGrad family: `smoothgrad`, `smoothgrad-sq`, `vargrad` (Smilkov 2017; Hooker 2019; Adebayo 2018).

All three draw N Gaussian samples x + e_n, e_n ~ N(0, sigma^2), and accumulate the base attribution at them
(the gradient by default; `--base input-x-gradient | integrated-gradients | ggig`, methods/base_attribution.py)
in one streaming (Welford) pass; they differ only in the statistic kept. sigma is `noise * (max(x) - min(x))`
per image (`--noise-unit relative`, the paper's 10-20 %) or `noise` itself in model-input units (`absolute`,
Captum's `stdevs`). `-n auto` draws rounds of samples until two independent halves agree (methods/convergence.py).
"""

from __future__ import annotations

from typing import Any

import torch

from saliency_cli.methods.base import (
    Attribution,
    MethodContext,
    NoisyPoints,
    SampleStats,
    noise_sigma,
    noise_stats,
    register,
    sample_result,
)
from saliency_cli.methods.base_attribution import base_cost, base_width, check_base_options, prepare_base, stream_base
from saliency_cli.methods.convergence import ROUND, Statistic, mean_of, sample_rounds
from saliency_cli.oracle import GradientOracle

DEFAULTS = {"noise": 0.15, "samples": 50, "noise_unit": "relative", "base": "gradient", "converge": 0.95,
            "max_samples": 400}
PAPER = "Smilkov et al. 2017, arXiv:1706.03825"


def sample_count(hyper: dict[str, Any]) -> int:
    """Samples per image at these settings: `samples`, or its cap `max_samples` when it is `auto`."""
    return int(hyper["max_samples"] if hyper["samples"] == "auto" else hyper["samples"])


def smoother_cost(hyper: dict[str, Any]) -> int:
    """Model passes per image: samples (the cap with `-n auto`) times the base's passes per sample."""
    return sample_count(hyper) * base_cost(hyper)


def smoother_width(hyper: dict[str, Any], extra: int = 0) -> int:
    """Model inputs per image in one oracle call: the samples of a round (all N, or a round of `-n auto`), plus
    `extra` clean inputs, times the base's inputs per sample."""
    n = ROUND if hyper["samples"] == "auto" else int(hyper["samples"]) + extra
    return n * base_width(str(hyper.get("base", "gradient")), hyper)


def noisy_estimate(oracle: GradientOracle, x: torch.Tensor, target: torch.Tensor, generators: list[torch.Generator],
                   ctx: MethodContext, statistic: Statistic, *, noise: float, samples: int | str, noise_unit: str,
                   base: str, converge: float, max_samples: int, base_options: dict[str, Any]) -> Attribution:
    """statistic over n = 1..N of the base attribution A(x + e_n), e_n = sigma * N(0, 1) drawn from each image's
    generator, sigma (B,) absolute (`noise_sigma`). (B, C, H, W); stats: sigma, noise_absolute, noise_relative,
    dropped_samples; with samples = auto also samples_used and split_half."""
    check_base_options(base, base_options)
    prepared = prepare_base(base, x, generators, ctx, base_options)  # the baseline first, then the noise
    sigma = noise_sigma(x, float(noise), noise_unit)  # (B,)
    scale = sigma.view(-1, 1, 1, 1, 1)
    if samples == "auto":
        result = sample_rounds(oracle, x, target, generators, prepared, scale, statistic, converge=float(converge),
                               cap=int(max_samples))
        result.stats.update(noise_stats(x, sigma))
        return result
    points = NoisyPoints(x, generators, int(samples), scale)  # (B, N, C, H, W), drawn chunk by chunk
    stats = SampleStats()
    stream_base(oracle, points, target, prepared, lambda a, sl: stats.update(a))
    return sample_result(stats, statistic(stats), **noise_stats(x, sigma))


def _mean_square(s: SampleStats) -> torch.Tensor:
    return s.mean_square


def _variance(s: SampleStats) -> torch.Tensor:
    return s.variance


@register("smoothgrad", summary="Mean gradient (or --base attribution) over Gaussian input noise", paper=PAPER,
          defaults=DEFAULTS, stochastic=True, cost=smoother_cost, width=smoother_width)
def smoothgrad(oracle: GradientOracle, x: torch.Tensor, target: torch.Tensor, *,
               generators: list[torch.Generator], ctx: MethodContext, noise: float, samples: int | str,
               noise_unit: str = "relative", base: str = "gradient", converge: float = 0.95, max_samples: int = 400,
               **base_options: Any) -> Attribution:
    """mean_n A(x + e_n), A the base attribution (default the gradient g). (B, C, H, W)"""
    return noisy_estimate(oracle, x, target, generators, ctx, mean_of, noise=noise, samples=samples,
                          noise_unit=noise_unit, base=base, converge=converge, max_samples=max_samples,
                          base_options=base_options)


@register("smoothgrad-sq", summary="Mean squared gradient (or --base attribution) over Gaussian input noise",
          paper="Hooker et al. 2019, arXiv:1806.10758", defaults=DEFAULTS, stochastic=True, cost=smoother_cost,
          reduce="sum", width=smoother_width)
def smoothgrad_sq(oracle: GradientOracle, x: torch.Tensor, target: torch.Tensor, *,
                  generators: list[torch.Generator], ctx: MethodContext, noise: float, samples: int | str,
                  noise_unit: str = "relative", base: str = "gradient", converge: float = 0.95,
                  max_samples: int = 400, **base_options: Any) -> Attribution:
    """mean_n A(x + e_n)^2. (B, C, H, W), non-negative."""
    return noisy_estimate(oracle, x, target, generators, ctx, _mean_square, noise=noise, samples=samples,
                          noise_unit=noise_unit, base=base, converge=converge, max_samples=max_samples,
                          base_options=base_options)


@register("vargrad", summary="Variance of the gradient (or --base attribution) over Gaussian input noise",
          paper="Adebayo et al. 2018, arXiv:1810.03307", defaults=DEFAULTS, stochastic=True, cost=smoother_cost,
          reduce="sum", width=smoother_width)
def vargrad(oracle: GradientOracle, x: torch.Tensor, target: torch.Tensor, *,
            generators: list[torch.Generator], ctx: MethodContext, noise: float, samples: int | str,
            noise_unit: str = "relative", base: str = "gradient", converge: float = 0.95, max_samples: int = 400,
            **base_options: Any) -> Attribution:
    """mean_n A^2 - (mean_n A)^2, from a Welford accumulator. (B, C, H, W), non-negative."""
    return noisy_estimate(oracle, x, target, generators, ctx, _variance, noise=noise, samples=samples,
                          noise_unit=noise_unit, base=base, converge=converge, max_samples=max_samples,
                          base_options=base_options)
