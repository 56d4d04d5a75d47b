"""The contract every registered method keeps, tested over the whole registry (so a new method is tested for
free): output shape and type, independence from batching, a model left as it was found, honest metadata."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
from conftest import TINY_SIZE, make_generators, random_images

from saliency_cli.methods import METHODS, Method, MethodContext
from saliency_cli.oracle import GradientOracle
from saliency_cli.reduce import REDUCTIONS

NAMES = sorted(METHODS)
# Counts that only make a method slower, capped so that every method runs in a fraction of a second here; the
# properties tested do not depend on them.
SMALL = {"samples": 3, "steps": 4, "models": 2, "iterations": 3, "chains": 2}
# `auto` settings replaced by a number in most tests here, to keep them quick (`--weight-noise auto` calibrates on
# each image: over a hundred forward passes); the cost of each auto is checked on its own below.
RUN_LEVEL = {"weight_noise": 0.05}
ALL = 1_000_000  # an oracle batch size that takes everything at once
SEEDS = [101, 202, 303]
TARGETS = [1, 2, 3]


def settings(method: Method) -> dict:
    """The method's defaults with its `cheap` settings, every count capped at SMALL and run-level `auto` values
    replaced by a number, as the pipeline does."""
    hyper = {**method.defaults, **method.cheap}
    for key, value in RUN_LEVEL.items():
        if hyper.get(key) == "auto":
            hyper[key] = value
    for key, cap in SMALL.items():
        if key in hyper:
            hyper[key] = min(int(hyper[key]), cap)
    return hyper


def attribute(name: str, model: torch.nn.Module, ctx: MethodContext, idx: list[int], *, batch_size: int = ALL,
              seeds: list[int] | None = None):
    """Run a method on images `idx` of a fixed set of three, each with its own target and generator seed."""
    x = random_images(3, seed=42)[idx]
    target = torch.tensor([TARGETS[i] for i in idx])
    gens = make_generators([(seeds or SEEDS)[i] for i in idx])
    oracle = GradientOracle(model, batch_size=batch_size)
    method = METHODS[name]
    return method.fn(oracle, x, target, generators=gens, ctx=ctx, **settings(method))


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max()))


def test_registry_is_not_empty_and_names_match():
    """The registry holds the foundation's methods under their CLI names, each registered under its own name."""
    assert {"gradient", "input-x-gradient", "smoothgrad", "smoothgrad-sq", "vargrad",
            "integrated-gradients"} <= set(METHODS)
    assert all(method.name == name for name, method in METHODS.items())


@pytest.mark.parametrize("name", NAMES)
def test_metadata_is_complete(name):
    """Every method has a one-line summary, a paper, defaults its function accepts, a positive integer cost,
    cheap settings among its defaults, and a default reduction the reducer knows."""
    method = METHODS[name]
    assert isinstance(method.summary, str) and method.summary.strip() and "\n" not in method.summary
    assert isinstance(method.paper, str) and method.paper.strip()
    assert isinstance(method.defaults, dict)
    for hyper in (method.defaults, settings(method)):
        cost = method.cost(hyper)
        assert isinstance(cost, int) and not isinstance(cost, bool) and cost > 0
    assert set(method.cheap) <= set(method.defaults)
    assert method.reduce in REDUCTIONS
    assert isinstance(method.stochastic, bool) and isinstance(method.needs_gradients, bool)
    params = inspect.signature(method.fn).parameters
    assert {"generators", "ctx"} <= set(params)
    assert set(method.defaults) <= set(params)


@pytest.mark.parametrize("name", NAMES)
def test_output_is_a_finite_float32_map_of_the_input_shape(name, tiny, tiny_ctx):
    """The raw map is (B, C, H, W) float32 and finite; every per-image stat is a (B,) tensor."""
    out = attribute(name, tiny, tiny_ctx, [0, 1])
    assert out.maps.shape == (2, 3, TINY_SIZE, TINY_SIZE)
    assert out.maps.dtype == torch.float32
    assert torch.isfinite(out.maps).all()
    assert out.maps.abs().sum() > 0
    for key, value in out.stats.items():
        assert isinstance(value, torch.Tensor) and value.shape == (2,), key


