"""Shared fixtures: the sample images, the bundled model, a tiny timm model and per-image generators."""

from __future__ import annotations

import os

# As the CLI does: OpenMP threads that spin while waiting make small tensor ops many times slower when the
# CPU is shared (7x on the contract tests with two busy cores). Must be set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from saliency_cli.data import input_bounds
from saliency_cli.methods import MethodContext

REPO = Path(__file__).resolve().parents[1]
TINY_SIZE = 32  # side of the tiny model's inputs in the fast tests
TINY_CONFIG = {"input_size": (3, TINY_SIZE, TINY_SIZE), "interpolation": "bilinear", "mean": (0.5, 0.5, 0.5),
               "std": (0.5, 0.5, 0.5), "crop_pct": 0.95, "crop_mode": "center"}


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    """The repository's sample_images/ folder."""
    return REPO / "sample_images"


@pytest.fixture(scope="session")
def bundled():
    """The bundled EfficientNet-Lite0 (`-m default`) on the CPU, loaded once per session."""
    from saliency_cli.models import load_model

    return load_model("default", device="cpu")


def _tiny(name: str) -> torch.nn.Module:
    import timm

    torch.manual_seed(0)  # the same random weights in every session
    return timm.create_model(name, pretrained=False).eval()


@pytest.fixture(scope="session")
def tiny() -> torch.nn.Module:
    """timm's `test_resnet` (random weights, eval mode, 1000 classes). Tests that change its state restore it."""
    return _tiny("test_resnet")


@pytest.fixture(scope="session")
def tiny_vit() -> torch.nn.Module:
    """timm's `test_vit` (random weights, eval mode); it takes 160 x 160 inputs only."""
    return _tiny("test_vit")


@pytest.fixture(scope="session")
def tiny_ctx() -> MethodContext:
    """Input bounds of TINY_CONFIG (mean = std = 0.5: every channel spans [-1, 1])."""
    return MethodContext(input_bounds(TINY_CONFIG), seed=0)


def make_generators(seeds: list[int], device: torch.device | str = "cpu") -> list[torch.Generator]:
    """One freshly seeded generator per image, as the pipeline makes them from (run seed, file bytes)."""
    return [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]


@pytest.fixture
def generators() -> Callable[..., list[torch.Generator]]:
    """`generators([seed, ...])` -> one freshly seeded torch.Generator per image."""
    return make_generators


def random_images(n: int, size: int = TINY_SIZE, seed: int = 0) -> torch.Tensor:
    """n smooth random images in TINY_CONFIG's normalised space, inside [-1, 1]: (n, 3, size, size)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand((n, 3, size // 4, size // 4), generator=g)
    pixels = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    return (pixels - 0.5) / 0.5


@pytest.fixture
def images() -> Callable[..., torch.Tensor]:
    """`images(n, size=32, seed=0)` -> n distinct smooth random normalised images (n, 3, size, size)."""
    return random_images


@pytest.fixture(autouse=True)
def _tiny_models_stay_in_eval_mode(request):
    """Fail a test that leaves a shared tiny model out of eval mode (later tests rely on it)."""
    yield
    for name in ("tiny", "tiny_vit"):
        if name in request.fixturenames:
            model = request.getfixturevalue(name)
            assert not any(m.training for m in model.modules()), f"{request.node.name} left {name} in train mode"


def seeded_weights(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter N(0, 0.5^2) and BatchNorm statistics (mean N(0, 0.1^2), var U(0.5, 1.5)) from one seeded
    generator; returned in eval mode. Gives small test CNNs reproducible, non-trivial weights."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        for name, buf in model.named_buffers():
            if name.endswith("running_mean"):
                buf.copy_(torch.randn(buf.shape, generator=g) * 0.1)
            elif name.endswith("running_var"):
                buf.copy_(torch.rand(buf.shape, generator=g) + 0.5)
    return model.eval()
