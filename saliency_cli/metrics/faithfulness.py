"""Faithfulness: does removing (or keeping) what the map calls important change the model's answer?

- `deletion` / `insertion` (Petsiuk et al. 2018, RISE): pixels removed from the input (inserted into the
  reference) in the map's order; area under the target's softmax-probability curve over the fraction of
  pixels perturbed, in [0, 1]. Deletion: lower is better; insertion: higher is better.
- `aupc` (Goh et al. 2021, SmoothTaylor; after Samek et al. 2017): 15x15 windows ranked by mean |map|, the
  most relevant non-overlapping ones replaced one after another by uniform noise; area under the target
  logit normalised by its clean value, over the fraction of the 30 steps done. Lower is better.
- `keep` / `remove` (the practical form of Thakur & Fischmeister 2020's reconstruction check): keep only (or
  blank out) the top-k % most salient pixels and report whether the top-1 prediction is still the target
  (1 or 0; the mean is the survival rate). keep: higher is better; remove: lower is better.

Every step of every curve goes through the model in chunked batches (metrics.base.perturbation_curve).
"""

from __future__ import annotations

import torch

from saliency_cli.metrics.base import Batch, Scores, flat_rank, perturbation_curve, pixel_thresholds, register
from saliency_cli.numerics import trapezoid_mean

RISE = "Petsiuk et al. 2018, RISE, arXiv:1806.07421"


def _pixel_curve(batch: Batch, steps: int, insert: bool) -> Scores:
    rank = flat_rank(batch.maps)  # (R, H, W), 0 = most salient
    n = batch.maps[0].numel()
    thresholds = pixel_thresholds(n, steps, batch.device)  # (S,)
    if insert:
        # Step s shows the input on the s-th fraction of most salient pixels and the reference elsewhere.
        out = perturbation_curve(batch.oracle, batch.reference(), batch.x, batch.target, rank, thresholds)
    else:
        out = perturbation_curve(batch.oracle, batch.x, batch.reference(), batch.target, rank, thresholds)
    x = thresholds.float() / n
    return Scores(trapezoid_mean(out.prob), out.prob, x, "fraction of pixels " + ("inserted" if insert else
                                                                                 "deleted"), "probability")


@register("deletion", summary="Area under the class probability as the most salient pixels are removed",
          paper=RISE, higher_is_better=False, defaults={"steps": 50}, cost=lambda o: o["steps"] + 1)
def deletion(batch: Batch, *, steps: int) -> Scores:
    """AUC of p_y(x_k), where x_k has its k/steps most salient pixels replaced by the reference (blur by
    default), k = 0..steps; trapezoid rule over the fraction in [0, 1]. (R,) in [0, 1], curves (R, steps+1)."""
    return _pixel_curve(batch, steps, insert=False)


@register("insertion", summary="Area under the class probability as the most salient pixels are inserted",
          paper=RISE, higher_is_better=True, defaults={"steps": 50}, cost=lambda o: o["steps"] + 1)
def insertion(batch: Batch, *, steps: int) -> Scores:
    """AUC of p_y(x_k), where x_k is the reference with the k/steps most salient pixels of the input put back,
    k = 0..steps; trapezoid rule over the fraction in [0, 1]. (R,) in [0, 1], curves (R, steps+1)."""
    return _pixel_curve(batch, steps, insert=True)


