"""Numerical building blocks shared by methods and metrics: quadrature rules, streaming sample statistics,
rank statistics, confidence intervals and the seed formulas. Pure functions of tensors; no model, no files."""

from __future__ import annotations

import hashlib
import math

import torch

MASK63 = (1 << 63) - 1


# -- seeds ------------------------------------------------------------------------------------------------
def derive_seed(*parts: object) -> int:
    """A 63-bit seed from `sha256(":".join(parts))`: the one formula behind every generator of a run (an image's
    from (run seed, file digest), noisy model m's from ("weight-noise", run seed, m))."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & MASK63


def purpose_seed(seed: int, purpose: str) -> int:
    """A seed for one purpose (a metric's or a sanity stage's draws) derived from a row's or a run's seed, so
    every method of an image is scored against the same draws while different purposes draw independently."""
    stable = int.from_bytes(hashlib.sha256(purpose.encode()).digest()[:8], "little")
    return (seed * 1_000_003 + stable) & MASK63


def seeded_generator(seed: int, device: torch.device | str) -> torch.Generator:
    """A fresh `torch.Generator` on `device` (draws must happen where the tensors live: no host round trip)."""
    return torch.Generator(device=device).manual_seed(int(seed))


# -- streaming statistics over samples ---------------------------------------------------------------------
class SampleStats:
    """Streaming mean and variance over samples (Chan/Welford merge of chunks), dropping non-finite samples.

    update(values (B, k, ...)) adds k samples per image. Samples with any NaN/Inf are left out and counted.
    """

    def __init__(self) -> None:
        self.count: torch.Tensor | None = None  # (B,)
        self.mean: torch.Tensor | None = None  # (B, ...)
        self.m2: torch.Tensor | None = None
        self.dropped: torch.Tensor | None = None

    def update(self, values: torch.Tensor) -> None:
        values = values.float()
        b, k = values.shape[:2]
        ok = torch.isfinite(values.reshape(b, k, -1)).all(-1)  # (B, k)
        w = ok.to(values.dtype).view(b, k, *([1] * (values.dim() - 2)))
        clean = torch.where(w.bool(), values, torch.zeros((), dtype=values.dtype, device=values.device))
        n_new = ok.sum(1).to(values.dtype)  # (B,)
        shape = (b, *([1] * (values.dim() - 2)))
        mean_new = clean.sum(1) / n_new.clamp(min=1).view(shape)
        m2_new = (w * (clean - mean_new[:, None]) ** 2).sum(1)
        dropped_new = (k - ok.sum(1)).to(torch.int64)
        if self.count is None:
            self.count, self.mean, self.m2, self.dropped = n_new, mean_new, m2_new, dropped_new
            return
        assert self.mean is not None and self.m2 is not None and self.dropped is not None
        n = self.count + n_new
        frac = (n_new / n.clamp(min=1)).view(shape)
        delta = mean_new - self.mean
        self.mean = self.mean + delta * frac
        self.m2 = self.m2 + m2_new + delta**2 * (self.count * frac.flatten()).view(shape)
        self.count = n
        self.dropped = self.dropped + dropped_new

    def _n(self) -> torch.Tensor:
        assert self.count is not None and self.mean is not None
        return self.count.clamp(min=1).view(-1, *([1] * (self.mean.dim() - 1)))

    @property
    def variance(self) -> torch.Tensor:
        """Population variance (divides by the number of finite samples)."""
        assert self.m2 is not None
        return self.m2 / self._n()

    @property
    def mean_square(self) -> torch.Tensor:
        assert self.mean is not None
        return self.variance + self.mean**2

    def result(self, maps: torch.Tensor, **stats: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Package maps with the dropped-sample count; images whose samples were all dropped become NaN."""
        assert self.count is not None and self.dropped is not None
        empty = (self.count == 0).view(-1, *([1] * (maps.dim() - 1)))
        maps = torch.where(empty, torch.full_like(maps, float("nan")), maps)
        return maps, {"dropped_samples": self.dropped, **stats}



