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
    MethodContext,
    SampleStats,
    gaussian,
    register,
    relative_sigma,
    sample_result,
    stream_gradients,
)
from saliency_cli.methods.settings import OBJECTIVES
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
    return sample_result(stats, stats.mean, sigma=sigma.clone())




@register("smoothtaylor", summary="Mean first-order Taylor term around Gaussian roots near the input",
          paper=PAPER, defaults={"noise": TAYLOR_NOISE, "samples": 150, "objective": "noise"}, stochastic=True,
          cost=lambda h: int(h["samples"]) * (1 if h["noise"] != "auto" else 2 * ADAPTIVE_MAX_STEPS + 1),
          reduce="abs-sum", cheap={"samples": 50})
def smoothtaylor(oracle: GradientOracle, x: torch.Tensor, target: torch.Tensor, *,
                 generators: list[torch.Generator], ctx: MethodContext, noise: float | str, samples: int,
                 objective: str = "noise") -> Attribution:
    """mean_n (x - z_n) * g(z_n), z_n = x + e_n, e_n ~ N(0, sigma^2), sigma = noise * (max(x) - min(x)). (B, C, H, W)

    noise is relative: the default 0.106 is the reference's 0.5 absolute in ImageNet-normalised units divided by
    a typical image range of about 4.7. noise = "auto" searches sigma per image (`adaptive_sigma_search`),
    minimising `objective` (`noise`: AUTVC, or `aupc`). stats: sigma (B,), the absolute std; dropped_samples;
    with auto, objective (B,), the objective's value at the chosen sigma.
    """
    unit = gaussian(generators, int(samples), x)  # (B, N, C, H, W), drawn once: every candidate reuses it
    if noise == "auto":
        return adaptive_sigma_search(oracle, x, target, unit, ctx, objective)
    return smoothtaylor_at(oracle, x, target, relative_sigma(x, float(noise)), unit)


ADAPTIVE_MAX_STEPS = 20


def adaptive_sigma_search(oracle: GradientOracle, x: torch.Tensor, target: torch.Tensor, unit: torch.Tensor,
                          ctx: MethodContext, objective: str, *, step: float = 0.1, shrink: float = 0.9,
                          patience: int = 3, max_steps: int = ADAPTIVE_MAX_STEPS) -> Attribution:
    """The paper's adaptive noising: a greedy 1-D search over the absolute sigma of each image, lower objective
    is better. Start at mean|x|; each step tries sigma + step and sigma - step (the better of the two, if it beats
    the current value, is taken); a step that improves nothing multiplies the step by `shrink` and counts a
    failure; an image stops after `patience` failures in a row, and all stop after `max_steps` steps. The same
    unit noise serves every candidate (common random numbers), so candidates differ only in sigma. Images of
    the batch search side by side: one SmoothTaylor call per candidate direction for the whole batch.
    (B, C, H, W); stats: sigma (B,) chosen, objective (B,) its value, dropped_samples.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, not {objective!r}")
    if ctx.scorer is None:
        raise ValueError("smoothtaylor --noise auto needs a metric scorer in its context (ctx.scorer)")
    scorer = ctx.scorer
    b = x.shape[0]

    def evaluate(sigma: torch.Tensor) -> tuple[Attribution, torch.Tensor]:
        result = smoothtaylor_at(oracle, x, target, sigma, unit)
        return result, scorer(objective, oracle, x, target, result.maps).float()

    sigma = x.abs().flatten(1).mean(1)  # (B,)
    best, best_value = evaluate(sigma)
    steps = torch.full((b,), step, device=x.device)
    failures = torch.zeros(b, dtype=torch.int64, device=x.device)
    for _ in range(max_steps):
        active = failures < patience
        if not bool(active.any()):
            break
        improved = torch.zeros(b, dtype=torch.bool, device=x.device)
        for direction in (1.0, -1.0):
            candidate = (sigma + direction * steps).clamp(min=1e-6)
            result, value = evaluate(candidate)
            better = active & (value < best_value)
            if bool(better.any()):
                keep = better.view(-1, 1, 1, 1)
                best = Attribution(torch.where(keep, result.maps, best.maps),
                                   {k: torch.where(better, result.stats[k], best.stats[k]) for k in best.stats})
                best_value = torch.where(better, value, best_value)
                sigma = torch.where(better, candidate, sigma)
                improved |= better
        failures = torch.where(improved, torch.zeros_like(failures), failures + (active & ~improved).long())
        steps = torch.where(active & ~improved, steps * shrink, steps)
    best.stats["sigma"] = sigma
    best.stats["objective"] = best_value
    return best