def window_order(maps: torch.Tensor, size: int, regions: int) -> torch.Tensor:
    """Greedy non-overlapping windows, most relevant first: (R, H, W) -> (R, H, W) int64 holding, for every
    pixel, the index (0..regions-1) of the window covering it, or `regions` when none does.

    Window relevance is the mean |map| over a size x size window at every position (stride 1); the best
    window is taken, every window overlapping it is ruled out, and so on (the reference code's procedure).
    One Python iteration per window, each vectorised over the rows."""
    r, h, w = maps.shape
    size = min(size, h, w)
    score = torch.nn.functional.avg_pool2d(maps.abs()[:, None].float(), size, stride=1)[:, 0]  # (R, h', w')
    ph, pw = score.shape[1:]
    score = score.reshape(r, -1).clone()
    py = torch.arange(ph, device=maps.device).repeat_interleave(pw)  # (P,) window top
    px = torch.arange(pw, device=maps.device).repeat(ph)  # (P,) window left
    yy = torch.arange(h, device=maps.device).view(1, h, 1)
    xx = torch.arange(w, device=maps.device).view(1, 1, w)
    order = torch.full((r, h, w), regions, dtype=torch.long, device=maps.device)
    rows = torch.arange(r, device=maps.device)
    for j in range(regions):
        best = score.argmax(1)  # (R,)
        found = torch.isfinite(score[rows, best])  # rows with room left for a window
        top, left = py[best], px[best]
        inside = ((yy >= top.view(-1, 1, 1)) & (yy < (top + size).view(-1, 1, 1))
                  & (xx >= left.view(-1, 1, 1)) & (xx < (left + size).view(-1, 1, 1)))  # (R, H, W)
        order = torch.where(inside & found.view(-1, 1, 1), torch.full_like(order, j), order)
        overlap = ((py.view(1, -1) - top.view(-1, 1)).abs() < size) & ((px.view(1, -1) - left.view(-1, 1)).abs()
                                                                     < size)  # (R, P)
        score = score.masked_fill(overlap, float("-inf"))
    return order


@register("aupc", summary="Area under the perturbation curve: 15x15 windows replaced by uniform noise",
          paper="Goh et al. 2021, SmoothTaylor, arXiv:2004.10484; Samek et al. 2017",
          higher_is_better=False, defaults={"window": 15, "regions": 30}, cost=lambda o: o["regions"] + 1)
def aupc(batch: Batch, *, window: int, regions: int) -> Scores:
    """AUC of f_y(x_k) / |f_y(x)| (target logit), k = 0..regions, where x_k has its k most relevant
    non-overlapping window x window regions replaced by uniform noise in pixel space [0, 1] (normalised
    like the input). The x axis is the fraction of the `regions` steps done, so the value is the reference
    code's Simpson area (dx = 1 region) divided by `regions`, up to the quadrature rule. One noise draw per
    image, from its generator and shared by every method of that image. (R,), curves (R, regions + 1)."""
    order = window_order(batch.maps, window, regions)
    gens = batch.generators("aupc")
    u = torch.stack([torch.rand(batch.x.shape[1:], generator=g, device=batch.device) for g in gens])
    noise = batch.bounds.lo + u * (batch.bounds.hi - batch.bounds.lo)  # (R, C, H, W) uniform pixels, normalised
    thresholds = torch.arange(regions + 1, device=batch.device)
    out = perturbation_curve(batch.oracle, batch.x, noise, batch.target, order, thresholds)
    curves = out.logit / out.logit[:, :1].abs().clamp(min=1e-12)
    return Scores(trapezoid_mean(curves), curves, thresholds.float() / regions, "fraction of windows perturbed",
                  "logit / clean logit")


def _top_fraction(batch: Batch, fraction: float, keep: bool) -> Scores:
    rank = flat_rank(batch.maps)
    n = batch.maps[0].numel()
    k = torch.tensor([round(fraction * n)], device=batch.device)
    if keep:  # the reference everywhere except the k most salient pixels
        out = perturbation_curve(batch.oracle, batch.x, batch.reference(), batch.target, rank, k, invert=True)
    else:  # the reference on the k most salient pixels
        out = perturbation_curve(batch.oracle, batch.x, batch.reference(), batch.target, rank, k)
    return Scores(out.top1[:, 0])


@register("keep", summary="Does the prediction survive when only the top 20 % salient pixels are kept?",
          paper="Thakur & Fischmeister 2020 (reconstruction check, practical form)", higher_is_better=True,
          defaults={"fraction": 0.2}, cost=lambda o: 1)
def keep(batch: Batch, *, fraction: float) -> Scores:
    """1 if argmax f(x_keep) = y, where x_keep is the reference except the `fraction` most salient pixels,
    else 0. (R,)"""
    return _top_fraction(batch, fraction, keep=True)


@register("remove", summary="Does the prediction survive when the top 20 % salient pixels are blanked out?",
          paper="Thakur & Fischmeister 2020 (reconstruction check, practical form)", higher_is_better=False,
          defaults={"fraction": 0.2}, cost=lambda o: 1)
def remove(batch: Batch, *, fraction: float) -> Scores:
    """1 if argmax f(x_remove) = y, where x_remove has its `fraction` most salient pixels replaced by the
    reference, else 0. (R,)"""
    return _top_fraction(batch, fraction, keep=False)
