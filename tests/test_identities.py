"""Identities of the maths (zennit style): each test states one property that must hold exactly or within a
stated tolerance, with expected values computed independently of the code under test."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import make_generators, random_images

from saliency_cli.data import InputRange, baseline, decode, input_bounds, preprocess
from saliency_cli.methods import METHODS, MethodContext
from saliency_cli.methods.base import QUADRATURES, SampleStats, quadrature
from saliency_cli.oracle import GradientOracle


def run(name: str, model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor, ctx: MethodContext, *,
        batch_size: int = 16, seeds: list[int] | None = None, **hyper):
    """Call a registered method the way the pipeline does, with fresh per-image generators."""
    oracle = GradientOracle(model, batch_size=batch_size)
    gens = make_generators(seeds if seeds is not None else list(range(x.shape[0])))
    return METHODS[name].fn(oracle, x, target, generators=gens, ctx=ctx, **hyper)


def plain_gradient(model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """d logit_target / d x by hand, one image at a time (no oracle, no batching)."""
    out = []
    for xi, ti in zip(x, target, strict=True):
        xi = xi[None].clone().requires_grad_(True)
        (g,) = torch.autograd.grad(model(xi)[0, ti], xi)
        out.append(g[0])
    return torch.stack(out)


class Recorder(torch.nn.Module):
    """score_k(x) = sum(A_k * tanh(x)) + sum(B_k * x^2) / 2: smooth, nonlinear, and it records every input of a
    gradient pass and the gradient autograd delivers for it. With `nan_where`, the scores of the inputs it
    selects are NaN (so are their gradients)."""

    def __init__(self, shape: tuple[int, ...], classes: int = 3, nan_where=None) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(7)
        self.a = torch.nn.Parameter(torch.randn(classes, *shape, generator=g))
        self.b = torch.nn.Parameter(torch.randn(classes, *shape, generator=g))
        self.nan_where = nan_where
        self.inputs: list[torch.Tensor] = []
        self.grads: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad:
            self.inputs.append(x.detach().clone())
            x.register_hook(lambda g: self.grads.append(g.detach().clone()))
        out = torch.einsum("bchw,kchw->bk", torch.tanh(x), self.a) + torch.einsum("bchw,kchw->bk", x * x, self.b) / 2
        if self.nan_where is not None:
            bad = self.nan_where(x.detach())  # (N,) bool
            out = out * torch.where(bad, float("nan"), 1.0)[:, None]
        return out

    def recorded(self) -> tuple[np.ndarray, np.ndarray]:
        """All recorded inputs and gradients, in float64: (N, C, H, W) each."""
        return (torch.cat(self.inputs).double().numpy(), torch.cat(self.grads).double().numpy())


# -- SmoothGrad family ------------------------------------------------------------------------------------
@pytest.mark.parametrize(("model_name", "size", "samples"),
                         [("tiny", 32, 1), ("tiny", 32, 3), ("tiny", 32, 8), ("tiny_vit", 160, 4)])
def test_smoothgrad_without_noise_is_the_gradient(request, model_name, size, samples):
    """SmoothGrad with noise 0 equals the plain gradient, for any number of samples."""
    model = request.getfixturevalue(model_name)
    x = random_images(2, size=size, seed=1)
    target = torch.tensor([3, 11])
    lo, hi = torch.full((3, 1, 1), -1.0), torch.full((3, 1, 1), 1.0)
    out = run("smoothgrad", model, x, target, MethodContext(InputRange(lo, hi)), batch_size=3, noise=0.0,
              samples=samples)
    expected = plain_gradient(model, x, target)
    assert out.maps.shape == expected.shape
    scale = expected.abs().max().item()
    torch.testing.assert_close(out.maps, expected, rtol=1e-4, atol=1e-5 * scale)
    assert out.stats["dropped_samples"].tolist() == [0, 0]


def test_smoothgrad_noise_has_requested_std_and_zero_mean():
    """The inputs the model sees are x + e, e ~ N(0, sigma^2), sigma = noise * (max(x) - min(x)) per image."""
    shape = (3, 8, 8)
    x = random_images(2, size=8, seed=2)
    x[1] = 0.25 * x[1] + 5.0  # a narrower range (0.5 instead of 2) far from image 0, so samples are told apart
    ranges = [float(xi.max() - xi.min()) for xi in x]
    noise, samples = 0.2, 200
    rec = Recorder(shape)
    lo, hi = torch.full((3, 1, 1), -10.0), torch.full((3, 1, 1), 10.0)
    out = run("smoothgrad", rec, x, torch.tensor([0, 1]), MethodContext(InputRange(lo, hi)), batch_size=64, noise=noise,
              samples=samples)
    inputs, _ = rec.recorded()
    assert inputs.shape[0] == 2 * samples
    which = (inputs.mean(axis=(1, 2, 3)) > 2.5).astype(int)  # image 1 sits at +5
    for i in (0, 1):
        eps = inputs[which == i] - x[i].double().numpy()
        sigma = noise * ranges[i]
        assert eps.shape[0] == samples
        assert eps.std() == pytest.approx(sigma, rel=0.02)
        assert abs(eps.mean()) < 4 * sigma / np.sqrt(eps.size)
        # every element and every sample gets its own draw: no two samples are the same
        assert len({e.tobytes() for e in eps.astype(np.float32)}) == samples
    assert out.stats["sigma"].tolist() == pytest.approx([noise * r for r in ranges], rel=1e-6)


def test_each_image_draws_its_own_noise():
    """Two images with the same seed get the same standardised noise; another seed gives other noise."""
    shape = (3, 8, 8)
    x = random_images(1, size=8, seed=3).repeat(3, 1, 1, 1)
    x[1] = 2 * x[1]  # same pattern, twice the range: the same draws, twice the sigma
    rec = Recorder(shape)
    lo, hi = torch.full((3, 1, 1), -10.0), torch.full((3, 1, 1), 10.0)
    run("smoothgrad", rec, x, torch.zeros(3, dtype=torch.long), MethodContext(InputRange(lo, hi)), batch_size=100,
        seeds=[5, 5, 6], noise=0.1, samples=4)
    inputs, _ = rec.recorded()
    eps = (inputs - x.double().numpy().repeat(4, axis=0)).reshape(3, 4, *shape)  # image-major rows
    np.testing.assert_allclose(eps[1], 2 * eps[0], rtol=1e-4, atol=1e-6)
    assert np.abs(eps[2] - eps[0]).max() > 0.01


def _family_run(name: str, x: torch.Tensor, noise: float, samples: int):
    rec = Recorder(tuple(x.shape[1:]))
    lo, hi = torch.full((3, 1, 1), -10.0), torch.full((3, 1, 1), 10.0)
    out = run(name, rec, x, torch.tensor([1]), MethodContext(InputRange(lo, hi)), batch_size=4, seeds=[11], noise=noise,
              samples=samples)
    _, grads = rec.recorded()
    assert grads.shape[0] == samples
    return out.maps[0].double().numpy(), grads


@pytest.mark.parametrize(("name", "statistic"), [
    ("smoothgrad", lambda g: g.mean(axis=0)),
    ("smoothgrad-sq", lambda g: (g**2).mean(axis=0)),
    ("vargrad", lambda g: g.var(axis=0)),
])
def test_smoothgrad_family_statistics_of_recorded_gradients(name, statistic):
    """smoothgrad / smoothgrad-sq / vargrad are the mean / mean square / population variance of the gradients
    the model actually produced, computed here by numpy in float64 (13 samples in chunks of 4)."""
    x = random_images(1, size=8, seed=4)
    attr, grads = _family_run(name, x, noise=0.3, samples=13)
    expected = statistic(grads)
    assert expected.std() > 0  # the gradients do vary: the statistic is not trivially 0
    np.testing.assert_allclose(attr, expected, rtol=2e-4, atol=1e-6 * np.abs(expected).max())


def test_nan_samples_are_dropped_and_counted():
    """Samples with a NaN gradient are left out of the mean and counted; an image with no finite sample is NaN."""
    shape = (3, 8, 8)
    x = random_images(2, size=8, seed=5)
    x[0, 0, 0, 0] = 0.0  # NaN exactly when the noise at element (0, 0, 0) is positive: about half the samples
    x[1, 0, 0, 0] = 50.0  # always NaN
    rec = Recorder(shape, nan_where=lambda v: v[:, 0, 0, 0] > 0)
    lo, hi = torch.full((3, 1, 1), -100.0), torch.full((3, 1, 1), 100.0)
    samples = 40
    out = run("smoothgrad", rec, x, torch.tensor([0, 2]), MethodContext(InputRange(lo, hi)), batch_size=16, noise=0.01,
              samples=samples)
    inputs, grads = rec.recorded()
    mine = inputs[:, 0, 0, 0] < 25  # samples of image 0
    bad = inputs[mine, 0, 0, 0] > 0
    assert 5 < bad.sum() < samples - 5
    assert np.isnan(grads[mine][bad]).all() and np.isfinite(grads[mine][~bad]).all()
    assert out.stats["dropped_samples"].tolist() == [int(bad.sum()), samples]
    np.testing.assert_allclose(out.maps[0].double().numpy(), grads[mine][~bad].mean(axis=0), rtol=1e-4, atol=1e-6)
    assert torch.isnan(out.maps[1]).all()


def test_sample_stats_merge_chunks_like_one_pass():
    """Merging chunks of 1, 5 and 11 samples gives the float64 mean and variance of all 17 at once, even on
    values with a large common offset (no float32 cancellation); non-finite samples are left out and counted."""
    g = torch.Generator().manual_seed(0)
    values = 100.0 + torch.randn((2, 17, 3, 4, 4), generator=g)
    values[0, 3, 1, 2, 2] = float("nan")
    values[0, 9, 0, 0, 0] = float("inf")
    values[1, 16] = float("-inf")
    stats = SampleStats()
    for sl in (slice(0, 1), slice(1, 6), slice(6, 17)):
        stats.update(values[:, sl])
    v = values.double().numpy()
    keep = [np.isfinite(v[i].reshape(17, -1)).all(1) for i in range(2)]
    assert stats.count.tolist() == [15, 16]
    assert stats.dropped.tolist() == [2, 1]
    for i in range(2):
        finite = v[i][keep[i]]
        np.testing.assert_allclose(stats.mean[i].double().numpy(), finite.mean(0), rtol=1e-6)
        # 1e-4: a float32 E[x^2] - E[x]^2 would miss by about 1e-2 here (offset 100, variance 1)
        np.testing.assert_allclose(stats.variance[i].double().numpy(), finite.var(0), rtol=1e-4)
        np.testing.assert_allclose(stats.mean_square[i].double().numpy(), (finite**2).mean(0), rtol=1e-6)


def test_sample_stats_chunking_does_not_change_the_result():
    """The statistics are the same whether samples arrive in one chunk or one at a time."""
    values = torch.randn((3, 9, 2, 5, 5), generator=torch.Generator().manual_seed(1))
    one, many = SampleStats(), SampleStats()
    one.update(values)
    for k in range(9):
        many.update(values[:, k:k + 1])
    torch.testing.assert_close(many.mean, one.mean, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(many.variance, one.variance, rtol=1e-5, atol=1e-7)
    assert many.count.tolist() == one.count.tolist() == [9, 9, 9]


# -- Integrated Gradients ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_convnext() -> torch.nn.Module:
    """timm's `test_convnext` (GELU, LayerNorm: a smooth function of its input), random weights, eval mode."""
    import timm

    torch.manual_seed(0)
    return timm.create_model("test_convnext", pretrained=False).eval()


