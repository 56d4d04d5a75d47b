"""Geometrically-guided Integrated Gradients, `ggig` (Rahman, Lewis, Plis 2022, arXiv:2206.05903).

Take the m+1 points x_k = x' + a_k (x - x'), a_k = k/m, k = 0..m, on the straight path from the baseline x'
to the input x (both ends included). Every point climbs the target score by plain gradient ascent,

    x_k^(0) = x_k,    x_k^(t+1) = x_k^(t) + lr * g(x_k^(t)),    t = 0..T-1   (no clipping, no projection),

and the gradient of every step is kept. The map is

    max:        A = max_k max_t g(x_k^(t))                     (elementwise)
    trapezoid:  A = sum_k w_k max_t g(x_k^(t))                 (w_k the trapezoid weights, summing to 1)

in the units of the score per normalised input unit; unlike IG it is not multiplied by (x - x').

"Signed elementwise maximum" is read as the maximum of the signed values (torch.maximum), not as "the value
of largest magnitude, sign kept": the method looks for the strongest evidence *for* the class along the
ascent, so a large negative derivative is not evidence and must not win. Elements whose derivative is
negative at every point and step stay negative, which is why the default channel reduction is the signed
`sum` (an abs-based reduction would turn those into salient pixels).

`ggig_reduce` defaults to `max`, the method as published; `trapezoid` is the paper's variant. The maximum of
many signed gradients is almost all positive (98 % of the elements on the sample cat), while the trapezoid
mean keeps both signs (about 35 % negative), which the signed channel sum shows as well.

Cost: T x (m+1) gradient passes per image. All path points of all images ascend at once: one oracle call per
ascent step over the B*(m+1) points (the oracle chunks them by its batch size). On CPU the defaults (5100
passes) take minutes per image; the `cheap` setting, 11 points x 20 steps (220 passes), is about 23x cheaper.
With lr 1e-4 the ascent moves the points little (about +0.25 logit over 20 steps on the bundled model), so the
map stays close to the maximum of the straight-path gradients (correlation 0.96 with lr = 0 at that setting).
"""

from __future__ import annotations

import torch

from saliency_cli.data import baseline as make_baseline
from saliency_cli.methods.base import BASELINES, Attribution, MethodContext, expand_target, quadrature, register
from saliency_cli.methods.settings import GGIG_REDUCTIONS
from saliency_cli.oracle import GradientOracle

REDUCTIONS = GGIG_REDUCTIONS


