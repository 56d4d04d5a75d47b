"""The fidelity fixes of issue 12, each against an independent computation written here: NoiseGrad/FusionGrad's
reference display (per-model abs channel sums, averaged), SmoothTaylor's adaptive noising on the signed channel
sum (the greedy search re-implemented with plain floats), the cascading model-parameter randomisation (a
Quantus-style MPRT on a deep copy, with a numpy Spearman), and the signed energy metric (numpy)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from conftest import seeded_weights
from torch import nn

from saliency_cli.data import InputRange
from saliency_cli.methods import METHODS, MethodContext
from saliency_cli.metrics import METRICS, Batch, score_maps
from saliency_cli.metrics.sanity import randomization, reinit_layers
from saliency_cli.numerics import derive_seed
from saliency_cli.oracle import GradientOracle
from saliency_cli.reduce import reduce_channels

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
BOUNDS = InputRange((0 - MEAN) / STD, (1 - MEAN) / STD)
CTX = MethodContext(BOUNDS, seed=11)


def cnn(seed: int = 0, side: int = 16) -> nn.Module:
    """conv-BN-tanh-conv-BN-tanh-pool-linear (5 classes), parameters and BN statistics from a generator."""
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.Tanh(),
                          nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6), nn.Tanh(),
                          nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(24, 5))
    return seeded_weights(model, seed)


def images(n: int, side: int = 16, seed: int = 1) -> torch.Tensor:
    u = torch.rand((n, 3, side, side), generator=torch.Generator().manual_seed(seed))
    return (u - MEAN) / STD


def grad(model: nn.Module, z: torch.Tensor, k: int) -> torch.Tensor:
    """d logit_k / d z for one input (C, H, W), plain autograd."""
    z = z.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(model(z[None])[0, k], z)
    return g


def noisy_copy(model: nn.Module, seed: int, m: int, s: float) -> nn.Module:
    """Noisy model m as the reference makes it: every parameter times N(1, s^2), from (run seed, m)."""
    noisy = copy.deepcopy(model)
    g = torch.Generator().manual_seed(derive_seed("weight-noise", seed, m))
    with torch.no_grad():
        for p in noisy.parameters():
            p.mul_(torch.empty_like(p).normal_(1.0, s, generator=g))
    return noisy


# -- 1. NoiseGrad / FusionGrad display ----------------------------------------------------------------------
def test_noisegrad_reference_display_is_the_mean_of_per_model_abs_sums_and_the_raw_mean_stays() -> None:
    model, x, target, s, m_count = cnn(), images(2), torch.tensor([0, 3]), 0.3, 4
    oracle = GradientOracle(model, batch_size=3)
    result = METHODS["noisegrad"].fn(oracle, x, target, generators=[], ctx=CTX, weight_noise=s, models=m_count)
    per_model = torch.stack([torch.stack([grad(noisy_copy(model, CTX.seed, m, s), x[i], int(target[i]))
                                          for i in range(2)]) for m in range(m_count)])  # (M, B, C, H, W)
    reference = per_model.abs().sum(2).mean(0)  # mean_m sum_c |g_m,c|: Saliency(abs=True).sum(axis=1), averaged
    torch.testing.assert_close(result.display, reference, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(result.maps, per_model.mean(0), rtol=1e-4, atol=1e-6)  # raw signed mean
    assert METHODS["noisegrad"].reduce == METHODS["fusiongrad"].reduce == "mean-abs-sum"
    torch.testing.assert_close(reduce_channels(result.maps, "mean-abs-sum", result.display), result.display)
    torch.testing.assert_close(reduce_channels(result.maps, "sum"), per_model.mean(0).sum(1), rtol=1e-4,
                               atol=1e-6)  # --reduce sum / none: the raw signed mean
    assert not torch.allclose(result.display, reduce_channels(result.maps, "abs-sum"), rtol=1e-2)
    with pytest.raises(ValueError, match="mean-abs-sum"):
        reduce_channels(result.maps, "mean-abs-sum")


def test_fusiongrad_reference_display_averages_every_model_and_input_sample() -> None:
    model, x, target, s, m_count, n = cnn(), images(1), torch.tensor([2]), 0.3, 2, 3
    oracle = GradientOracle(model, batch_size=4)
    gens = [torch.Generator().manual_seed(7)]
    result = METHODS["fusiongrad"].fn(oracle, x, target, generators=gens, ctx=CTX, weight_noise=s, models=m_count,
                                      noise=0.1, samples=n)
    sigma = 0.1 * float(x.max() - x.min())
    u = torch.randn((m_count * n, 3, 16, 16), generator=torch.Generator().manual_seed(7)).view(m_count, n, 3, 16, 16)
    g = torch.stack([torch.stack([grad(noisy_copy(model, CTX.seed, m, s), x[0] + sigma * u[m, j], 2)
                                  for j in range(n)]) for m in range(m_count)])  # (M, N, C, H, W)
    torch.testing.assert_close(result.display[0], g.abs().sum(2).mean((0, 1)), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(result.maps[0], g.mean((0, 1)), rtol=1e-4, atol=1e-6)


# -- 2. SmoothTaylor --noise auto on the signed channel sum --------------------------------------------------
def _greedy_by_hand(objective_at, start: float, step: float = 0.1, shrink: float = 0.9, patience: int = 3,
                    max_steps: int = 20) -> float:
    """The documented search, one image, plain floats: try +step then -step from wherever sigma is, take a
    candidate that beats the best so far, shrink the step on a failed step, stop after `patience` failures."""
    sigma, best = start, objective_at(start)
    failures = 0
    for _ in range(max_steps):
        if failures >= patience:
            break
        improved = False
        for direction in (1.0, -1.0):
            candidate = max(sigma + direction * step, 1e-6)
            value = objective_at(candidate)
            if value < best:
                sigma, best, improved = candidate, value, True
        if improved:
            failures = 0
        else:
            failures += 1
            step *= shrink
    return sigma


@pytest.mark.parametrize("objective", ["noise", "aupc"])
def test_smoothtaylor_auto_scores_the_signed_channel_sum(objective: str) -> None:
    """The chosen sigma equals that of the search re-done here on SmoothTaylor maps computed here (autograd,
    the image's own draws), scored by the registered metric of the *signed* channel sum."""
    model, x, target, n = cnn(), images(1), torch.tensor([1]), 6
    oracle = GradientOracle(model, batch_size=16)
    ctx = MethodContext(BOUNDS, seed=0, scorer=lambda name, orc, xs, t, m: score_maps(name, orc, xs, t, m, BOUNDS))
    result = METHODS["smoothtaylor"].fn(oracle, x, target, generators=[torch.Generator().manual_seed(4)], ctx=ctx,
                                         noise="auto", samples=n, objective=objective)
    u = torch.randn((n, 3, 16, 16), generator=torch.Generator().manual_seed(4))

    def objective_at(sigma: float) -> float:
        eps = torch.tensor(sigma, dtype=torch.float32) * u
        r = torch.stack([-eps[j] * grad(model, x[0] + eps[j], 1) for j in range(n)]).mean(0)  # (C, H, W)
        return float(score_maps(objective, GradientOracle(model), x, target, r.sum(0)[None], BOUNDS)[0])

    expected = _greedy_by_hand(objective_at, float(x.abs().mean()))
    assert float(result.stats["sigma"][0]) == pytest.approx(expected, rel=1e-4)
    assert float(result.stats["objective"][0]) == pytest.approx(objective_at(expected), rel=1e-3, abs=1e-5)


# -- 3. cascading model-parameter randomisation ---------------------------------------------------------------
def spearmanr(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rho: Pearson's r of the average ranks (ties share their mean rank)."""

    def ranks(v: np.ndarray) -> np.ndarray:
        r = np.empty(len(v))
        r[np.argsort(v, kind="stable")] = np.arange(len(v))
        _, inverse, counts = np.unique(v, return_inverse=True, return_counts=True)
        return (np.bincount(inverse, weights=r) / counts)[inverse]

    return float(np.corrcoef(ranks(a), ranks(b))[0, 1])


def _gradient_maps(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> np.ndarray:
    return np.stack([grad(model, x[i], int(target[i])).abs().sum(0).numpy() for i in range(x.shape[0])])


def _mprt_by_hand(model: nn.Module, x: torch.Tensor, target: torch.Tensor, seed: int) -> tuple[list[str], np.ndarray]:
    """Quantus-style MPRT, top-down cascading: a deep copy, every module with reset_parameters() and tensors
    of its own from the last to the first, `torch.manual_seed(per-layer seed); module.reset_parameters()`,
    then Spearman's rho (numpy) of each image's gradient map with the original one."""
    original = _gradient_maps(model, x, target)
    work = copy.deepcopy(model)
    layers = [(n, m) for n, m in work.named_modules()
              if hasattr(m, "reset_parameters") and (list(m.parameters(False)) or list(m.buffers(False)))]
    names, curve = [], []
    state = torch.get_rng_state()
    for name, module in reversed(layers):
        torch.manual_seed(derive_seed("randomization", seed, name))
        module.reset_parameters()
        maps = _gradient_maps(work, x, target)
        curve.append([spearmanr(original[i].ravel(), maps[i].ravel()) for i in range(x.shape[0])])
        names.append(name)
    torch.set_rng_state(state)
    return names, np.array(curve)


def test_randomization_is_the_cascading_mprt_per_layer_and_restores_everything() -> None:
    model, x = cnn(), images(2)
    oracle = GradientOracle(model, batch_size=8)
    target = oracle.logits(x).argmax(1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()

    def recompute() -> torch.Tensor:
        g, _ = oracle.gradients(x, target)
        return g.abs().sum(1)

    result = randomization(oracle, recompute, seed=5)
    names, curve = _mprt_by_hand(model, x, target, seed=5)
    assert result.stages == names == ["8", "4", "3", "1", "0"]  # logits first, BatchNorms included
    np.testing.assert_allclose(result.correlations.numpy(), curve, atol=1e-4)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # parameters and BN buffers
    assert torch.equal(torch.get_rng_state(), rng)  # the caller's global RNG is untouched
    grouped = randomization(oracle, recompute, seed=5, max_stages=2)  # the same layers' weights, fewer points
    assert grouped.stages == ["8", "4..0"]
    torch.testing.assert_close(grouped.correlations[-1], result.correlations[-1])


def test_randomization_resets_batchnorm_running_statistics() -> None:
    """After the cascade passes a BatchNorm, its running mean is 0 and its variance 1 (reset_running_stats),
    observed from inside the recomputation."""
    model, x = cnn(), images(1)
    oracle = GradientOracle(model)
    seen: list[tuple[float, float]] = []

    def recompute() -> torch.Tensor:
        bn = model[1]
        seen.append((float(bn.running_mean.abs().max()), float((bn.running_var - 1).abs().max())))
        return oracle.gradients(x, torch.tensor([0]))[0].abs().sum(1)

    randomization(oracle, recompute, seed=0)
    assert seen[0][0] > 0 and seen[-1] == (0.0, 0.0)
    assert [n for n, _ in reinit_layers(model)] == ["0", "1", "3", "4", "8"]


# -- 4. energy on signed maps -----------------------------------------------------------------------------------
def test_energy_clamps_negatives_and_energy_signed_keeps_them() -> None:
    m = np.array([[[2.0, -1.0], [-3.0, 1.0]]], dtype=np.float32)  # (1, 2, 2)
    region = np.array([[[True, True], [False, False]]])
    batch = Batch(oracle=GradientOracle(nn.Flatten()), x=torch.zeros(1, 3, 2, 2), target=torch.zeros(1, dtype=int),
                  maps=torch.from_numpy(m), bounds=BOUNDS, regions=torch.from_numpy(region),
                  has_region=torch.tensor([True]))
    pos = np.clip(m, 0, None)
    assert float(METRICS["energy"].fn(batch).values[0]) == pytest.approx(pos[region].sum() / pos.sum())  # 2/3
    assert float(METRICS["energy-signed"].fn(batch).values[0]) == pytest.approx(m[region].sum() / np.abs(m).sum())
    assert "clamped" in METRICS["energy"].summary
    batch.maps = torch.from_numpy(np.abs(m))
    assert float(METRICS["energy-signed"].fn(batch).values[0]) == pytest.approx(
        float(METRICS["energy"].fn(batch).values[0]))


def test_the_sample_images_boxes_are_read_and_lie_inside_their_images() -> None:
    """tests/data/boxes.json: one hand-drawn object box per sample image, [left, top, right, bottom] in original
    pixels (the README's quality table uses it)."""
    from pathlib import Path

    from PIL import Image

    from saliency_cli.metrics.localisation import read_boxes

    root = Path(__file__).resolve().parents[1]
    boxes = read_boxes(root / "tests" / "data" / "boxes.json")
    names = sorted(p.name for p in (root / "sample_images").iterdir() if p.suffix in (".png", ".jpg"))
    assert sorted(boxes) == names
    for name, [(left, top, right, bottom)] in boxes.items():
        with Image.open(root / "sample_images" / name) as im:
            w, h = im.size
        assert 0 <= left < right <= w and 0 <= top < bottom <= h, name
