"""Every smoother over every base (`--base`), sample counts that stop when the map has converged (`-n auto`,
`--models auto`) and absolute noise units (`--noise-unit absolute`), each against an independent computation:
plain per-sample autograd loops written here, a map saved from the code before `--base` existed, and numpy.

The tiny CNN and images are made from explicit generators, so the saved reference maps do not depend on the
global RNG (tests/data/smoothers_reference.pt, written by the code of commit 59d976e with torch 2.14.1).
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import seeded_weights
from torch import nn

from saliency_cli.data import InputRange
from saliency_cli.methods import METHODS, MethodContext
from saliency_cli.methods.convergence import ROUND, split_half_correlation
from saliency_cli.numerics import derive_seed
from saliency_cli.oracle import GradientOracle
from saliency_cli.pipeline.plan import ExplainOptions, make_jobs, validate

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
CTX = MethodContext(InputRange((0 - MEAN) / STD, (1 - MEAN) / STD), seed=3)
SIDE = 12
REFERENCE = Path(__file__).parent / "data" / "smoothers_reference.pt"
SMOOTHERS = ("smoothgrad", "smoothgrad-sq", "vargrad", "noisegrad", "fusiongrad", "adaptgrad")


def cnn(seed: int = 0) -> nn.Module:
    """Conv -> BatchNorm -> Tanh -> pool -> Linear, 5 classes, parameters and BN statistics from a generator."""
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.Tanh(), nn.AdaptiveAvgPool2d(2),
                          nn.Flatten(), nn.Linear(24, 5))
    return seeded_weights(model, seed)


def images(n: int, seed: int = 1) -> torch.Tensor:
    """n random images in ImageNet-normalised space: (n, 3, SIDE, SIDE)."""
    u = torch.rand((n, 3, SIDE, SIDE), generator=torch.Generator().manual_seed(seed))
    return (u - MEAN) / STD


def gens(*seeds: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in seeds]


def run(name: str, model: nn.Module, x: torch.Tensor, target: torch.Tensor, seeds: tuple[int, ...], *,
        batch_size: int = 4, **hyper: object):
    oracle = GradientOracle(model, batch_size=batch_size)
    return METHODS[name].fn(oracle, x, target, generators=gens(*seeds), ctx=CTX, **hyper), oracle


def grad(model: nn.Module, z: torch.Tensor, k: int) -> torch.Tensor:
    """d logit_k / d z of one input (C, H, W), by plain autograd."""
    z = z.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(model(z[None])[0, k], z)
    return g


def ig_by_hand(model: nn.Module, z: torch.Tensor, ref: torch.Tensor, k: int, steps: int) -> torch.Tensor:
    """(z - z') * sum_j w_j g(z' + a_j (z - z')) with numpy's Gauss-Legendre rule mapped to [0, 1]."""
    nodes, weights = np.polynomial.legendre.leggauss(steps)
    total = torch.zeros_like(z)
    for a, w in zip((nodes + 1) / 2, weights / 2, strict=True):
        total += float(w) * grad(model, ref + float(a) * (z - ref), k)
    return (z - ref) * total


HYPER = {  # the settings the reference maps were made with
    "smoothgrad": {"noise": 0.1, "samples": 7},
    "smoothgrad-sq": {"noise": 0.1, "samples": 7},
    "vargrad": {"noise": 0.1, "samples": 7},
    "noisegrad": {"weight_noise": 0.2, "models": 3},
    "fusiongrad": {"weight_noise": 0.2, "models": 2, "noise": 0.1, "samples": 3},
    "adaptgrad": {"confidence": 0.95, "samples": 5},
    "smoothtaylor": {"noise": 0.1, "samples": 5},
}
TARGET = torch.tensor([1, 4])


# -- --base gradient: today's maps, bit for bit ------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(HYPER))
def test_base_gradient_leaves_the_maps_bit_for_bit_as_before(name: str) -> None:
    """The maps of the code before `--base`, `--noise-unit` and `-n auto` existed, saved to a file, are
    reproduced exactly with the defaults of the new settings (and with them given explicitly)."""
    saved = torch.load(REFERENCE, weights_only=True)
    model, x = cnn(), images(2)
    result, _ = run(name, model, x, TARGET, (21, 22), **HYPER[name])
    if (saved["torch_version"], saved.get("cpu")) == (torch.__version__, torch.backends.cpu.get_cpu_capability()):
        assert torch.equal(result.maps, saved[name])
    else:  # another torch or CPU rounds differently (AMD and Intel kernels differ in the last bits: seen 5e-8 of
        # the map's largest value); the definition must still agree to float32 rounding
        torch.testing.assert_close(result.maps, saved[name], rtol=1e-6, atol=1e-6 * float(saved[name].abs().max()))
    if "base" in METHODS[name].defaults:
        explicit, _ = run(name, model, x, TARGET, (21, 22), base="gradient", **HYPER[name])
        assert torch.equal(explicit.maps, result.maps)


# -- other bases -------------------------------------------------------------------------------------------
def test_smoothgrad_over_integrated_gradients_is_the_mean_of_ig_maps_at_the_same_noisy_inputs() -> None:
    model, x, n, steps = cnn(), images(2), 4, 5
    result, oracle = run("smoothgrad", model, x, TARGET, (21, 22), noise=0.1, samples=n,
                         base="integrated-gradients", steps=steps, baseline="black", quadrature="gausslegendre")
    assert oracle.passes == 2 * n * steps == 2 * METHODS["smoothgrad"].cost(
        {"samples": n, "base": "integrated-gradients", "steps": steps})
    black = CTX.bounds.lo.expand(3, SIDE, SIDE)  # pixel value 0, normalised
    for i, seed in enumerate((21, 22)):
        xi = x[i]
        sigma = 0.1 * float(xi.max() - xi.min())
        u = torch.randn((n, 3, SIDE, SIDE), generator=torch.Generator().manual_seed(seed))  # the image's draws
        expected = torch.stack([ig_by_hand(model, xi + sigma * u[j], black, int(TARGET[i]), steps)
                                for j in range(n)]).mean(0)
        torch.testing.assert_close(result.maps[i], expected, rtol=1e-4, atol=1e-6)


def test_smoothgrad_over_input_x_gradient_and_ggig_by_hand() -> None:
    """input-x-gradient: mean_n z_n * g(z_n). ggig with one ascent step and two path points (baseline `mean`,
    zero): max(g(0), g(z)) elementwise per noisy z (max over the two path points of the first step)."""
    model, x, n = cnn(), images(1), 3
    ixg, _ = run("smoothgrad", model, x, TARGET[:1], (5,), noise=0.1, samples=n, base="input-x-gradient")
    gg, _ = run("smoothgrad", model, x, TARGET[:1], (5,), noise=0.1, samples=n, base="ggig", steps=2, iterations=1,
                baseline="mean")
    sigma = 0.1 * float(x.max() - x.min())
    u = torch.randn((n, 3, SIDE, SIDE), generator=torch.Generator().manual_seed(5))
    zs = [x[0] + sigma * u[j] for j in range(n)]
    k = int(TARGET[0])
    torch.testing.assert_close(ixg.maps[0], torch.stack([z * grad(model, z, k) for z in zs]).mean(0),
                               rtol=1e-4, atol=1e-6)
    g0 = grad(model, torch.zeros_like(x[0]), k)
    torch.testing.assert_close(gg.maps[0], torch.stack([torch.maximum(g0, grad(model, z, k)) for z in zs]).mean(0),
                               rtol=1e-4, atol=1e-6)


def test_noisegrad_over_integrated_gradients_by_hand() -> None:
    """mean_m IG under noisy model m; model m re-made here from its seed by multiplying a deep copy's
    parameters, in order, by N(1, s^2) draws; display = mean_m sum_c |IG_m|."""
    model, x, s, m_count, steps = cnn(), images(2), 0.2, 3, 4
    result, _ = run("noisegrad", model, x, TARGET, (21, 22), weight_noise=s, models=m_count,
                    base="integrated-gradients", steps=steps)
    black = CTX.bounds.lo.expand(3, SIDE, SIDE)
    per_model = []
    for m in range(m_count):
        noisy = copy.deepcopy(model)
        g = torch.Generator().manual_seed(derive_seed("weight-noise", CTX.seed, m))
        with torch.no_grad():
            for p in noisy.parameters():
                p.mul_(torch.empty_like(p).normal_(1.0, s, generator=g))
        per_model.append(torch.stack([ig_by_hand(noisy, x[i], black, int(TARGET[i]), steps) for i in range(2)]))
    stacked = torch.stack(per_model)  # (M, B, C, H, W)
    torch.testing.assert_close(result.maps, stacked.mean(0), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(result.display, stacked.abs().sum(2).mean(0), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", SMOOTHERS)
@pytest.mark.parametrize("base", ["input-x-gradient", "integrated-gradients", "ggig"])
def test_cost_is_the_product_and_equals_the_counted_passes(name: str, base: str) -> None:
    method = METHODS[name]
    small = {"samples": 2, "models": 2, "steps": 3, "iterations": 2, "weight_noise": 0.1}
    hyper = method.hyper_for({**small, "base": base})
    result, oracle = run(name, cnn(), images(1), TARGET[:1], (3,), **hyper)
    per_point = {"input-x-gradient": 1, "integrated-gradients": 3, "ggig": 6}[base]
    points = {"fusiongrad": 4, "adaptgrad": 3}.get(name, 2)
    assert oracle.passes == method.cost(hyper) == points * per_point
    assert torch.isfinite(result.maps).all()


def test_jobs_name_both_and_take_the_bases_own_settings() -> None:
    opts = ExplainOptions(inputs=["x.png"], methods=["smoothgrad", "fusiongrad", "gradient"],
                          hyper={"base": "integrated-gradients", "steps": 8})
    assert validate(opts, METHODS) == []  # --steps is the base's setting, --base the smoothers'
    sg, fg, plain = make_jobs(opts, METHODS)
    assert sg.tag == "smoothgrad+integrated-gradients" and fg.tag == "fusiongrad+integrated-gradients"
    assert plain.tag == "gradient" and "base" not in plain.hyper
    assert sg.hyper["base"] == "integrated-gradients"
    assert {k: sg.hyper[k] for k in ("steps", "baseline", "quadrature")} == {
        "steps": 8, "baseline": "black", "quadrature": "gausslegendre"}
    assert sg.reduce == "sum" and fg.reduce == "mean-abs-sum"  # IG's signed display; fusiongrad keeps its own
    assert "converge" not in sg.hyper and "max_samples" not in sg.hyper  # only with -n auto
    cheap = make_jobs(ExplainOptions(inputs=["x"], methods=["smoothgrad"], hyper={"base": "ggig"}, cheap=True),
                      METHODS)[0]
    assert (cheap.hyper["steps"], cheap.hyper["iterations"]) == (11, 20)  # ggig's own --cheap
    default = make_jobs(ExplainOptions(inputs=["x"], methods=["smoothgrad"]), METHODS)[0]
    assert default.tag == "smoothgrad" and default.reduce == "abs-sum" and default.hyper["base"] == "gradient"


# -- -n auto / --models auto ---------------------------------------------------------------------------------
def test_samples_auto_stopping_at_n_equals_the_fixed_n_run_and_reports_the_split_half() -> None:
    """With a converge target it cannot reach, -n auto runs to its cap N: the same noise draws as -n N (one
    draw per round here, one draw of N there), so the same map up to float rounding; split_half is the
    Pearson correlation, recomputed here with numpy, of the 4 x 4-pooled abs channel sums of the means of the
    even and the odd samples, whose gradients are recomputed here one by one."""
    model, x, cap = cnn(), images(2), 2 * ROUND
    auto, _ = run("smoothgrad", model, x, TARGET, (21, 22), noise=0.1, samples="auto", converge=0.999999,
                  max_samples=cap)
    fixed, _ = run("smoothgrad", model, x, TARGET, (21, 22), noise=0.1, samples=cap)
    torch.testing.assert_close(auto.maps, fixed.maps, rtol=1e-5, atol=1e-7)
    assert auto.stats["samples_used"].tolist() == [cap, cap]
    for i, seed in enumerate((21, 22)):
        sigma = 0.1 * float(x[i].max() - x[i].min())
        u = torch.randn((cap, 3, SIDE, SIDE), generator=torch.Generator().manual_seed(seed))
        g = torch.stack([grad(model, x[i] + sigma * u[j], int(TARGET[i])) for j in range(cap)]).double()
        halves = [g[0::2].mean(0).abs().sum(0).numpy(), g[1::2].mean(0).abs().sum(0).numpy()]  # (H, W) each
        pooled = [h.reshape(3, 4, 3, 4).mean(axis=(1, 3)).ravel() for h in halves]  # 12 x 12 -> 3 x 3
        r = np.corrcoef(pooled[0], pooled[1])[0, 1]
        assert float(auto.stats["split_half"][i]) == pytest.approx(r, abs=1e-5)


def test_samples_auto_stops_per_image_whatever_the_batch() -> None:
    """An easy target stops after the first round; each image's map and count are the same alone or batched."""
    model, x = cnn(), images(3)
    t = torch.tensor([1, 4, 2])
    both, _ = run("smoothgrad", model, x, t, (1, 2, 3), noise=0.1, samples="auto", converge=0.5, max_samples=100,
                  batch_size=5)
    alone, _ = run("smoothgrad", model, x[2:], t[2:], (3,), noise=0.1, samples="auto", converge=0.5,
                   max_samples=100, batch_size=1)
    assert (both.stats["samples_used"] >= ROUND).all() and (both.stats["samples_used"] <= 100).all()
    torch.testing.assert_close(both.maps[2], alone.maps[0], rtol=1e-5, atol=1e-7)
    assert int(both.stats["samples_used"][2]) == int(alone.stats["samples_used"][0])
    assert (both.stats["split_half"] >= 0.5).all()


@pytest.mark.parametrize("name, extra", [("adaptgrad", {"confidence": 0.95}),
                                         ("smoothtaylor", {"noise": 0.1}),
                                         ("vargrad", {"noise": 0.1, "base": "input-x-gradient"})])
def test_samples_auto_at_its_cap_equals_the_fixed_run(name: str, extra: dict) -> None:
    model, x = cnn(), images(2)
    auto, _ = run(name, model, x, TARGET, (21, 22), samples="auto", converge=0.999999, max_samples=ROUND + 4,
                  **extra)
    fixed, _ = run(name, model, x, TARGET, (21, 22), samples=ROUND + 4, **extra)
    torch.testing.assert_close(auto.maps, fixed.maps, rtol=1e-4, atol=1e-6)
    assert auto.stats["samples_used"].tolist() == [ROUND + 4] * 2


@pytest.mark.parametrize("name, extra", [("noisegrad", {}), ("fusiongrad", {"noise": 0.1, "samples": 3})])
def test_models_auto_at_its_cap_equals_the_fixed_run_with_its_display(name: str, extra: dict) -> None:
    model, x = cnn(), images(2)
    auto, _ = run(name, model, x, TARGET, (21, 22), weight_noise=0.2, models="auto", converge=0.999999,
                  max_samples=5, **extra)
    fixed, _ = run(name, model, x, TARGET, (21, 22), weight_noise=0.2, models=5, **extra)
    torch.testing.assert_close(auto.maps, fixed.maps, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(auto.display, fixed.display, rtol=1e-5, atol=1e-7)
    assert auto.stats["models_used"].tolist() == [5, 5]


def test_split_half_correlation_pools_the_abs_channel_sum() -> None:
    a = torch.zeros(1, 3, 8, 8)
    a[0, 0, :4, :4] = 1.0
    b = a.clone()
    b[0, 1, :4, :4] = -1.0  # doubles the top-left block of sum_c |.|: same pattern, r = 1
    assert float(split_half_correlation(a, b)[0]) == pytest.approx(1.0)
    c = torch.zeros(1, 3, 8, 8)
    c[0, 2, 4:, 4:] = 1.0  # the opposite block
    assert float(split_half_correlation(a, c)[0]) == pytest.approx(-1.0 / 3.0)  # 4 pooled cells: 1,0,0,0 vs 0,0,0,1


def test_auto_options_are_checked_before_anything_is_loaded() -> None:
    from saliency_cli.errors import UsageError

    with pytest.raises(UsageError, match="--models auto"):
        validate(ExplainOptions(inputs=["x"], methods=["fusiongrad"], hyper={"samples": "auto"}), METHODS)
    with pytest.raises(UsageError, match="fixed --noise"):
        validate(ExplainOptions(inputs=["x"], methods=["smoothtaylor"], noise=["auto"], hyper={"samples": "auto"}),
                 METHODS)
    with pytest.raises(UsageError, match="mean-abs-sum"):
        validate(ExplainOptions(inputs=["x"], methods=["smoothgrad"], reduce="mean-abs-sum"), METHODS)
    warnings = validate(ExplainOptions(inputs=["x"], methods=["smoothgrad"], hyper={"converge": 0.9}), METHODS)
    assert warnings and "only with -n auto" in warnings[0]
    job = make_jobs(ExplainOptions(inputs=["x"], methods=["smoothgrad"], hyper={"samples": "auto"}), METHODS)[0]
    assert job.hyper["converge"] == 0.95 and job.hyper["max_samples"] == 400
    assert METHODS["smoothgrad"].cost(job.hyper) == 400  # the cap: the pipeline sizes its groups by it


# -- --noise-unit --------------------------------------------------------------------------------------------
def test_absolute_noise_is_sigma_in_model_input_units_as_captum_stdevs() -> None:
    """smoothgrad --noise 0.3 --noise-unit absolute = mean_n g(x + 0.3 u_n) (Captum's NoiseTunnel stdevs=0.3);
    both units are in the stats (the manifest's params)."""
    model, x, n = cnn(), images(2), 4
    result, _ = run("smoothgrad", model, x, TARGET, (8, 9), noise=0.3, samples=n, noise_unit="absolute")
    for i, seed in enumerate((8, 9)):
        u = torch.randn((n, 3, SIDE, SIDE), generator=torch.Generator().manual_seed(seed))
        expected = torch.stack([grad(model, x[i] + 0.3 * u[j], int(TARGET[i])) for j in range(n)]).mean(0)
        torch.testing.assert_close(result.maps[i], expected, rtol=1e-4, atol=1e-6)
    span = (x.flatten(1).amax(1) - x.flatten(1).amin(1))
    torch.testing.assert_close(result.stats["sigma"], torch.full((2,), 0.3))
    torch.testing.assert_close(result.stats["noise_absolute"], torch.full((2,), 0.3))
    torch.testing.assert_close(result.stats["noise_relative"], 0.3 / span)
    relative, _ = run("smoothgrad", model, x, TARGET, (8, 9), noise=0.1, samples=n)
    torch.testing.assert_close(relative.stats["noise_relative"], torch.full((2,), 0.1))
    torch.testing.assert_close(relative.stats["sigma"], 0.1 * span)


@pytest.mark.parametrize("name, extra", [("fusiongrad", {"weight_noise": 0.0, "models": 1, "samples": 3}),
                                         ("smoothtaylor", {"samples": 3}), ("vargrad", {"samples": 3})])
def test_absolute_noise_applies_to_every_method_with_a_noise_setting(name: str, extra: dict) -> None:
    model, x = cnn(), images(2)
    span = (x.flatten(1).amax(1) - x.flatten(1).amin(1))
    absolute, _ = run(name, model, x, TARGET, (4, 5), noise=0.4, noise_unit="absolute", **extra)
    relative, _ = run(name, model, x, TARGET, (4, 5), noise=0.4 / span[0].item(), **extra)  # same sigma for image 0
    torch.testing.assert_close(absolute.stats["sigma"], torch.full((2,), 0.4))
    torch.testing.assert_close(absolute.maps[0], relative.maps[0], rtol=1e-4, atol=1e-6)