def path_nodes(steps: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Path positions a_k = k/m (k = 0..m, m = steps - 1) and trapezoid weights w_k summing to 1: (S,), (S,).

    With a single point there is no path: it is the input itself (a = 1, w = 1).
    """
    if steps == 1:
        return torch.ones(1, device=device), torch.ones(1, device=device)
    alphas, weights = quadrature("trapezoid", steps)
    return alphas.to(device=device, dtype=torch.float32), weights.to(device=device, dtype=torch.float32)


def straight_path(x: torch.Tensor, ref: torch.Tensor, alphas: torch.Tensor) -> torch.Tensor:
    """x' + a_k (x - x') for every image and a_k: (B, C, H, W), (B, C, H, W), (S,) -> (B, S, C, H, W)."""
    return ref[:, None] + alphas.view(1, -1, 1, 1, 1) * (x - ref)[:, None]


GGIG_DEFAULTS = {"steps": 51, "iterations": 100, "step_size": 1e-4, "baseline": "mean", "ggig_reduce": "max"}


@register("ggig", summary="Max of the gradient over ascent steps from points on the IG path",
          paper="Rahman, Lewis, Plis 2022, arXiv:2206.05903", defaults=GGIG_DEFAULTS,
          stochastic=False, cost=lambda h: h["steps"] * h["iterations"], reduce="sum",
          cheap={"steps": 11, "iterations": 20}, width=lambda h: int(h["steps"]))
def ggig(oracle: GradientOracle, x: torch.Tensor, target: torch.Tensor, *, generators: list[torch.Generator],
         ctx: MethodContext, steps: int, iterations: int, step_size: float, baseline: str,
         ggig_reduce: str) -> Attribution:
    """The GGIG map (B, C, H, W), see the module docstring; steps = m + 1 path points, iterations = T.

    stats: dropped_samples, the (point, step) gradients left out for NaN/Inf (their point does not move that
    step); score_gain, the mean over path points of the target score at the last ascent step minus the first.
    """
    if baseline not in BASELINES:
        raise ValueError(f"unknown baseline {baseline!r}")
    if ggig_reduce not in REDUCTIONS:
        raise ValueError(f"ggig_reduce must be one of {REDUCTIONS}, not {ggig_reduce!r}")
    ref = make_baseline(x, baseline, ctx.bounds, generators)  # (B, C, H, W); `mean` is 0 in normalised space
    return ggig_map(oracle, x, target, ref, steps=steps, iterations=iterations, step_size=step_size,
                    ggig_reduce=ggig_reduce)


def ggig_map(oracle: GradientOracle, x: torch.Tensor, target: torch.Tensor, ref: torch.Tensor, *, steps: int,
             iterations: int, step_size: float, ggig_reduce: str) -> Attribution:
    """The GGIG map of inputs x (B, C, H, W) from references ref (B, C, H, W): (B, C, H, W), see the module
    docstring; steps x iterations gradient passes per input. Also the base attribution `ggig` of the smoothers
    (methods/base_attribution.py), at each noisy input."""
    if ggig_reduce not in REDUCTIONS:
        raise ValueError(f"ggig_reduce must be one of {REDUCTIONS}, not {ggig_reduce!r}")
    steps, iterations = int(steps), int(iterations)
    if steps < 1 or iterations < 1:
        raise ValueError("steps and iterations must be at least 1")
    b, s = x.shape[0], steps
    alphas, weights = path_nodes(s, x.device)
    points = straight_path(x, ref, alphas).flatten(0, 1)  # (B, S, C, H, W) -> (B*S, C, H, W)
    targets = expand_target(target, s)  # (B*S,)
    best = torch.full_like(points, float("-inf"))  # running max over steps, per point
    dropped = torch.zeros(b * s, dtype=torch.int64, device=x.device)
    first = last = torch.zeros(b * s, device=x.device)
    for t in range(iterations):
        g, score = oracle.gradients(points, targets)  # (B*S, C, H, W), (B*S,)
        ok = torch.isfinite(g.flatten(1)).all(1) & torch.isfinite(score)  # (B*S,)
        dropped += (~ok).to(torch.int64)
        # NaN/Inf gradients are left out of the max and do not move their points. Masked in place whether or not
        # any occurred (a no-op where all are finite), so no step waits for the device to answer `ok.all()`.
        bad = ~ok.view(-1, 1, 1, 1)
        g.masked_fill_(bad, float("-inf"))
        torch.maximum(best, g, out=best)
        g.masked_fill_(bad, 0.0)
        if t == 0:
            first = score
        last = score
        if t + 1 < iterations:  # the last step's update would never be evaluated
            points.add_(g, alpha=step_size)
    best = best.view(b, s, *x.shape[1:])  # (B*S, C, H, W) -> (B, S, C, H, W)
    seen = torch.isfinite(best.flatten(2)[:, :, 0])  # (B, S): the point had at least one finite gradient
    if ggig_reduce == "max":
        maps = best.amax(1)
    else:
        w = weights.view(1, -1) * seen  # renormalise over the points that had a finite gradient
        w = w / w.sum(1, keepdim=True).clamp(min=torch.finfo(w.dtype).tiny)
        maps = (torch.where(seen.view(b, s, 1, 1, 1), best, 0.0) * w.view(b, s, 1, 1, 1)).sum(1)
    empty = ~seen.any(1)  # every gradient of the image was NaN/Inf: the map is undefined
    maps = torch.where(empty.view(-1, 1, 1, 1), float("nan"), maps)
    gain = (last - first).view(b, s).nan_to_num(0.0).mean(1)  # (B*S,) -> (B, S) -> (B,)
    return Attribution(maps, {"dropped_samples": dropped.view(b, s).sum(1), "score_gain": gain})

