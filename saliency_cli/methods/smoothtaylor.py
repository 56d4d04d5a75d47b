"""SmoothTaylor (Goh, Lapuschkin, Weber, Samek, Binder; ICPR 2020, arXiv:2004.10484).

The average of first-order Taylor terms of the target score around N random roots `z_n = x + e_n`,
`e_n ~ N(0, sigma^2)`:

    R(x) = mean_n (x - z_n) * g(z_n) = -mean_n e_n * g(x + e_n)

It is signed; the default reduction is `abs-sum` because positive and negative relevance of neighbouring pixels
almost cancel in a signed display of a photo (`--reduce sum` keeps the sign). For a linear score `w . x + b` it is
`-mean_n e_n * w` (zero in expectation).
`smoothtaylor_at` computes it for a given absolute sigma per image: the building block of the
adaptive-noise search, which calls it for each candidate sigma.
"""

from __future__ import annotations

import torch

from saliency_cli.methods.base import (
    Attribution,
    Context,
    SampleStats,
    gaussian,
    register,
    relative_sigma,
    stream_gradients,
)
from saliency_cli.oracle import GradientOracle

PAPER = "Goh, Lapuschkin, Weber, Samek, Binder 2021, ICPR 2020, arXiv:2004.10484"

# The reference's default is 0.5 absolute in normalised units. For ImageNet-normalised images the range
# max(x) - min(x) is about 4.7 (at most 4.758), so the relative equivalent is 0.5 / 4.7 = 0.106.
TAYLOR_NOISE = 0.106


def smoothtaylor_at(oracle: GradientOracle, x: torch.Tensor, target: torch.Tensor,
                    sigma: torch.Tensor | float, unit_noise: torch.Tensor) -> Attribution:
    """SmoothTaylor for a given absolute sigma per image: `-mean_n (sigma u_n) * g(x + sigma u_n)`. (B, C, H, W)

    sigma: (B,) absolute std in x's units (a float applies to every image). unit_noise: (B, N, C, H, W)
    standard normal draws, e.g. `gaussian(generators, N, x)`; a search over sigma should draw them once and
    reuse them for every candidate, so candidates differ only in sigma (common random numbers).
    stats: sigma (B,); dropped_samples.
    """
    b = x.shape[0]
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).expand(b)  # () or (B,) -> (B,)
    eps = unit_noise * sigma.view(-1, 1, 1, 1, 1)  # (B, N, C, H, W)
    stats = SampleStats()
    # (x - z_n) * g(z_n) = -e_n * g(z_n), formed chunk by chunk as the gradients arrive
    stream_gradients(oracle, x[:, None] + eps, target, stats, transform=lambda g, sl: -eps[:, sl] * g)
    assert stats.mean is not None
    return stats.result(stats.mean, sigma=sigma.clone())


@register("smoothtaylor", summary="Mean first-order Taylor term around Gaussian roots near the input",
          paper=PAPER, defaults={"noise": TAYLOR_NOISE, "samples": 150}, stochastic=True,
          cost=lambda h: int(h["samples"]), reduce="abs-sum", cheap={"samples": 50})
def smoothtaylor(oracle: GradientOracle, x: torch.Tensor, target: torch.Tensor, *,
                 generators: list[torch.Generator], ctx: Context, noise: float, samples: int) -> Attribution:
    """mean_n (x - z_n) * g(z_n), z_n = x + e_n, e_n ~ N(0, sigma^2), sigma = noise * (max(x) - min(x)). (B, C, H, W)

    noise is relative: the default 0.106 is the reference's 0.5 absolute in ImageNet-normalised units divided by
    a typical image range of about 4.7. stats: sigma (B,), the absolute std; dropped_samples.
    """
    sigma = relative_sigma(x, noise)  # (B,)
    return smoothtaylor_at(oracle, x, target, sigma, gaussian(generators, int(samples), x))
