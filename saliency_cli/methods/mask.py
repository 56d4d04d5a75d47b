"""Mask optimisation, `mask` (Thakur & Fischmeister, ICPR 2020, arXiv:2006.09504). Black-box: no gradients.

Each chain carries an s x s cell mask; about `keep` of the cells are on at the start. At every step the cell
mask is upsampled RISE-style (Petsiuk et al. 2018: bilinear to (s+1) * ceil(H/s) pixels per side, a random
shift of less than one cell, crop to H x W), giving M in [0, 1]^(H x W), and the model sees

    x_M = x' + M * (x - x')        (masked pixels take the baseline value x'; `black` by default, i.e. the
                                    image multiplied by the mask in pixel space, as the paper does)

With p the target-class probability of x_M and p_prev that of the chain's previous step, every cell then
moves on independently: an on-cell stays on with probability p, an off-cell turns on with probability 1 - p.
A good mask (high p) is kept; a bad one is reshuffled, so cells that matter for the class spend more time on.

"Newly-on cells are down-weighted by 0.02 * |p - p_prev|" is read as: a cell that has just turned on enters
the next mask with the value 1 - 0.02 |p - p_prev| instead of 1 (it has not been tested yet, and the less
stable the chain's probability, the less it counts); from its next step on, if it stays on, it is 1 again.
The other reading, multiplying the cell by 0.02 |p - p_prev| <= 0.02, would make a newly-on cell invisible
to the model at the very step that is meant to test it, so it is not taken. On the first step p_prev = p.

Every evaluated mask M is accumulated: S = sum over chains and steps of M. The saliency is

    A = relu(S - mean(S)) / max(relu(S - mean(S)))         in [0, 1], (H, W), the same in every channel.

The reference runs one chain of `iterations` sequential forward passes; here `chains` independent chains run
as one batch for iterations // chains steps (same total of forward passes, up to the remainder), and the
chains of all images of the batch go through the oracle together (it chunks by its batch size). That pays
off where a batch-1 forward pass is launch- or overhead-bound (GPUs); on a CPU the pass is compute-bound and a
batch of chains costs about as much per pass as one chain (benchmarks/bench_mask_ggig.py).

The map needs many passes: on the bundled model, two seeds' maps correlate 0.15-0.2 at 1280 passes, 0.16-0.50
at 2560 (the `cheap` setting, 40 steps per chain) and 0.25-0.53 at the default 5000, depending on the image.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from saliency_cli.data import baseline as make_baseline
from saliency_cli.methods.base import BASELINES, Attribution, MethodContext, expand_target, register
from saliency_cli.oracle import GradientOracle

NEW_CELL_PENALTY = 0.02  # per unit of |p - p_prev|, from the reference


def rise_upsample(cells: torch.Tensor, shifts: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Cell masks (N, s, s) to pixel masks (N, H, W), RISE-style.

    Bilinear to ((s+1) * ceil(H/s), (s+1) * ceil(W/s)), then a crop of H x W starting at
    (floor(u_0 * ceil(H/s)), floor(u_1 * ceil(W/s))), where shifts (N, 2) holds the uniforms u in [0, 1).
    """
    n, s = cells.shape[0], cells.shape[-1]
    h, w = size
    ch, cw = math.ceil(h / s), math.ceil(w / s)
    up = F.interpolate(cells[:, None], size=((s + 1) * ch, (s + 1) * cw), mode="bilinear", align_corners=False)
    up = up[:, 0]  # (N, 1, UH, UW) -> (N, UH, UW)
    dy = (shifts[:, 0] * ch).long().clamp(max=ch - 1)  # (N,)
    dx = (shifts[:, 1] * cw).long().clamp(max=cw - 1)
    rows = dy[:, None] + torch.arange(h, device=cells.device)  # (N, H)
    cols = dx[:, None] + torch.arange(w, device=cells.device)  # (N, W)
    up = up.gather(1, rows[:, :, None].expand(n, h, up.shape[2]))  # (N, H, UW)
    return up.gather(2, cols[:, None, :].expand(n, h, w))  # (N, H, W)


def saliency_from_sum(total: torch.Tensor) -> torch.Tensor:
    """relu(S - mean S) / max, per image: (B, H, W) -> (B, H, W) in [0, 1] (all zero if S is constant)."""
    centred = (total - total.mean((1, 2), keepdim=True)).clamp(min=0)
    top = centred.amax((1, 2), keepdim=True)
    return centred / top.clamp(min=torch.finfo(top.dtype).tiny)


