"""GGIG and mask optimisation: identities of the maths, black-box use, determinism, and no side effects."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from saliency_cli.data import InputRange
from saliency_cli.methods import METHODS, MethodContext
from saliency_cli.methods.ggig import ggig
from saliency_cli.methods.mask import mask, rise_upsample
from saliency_cli.oracle import GradientOracle

C = 3
LO, HI = -2.0, 2.0


# -- fixtures -------------------------------------------------------------------------------------------------
def _ctx() -> MethodContext:
    return MethodContext(InputRange(torch.full((C, 1, 1), LO), torch.full((C, 1, 1), HI)), seed=0)


def _gens(seeds: list[int]) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in seeds]


def _tiny_net(seed: int = 0, classes: int = 5) -> nn.Module:
    """A small nonlinear conv net (tanh, so gradients change along the path), weights from its own generator."""
    net = nn.Sequential(nn.Conv2d(C, 4, 3, padding=1), nn.Tanh(), nn.Conv2d(4, 4, 3, padding=1), nn.Tanh(),
                        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, classes))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.7)
    return net.eval()


class Recorder(nn.Module):
    """Passes inputs through `inner` and keeps a copy of every batch it sees."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.detach().clone())
        return self.inner(x)


class _NoBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx: object, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("this model has no gradient")


class PatchModel(nn.Module):
    """Two classes; logit_0 = k * (mean of one patch's pixels - threshold), logit_1 = 0. Nothing else matters."""

    def __init__(self, rows: slice, cols: slice, threshold: float, k: float = 6.0, no_backward: bool = False) -> None:
        super().__init__()
        self.rows, self.cols, self.threshold = rows, cols, threshold
        self.k = nn.Parameter(torch.tensor(k))
        self.no_backward = no_backward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.no_backward:
            x = _NoBackward.apply(x)
        v = x[:, :, self.rows, self.cols].mean((1, 2, 3))  # (N,)
        return torch.stack([self.k * (v - self.threshold), torch.zeros_like(v)], 1)  # (N, 2)


SIDE = 40
ROWS, COLS = slice(4, 16), slice(22, 34)  # a 12 x 12 patch: 9 % of the 40 x 40 image


def _patch_images(n: int, seed: int = 1) -> torch.Tensor:
    """Bright images (so masking to black lowers every pixel), shape (n, C, SIDE, SIDE)."""
    g = torch.Generator().manual_seed(seed)
    return 0.5 + 1.5 * torch.rand((n, C, SIDE, SIDE), generator=g)


def _patch_model(no_backward: bool = False) -> PatchModel:
    # The patch's mean is ~1.25 when visible and -2 when black: p = 0.5 with ~40 % of the patch masked, and p
    # moves smoothly with the visible fraction (k = 2), so every step of a chain carries information.
    return PatchModel(ROWS, COLS, threshold=0.0, k=2.0, no_backward=no_backward)


def _snapshot(model: nn.Module) -> list[tuple[torch.Tensor, bool]]:
    return [(p.detach().clone(), p.requires_grad) for p in model.parameters()]


def _unchanged(model: nn.Module, before: list[tuple[torch.Tensor, bool]]) -> bool:
    now = list(model.parameters())
    return len(now) == len(before) and all(
        torch.equal(p.detach(), p0) and p.requires_grad == flag for p, (p0, flag) in zip(now, before, strict=True))


def _path_gradients(net: nn.Module, x: torch.Tensor, target: torch.Tensor, alphas: torch.Tensor) -> torch.Tensor:
    """d logit_target / d input at a x (baseline 0), plain autograd one point at a time: (B, S, C, H, W)."""
    out = torch.empty(x.shape[0], len(alphas), *x.shape[1:])
    for i in range(x.shape[0]):
        for j, a in enumerate(alphas.tolist()):
            point = (a * x[i : i + 1]).requires_grad_(True)
            (g,) = torch.autograd.grad(net(point)[0, int(target[i])], point)
            out[i, j] = g[0]
    return out


def _trapezoid(s: int) -> torch.Tensor:
    w = torch.ones(s)
    w[0] = w[-1] = 0.5
    return w / (s - 1)


