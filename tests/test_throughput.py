"""The speed machinery on the CPU: the folded private copy (same gradients, the user's model untouched, weight
edits followed), group sizes that fill the oracle, and the host-to-device path (a no-op on the CPU)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import timm
import torch
from conftest import random_images

from saliency_cli.methods import METHODS
from saliency_cli.oracle import GradientOracle, fast_copy, to_device
from saliency_cli.pipeline.explain import MAX_GROUP, ExplainRun
from saliency_cli.pipeline.plan import ExplainOptions, make_jobs


def with_random_batchnorm(name: str, seed: int = 1) -> torch.nn.Module:
    """A tiny timm model (random weights) whose BatchNorms have non-trivial statistics and affine parameters, so a
    fold is more than the identity (freshly initialised ones are mean 0, var 1, gamma 1, beta 0)."""
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(0.2 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.25 + 1.5 * torch.rand(m.running_var.shape, generator=g))
                m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
    return model


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|."""
    return float((a - b).abs().max() / b.abs().max())


TARGETS = torch.tensor([1, 2, 3, 4])


@pytest.mark.parametrize("name", ["test_efficientnet", "test_resnet"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_folded_copy_gives_the_same_gradients(name, channels_last):
    """Every BatchNorm after a convolution is folded, and the input gradients and scores equal the model's
    within 1e-5 relative (float32 rounding) on a model with BatchNorm (timm's BatchNormAct2d, plain BatchNorm2d)."""
    model = with_random_batchnorm(name)
    x = random_images(4)
    fast, info = fast_copy(model, channels_last=channels_last, example=x)
    assert fast is not None and info["folded"] == len(fast.folds) > 0
    assert info["max_rel_diff"] < 1e-5 and info["channels_last"] == channels_last
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.module.modules())
    g0, s0 = GradientOracle(model).gradients(x, TARGETS)
    g1, s1 = GradientOracle(model, fast=fast).gradients(x, TARGETS)
    assert g1.dtype == torch.float32 and g1.is_contiguous()
    assert relative(g1, g0) < 1e-5 and relative(s1, s0) < 1e-5
    l0, l1 = GradientOracle(model).logits(x), GradientOracle(model, fast=fast).logits(x)
    assert relative(l1, l0) < 1e-5


def test_private_copy_leaves_the_users_model_untouched():
    """The model keeps its modules, parameter objects, values, flags and modes; the copy is another object whose
    folded weights are its own, and it never writes the tensors it shares."""
    model = with_random_batchnorm("test_efficientnet").train()
    params = list(model.parameters())
    for i, p in enumerate(params):
        p.requires_grad_(i % 2 == 0)
    flags = [p.requires_grad for p in params]
    kinds = [type(m) for m in model.modules()]
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    fast, _ = fast_copy(model, channels_last=True, example=random_images(2))
    assert fast is not None and fast.module is not model
    oracle = GradientOracle(model, fast=fast)
    oracle.gradients(random_images(2), TARGETS[:2])
    oracle.logits(random_images(2))
    assert [type(m) for m in model.modules()] == kinds
    assert list(model.parameters()) == params and [p.requires_grad for p in params] == flags
    assert all(m.training for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in params)
    ids = {id(p) for p in params}
    assert all(id(f.conv.weight) not in ids and id(f.conv.bias) not in ids for f in fast.folds)
    assert not any(m.training for m in fast.module.modules())


def test_weight_edits_reach_the_folded_copy():
    """Weight noise is drawn on the model's own parameters (conv weights and BatchNorm gamma/beta separately, the
    paper's noise model); the copy refolds from them before every pass, also after a write that bumps no
    version (`.data`), and returns to the clean fold afterwards."""
    model = with_random_batchnorm("test_efficientnet")
    x = random_images(4)
    fast, _ = fast_copy(model, example=x)
    plain, folded = GradientOracle(model), GradientOracle(model, fast=fast)
    clean, _ = folded.gradients(x, TARGETS)
    with folded.parameters_edited() as editor:
        editor.scale_by_noise(torch.Generator().manual_seed(3), 0.05)
        noisy_plain, _ = plain.gradients(x, TARGETS)
        noisy_folded, _ = folded.gradients(x, TARGETS)
        assert relative(noisy_folded, noisy_plain) < 1e-5 and relative(noisy_folded, clean) > 1e-3
        bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
        bn.weight.data.mul_(2.0)  # no version bump: the copy still follows, since it refolds while editing
        assert relative(folded.gradients(x, TARGETS)[0], plain.gradients(x, TARGETS)[0]) < 1e-5
    after, _ = folded.gradients(x, TARGETS)
    assert relative(after, clean) < 1e-6
    with torch.no_grad():  # outside an edit, an in-place change of the model is seen through its version
        next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)).bias.add_(0.5)
    assert relative(folded.gradients(x, TARGETS)[0], plain.gradients(x, TARGETS)[0]) < 1e-5


