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

IG_DEFAULTS = {"steps": 50, "baseline": "black", "quadrature": "gausslegendre"}


@register("integrated-gradients", summary="Path integral of the gradient from a baseline to the input",
          paper="Sundararajan et al. 2017, arXiv:1703.01365", defaults=IG_DEFAULTS,
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
    attr = path_integral(oracle, x, target, ref, steps, rule)
    ends = oracle.scores(torch.cat([x, ref]), torch.cat([target, target]))  # (2B,)
    diff = ends[:b] - ends[b:]
    gap = attr.flatten(1).sum(1) - diff
    return Attribution(attr, {"completeness_gap": gap, "score_difference": diff})


def path_integral(oracle: GradientOracle, x: torch.Tensor, target: torch.Tensor, ref: torch.Tensor, steps: int,
                  rule: str) -> torch.Tensor:
    """IG's map for given references: `(x - x') * sum_k w_k g(x' + a_k (x - x'))`, (a_k, w_k) the `rule`'s
    `steps` points on [0, 1]. x, ref: (N, C, H, W), target (N,) -> (N, C, H, W); steps gradient passes per
    input, all N*steps path points in one oracle call. Also the base attribution `integrated-gradients` of the
    smoothers (methods/base_attribution.py), at each noisy input."""
    n = x.shape[0]
    alphas, weights = quadrature(rule, steps)
    alphas = alphas.to(device=x.device, dtype=torch.float32)
    weights = weights.to(device=x.device, dtype=torch.float32)
    delta = x - ref
    path = ref[:, None] + alphas.view(1, -1, 1, 1, 1) * delta[:, None]  # (N, S, C, H, W)
    g, _ = oracle.gradients(path.flatten(0, 1), expand_target(target, steps))
    g = g.view(n, steps, *x.shape[1:])  # (N*S, C, H, W) -> (N, S, C, H, W)
    avg = (g * weights.view(1, -1, 1, 1, 1)).sum(1)
    return delta * avg