@pytest.fixture
def net_inputs() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    net = _tiny_net()
    x = torch.randn((2, C, 8, 8), generator=torch.Generator().manual_seed(3))
    return net, x, torch.tensor([1, 3])


# -- ggig ----------------------------------------------------------------------------------------------------
def test_ggig_one_iteration_trapezoid_is_trapezoid_mean_of_path_gradients(net_inputs) -> None:
    """With T = 1 nothing ascends, so the trapezoid variant is the trapezoid mean of the straight-path gradients."""
    net, x, target = net_inputs
    s = 6
    attr = ggig(GradientOracle(net, batch_size=64), x, target, generators=_gens([0, 1]), ctx=_ctx(), steps=s,
                iterations=1, step_size=1e-2, baseline="mean", ggig_reduce="trapezoid")
    g = _path_gradients(net, x, target, torch.linspace(0, 1, s))
    expected = (g * _trapezoid(s).view(1, -1, 1, 1, 1)).sum(1)
    torch.testing.assert_close(attr.maps, expected, rtol=1e-5, atol=1e-6)


def test_ggig_zero_step_max_is_max_over_path_of_gradient(net_inputs) -> None:
    """With lr = 0 every step sees the same gradient, so the map is the elementwise max of g over path points."""
    net, x, target = net_inputs
    s = 5
    attr = ggig(GradientOracle(net, batch_size=7), x, target, generators=_gens([0, 1]), ctx=_ctx(), steps=s,
                iterations=3, step_size=0.0, baseline="mean", ggig_reduce="max")
    g = _path_gradients(net, x, target, torch.linspace(0, 1, s))
    torch.testing.assert_close(attr.maps, g.amax(1), rtol=1e-5, atol=1e-6)
    assert (attr.stats["score_gain"] == 0).all()


def test_ggig_starts_on_the_straight_line_and_ascends_by_lr_times_gradient(net_inputs) -> None:
    """Step 0 evaluates x' + (k/m)(x - x') for the black baseline; step 1 evaluates x_k + lr * g(x_k)."""
    net, x, target = net_inputs
    rec = Recorder(net)
    s, lr = 4, 0.05
    ctx = _ctx()
    ggig(GradientOracle(rec, batch_size=1000), x, target, generators=_gens([0, 1]), ctx=ctx, steps=s,
         iterations=2, step_size=lr, baseline="black", ggig_reduce="max")
    assert len(rec.seen) == 2  # one oracle call per ascent step, all points of all images in one batch
    first, second = (t.view(2, s, *x.shape[1:]) for t in rec.seen)  # (B*S, C, H, W) -> (B, S, C, H, W)
    black = ctx.bounds.lo.expand_as(x)
    for k in range(s):
        torch.testing.assert_close(first[:, k], black + k / (s - 1) * (x - black), rtol=0, atol=1e-6)
    g = _path_gradients(net, first.flatten(0, 1), target.repeat_interleave(s), torch.ones(1))[:, 0]
    torch.testing.assert_close(second, first + lr * g.view_as(first), rtol=1e-5, atol=1e-6)


def test_ggig_ascent_raises_the_target_score(net_inputs) -> None:
    """Gradient ascent with a small step increases the target logit of the path points on average."""
    net, x, target = net_inputs
    attr = ggig(GradientOracle(net, batch_size=64), x, target, generators=_gens([0, 1]), ctx=_ctx(), steps=5,
                iterations=5, step_size=0.05, baseline="mean", ggig_reduce="max")
    assert (attr.stats["score_gain"] > 0).all()