class TwoUses(torch.nn.Module):
    """The convolution's output feeds the BatchNorm and is also added back: folding would change the sum."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = torch.nn.Conv2d(3, 3, 3, padding=1), torch.nn.BatchNorm2d(3).eval()
        self.head = torch.nn.Linear(3, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.head((self.bn(y) + y).mean((2, 3)))


class Standardised(torch.nn.Conv2d):
    """A Conv2d subclass that standardises its weight in forward (as timm's StdConv2d): not linear in it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = (self.weight - self.weight.mean((1, 2, 3), keepdim=True)) / (self.weight.std((1, 2, 3), keepdim=True))
        return self._conv_forward(x, w, self.bias)


def test_only_exact_pairs_are_folded():
    """No fold where the convolution's output has another use, where the convolution is not linear in its
    weight, or where there is no BatchNorm: the oracle then runs the model itself (fast_copy gives None)."""
    two = TwoUses().eval()
    assert fast_copy(two, example=random_images(2))[0] is None
    std = torch.nn.Sequential(Standardised(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten()).eval()
    assert fast_copy(std)[0] is None
    vit_like = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten()).eval()
    fast, info = fast_copy(vit_like)
    assert fast is None and info["reason"]


def test_untraceable_wrappers_are_searched_child_by_child():
    """A wrapper fx cannot trace (its forward branches on a tensor's value) still has its children folded."""

    class Branching(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = with_random_batchnorm("test_resnet")

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.body(x) if x.sum() > 0 else -self.body(x)

    model = Branching().eval()
    x = random_images(2) + 2.0
    fast, info = fast_copy(model, example=x)
    assert fast is not None and info["folded"] == 15 and info["max_rel_diff"] < 1e-5


def _group_size(methods: list[str], batch_size: int, **hyper: object) -> int:
    run = ExplainRun(ExplainOptions(inputs=["unused"], methods=methods, hyper=dict(hyper)))
    run.jobs = make_jobs(run.opts, METHODS)
    run.oracle = GradientOracle(torch.nn.Identity(), batch_size=batch_size)
    return run._group_size()


@pytest.mark.parametrize("methods, hyper, batch, expected", [
    (["noisegrad"], {"weight_noise": 0.01}, 16, 16),  # width 1: 16 images go through each noisy model at once
    (["noisegrad"], {"weight_noise": 0.01}, 64, 64),
    (["noisegrad"], {"weight_noise": 0.01}, 4096, MAX_GROUP),
    (["smoothgrad"], {"samples": 50}, 16, 1),  # 50 samples of one image fill (and overfill) a call
    (["smoothgrad"], {"samples": 8}, 64, 8),
    (["fusiongrad"], {"weight_noise": 0.01, "samples": 4}, 16, 4),  # N inputs per image per noisy model
    (["mask"], {"chains": 8, "iterations": 64}, 64, 8),
    (["gradient"], {}, 16, 16),
    (["gradient", "noisegrad"], {"weight_noise": 0.01}, 16, 16),
    (["gradient", "smoothgrad"], {"samples": 8}, 16, 2),  # the widest job decides
])
def test_group_size_fills_the_oracle(methods, hyper, batch, expected):
    """Images per group = batch_size // width of the widest job (at most MAX_GROUP), not // cost."""
    assert _group_size(methods, batch, **hyper) == expected


def test_a_full_group_makes_full_oracle_calls(tiny, tiny_ctx, generators):
    """noisegrad over a group of batch_size images: every oracle call carries batch_size inputs, and each map
    equals the map of its image alone (the noisy models depend on (seed, m) only)."""
    method = METHODS["noisegrad"]
    hyper = {**method.defaults, "weight_noise": 0.01, "models": 3}
    batch = _group_size(["noisegrad"], 4, **hyper)
    oracle = GradientOracle(tiny, batch_size=4)
    sizes: list[int] = []
    gradients = oracle.gradients
    oracle.gradients = lambda x, t: (sizes.append(x.shape[0]), gradients(x, t))[1]  # type: ignore[method-assign]
    x = random_images(batch, seed=5)
    target = torch.arange(batch)
    maps = method.fn(oracle, x, target, generators=generators(list(range(batch))), ctx=tiny_ctx, **hyper).maps
    assert sizes == [4, 4, 4]
    alone = method.fn(GradientOracle(tiny, batch_size=4), x[2:3], target[2:3], generators=generators([2]),
                      ctx=tiny_ctx, **hyper).maps
    torch.testing.assert_close(maps[2:3], alone, rtol=1e-4, atol=1e-5 * float(alone.abs().max()))


def test_host_to_device_copy_is_a_no_op_on_the_cpu():
    """On the CPU `to_device` returns the tensor itself: no pinning, no copy."""
    x = torch.randn(2, 3, 8, 8)
    assert to_device(x, torch.device("cpu")) is x


def test_bf16_autocast_runs_on_the_cpu_and_returns_float32(tiny):
    """--precision bf16 on the CPU: float32 gradients, finite, close in rank to fp32's."""
    from saliency_cli.numerics import spearman

    x = random_images(2)
    g32, _ = GradientOracle(tiny).gradients(x, TARGETS[:2])
    g16, s16 = GradientOracle(tiny, precision="bf16").gradients(x, TARGETS[:2])
    assert g16.dtype == torch.float32 and s16.dtype == torch.float32 and torch.isfinite(g16).all()
    assert float(spearman(g16.abs().sum(1), g32.abs().sum(1)).min()) > 0.9


def test_explain_records_the_fast_copy_and_keeps_maps(tmp_path: Path, sample_dir: Path):
    """An in-memory model through `explain`: run.json says what was folded; --no-fast gives the same maps within
    float32 rounding; the user's module is left exactly as it was."""
    import json

    import numpy as np

    from saliency_cli.api import explain

    model = with_random_batchnorm("test_efficientnet")
    before = copy.deepcopy(model.state_dict())
    cfg = {"input_size": (3, 32, 32), "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
    images = [str(p) for p in sorted(sample_dir.glob("*.png"))[:2]]
    maps = {}
    for fast in (True, False):
        out = tmp_path / ("fast" if fast else "plain")
        info = explain(ExplainOptions(inputs=images, out=out, model=model, data_overrides=cfg, methods=["gradient"],
                                      device="cpu", fast=fast, workers=2))
        run = json.loads((out / "run.json").read_text())
        assert run["fast"]["folded"] == (13 if fast else 0) and run["compile"] is False
        assert run["decode_workers"] == 2 and info["counts"]["ok"] == 2
        records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
        maps[fast] = {r["image"]: np.load(out / r["outputs"]["npy"]) for r in records if r.get("status") == "ok"}
    for key, a in maps[True].items():
        b = maps[False][key]
        assert float(np.abs(a - b).max() / np.abs(b).max()) < 1e-4
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
