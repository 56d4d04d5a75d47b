"""Plain gradient baselines: `gradient` and `input-x-gradient`."""

from __future__ import annotations

import torch

from saliency_cli.methods.base import Attribution, MethodContext, register
from saliency_cli.oracle import GradientOracle


@register("gradient", summary="Vanilla gradient of the target score, g(x)",
          paper="Simonyan et al. 2014, arXiv:1312.6034", defaults={}, stochastic=False, cost=lambda h: 1)
def gradient(oracle: GradientOracle, x: torch.Tensor, target: torch.Tensor, *,
             generators: list[torch.Generator], ctx: MethodContext) -> Attribution:
    """g(x) = d f_y / d x. (B, C, H, W)"""
    g, _ = oracle.gradients(x, target)
    return Attribution(g)


@register("input-x-gradient", summary="Input times gradient, x * g(x)",
          paper="Shrikumar et al. 2016, arXiv:1605.01713", defaults={}, stochastic=False, cost=lambda h: 1,
          reduce="sum")
def input_x_gradient(oracle: GradientOracle, x: torch.Tensor, target: torch.Tensor, *,
                     generators: list[torch.Generator], ctx: MethodContext) -> Attribution:
    """x * g(x), elementwise. (B, C, H, W)"""
    g, _ = oracle.gradients(x, target)
    return Attribution(x * g)