def _logit_difference(model: torch.nn.Module, x: torch.Tensor, ref: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """f(x) - f(x') of the target logits by a plain forward pass: (B,)."""
    with torch.no_grad():
        fx, fr = model(x), model(ref)
    return (fx.gather(1, target[:, None]) - fr.gather(1, target[:, None])).squeeze(1).double()


def test_ig_completeness_with_64_gauss_legendre_points_on_a_smooth_model(tiny_convnext, tiny_ctx):
    """On a smooth model, IG with 64 Gauss-Legendre points is complete: sum(attr) = f(x) - f(x') (to 1e-3
    relative, far inside 1 %), and the reported completeness_gap is that difference."""
    x = random_images(2, seed=8)
    target = torch.tensor([4, 17])
    diff = _logit_difference(tiny_convnext, x, torch.full_like(x, -1.0), target)
    out = run("integrated-gradients", tiny_convnext, x, target, tiny_ctx, steps=64, baseline="black",
              quadrature="gausslegendre")
    total = out.maps.double().flatten(1).sum(1)
    assert (diff.abs() > 0.1).all()  # a meaningful difference to be complete about
    assert ((total - diff).abs() <= 1e-3 * diff.abs()).all()
    torch.testing.assert_close(out.stats["completeness_gap"].double(), total - diff, rtol=0,
                               atol=1e-4 * float(diff.abs().max()))
    torch.testing.assert_close(out.stats["score_difference"].double(), diff, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_ig_completeness_on_the_bundled_model(bundled, sample_dir):
    """On the cat photo and the bundled model, IG from the black image is complete within 1 % once the
    quadrature resolves the path (256 Gauss-Legendre points); f(x) - f(x') is computed here by a forward pass.

    64 points are not enough on this model: the ReLU6 network's path integrand has narrow spikes (up to 15x
    its mean near a = 0.1), and 64 Gauss-Legendre points leave a gap of about 4 % on this image.
    """
    cfg = bundled.data_config
    x, _ = preprocess(decode((sample_dir / "chelsea.png").read_bytes()), cfg)
    x = x[None]
    black = torch.tensor([(0 - m) / s for m, s in zip(cfg["mean"], cfg["std"], strict=True)]).view(1, 3, 1, 1)
    with torch.no_grad():
        target = bundled.module(x).argmax(1)
    diff = float(_logit_difference(bundled.module, x, black.expand_as(x), target)[0])
    out = run("integrated-gradients", bundled.module, x, target, MethodContext(input_bounds(cfg)), batch_size=32,
              steps=256, baseline="black", quadrature="gausslegendre")
    total = float(out.maps.double().sum())
    assert abs(diff) > 1.0
    assert abs(total - diff) <= 0.01 * abs(diff)
    assert float(out.stats["completeness_gap"][0]) == pytest.approx(total - diff, abs=1e-3 * abs(diff))


def test_manifest_reports_the_completeness_gap(bundled, sample_dir, tmp_path):
    """The manifest's completeness_gap of a 64-point Gauss-Legendre run equals sum(.npy map, signed channel sum)
    - (f(x) - f(x')), with f(x) - f(x') computed here by a plain forward pass."""
    from saliency_cli.api import ExplainOptions, explain

    src = tmp_path / "in"
    src.mkdir()
    (src / "chelsea.png").write_bytes((sample_dir / "chelsea.png").read_bytes())
    out = tmp_path / "out"
    info = explain(ExplainOptions(inputs=[str(src)], out=out, methods=["integrated-gradients"],
                                  hyper={"steps": 64}, reduce="sum", device="cpu"))
    assert info["counts"]["ok"] == 1
    (rec,) = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    cfg = bundled.data_config
    x, _ = preprocess(decode((src / "chelsea.png").read_bytes()), cfg)
    black = torch.tensor([(0 - m) / s for m, s in zip(cfg["mean"], cfg["std"], strict=True)]).view(3, 1, 1)
    with torch.no_grad():
        logits = bundled.module(torch.stack([x, black.expand_as(x)]))
    diff = float(logits[0, rec["target"]] - logits[1, rec["target"]])
    total = float(np.load(out / rec["outputs"]["npy"]).astype(np.float64).sum())
    assert rec["params"]["quadrature"] == "gausslegendre" and rec["params"]["steps"] == 64
    assert rec["target"] == int(logits[0].argmax())
    assert rec["stats"]["completeness_gap"] == pytest.approx(total - diff, abs=2e-3 * abs(diff))


@pytest.mark.parametrize("kind", ["black", "mean"])
def test_ig_one_right_riemann_step_is_delta_times_gradient(tiny, tiny_ctx, kind):
    """IG with one right-Riemann step equals (x - x') * g(x)."""
    x = random_images(2, seed=6)
    target = torch.tensor([5, 9])
    ref = torch.full_like(x, -1.0) if kind == "black" else torch.zeros_like(x)  # mean = std = 0.5
    out = run("integrated-gradients", tiny, x, target, tiny_ctx, steps=1, baseline=kind, quadrature="riemann-right")
    expected = (x - ref) * plain_gradient(tiny, x, target)
    torch.testing.assert_close(out.maps, expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item())


def test_ig_evaluates_the_straight_path_at_the_gauss_legendre_nodes(tiny_ctx):
    """IG's gradient inputs are x' + a_k (x - x') with a_k the n Gauss-Legendre nodes on [0, 1]."""
    n = 5
    x = random_images(1, size=8, seed=7)
    rec = Recorder((3, 8, 8))
    run("integrated-gradients", rec, x, torch.tensor([2]), tiny_ctx, steps=n, baseline="black",
        quadrature="gausslegendre")
    inputs, _ = rec.recorded()
    nodes = (np.polynomial.legendre.leggauss(n)[0] + 1) / 2
    ref = -np.ones((3, 8, 8))
    expected = np.stack([ref + a * (x[0].double().numpy() - ref) for a in nodes])
    np.testing.assert_allclose(np.sort(inputs, axis=0), np.sort(expected, axis=0), atol=1e-6)


# -- quadrature -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rule", QUADRATURES)
@pytest.mark.parametrize("n", [2, 3, 7, 50])
def test_quadrature_weights_sum_to_one_and_points_lie_in_unit_interval(rule, n):
    """Every rule's n weights are positive and sum to 1; its n points lie in [0, 1] and are increasing."""
    a, w = quadrature(rule, n)
    assert a.shape == w.shape == (n,)
    assert float(w.sum()) == pytest.approx(1.0, abs=1e-12)
    assert (w > 0).all() and (a >= 0).all() and (a <= 1).all() and (a.diff() > 0).all()


@pytest.mark.parametrize("n", [1, 2, 5, 16, 64])
def test_gauss_legendre_is_exact_to_degree_2n_minus_1(n):
    """n-point Gauss-Legendre integrates a^d over [0, 1] exactly (1 / (d + 1)) for every d <= 2n - 1."""
    a, w = quadrature("gausslegendre", n)
    for d in range(2 * n):
        assert float((w * a**d).sum()) == pytest.approx(1 / (d + 1), rel=1e-10, abs=1e-13)


@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_gauss_legendre_misses_degree_2n_by_the_textbook_error(n):
    """For a^(2n), n-point Gauss-Legendre misses by (n!)^4 / ((2n + 1) ((2n)!)^2): it has exactly n nodes."""
    a, w = quadrature("gausslegendre", n)
    error = math.factorial(n) ** 4 / ((2 * n + 1) * math.factorial(2 * n) ** 2)
    assert 1 / (2 * n + 1) - float((w * a ** (2 * n)).sum()) == pytest.approx(error, rel=1e-6)


@pytest.mark.parametrize("n", [2, 3, 10, 51])
def test_newton_cotes_rules_have_their_textbook_values(n):
    """On [0, 1]: left Riemann of a is (n-1)/(2n), right (n+1)/(2n); midpoint of a^2 is 1/3 - 1/(12 n^2);
    trapezoid of a^2 is 1/3 + h^2/6 with h = 1/(n-1), and trapezoid is exact for a (Captum's weights are not)."""
    def integral(rule, f):
        a, w = quadrature(rule, n)
        return float((w * f(a)).sum())

    assert integral("riemann-left", lambda a: a) == pytest.approx((n - 1) / (2 * n), rel=1e-12)
    assert integral("riemann-right", lambda a: a) == pytest.approx((n + 1) / (2 * n), rel=1e-12)
    assert integral("riemann-middle", lambda a: a) == pytest.approx(0.5, rel=1e-12)
    assert integral("riemann-middle", lambda a: a**2) == pytest.approx(1 / 3 - 1 / (12 * n * n), rel=1e-12)
    assert integral("trapezoid", lambda a: 1 + 0 * a) == pytest.approx(1.0, rel=1e-12)
    assert integral("trapezoid", lambda a: a) == pytest.approx(0.5, rel=1e-12)
    h = 1 / (n - 1)
    assert integral("trapezoid", lambda a: a**2) == pytest.approx(1 / 3 + h * h / 6, rel=1e-12)


def test_quadrature_rejects_unknown_rules_and_a_one_point_trapezoid():
    """An unknown rule and a trapezoid with fewer than 2 points are errors, not silent fallbacks."""
    with pytest.raises(ValueError, match="unknown quadrature"):
        quadrature("simpson", 5)
    with pytest.raises(ValueError, match="at least 2"):
        quadrature("trapezoid", 1)


# -- baselines --------------------------------------------------------------------------------------------
IMAGENET = {"input_size": (3, 8, 8), "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}


def _imagenet_ctx() -> MethodContext:
    return MethodContext(input_bounds(IMAGENET))


def test_black_baseline_is_pixel_zero():
    """`black` is pixel value 0 normalised, (0 - mean) / std per channel, which is ctx.bounds.lo."""
    ctx = _imagenet_ctx()
    x = torch.randn(2, 3, 8, 8)
    ref = baseline(x, "black", ctx.bounds, make_generators([0, 1]))
    expected = torch.tensor([-0.485 / 0.229, -0.456 / 0.224, -0.406 / 0.225]).view(1, 3, 1, 1).expand_as(x)
    torch.testing.assert_close(ref, expected)
    torch.testing.assert_close(ref, ctx.bounds.lo.expand_as(x))


def test_mean_baseline_is_zero():
    """`mean` is the normalisation's mean colour, which is 0 in normalised space."""
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(baseline(x, "mean", _imagenet_ctx(), make_generators([0, 1])), torch.zeros_like(x))


def test_blur_baseline_keeps_a_constant_image_and_smooths_others():
    """`blur` of a constant image is the image itself; of a noisy image it has less variance, same mean."""
    ctx = _imagenet_ctx()
    const = torch.tensor([0.3, -1.2, 2.0]).view(1, 3, 1, 1).expand(2, 3, 16, 16).clone()
    torch.testing.assert_close(baseline(const, "blur", ctx.bounds, make_generators([0, 1])), const, rtol=0, atol=1e-6)
    noisy = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    blurred = baseline(noisy, "blur", ctx.bounds, make_generators([0, 1]))
    assert blurred.shape == noisy.shape
    assert float(blurred.var()) < 0.5 * float(noisy.var())


def test_uniform_baseline_lies_in_the_valid_range_and_follows_the_generator():
    """`uniform` lies within [lo, hi] per channel, covers it, and each image's draw depends on its seed only."""
    ctx = _imagenet_ctx()
    x = torch.zeros(3, 3, 32, 32)
    ref = baseline(x, "uniform", ctx.bounds, make_generators([1, 2, 1]))
    lo, hi = ctx.bounds.lo.view(1, 3, 1, 1), ctx.bounds.hi.view(1, 3, 1, 1)
    assert ((ref >= lo) & (ref <= hi)).all()
    pixels = ref * torch.tensor(IMAGENET["std"]).view(1, 3, 1, 1) + torch.tensor(IMAGENET["mean"]).view(1, 3, 1, 1)
    assert float(pixels.min()) < 0.01 and float(pixels.max()) > 0.99
    assert float(pixels.mean()) == pytest.approx(0.5, abs=0.02)
    assert torch.equal(ref[0], ref[2]) and not torch.equal(ref[0], ref[1])
    alone = baseline(x[:1], "uniform", ctx.bounds, make_generators([2]))
    assert torch.equal(alone[0], ref[1])
