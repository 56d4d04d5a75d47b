"""Smoothness and sparseness of the maps themselves; no forward passes.

- `noise` (AUTVC, Goh et al. 2021, SmoothTaylor): average total variation of the normalised |map| over a
  Gaussian pyramid; lower is smoother.
- `sparseness` (Chalasani et al. 2020): Gini index of |map|; higher is sparser.
"""

from __future__ import annotations

import math

import torch

from saliency_cli.metrics.base import Batch, Scores, register
from saliency_cli.numerics import trapezoid_mean


def normalise_percentile(maps: torch.Tensor, percentile: float = 99.0) -> torch.Tensor:
    """(|m| - min|m|) / (q - min|m|), clipped to [0, 1], with q the percentile of |m| per map. (R, H, W)"""
    a = maps.abs().float()
    flat = a.reshape(a.shape[0], -1)
    lo = flat.amin(1).view(-1, 1, 1)
    hi = torch.quantile(flat, percentile / 100.0, dim=1).view(-1, 1, 1)
    scale = (hi - lo).clamp(min=1e-12)
    return ((a - lo) / scale).clamp(0, 1)


def average_total_variation(maps: torch.Tensor) -> torch.Tensor:
    """(sum |m[:, j+1] - m[:, j]| + sum |m[i+1] - m[i]|) / (H * W) of each (H, W) map: (R, H, W) -> (R,)."""
    dx = (maps[:, :, 1:] - maps[:, :, :-1]).abs().flatten(1).sum(1)
    dy = (maps[:, 1:] - maps[:, :-1]).abs().flatten(1).sum(1)
    return (dx + dy) / (maps.shape[1] * maps.shape[2])


def gaussian_pyramid(maps: torch.Tensor, downscale: float, min_size: int) -> list[torch.Tensor]:
    """Levels of skimage's `pyramid_gaussian`: the map, then repeatedly Gaussian-smoothed (sigma =
    2 * downscale / 6, reflected borders) and resized bilinearly to ceil(size / downscale), while both sides
    stay at least min_size. (R, H, W) -> list of (R, h_l, w_l)."""
    from torchvision.transforms.functional import gaussian_blur  # type: ignore[import-untyped]

    sigma = 2 * downscale / 6.0
    ksize = 2 * math.ceil(4 * sigma) + 1
    levels = [maps]
    cur = maps[:, None].float()
    while True:
        h, w = math.ceil(cur.shape[-2] / downscale), math.ceil(cur.shape[-1] / downscale)
        if h < min_size or w < min_size:
            break
        cur = gaussian_blur(cur, [ksize, ksize], [sigma, sigma])
        cur = torch.nn.functional.interpolate(cur, size=(h, w), mode="bilinear", align_corners=False)
        levels.append(cur[:, 0])
    return levels


@register("noise", summary="Total variation of the normalised |map| averaged over a Gaussian pyramid (AUTVC)",
          paper="Goh et al. 2021, SmoothTaylor, arXiv:2004.10484", higher_is_better=False,
          defaults={"downscale": 1.5, "min_size": 30, "percentile": 99.0}, cost=lambda o: 0)
def noise(batch: Batch, *, downscale: float, min_size: int, percentile: float) -> Scores:
    """AUTVC = area under ATV(level) over the pyramid levels, where ATV is the average total variation of
    the level normalised by its own `percentile` (reference code: `heatmap_normalize` per level). The area
    uses the trapezoid rule with dx = 1 level (the reference: Simpson's rule, same units). (R,) >= 0;
    curves (R, L): ATV per level."""
    levels = gaussian_pyramid(batch.maps, downscale, min_size)
    atv = torch.stack([average_total_variation(normalise_percentile(m, percentile)) for m in levels], 1)  # (R, L)
    area = trapezoid_mean(atv) * (atv.shape[1] - 1) if atv.shape[1] > 1 else atv[:, 0]
    return Scores(area, atv, torch.arange(atv.shape[1], device=batch.device, dtype=torch.float32),
                  "pyramid level", "average total variation")


def gini(maps: torch.Tensor) -> torch.Tensor:
    """Gini index of |m| per map: G = sum_k (2k - n - 1) a_(k) / (n sum a), a sorted ascending, k = 1..n.
    0 for a constant map, 1 - 1/n for a single non-zero pixel; 0 for an all-zero map. (R, ...) -> (R,)"""
    a = maps.abs().reshape(maps.shape[0], -1).double().sort(1).values
    n = a.shape[1]
    k = torch.arange(1, n + 1, device=a.device, dtype=torch.float64)
    total = a.sum(1)
    g = ((2 * k - n - 1) * a).sum(1) / (n * total.clamp(min=1e-300))
    return torch.where(total > 0, g, torch.zeros_like(g)).float()


@register("sparseness", summary="Gini index of |map| (1: one pixel holds everything, 0: uniform)",
          paper="Chalasani et al. 2020, arXiv:1810.06583", higher_is_better=True, defaults={}, cost=lambda o: 0)
def sparseness(batch: Batch) -> Scores:
    """Gini index of |map|. (R,) in [0, 1)."""
    return Scores(gini(batch.maps))