# -- quadrature -------------------------------------------------------------------------------------------
def gauss_legendre(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Nodes and weights of n-point Gauss-Legendre quadrature on [0, 1] (weights sum to 1)."""
    import numpy as np

    nodes, weights = np.polynomial.legendre.leggauss(n)
    return torch.tensor((nodes + 1) / 2, dtype=torch.float64), torch.tensor(weights / 2, dtype=torch.float64)


def quadrature(rule: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Points a_k in [0, 1] and weights w_k (summing to 1) of an n-point rule for integral_0^1 h(a) da."""
    k = torch.arange(n, dtype=torch.float64)
    if rule == "gausslegendre":
        return gauss_legendre(n)
    if rule == "riemann-left":
        return k / n, torch.full((n,), 1.0 / n, dtype=torch.float64)
    if rule == "riemann-right":
        return (k + 1) / n, torch.full((n,), 1.0 / n, dtype=torch.float64)
    if rule == "riemann-middle":
        return (k + 0.5) / n, torch.full((n,), 1.0 / n, dtype=torch.float64)
    if rule == "trapezoid":
        if n < 2:
            raise ValueError("the trapezoid rule needs at least 2 points")
        w = torch.full((n,), 1.0 / (n - 1), dtype=torch.float64)
        w[0] = w[-1] = 0.5 / (n - 1)
        return k / (n - 1), w
    raise ValueError(f"unknown quadrature {rule!r}")


QUADRATURES = ("gausslegendre", "riemann-left", "riemann-right", "riemann-middle", "trapezoid")

# -- summaries --------------------------------------------------------------------------------------------
def trapezoid_mean(curves: torch.Tensor) -> torch.Tensor:
    """Area under (R, S) curves sampled at S evenly spaced points of [0, 1] (trapezoid rule): (R,)."""
    s = curves.shape[1]
    if s == 1:
        return curves[:, 0].clone()
    return (curves[:, 1:] + curves[:, :-1]).sum(1) / (2 * (s - 1))


_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
         11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093,
         20: 2.086, 21: 2.080, 22: 2.074, 23: 2.069, 24: 2.064, 25: 2.060, 26: 2.056, 27: 2.052, 28: 2.048,
         29: 2.045, 30: 2.042, 40: 2.021, 60: 2.000, 120: 1.980}


def t_quantile_975(df: int) -> float:
    """The 97.5 % quantile of Student's t with df degrees of freedom (table; between entries the next smaller
    df's value, which is conservative; 1.96 beyond 120)."""
    if df < 1:
        raise ValueError("df must be at least 1")
    if df in _T975:
        return _T975[df]
    if df > 120:
        return 1.96
    return _T975[max(k for k in _T975 if k < df)]


def mean_ci95(values: list[float]) -> dict[str, float | int | None]:
    """Mean, half-width of its 95 % confidence interval (t interval, sample std) and n of the finite values.

    ci95 is None when n < 2; mean is None when n = 0."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    n = len(finite)
    if n == 0:
        return {"mean": None, "ci95": None, "n": 0}
    mean = sum(finite) / n
    if n < 2:
        return {"mean": mean, "ci95": None, "n": n}
    var = sum((v - mean) ** 2 for v in finite) / (n - 1)
    return {"mean": mean, "ci95": t_quantile_975(n - 1) * math.sqrt(var / n), "n": n}


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman rank correlation of each row of a and b, (R, ...) each -> (R,). Ties get their average rank.
    NaN where a row is constant."""
    ra, rb = average_ranks(a.reshape(a.shape[0], -1)), average_ranks(b.reshape(b.shape[0], -1))
    return pearson(ra, rb)


def pearson(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of each row, (R, N) each -> (R,), in float64; NaN for a constant row."""
    a = a.double() - a.double().mean(1, keepdim=True)
    b = b.double() - b.double().mean(1, keepdim=True)
    den = (a.square().sum(1) * b.square().sum(1)).sqrt()
    out = (a * b).sum(1) / den
    return torch.where(den > 0, out, torch.full_like(out, float("nan"))).float()


def average_ranks(v: torch.Tensor) -> torch.Tensor:
    """Ranks 0..N-1 of each row of v (R, N), ties sharing their average rank: (R, N) float64."""
    r, n = v.shape
    values, order = v.sort(dim=1, stable=True)
    new = torch.ones_like(values, dtype=torch.bool)
    new[:, 1:] = values[:, 1:] != values[:, :-1]
    group = new.long().cumsum(1) - 1  # (R, N) tie-group id of each sorted position
    pos = torch.arange(n, device=v.device, dtype=torch.float64).expand(r, -1)
    sums = torch.zeros(r, n, dtype=torch.float64, device=v.device).scatter_add_(1, group, pos)
    counts = torch.zeros(r, n, dtype=torch.float64, device=v.device).scatter_add_(1, group, torch.ones_like(pos))
    avg = sums.gather(1, group) / counts.gather(1, group)
    return torch.empty_like(avg).scatter_(1, order, avg)
