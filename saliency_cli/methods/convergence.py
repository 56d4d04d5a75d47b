"""Sample counts that stop when the map has converged: `-n auto` (input-noise smoothers) and `--models auto`
(NoiseGrad/FusionGrad).

Samples are drawn in rounds. Sample j of an image (0-based, in draw order) goes to half j mod 2, so the two
halves are independent estimates of the same map from disjoint samples (for `--models auto` the unit is a
noisy model: all of model m's samples go to half m mod 2). After each round every unfinished image computes the
split-half correlation

    r = Pearson( pool(sum_c |S_c(half 0)|), pool(sum_c |S_c(half 1)|) )

where S is the method's statistic of a half (the mean for smoothgrad, the mean square for smoothgrad-sq, the
variance for vargrad, ...), sum_c |.| the abs channel sum (the default display of most smoothers) and pool a
4 x 4 average pooling (stride 4; 224 px maps give 56 x 56), and stops when r >= `converge` (default 0.95) or
the cap `max_samples` is reached. The abs sum, not the signed one: on the six sample images (bundled model,
smoothgrad at 0.15) the signed channel sum's r at 4 x 4 was 0.23-0.62 at N = 50 and still 0.66-0.93 at
N = 400, so a 0.95 target would always run to the cap; the abs sum's r at N = 50 / 100 / 200 / 400 was
0.85-0.95 / 0.88-0.96 / 0.92-0.97 / 0.95-0.98, which separates easy images from hard ones: `-n auto` stopped
at 60 samples (rocket), 100 (astronaut, Grace Hopper), 170 (coffee), 390 (horse) and the cap 400 (chelsea,
r 0.945), 1220 in all against 300 for `-n 50`. The map
returned is S over all the samples taken (both halves, and AdaptGrad's clean gradient). r is the raw
correlation of two half-size estimates; the full estimate is more reliable than either (by Spearman-Brown,
2r / (1 + r): 0.974 at r = 0.95).

An image stops on its own samples only, so its map does not depend on the other images of its batch. Its noise
is drawn round after round from its own generator; on the CPU a round of k samples of C*H*W values each draws
exactly the values a single draw of all samples would (torch fills normal draws in blocks of 16 values, and
C*H*W is a multiple of 16 for 3-channel images of even side), so `-n auto` stopping at N samples uses the same
noise as `-n N`, and its map equals that run's up to float32 rounding of the accumulation order (the chunks
differ). On CUDA the draws of a round differ from a single draw (Philox offsets), so the maps agree only in
distribution.

stats: samples_used (B,), the samples (or models) the image took; split_half (B,), its last r.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from saliency_cli.methods.base import Attribution, SampleStats, gaussian
from saliency_cli.methods.base_attribution import Base, stream_base
from saliency_cli.numerics import pearson
from saliency_cli.oracle import GradientOracle

ROUND = 10  # input-noise samples per image per round (5 to each half)
MODEL_ROUND = 2  # noisy models per round of `--models auto` (1 to each half)
POOL = 4  # side of the average pooling before the split-half correlation
Statistic = Callable[[SampleStats], torch.Tensor]  # accumulated samples -> the method's map (1, C, H, W)


def mean_of(stats: SampleStats) -> torch.Tensor:
    """The mean of the accumulated samples (the statistic of smoothgrad, adaptgrad, noisegrad, ...)."""
    assert stats.mean is not None
    return stats.mean


def pooled(maps: torch.Tensor, size: int = POOL) -> torch.Tensor:
    """sum_c |m_c| of (R, C, H, W) maps (or (R, H, W) maps as they are), average-pooled `size` x `size` (stride
    `size`; at most the map's side) and flattened: (R, floor(H/size) * floor(W/size))."""
    m = maps.abs().sum(1) if maps.dim() == 4 else maps
    k = max(1, min(size, m.shape[-2], m.shape[-1]))
    return torch.nn.functional.avg_pool2d(m[:, None].float(), k, stride=k).flatten(1)


def split_half_correlation(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of `pooled(a)` and `pooled(b)` for each row: (R, C, H, W) x 2 -> (R,); NaN when a
    pooled map is constant."""
    return pearson(pooled(a), pooled(b))


class Convergence:
    """Per-image streaming statistics of the samples so far: all of them, each half, and (`display`) the mean of
    every sample's sum_c |A_c| (the NoiseGrad reference's display). B images; `n` (B,) samples taken (the unit of
    the cap), `r` (B,) the last split-half correlation."""

    def __init__(self, b: int, display: bool = False) -> None:
        self.all = [SampleStats() for _ in range(b)]
        self.halves = [(SampleStats(), SampleStats()) for _ in range(b)]
        self.shown = [SampleStats() for _ in range(b)] if display else None
        self.n = torch.zeros(b, dtype=torch.int64)
        self.r = torch.full((b,), float("nan"))

    def update(self, rows: list[int], values: torch.Tensor, half: torch.Tensor | None) -> None:
        """Add values (R, k, C, H, W) of images `rows`; half (k,) bool: True = half 1 (None: to the whole
        estimate only, e.g. AdaptGrad's clean gradient)."""
        for j, i in enumerate(rows):
            v = values[j:j + 1]
            self.all[i].update(v)
            if self.shown is not None:
                self.shown[i].update(v.abs().sum(2))  # (1, k, C, H, W) -> (1, k, H, W)
            if half is None:
                continue
            for h, part in ((0, v[:, ~half]), (1, v[:, half])):
                if part.shape[1]:
                    self.halves[i][h].update(part)

    def check(self, rows: list[int], n: int, statistic: Statistic, converge: float, cap: int) -> list[int]:
        """After a round that brought images `rows` to n samples: their split-half r; the rows still unfinished."""
        left = []
        for i in rows:
            h0, h1 = self.halves[i]
            self.n[i] = n
            if h0.count is not None and h1.count is not None:
                self.r[i] = float(split_half_correlation(statistic(h0), statistic(h1))[0])
            if not (float(self.r[i]) >= converge) and n < cap:
                left.append(i)
        return left

    def result(self, statistic: Statistic, device: torch.device, **extra: torch.Tensor) -> Attribution:
        """The maps (B, C, H, W) over all samples (NaN where every sample was dropped), with samples_used,
        split_half, dropped_samples, `extra`, and the display map (B, H, W) when kept."""
        maps, dropped = [], []
        for acc in self.all:
            assert acc.count is not None and acc.dropped is not None
            m = statistic(acc)
            maps.append(torch.where(acc.count.view(-1, 1, 1, 1) == 0, torch.full_like(m, float("nan")), m))
            dropped.append(acc.dropped)
        stats = {"dropped_samples": torch.cat(dropped), "samples_used": self.n.to(device),
                 "split_half": self.r.to(device), **extra}
        shown = None if self.shown is None else torch.cat([s.mean for s in self.shown if s.mean is not None])
        return Attribution(torch.cat(maps), stats, shown)


def sample_rounds(oracle: GradientOracle, x: torch.Tensor, target: torch.Tensor, generators: list[torch.Generator],
                  base: Base, scale: torch.Tensor, statistic: Statistic, *, converge: float, cap: int,
                  transform: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                  clean_first: bool = False) -> Attribution:
    """`-n auto` for an input-noise smoother: rounds of ROUND samples e = scale * N(0, 1) per unfinished image
    at x + e, base attributions A(x + e) (or `transform(A, e)`), until the split-half correlation of each image
    reaches `converge` or it has `cap` samples. x (B, C, H, W); scale (B, 1, C, H, W) or (B, 1, 1, 1, 1), the
    noise std; clean_first: A(x) is part of the estimate (AdaptGrad's N + 1), not of either half.
    -> Attribution (B, C, H, W) with samples_used (noise samples, the clean one not counted) and split_half."""
    if not 0 < converge < 1:
        raise ValueError(f"converge {converge}: must be between 0 and 1")
    if cap < 2:
        raise ValueError(f"max_samples {cap}: must be at least 2")
    b = x.shape[0]
    acc = Convergence(b)
    everyone = list(range(b))
    if clean_first:
        stream_base(oracle, x[:, None], target, base, lambda a, sl: acc.update(everyone, a, None))
    active, n = everyone, 0
    while active:
        k = min(ROUND, cap - n)
        rows = torch.tensor(active, device=x.device)
        eps = gaussian([generators[i] for i in active], k, x[rows]) * scale[rows]  # (A, k, C, H, W)
        half = (torch.arange(n, n + k, device=x.device) % 2) == 1  # (k,)

        def consume(a: torch.Tensor, sl: slice, eps: torch.Tensor = eps, half: torch.Tensor = half,
                    active: list[int] = active) -> None:
            acc.update(active, a if transform is None else transform(a, eps[:, sl]), half[sl])

        stream_base(oracle, x[rows][:, None] + eps, target[rows], base, consume, rows)
        n += k
        active = acc.check(active, n, statistic, converge, cap)
    return acc.result(statistic, x.device)