def test_ggig_is_independent_of_chunking_and_batch_composition(net_inputs) -> None:
    """The same map with oracle batch sizes 1 and 5, and for an image explained alone or among others."""
    net, x, target = net_inputs
    kw = {"ctx": _ctx(), "steps": 4, "iterations": 3, "step_size": 0.05, "baseline": "mean", "ggig_reduce": "max"}
    one = ggig(GradientOracle(net, batch_size=1), x, target, generators=_gens([0, 1]), **kw).maps
    five = ggig(GradientOracle(net, batch_size=5), x, target, generators=_gens([0, 1]), **kw).maps
    alone = ggig(GradientOracle(net, batch_size=5), x[1:], target[1:], generators=_gens([1]), **kw).maps
    torch.testing.assert_close(one, five, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(alone[0], five[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("reduce", ["max", "trapezoid"])
def test_ggig_leaves_the_model_unchanged_and_maps_are_finite(net_inputs, reduce: str) -> None:
    """Parameters and their requires_grad flags are as before; the map is finite, float32, (B, C, H, W)."""
    net, x, target = net_inputs
    before = _snapshot(net)
    attr = ggig(GradientOracle(net, batch_size=4), x, target, generators=_gens([0, 1]), ctx=_ctx(), steps=3,
                iterations=2, step_size=1e-4, baseline="mean", ggig_reduce=reduce)
    assert _unchanged(net, before)
    assert attr.maps.shape == x.shape and attr.maps.dtype == torch.float32
    assert torch.isfinite(attr.maps).all()
    assert (attr.stats["dropped_samples"] == 0).all()


def test_ggig_registration_cost_and_cheap_setting() -> None:
    """Cost is T x (m+1) gradient passes; the cheap setting is cheaper than the defaults."""
    m = METHODS["ggig"]
    assert m.cost(m.defaults) == 51 * 100
    assert m.cost({**m.defaults, **m.cheap}) < m.cost(m.defaults) / 10


# -- mask ----------------------------------------------------------------------------------------------------
MASK_KW = {"grid": 8, "iterations": 64 * 50, "chains": 64, "keep": 0.3, "baseline": "black"}


def _patch_share(maps: torch.Tensor) -> torch.Tensor:
    """Fraction of each map's total saliency inside the patch: (B,)."""
    inside = maps[:, 0, ROWS, COLS].flatten(1).sum(1)
    return inside / maps[:, 0].flatten(1).sum(1)


def test_mask_finds_the_patch_without_gradients() -> None:
    """The class depends only on one patch (9 % of the image): most of the saliency lands on it, and the run
    works although the model's backward raises (black-box: probabilities only).

    The share cannot approach 1: with 8 x 8 cells the patch spans 2.4 cells and bilinear RISE upsampling with
    random shifts spreads its saliency about half a cell around it; at these settings it is 0.62-0.70.
    """
    model = _patch_model(no_backward=True)
    x = _patch_images(4)
    target = torch.zeros(4, dtype=torch.long)
    oracle = GradientOracle(model, batch_size=512)
    with pytest.raises(RuntimeError, match="no gradient"):
        oracle.gradients(x, target)
    attr = mask(oracle, x, target, generators=_gens([5, 6, 7, 8]), ctx=_ctx(), **MASK_KW)
    share = _patch_share(attr.maps)
    assert share.mean() > 0.6 and (share > 0.55).all(), share  # a uniform map would give 0.09


def test_mask_is_deterministic_across_batch_sizes_and_composition() -> None:
    """Per-image generators: the same map with oracle batch sizes 1 and 5, and alone or among other images."""
    model = _patch_model()
    x = _patch_images(3)
    target = torch.zeros(3, dtype=torch.long)
    kw = {**MASK_KW, "iterations": 8 * 6, "chains": 8}
    one = mask(GradientOracle(model, batch_size=1), x, target, generators=_gens([1, 2, 3]), ctx=_ctx(), **kw).maps
    five = mask(GradientOracle(model, batch_size=5), x, target, generators=_gens([1, 2, 3]), ctx=_ctx(), **kw).maps
    alone = mask(GradientOracle(model, batch_size=5), x[2:], target[2:], generators=_gens([3]), ctx=_ctx(), **kw).maps
    mixed = mask(GradientOracle(model, batch_size=5), x[[2, 0]], target[:2], generators=_gens([3, 1]), ctx=_ctx(),
                 **kw).maps
    assert torch.equal(one, five)
    assert torch.equal(alone[0], five[2])
    assert torch.equal(mixed[0], five[2]) and torch.equal(mixed[1], five[0])
    other_seed = mask(GradientOracle(model, batch_size=5), x[2:], target[2:], generators=_gens([4]), ctx=_ctx(),
                      **kw).maps
    assert not torch.equal(other_seed[0], alone[0])  # the randomness really comes from the generator


def test_mask_map_shape_range_cost_and_model_unchanged() -> None:
    """(B, C, H, W) float32, the same map in every channel, in [0, 1] with max 1; K * (iterations // K)
    forward passes, no backward; parameters untouched."""
    model = _patch_model()
    x = _patch_images(2)
    target = torch.zeros(2, dtype=torch.long)
    before = _snapshot(model)
    oracle = GradientOracle(model, batch_size=16)
    attr = mask(oracle, x, target, generators=_gens([1, 2]), ctx=_ctx(), **{**MASK_KW, "iterations": 100,
                                                                           "chains": 16})
    assert _unchanged(model, before)
    assert attr.maps.shape == x.shape and attr.maps.dtype == torch.float32
    assert torch.isfinite(attr.maps).all()
    assert torch.equal(attr.maps, attr.maps[:, :1].expand_as(attr.maps))
    assert attr.maps.min() >= 0 and torch.allclose(attr.maps.flatten(1).amax(1), torch.ones(2))
    assert oracle.passes == 2 * 16 * (100 // 16)
    assert (attr.stats["forward_passes"] == 16 * 6).all()
    mask_method = METHODS["mask"]
    assert mask_method.needs_gradients is False and mask_method.cost(mask_method.defaults) == 64 * (5000 // 64)


def test_rise_upsample_shapes_and_shift() -> None:
    """All-on cells give an all-one mask; a single on-cell moves with the shift by whole pixels, inside one cell."""
    n, s, h, w = 2, 4, 12, 12  # cell 3 px, upsampled to 15 px
    ones = rise_upsample(torch.ones(n, s, s), torch.zeros(n, 2), (h, w))
    assert ones.shape == (n, h, w) and torch.allclose(ones, torch.ones(n, h, w))
    cells = torch.zeros(n, s, s)
    cells[:, 1, 1] = 1.0
    shifts = torch.tensor([[0.0, 0.0], [0.4, 0.7]])  # -> pixel offsets (0, 0) and (1, 2)
    m = rise_upsample(cells, shifts, (h, w))
    up = torch.nn.functional.interpolate(cells[:1, None], size=(15, 15), mode="bilinear", align_corners=False)[0, 0]
    torch.testing.assert_close(m[0], up[:h, :w])
    torch.testing.assert_close(m[1], up[1 : 1 + h, 2 : 2 + w])


class NanAbove(nn.Module):
    """`inner`, but every output is NaN for inputs whose first element exceeds `level` (NaN gradients too)."""

    def __init__(self, inner: nn.Module, level: float) -> None:
        super().__init__()
        self.inner, self.level = inner, level

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bad = x[:, 0, 0, 0] > self.level  # (N,)
        return self.inner(x) * torch.where(bad, float("nan"), 1.0)[:, None]


def test_ggig_drops_non_finite_gradients(net_inputs) -> None:
    """Points whose score is NaN are left out and counted: the map is the max over the finite points only."""
    net, x, target = net_inputs
    x = x.clone()
    x[:, 0, 0, 0] = 1.0  # with the zero baseline, path point a has first element a: NaN for a > 0.7
    s, t = 6, 2
    attr = ggig(GradientOracle(NanAbove(net, 0.7), batch_size=64), x, target, generators=_gens([0, 1]), ctx=_ctx(),
                steps=s, iterations=t, step_size=0.0, baseline="mean", ggig_reduce="max")
    alphas = torch.linspace(0, 1, s)
    finite = alphas < 0.7
    g = _path_gradients(net, x, target, alphas[finite])
    torch.testing.assert_close(attr.maps, g.amax(1), rtol=1e-5, atol=1e-6)
    assert (attr.stats["dropped_samples"] == int((~finite).sum()) * t).all()