def _passes(iterations: int, chains: int) -> int:
    """Forward passes per image: K = min(chains, iterations) chains of iterations // K steps."""
    k = min(chains, iterations)
    return k * (iterations // k)


@register("mask", summary="Black-box: masks kept while the class survives, many chains as one batch",
          paper="Thakur & Fischmeister, ICPR 2020, arXiv:2006.09504",
          defaults={"grid": 8, "iterations": 5000, "chains": 64, "keep": 0.3, "baseline": "black"},
          stochastic=True, cost=lambda h: _passes(int(h["iterations"]), int(h["chains"])), reduce="max-abs",
          needs_gradients=False,
          cheap={"iterations": 2560, "chains": 64}, width=lambda h: min(int(h["chains"]), int(h["iterations"])))
def mask(oracle: GradientOracle, x: torch.Tensor, target: torch.Tensor, *, generators: list[torch.Generator],
         ctx: MethodContext, grid: int, iterations: int, chains: int, keep: float, baseline: str) -> Attribution:
    """The mask-optimisation saliency (B, C, H, W), the same [0, 1] map in every channel; see the module docstring.

    grid: s, cells per side. iterations: forward passes per image over all chains. chains: K, run as one batch
    (K > iterations is cut to iterations). keep: the probability that a cell is on at the start.
    stats: forward_passes (K * (iterations // K)), dropped_samples (masked inputs with a non-finite
    probability: not accumulated, their chain does not move), mean_probability (over all masked inputs).
    """
    if baseline not in BASELINES:
        raise ValueError(f"unknown baseline {baseline!r}")
    grid, iterations, chains = int(grid), int(iterations), int(chains)
    if grid < 1 or iterations < 1 or chains < 1:
        raise ValueError("grid, iterations and chains must be at least 1")
    b, c, h, w = x.shape
    k = min(chains, iterations)
    n_steps = iterations // k
    cells = grid * grid
    ref = make_baseline(x, baseline, ctx.bounds, generators)  # (B, C, H, W)
    delta = x - ref
    # Every random number an image needs, from its own generator in one call, so its map does not depend on
    # the batch: row 0 [:cells] = initial states; row t [cells:] = the shift of step t; row t+1 [:cells] = the
    # uniforms of the transition after step t.
    draws = torch.stack([torch.rand((n_steps + 1, k, cells + 2), generator=g, device=x.device, dtype=torch.float32)
                         for g in generators])  # (B, T+1, K, s*s+2)
    on = draws[:, 0, :, :cells] < keep  # (B, K, s*s)
    value = on.float()  # what each cell contributes to the mask: 1 on, 0 off, slightly less if just turned on
    p_prev: torch.Tensor | None = None
    total = torch.zeros(b, h, w, device=x.device)
    targets = expand_target(target, k)  # (B*K,)
    dropped = torch.zeros(b, dtype=torch.int64, device=x.device)
    p_sum = torch.zeros(b, device=x.device)
    for t in range(n_steps):
        shifts = draws[:, t, :, cells:].reshape(b * k, 2)  # (B, K, 2) -> (B*K, 2)
        m = rise_upsample(value.view(b * k, grid, grid), shifts, (h, w))  # (B*K, H, W)
        m = m.view(b, k, 1, h, w)  # (B*K, H, W) -> (B, K, 1, H, W)
        masked = ref[:, None] + m * delta[:, None]  # (B, K, C, H, W)
        p = oracle.probabilities(masked.flatten(0, 1), targets).view(b, k)  # (B*K,) -> (B, K)
        ok = torch.isfinite(p)  # (B, K)
        dropped += (~ok).sum(1)
        p_sum += torch.where(ok, p, 0.0).sum(1)
        total += (m[:, :, 0] * ok.view(b, k, 1, 1)).sum(1)
        if t + 1 == n_steps:
            break
        u = draws[:, t + 1, :, :cells]  # (B, K, s*s)
        pc = p[..., None]  # (B, K, 1)
        nxt = torch.where(on, u < pc, u < 1 - pc)
        p_prev = p if p_prev is None else p_prev
        change = (p - p_prev).abs().nan_to_num(0.0)[..., None]  # (B, K, 1); 0 while either is undefined
        nxt_value = torch.where(nxt & ~on, 1 - NEW_CELL_PENALTY * change, nxt.float())
        keep_state = ~ok[..., None]  # a chain whose probability is NaN/Inf stays where it is
        on = torch.where(keep_state, on, nxt)
        value = torch.where(keep_state, value, nxt_value)
        p_prev = torch.where(ok, p, p_prev)
    used = k * n_steps - dropped  # (B,)
    sal = saliency_from_sum(total)
    sal = torch.where((used == 0).view(-1, 1, 1), float("nan"), sal)
    maps = sal[:, None].expand(b, c, h, w).contiguous()  # (B, H, W) -> (B, C, H, W)
    stats = {"forward_passes": torch.full((b,), k * n_steps, device=x.device), "dropped_samples": dropped,
             "mean_probability": p_sum / used.clamp(min=1)}
    return Attribution(maps, stats)