@pytest.mark.parametrize("name", NAMES)
def test_same_seed_gives_the_same_map_whatever_the_batch(name, tiny, tiny_ctx):
    """An image's map does not depend on the oracle's batch size (1, 3, all), on its position in the batch or
    on the other images beside it: only on the image, its target and its seed."""
    alone = attribute(name, tiny, tiny_ctx, [0]).maps[0]
    close(attribute(name, tiny, tiny_ctx, [0], batch_size=1).maps[0], alone)
    close(attribute(name, tiny, tiny_ctx, [1, 0], batch_size=3).maps[1], alone)
    close(attribute(name, tiny, tiny_ctx, [2, 1, 0], batch_size=ALL).maps[2], alone)


@pytest.mark.parametrize("name", NAMES)
def test_stochastic_flag_is_honest(name, tiny, tiny_ctx):
    """Another image seed and run seed change the map of a stochastic method and leave a deterministic one as is."""
    base = attribute(name, tiny, tiny_ctx, [0]).maps[0]
    other_ctx = MethodContext(tiny_ctx.bounds, seed=tiny_ctx.seed + 1)
    other = attribute(name, tiny, other_ctx, [0], seeds=[7, 8, 9]).maps[0]
    if METHODS[name].stochastic:
        assert not torch.allclose(other, base, rtol=1e-3, atol=1e-3 * float(base.abs().max()))
    else:
        close(other, base)


@pytest.mark.parametrize("name", NAMES)
def test_model_is_left_as_it_was_found(name, tiny, tiny_ctx):
    """Afterwards every parameter and buffer is bit-identical, each parameter has its own requires_grad flag back
    and no .grad, and a model that was in train mode is in train mode again (BatchNorm statistics untouched)."""
    model = copy.deepcopy(tiny).train()
    params = list(model.parameters())
    for i, p in enumerate(params):
        p.requires_grad_(i % 3 == 0)  # a mix, as when part of a model is frozen for fine-tuning
    flags = [p.requires_grad for p in params]
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    out = attribute(name, model, tiny_ctx, [0, 1])
    assert torch.isfinite(out.maps).all()
    after = model.state_dict()
    assert before.keys() == after.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed == []
    assert [p.requires_grad for p in params] == flags
    assert all(p.grad is None for p in params)
    assert all(m.training for m in model.modules())


class _NoBackward(torch.autograd.Function):
    """Identity forward; a backward pass through it raises."""

    @staticmethod
    def forward(ctx, x):  # noqa: ANN001, ANN205 - autograd's signature
        return x.clone()

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        raise RuntimeError("backward through a forward-only model")


class ForwardOnly(torch.nn.Module):
    """A model whose forward works and whose backward raises (like a black-box API)."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _NoBackward.apply(self.inner(x))


@pytest.mark.parametrize("name", NAMES)
def test_needs_gradients_flag_is_honest(name, tiny, tiny_ctx):
    """A method flagged needs_gradients=False works when the model's backward raises; one flagged True does
    call backward (so the flag is not merely decorative)."""
    model = ForwardOnly(tiny).eval()  # eval like the model inside: the oracle restores one flag for the whole tree
    if METHODS[name].needs_gradients:
        with pytest.raises(RuntimeError, match="forward-only"):
            attribute(name, model, tiny_ctx, [0])
    else:
        out = attribute(name, model, tiny_ctx, [0])
        assert out.maps.shape == (1, 3, TINY_SIZE, TINY_SIZE) and torch.isfinite(out.maps).all()


@pytest.mark.parametrize("name", NAMES)
def test_declared_cost_is_the_number_of_model_passes(name, tiny, tiny_ctx):
    """`cost(hyper)` equals the forward passes the oracle counts for one image, at the defaults (with --cheap) and
    with every count capped: `saliency methods` and the pipeline's group sizes rely on it."""
    method = METHODS[name]
    checked = 0
    for capped, hyper in ((False, {**method.defaults, **method.cheap, **RUN_LEVEL_VALUES(method)}),
                          (True, settings(method))):
        if name in ("ggig", "mask", "smoothtaylor") and not capped:
            continue  # their defaults take thousands of passes; the capped settings exercise the formula
        oracle = GradientOracle(tiny, batch_size=ALL)
        x = random_images(1, seed=3)
        method.fn(oracle, x, torch.tensor([1]), generators=make_generators([5]), ctx=tiny_ctx, **hyper)
        assert oracle.passes == method.cost(hyper), (hyper, oracle.passes)
        checked += 1
    assert checked >= 1


