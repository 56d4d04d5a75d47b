"""Integrated Gradients (Sundararajan et al. 2017) with a choice of quadrature and baseline."""

from __future__ import annotations

import torch

from saliency_cli.data import baseline
from saliency_cli.methods.base import (
    BASELINES,
    QUADRATURES,
    Attribution,
    MethodContext,
    expand_target,
    quadrature,
    register,
)
from saliency_cli.oracle import GradientOracle


@register("integrated-gradients", summary="Path integral of the gradient from a baseline to the input",
          paper="Sundararajan et al. 2017, arXiv:1703.01365",
          defaults={"steps": 50, "baseline": "black", "quadrature": "gausslegendre"},
          stochastic=False, cost=lambda h: h["steps"] + 2, reduce="sum")
def integrated_gradients(oracle: GradientOracle, x: torch.Tensor, target: torch.Tensor, *,
                         generators: list[torch.Generator], ctx: MethodContext, steps: int, baseline: str,
                         quadrature: str) -> Attribution:
    """(x - x') * sum_k w_k g(x' + a_k (x - x')), with (a_k, w_k) the chosen quadrature on [0, 1].

    stats: completeness_gap = sum(attr) - (f(x) - f(x')) per image, and the score difference itself.
    """
    return _ig(oracle, x, target, generators, ctx, steps, baseline, quadrature)


def _ig(oracle: GradientOracle, x: torch.Tensor, target: torch.Tensor, generators: list[torch.Generator],
        ctx: MethodContext, steps: int, baseline_kind: str, rule: str) -> Attribution:
    if baseline_kind not in BASELINES:
        raise ValueError(f"unknown baseline {baseline_kind!r}")
    if rule not in QUADRATURES:
        raise ValueError(f"unknown quadrature {rule!r}")
    b = x.shape[0]
    ref = baseline(x, baseline_kind, ctx.bounds, generators)  # (B, C, H, W)
    alphas, weights = quadrature(rule, steps)
    alphas = alphas.to(device=x.device, dtype=torch.float32)
    weights = weights.to(device=x.device, dtype=torch.float32)
    delta = x - ref
    path = ref[:, None] + alphas.view(1, -1, 1, 1, 1) * delta[:, None]  # (B, S, C, H, W)
    g, _ = oracle.gradients(path.flatten(0, 1), expand_target(target, steps))
    g = g.view(b, steps, *x.shape[1:])  # (B*S, C, H, W) -> (B, S, C, H, W)
    avg = (g * weights.view(1, -1, 1, 1, 1)).sum(1)
    attr = delta * avg
    ends = oracle.scores(torch.cat([x, ref]), torch.cat([target, target]))  # (2B,)
    diff = ends[:b] - ends[b:]
    gap = attr.flatten(1).sum(1) - diff
    return Attribution(attr, {"completeness_gap": gap, "score_difference": diff})
