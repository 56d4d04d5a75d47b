"""Channel reduction (C, H, W) -> (H, W) and display normalisation, kept apart from the maths."""

from __future__ import annotations

import numpy as np
import torch

REDUCTIONS = ("sum", "abs-sum", "max-abs", "none", "mean-abs-sum")
SIGNED = {"sum": True, "abs-sum": False, "max-abs": False, "none": True, "mean-abs-sum": False}


def reduce_channels(maps: torch.Tensor, how: str, display: torch.Tensor | None = None) -> torch.Tensor:
    """(B, C, H, W) -> (B, H, W) by a signed channel sum, a sum of absolute values or the largest absolute
    value; `none` keeps (B, C, H, W). `mean-abs-sum` is the method's own `display` (B, H, W), the mean of each
    averaged explanation's sum_c |A_c| (NoiseGrad/FusionGrad), which `maps` (their mean) cannot give."""
    if how == "mean-abs-sum":
        if display is None:
            raise ValueError("reduction 'mean-abs-sum' needs the method's per-explanation display map "
                             "(only noisegrad and fusiongrad give one)")
        return display
    if how == "sum":
        return maps.sum(1)
    if how == "abs-sum":
        return maps.abs().sum(1)
    if how == "max-abs":
        return maps.abs().amax(1)
    if how == "none":
        return maps
    raise ValueError(f"unknown reduction {how!r}")


def display_scale(m: np.ndarray, percentile: float = 99.0) -> tuple[np.ndarray, float, bool]:
    """A 2-D map as float64 (a (C, H, W) map summed over C, non-finite values as 0), the value shown at full
    colour (the `percentile`-th of |m|, or max |m| when that is 0; 0 for an all-zero map), and whether the map
    has negative values (signed). In the map's own units."""
    m = np.asarray(m, dtype=np.float64)
    if m.ndim == 3:
        m = m.sum(0)
    m = np.nan_to_num(m, nan=0.0, posinf=0.0, neginf=0.0)
    signed = bool((m < 0).any())
    scale = float(np.percentile(np.abs(m), percentile)) if m.size else 0.0
    if scale <= 0:
        scale = float(np.abs(m).max()) if m.size else 0.0
    return m, max(scale, 0.0), signed


def display_map(m: np.ndarray, percentile: float = 99.0) -> tuple[np.ndarray, bool]:
    """A 2-D (or (C, H, W), summed) map scaled for display, and whether it is signed.

    Unsigned maps go to [0, 1] by their `percentile`-th value; maps with negative values to [-1, 1] by the
    percentile of |m| (see `display_scale`). Values beyond are clipped; a map that is all zero stays zero.
    """
    m, scale, signed = display_scale(m, percentile)
    if scale <= 0:
        return np.zeros_like(m), signed
    lo = -1.0 if signed else 0.0
    return np.clip(m / scale, lo, 1.0), signed