def always_better(ctx: MethodContext) -> MethodContext:
    """`ctx` with a scorer that runs the real metric (so its passes are counted) but reports a value lower than
    every earlier one: an adaptive search then never stops early and spends the most passes it may."""
    from saliency_cli.metrics import score_maps

    calls = iter(range(1_000_000))

    def scorer(metric, oracle, x, target, maps):  # noqa: ANN001, ANN202
        score_maps(metric, oracle, x, target, maps, ctx.bounds)
        return torch.full((x.shape[0],), -float(next(calls)))

    return MethodContext(ctx.bounds, ctx.seed, scorer)


def auto_variants(name: str) -> list[dict]:
    """Each `auto` a method offers, one at a time, on the capped settings: a sample or model count with a
    correlation target no map reaches (so it runs to its cap, 12 samples or 4 models: the declared cost is that
    cap's), the weight noise calibrated on the image, and smoothtaylor's adaptive noising under each objective."""
    from saliency_cli.methods.settings import OBJECTIVES, SETTINGS

    method = METHODS[name]
    hyper = settings(method)
    variants = []
    for key in method.defaults:
        if not SETTINGS[key].auto:
            continue
        if key == "weight_noise":
            variants.append({**hyper, key: "auto"})
            continue
        if key == "noise":
            if name == "smoothtaylor":
                variants += [{**hyper, "noise": "auto", "objective": o} for o in OBJECTIVES]
            continue  # the adaptive noising is smoothtaylor's alone (the pipeline refuses it elsewhere)
        if (name, key) == ("fusiongrad", "samples"):
            continue  # refused: fusiongrad's rounds run over noisy models (--models auto)
        variants.append({**hyper, key: "auto", "converge": 0.999999, "max_samples": 12 if key == "samples" else 4})
    return variants


def test_every_auto_setting_is_covered():
    """The variants below reach every method with a per-image auto setting (so a new one is not missed)."""
    covered = {name for name in NAMES if auto_variants(name)}
    assert {"smoothgrad", "smoothgrad-sq", "vargrad", "adaptgrad", "noisegrad", "fusiongrad", "smoothtaylor"} <= covered
    assert len(auto_variants("smoothtaylor")) == 3  # -n auto and the adaptive noising under both objectives
    assert len(auto_variants("noisegrad")) == 2  # --models auto, --weight-noise auto


@pytest.mark.parametrize("name", [n for n in NAMES if auto_variants(n)])
def test_declared_cost_of_every_auto_setting_is_the_number_of_model_passes(name, tiny, tiny_ctx):
    """For each `auto` a method offers, the declared cost is the passes the oracle counts when the auto runs as
    long as it may: sample and model counts to their cap (including a last round cut short by the cap), and
    smoothtaylor's adaptive noising through all its steps, the scorer's passes (aupc's) included."""
    method = METHODS[name]
    for hyper in auto_variants(name):
        oracle = GradientOracle(tiny, batch_size=ALL)
        x = random_images(1, seed=3)
        result = method.fn(oracle, x, torch.tensor([1]), generators=make_generators([5]), ctx=always_better(tiny_ctx),
                           **hyper)
        assert oracle.passes == method.cost(hyper), (hyper, oracle.passes, method.cost(hyper))
        used = result.stats.get("samples_used", result.stats.get("models_used"))
        if used is not None:
            assert int(used[0]) == hyper["max_samples"]  # it did run to the cap


def RUN_LEVEL_VALUES(method: Method) -> dict:  # noqa: N802 - reads like the constant it extends
    return {k: v for k, v in RUN_LEVEL.items() if method.defaults.get(k) == "auto"}


def test_frozen_restores_each_submodule_mode() -> None:
    """A model in train mode with one BatchNorm frozen in eval mode comes back exactly so."""
    import torch

    from saliency_cli.oracle import frozen

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU())
    model.train()
    model[1].eval()
    with frozen(model):
        assert not any(m.training for m in model.modules())
    assert [m.training for m in model.modules()] == [True, True, False, True]
