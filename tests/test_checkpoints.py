"""Checkpoints and model kinds: every way a trained classifier is saved loads exactly the saved weights, the
source records what was taken (and the sha256 of every file read), pickled code never runs, misfits are
explained in one line, and `load_model_from_source` reloads exactly the recorded model.

Every model is built from random initialisation and saved the way its tool saves it; nothing is downloaded."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pathlib
import warnings
from pathlib import Path

import pytest
import timm
import torch
from conftest import TINY_SIZE
from PIL import Image
from safetensors.torch import save_file

from saliency_cli.data import crop_geometry, preprocess
from saliency_cli.errors import ModelError, UsageError
from saliency_cli.models import (
    ExportedModule,
    LogitsOnly,
    check_labels,
    load_model,
    load_model_from_source,
    logits_of,
    num_classes,
    read_state_dict,
)

TINY = {"input_size": (3, TINY_SIZE, TINY_SIZE), "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}


def one_line(error: BaseException) -> str:
    """The message of a library error: one line, no ANSI escapes, short."""
    message = str(error)
    assert message and "\n" not in message and "\x1b" not in message and len(message) < 400
    return message


def randomised(module: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """The module's state dict with every float tensor replaced by seeded noise (not what init would give)."""
    g = torch.Generator().manual_seed(seed)
    return {k: (torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone())
            for k, v in module.state_dict().items()}


def assert_same_weights(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    loaded = module.state_dict()
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], state[k]) for k in state)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def resnet() -> torch.nn.Module:
    """A fresh test_resnet (1000 classes, random init): the architecture most checkpoints here are saved from."""
    return timm.create_model("test_resnet", pretrained=False)


# -- timm train.py, DDP, torch.compile, Lightning ---------------------------------------------------------
def train_checkpoint(model: torch.nn.Module, state: dict[str, torch.Tensor], ema: dict[str, torch.Tensor] | None,
                     ema_key: str = "state_dict_ema") -> dict[str, object]:
    """What timm's train.py CheckpointSaver writes: epoch, arch, args (a Namespace), weights, EMA weights,
    optimizer state (with momentum buffers), version and metric."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.zeros(2, 3, TINY_SIZE, TINY_SIZE)).sum().backward()
    optimizer.step()
    args = argparse.Namespace(model="test_resnet", lr=0.1, epochs=10, model_ema=True, data_dir="/data",
                              mean=None, input_size=[3, 160, 160])
    checkpoint: dict[str, object] = {"epoch": 7, "arch": "test_resnet", "args": args, "state_dict": state,
                                     "optimizer": optimizer.state_dict(), "version": 2, "metric": 61.5}
    if ema is not None:
        checkpoint[ema_key] = ema
    return checkpoint


@pytest.mark.parametrize("ema_key", ["state_dict_ema", "model_ema"])
def test_timm_train_checkpoint_loads_its_ema_weights(tmp_path, resnet, ema_key):
    """A timm train.py checkpoint (args Namespace, optimizer, EMA weights that differ from the raw ones) loads
    its EMA weights, as timm's own load_checkpoint does, and the source says it took them."""
    state, ema = randomised(resnet, 1), randomised(resnet, 2)
    path = tmp_path / "last.pth.tar"
    torch.save(train_checkpoint(timm.create_model("test_resnet"), state, ema, ema_key), path)
    model = load_model("test_resnet", checkpoint=str(path))
    assert_same_weights(model.module, ema)
    assert model.source["checkpoint"] == {"path": str(path), "format": "torch", "key": ema_key, "ema": True,
                                          "stripped_prefixes": [], "arch": "test_resnet", "epoch": 7}
    reference = timm.create_model("test_resnet")
    timm.models.load_checkpoint(reference, str(path))
    assert_same_weights(reference, ema)
    raw, info = read_state_dict(path, use_ema=False)
    assert info["key"] == "state_dict" and not info["ema"]
    assert all(torch.equal(raw[k], state[k]) for k in state)


def test_train_checkpoint_without_ema_loads_its_state_dict(tmp_path, resnet):
    """Without EMA weights the checkpoint's `state_dict` is taken."""
    state = randomised(resnet, 3)
    path = tmp_path / "checkpoint-3.pth.tar"
    torch.save(train_checkpoint(timm.create_model("test_resnet"), state, None), path)
    model = load_model("test_resnet", checkpoint=str(path))
    assert_same_weights(model.module, state)
    assert model.source["checkpoint"]["key"] == "state_dict" and model.source["checkpoint"]["ema"] is False


@pytest.mark.parametrize("wrapping", ["ddp", "compile", "compile-of-ddp", "ddp-of-compile"])
def test_ddp_and_compile_prefixes_are_stripped(tmp_path, wrapping):
    """State dicts of DataParallel/DDP (`module.`) and torch.compile (`_orig_mod.`) wrappers, nested either way,
    load exactly; the source lists the prefixes removed."""
    model = timm.create_model("test_resnet")
    model.load_state_dict(randomised(model, 4))
    wrapped: torch.nn.Module = {
        "ddp": lambda: torch.nn.DataParallel(model),
        "compile": lambda: torch.compile(model),
        "compile-of-ddp": lambda: torch.compile(torch.nn.DataParallel(model)),
        "ddp-of-compile": lambda: torch.nn.DataParallel(torch.compile(model)),
    }[wrapping]()
    saved = wrapped.state_dict()
    assert all(k.startswith(("module.", "_orig_mod.")) for k in saved)
    path = tmp_path / "wrapped.pth"
    torch.save({"state_dict": saved}, path)
    loaded = load_model("test_resnet", checkpoint=str(path))
    assert_same_weights(loaded.module, model.state_dict())
    expected = {"ddp": ["module."], "compile": ["_orig_mod."], "compile-of-ddp": ["_orig_mod.", "module."],
                "ddp-of-compile": ["module.", "_orig_mod."]}[wrapping]
    assert sorted(loaded.source["checkpoint"]["stripped_prefixes"]) == sorted(expected)


def lightning_checkpoint(state: dict[str, torch.Tensor], extra: dict[str, torch.Tensor] | None = None) -> dict:
    """What PyTorch Lightning's trainer.save_checkpoint writes for a LightningModule holding the classifier as
    `self.model` (and, with `extra`, other weights such as a loss's): its keys and value kinds."""
    weights = {f"model.{k}": v for k, v in state.items()} | (extra or {})
    return {
        "epoch": 4, "global_step": 500, "pytorch-lightning_version": "2.4.0", "state_dict": weights,
        "loops": {"fit_loop": {"state_dict": {}, "epoch_progress": {"total": {"ready": 5, "completed": 4}}}},
        "callbacks": {"ModelCheckpoint{'monitor': 'val_acc', 'mode': 'max'}": {
            "monitor": "val_acc", "best_model_score": torch.tensor(0.91), "best_model_path": "/runs/best.ckpt",
            "dirpath": "/runs", "best_k_models": {"/runs/best.ckpt": torch.tensor(0.91)}}},
        "optimizer_states": [{"state": {}, "param_groups": [{"lr": 1e-3, "params": [0, 1]}]}],
        "lr_schedulers": [], "hparams_name": "kwargs",
        "hyper_parameters": {"model_name": "test_resnet", "lr": 1e-3, "num_classes": 1000},
    }


def test_lightning_checkpoint_loads_with_its_model_prefix_removed(tmp_path, resnet):
    """A Lightning .ckpt (state_dict with `model.` on every key, hyper_parameters, loops, callbacks) loads
    exactly; the source records the prefix and the Lightning version."""
    state = randomised(resnet, 5)
    path = tmp_path / "epoch=4-step=500.ckpt"
    torch.save(lightning_checkpoint(state), path)
    model = load_model("test_resnet", checkpoint=str(path))
    assert_same_weights(model.module, state)
    info = model.source["checkpoint"]
    assert info["key"] == "state_dict" and info["stripped_prefixes"] == ["model."]
    assert info["lightning"] == "2.4.0" and info["arch"] == "test_resnet" and info["epoch"] == 4


def test_lightning_checkpoint_with_other_weights_takes_the_model_part(tmp_path, resnet):
    """When the LightningModule holds more than the classifier (a weighted loss), the part under `model.` whose
    names are exactly the classifier's is taken, and the other keys are counted as ignored."""
    state = randomised(resnet, 6)
    path = tmp_path / "last.ckpt"
    torch.save(lightning_checkpoint(state, {"criterion.weight": torch.ones(1000)}), path)
    model = load_model("test_resnet", checkpoint=str(path))
    assert_same_weights(model.module, state)
    assert model.source["checkpoint"]["stripped_prefixes"] == ["model."]
    assert model.source["checkpoint"]["ignored_keys"] == 1


# -- pickled code, errors, digests -----------------------------------------------------------------------
class _RunsCode:
    """Unpickling this calls Path.touch(marker): the kind of payload weights_only refuses to run."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (pathlib.Path.touch, (self.marker,))


@pytest.mark.parametrize("where", ["top", "inside-args"])
def test_a_pickle_that_would_run_code_is_refused_and_never_runs(tmp_path, resnet, where):
    """A checkpoint whose pickle would call code (at the top, or hidden in the allowed Namespace) fails with one
    clean line naming the first global it needs; the code never runs."""
    marker = tmp_path / "code-ran"
    payload = _RunsCode(marker)
    checkpoint = {"state_dict": resnet.state_dict(), "payload": payload} if where == "top" else \
        {"state_dict": resnet.state_dict(), "args": argparse.Namespace(model="test_resnet", hook=payload)}
    path = tmp_path / "evil.pth"
    torch.save(checkpoint, path)
    with pytest.raises(ModelError) as info:
        load_model("test_resnet", checkpoint=str(path))
    message = one_line(info.value)
    assert message.startswith(f"cannot read checkpoint {path}: it holds Python objects that are not plain data")
    assert "(first: GLOBAL " in message and message.endswith("saliency never unpickles code")
    assert not marker.exists()


def test_a_file_that_is_no_checkpoint_is_one_clean_line(tmp_path):
    """Random bytes as a checkpoint give a one-line ModelError naming the file."""
    path = tmp_path / "junk.pth"
    path.write_bytes(os.urandom(4096))
    with pytest.raises(ModelError) as info:
        load_model("test_resnet", checkpoint=str(path))
    assert one_line(info.value).startswith(f"cannot read checkpoint {path}")


def test_changing_the_checkpoint_bytes_changes_its_sha256(tmp_path, resnet):
    """source['sha256']['checkpoint'] is the file's sha256: the same bytes give the same digest, other bytes
    another (so the pipeline redoes work whose weights changed)."""
    path = tmp_path / "model.safetensors"
    save_file(randomised(resnet, 7), str(path))
    first = load_model("test_resnet", checkpoint=str(path)).source["sha256"]["checkpoint"]
    assert first == sha256(path) == load_model("test_resnet", checkpoint=str(path)).source["sha256"]["checkpoint"]
    save_file(randomised(resnet, 8), str(path))
    assert load_model("test_resnet", checkpoint=str(path)).source["sha256"]["checkpoint"] != first


def test_a_misfitting_checkpoint_names_the_keys_and_the_fix(tmp_path):
    """A 10-class checkpoint loaded with --num-classes 5 names the mis-shaped classifier (with shapes) and
    suggests --num-classes 10; another architecture's names its missing and unexpected keys."""
    path = tmp_path / "ten.safetensors"
    save_file(timm.create_model("test_resnet", num_classes=10).state_dict(), str(path))
    with pytest.raises(ModelError) as info:
        load_model("test_resnet", checkpoint=str(path), options={"num_classes": 5})
    message = one_line(info.value)
    assert "fc.weight 10x" in message and "vs 5x" in message and "--num-classes 10" in message

    vit = tmp_path / "vit.safetensors"
    save_file(timm.create_model("test_vit").state_dict(), str(vit))
    with pytest.raises(ModelError) as info:
        load_model("test_resnet", checkpoint=str(vit))
    message = one_line(info.value)
    assert f"checkpoint {vit} does not fit test_resnet" in message
    assert "92 missing (conv1.0.weight, conv1.1.weight" in message and "unexpected (blocks.0.attn" in message


def test_a_misfit_names_the_architecture_the_checkpoint_records(tmp_path):
    """A timm train.py checkpoint of test_vit given to test_resnet suggests -m test_vit."""
    vit = timm.create_model("test_vit")
    path = tmp_path / "vit.pth.tar"
    torch.save({"arch": "test_vit", "epoch": 1, "state_dict": vit.state_dict()}, path)
    with pytest.raises(ModelError, match="try -m test_vit"):
        load_model("test_resnet", checkpoint=str(path))


# -- grayscale, class counts, options ---------------------------------------------------------------------
def test_grayscale_ten_class_checkpoint_sets_channels_and_classes(tmp_path):
    """A 1-channel, 10-class test_resnet checkpoint loads with in_chans and num_classes read from its stem and
    classifier (recorded in source['options']); its data config has 1 channel and one mean and std, and a
    preprocessed photo goes through it."""
    trained = timm.create_model("test_resnet", in_chans=1, num_classes=10)
    state = randomised(trained, 9)
    path = tmp_path / "gray.safetensors"
    save_file(state, str(path))
    for options in (None, {"in_chans": 1, "num_classes": 10}):
        model = load_model("test_resnet", checkpoint=str(path), options=options)
        assert_same_weights(model.module, state)
        assert model.source["options"] == {"num_classes": 10, "in_chans": 1}
        cfg = model.data_config
        assert cfg["input_size"][0] == 1 and len(cfg["mean"]) == 1 and len(cfg["std"]) == 1
        x, _ = preprocess(Image.new("RGB", (50, 40), (200, 100, 50)), cfg)
        assert x.shape == cfg["input_size"]
        with torch.no_grad():
            assert model.module(x[None]).shape == (1, 10)
        assert num_classes(model) == 10


def test_a_grayscale_checkpoint_with_three_channels_asked_suggests_in_chans(tmp_path):
    """--in-chans 3 for a 1-channel checkpoint is refused with the option that fixes it."""
    path = tmp_path / "gray.safetensors"
    save_file(timm.create_model("test_resnet", in_chans=1).state_dict(), str(path))
    with pytest.raises(ModelError, match="--in-chans 1"):
        load_model("test_resnet", checkpoint=str(path), options={"in_chans": 3})


def test_model_options_reach_timm_create_model(tmp_path):
    """img_size sets a ViT's input size (and the data config's), model_kwargs go to timm.create_model, and
    img_size for a model without one is a clear ModelError; unknown option names are usage errors."""
    vit = timm.create_model("test_vit", img_size=64)
    path = tmp_path / "vit64.safetensors"
    save_file(randomised(vit, 10), str(path))
    model = load_model("test_vit", checkpoint=str(path), options={"img_size": 64, "model_kwargs": {"drop_rate": 0.25}})
    assert model.data_config["input_size"] == (3, 64, 64)
    assert model.module.head_drop.p == 0.25
    assert model.source["options"] == {"img_size": 64, "model_kwargs": {"drop_rate": 0.25}}
    with torch.no_grad():
        assert model.module(torch.zeros(1, 3, 64, 64)).shape == (1, 1000)
    with pytest.raises(ModelError, match="--img-size"):
        load_model("test_resnet", checkpoint=str(path), options={"img_size": 64})
    with pytest.raises(UsageError, match="num_clases"):
        load_model("test_resnet", options={"num_clases": 3})


def test_a_numpy_checkpoint_goes_to_the_models_load_pretrained(tmp_path, resnet):
    """As in timm's load_checkpoint, .npz weights go to the model's load_pretrained; a model without one, or an
    archive of another layout, is a one-line ModelError."""
    import numpy as np

    path = tmp_path / "weights.npz"
    np.savez(path, other=np.zeros(3, dtype=np.float32))
    with pytest.raises(ModelError, match="load_pretrained"):
        load_model("test_resnet", checkpoint=str(path))
    with pytest.raises(ModelError) as info:
        load_model("test_vit", checkpoint=str(path))
    assert one_line(info.value).startswith(f"checkpoint {path} does not fit test_vit")


def test_a_mistyped_timm_name_suggests_the_closest_names():
    """resnet5O (letter O) is not a model; the error suggests resnet50."""
    with pytest.raises(ModelError) as info:
        load_model("resnet5O")
    message = one_line(info.value)
    assert "'resnet5O'" in message and "did you mean resnet50" in message


def test_a_torchvision_state_dict_loads_into_timm_resnet18(tmp_path):
    """torchvision's resnet18 names match timm's: its state dict loads into -m resnet18 (timm preprocessing)."""
    from torchvision import models

    state = randomised(models.resnet18(weights=None), 11)
    path = tmp_path / "resnet18-tv.pth"
    torch.save(state, path)
    model = load_model("resnet18", checkpoint=str(path))
    assert_same_weights(model.module, state)
    assert model.source["kind"] == "timm"


# -- labels ----------------------------------------------------------------------------------------------
def test_a_labels_file_of_the_wrong_length_is_refused(tmp_path, resnet):
    """Three names for a 1000-class model: a UsageError naming the file and both counts; 1000 names load."""
    path = tmp_path / "model.safetensors"
    save_file(resnet.state_dict(), str(path))
    labels = tmp_path / "labels.txt"
    labels.write_text("cat\ndog\nbird\n")
    with pytest.raises(UsageError) as info:
        load_model("test_resnet", checkpoint=str(path), labels_file=str(labels))
    assert one_line(info.value) == f"--labels {labels}: 3 names for a model with 1000 classes"
    labels.write_text("".join(f"class {i}\n" for i in range(1000)))
    model = load_model("test_resnet", checkpoint=str(path), labels_file=str(labels))
    assert model.label(3) == "class 3"
    assert model.source["labels_file"] == str(labels) and model.source["sha256"]["labels"] == sha256(labels)


def test_num_classes_without_an_attribute_runs_one_forward_pass(tmp_path, tiny):
    """A TorchScript model has no num_classes attribute: its class count comes from one forward pass, and a
    sidecar's labels of the wrong length are refused naming the sidecar."""
    path = tmp_path / "tiny.pt"
    with torch.no_grad():
        torch.jit.trace(tiny, torch.zeros(1, 3, TINY_SIZE, TINY_SIZE)).save(str(path))
    model = load_model(str(path), overrides=TINY)
    model.known_classes = None
    assert num_classes(model) == 1000
    model.labels, model.labels_origin = ["a", "b"], "sidecar tiny.pt.json"
    with pytest.raises(UsageError, match="sidecar tiny.pt.json: 2 names for a model with 1000 classes"):
        check_labels(model)


# -- torchvision -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small", "efficientnet_b0",
                                  pytest.param("convnext_tiny", marks=pytest.mark.slow)])
def test_torchvision_state_dict_loads_into_its_builder(tmp_path, name):
    """A torchvision state dict loads exactly into -m torchvision:NAME; --weights IMAGENET1K_V1 gives that
    weights' eval preprocessing and its 1000 category names."""
    from torchvision import models

    state = randomised(models.get_model(name, weights=None), 12)
    path = tmp_path / f"{name}.pth"
    torch.save(state, path)
    model = load_model(f"torchvision:{name}", checkpoint=str(path), options={"weights": "IMAGENET1K_V1"})
    assert_same_weights(model.module, state)
    weights = models.get_model_weights(name)["IMAGENET1K_V1"]
    transform = weights.transforms()
    cfg = model.data_config
    assert cfg["input_size"] == (3, transform.crop_size[0], transform.crop_size[0])
    assert cfg["mean"] == tuple(transform.mean) and cfg["interpolation"] == transform.interpolation.value
    assert model.labels == weights.meta["categories"]
    assert model.source == {"kind": "torchvision", "name": name, "weights": str(path),
                            "checkpoint": {"path": str(path), "format": "torch", "key": None, "ema": False,
                                           "stripped_prefixes": []},
                            "options": {"weights": "IMAGENET1K_V1"}, "files": {"checkpoint": str(path)},
                            "sha256": {"checkpoint": sha256(path)}}


def test_torchvision_ten_class_checkpoint(tmp_path):
    """A 10-class torchvision resnet18 gets num_classes 10 from its fc, and no ImageNet names."""
    from torchvision import models

    state = randomised(models.resnet18(weights=None, num_classes=10), 13)
    path = tmp_path / "resnet18-10.safetensors"
    save_file(state, str(path))
    model = load_model("torchvision:resnet18", checkpoint=str(path), options={"weights": "IMAGENET1K_V1"})
    assert_same_weights(model.module, state)
    assert model.labels is None and num_classes(model) == 10
    assert model.source["options"] == {"weights": "IMAGENET1K_V1", "num_classes": 10}


@pytest.mark.parametrize(("name", "weights"), [("resnet18", "IMAGENET1K_V1"), ("resnet50", "IMAGENET1K_V2"),
                                               ("convnext_tiny", "IMAGENET1K_V1"), ("inception_v3", "IMAGENET1K_V1"),
                                               ("vit_b_16", "IMAGENET1K_SWAG_E2E_V1"),
                                               ("efficientnet_b0", "IMAGENET1K_V1")])
@pytest.mark.parametrize("size", [(300, 250), (250, 331)])
def test_torchvision_preprocessing_equals_its_own_transform(name, weights, size):
    """data.preprocess with the data config made from torchvision weights gives what the weights' own
    transforms() gives (Resize 256/232/236/342/384 of the short side, CenterCrop, normalise), within 1e-5."""
    from torchvision import models

    from saliency_cli.models import _normalise_config, _torchvision_data_config

    member = models.get_model_weights(name)[weights]
    cfg = _normalise_config(_torchvision_data_config(member))
    g = torch.Generator().manual_seed(size[0])
    pixels = (torch.rand((size[1], size[0], 3), generator=g) * 255).to(torch.uint8).numpy()
    img = Image.fromarray(pixels, "RGB")
    mine, _ = preprocess(img, cfg)
    theirs = member.transforms()(img)
    assert mine.shape == theirs.shape
    torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=0)


def test_every_torchvision_weights_resize_is_reproduced():
    """For every torchvision classification weights, crop_geometry resizes the short side to exactly the
    transform's resize_size (crop_pct is chosen so that floor(crop / crop_pct) gives it back)."""
    from torchvision import models

    from saliency_cli.models import _normalise_config, _torchvision_data_config

    for name in models.list_models(module=models):
        for member in models.get_model_weights(name):
            t = member.transforms()
            (w, h), _ = crop_geometry(400, 300, _normalise_config(_torchvision_data_config(member)))
            assert h == t.resize_size[0], (name, member.name)


def test_torchvision_without_preprocessing_or_weights_is_refused(tmp_path, monkeypatch):
    """Without --weights and without --input-size/--mean/--std a torchvision model is refused with both ways
    out; with them it loads. Without --checkpoint (and no cached file) it asks for one; a typo gets a
    suggestion."""
    from torchvision import models

    path = tmp_path / "mnv3.pth"
    torch.save(models.mobilenet_v3_small(weights=None).state_dict(), path)
    with pytest.raises(ModelError) as info:
        load_model("torchvision:mobilenet_v3_small", checkpoint=str(path))
    message = one_line(info.value)
    assert "--weights" in message and "--input-size" in message and "IMAGENET1K_V1" in message
    model = load_model("torchvision:mobilenet_v3_small", checkpoint=str(path), overrides=TINY)
    assert model.data_config["input_size"] == TINY["input_size"] and model.labels is None
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))  # an empty torch hub cache
    with pytest.raises(ModelError, match="--checkpoint"):
        load_model("torchvision:mobilenet_v3_small", options={"weights": "IMAGENET1K_V1"})
    with pytest.raises(ModelError, match="did you mean resnet18"):
        load_model("torchvision:resnet81")


def test_torchvision_weights_from_the_torch_hub_cache(tmp_path, monkeypatch):
    """A torchvision weights file that a past download left in the torch hub cache is used without
    --checkpoint (nothing is downloaded); the source names and hashes it."""
    from torchvision import models

    weights = models.get_model_weights("mobilenet_v3_small")["IMAGENET1K_V1"]
    state = randomised(models.mobilenet_v3_small(weights=None), 14)
    cached = tmp_path / "checkpoints" / Path(weights.url).name
    cached.parent.mkdir()
    torch.save(state, cached)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    model = load_model("torchvision:mobilenet_v3_small", options={"weights": "DEFAULT"})
    assert_same_weights(model.module, state)
    assert model.source["weights"] == str(cached) and model.source["sha256"]["checkpoint"] == sha256(cached)
    assert model.source["options"] == {"weights": "IMAGENET1K_V1"}


# -- torch.export and TorchScript ------------------------------------------------------------------------
@pytest.fixture
def exported(tmp_path, tiny) -> Path:
    """test_resnet exported with torch.export at a static batch of 1 and saved as tiny.pt2."""
    path = tmp_path / "tiny.pt2"
    torch.export.save(torch.export.export(tiny, (torch.zeros(1, 3, TINY_SIZE, TINY_SIZE),)), str(path))
    return path


def test_a_torch_export_file_loads_and_computes_what_the_original_does(exported, tiny):
    """A .pt2 loads with torch.export.load(...).module(), in eval mode without error, computes the original's
    logits for a batch of 3 (more than it was exported with), and gives input gradients."""
    model = load_model(str(exported), overrides=TINY)
    assert isinstance(model.module, ExportedModule) and not model.module.training
    model.module.eval()
    assert model.source["kind"] == "export" and model.source["sha256"] == {"export": sha256(exported)}
    x = torch.randn(3, 3, TINY_SIZE, TINY_SIZE, generator=torch.Generator().manual_seed(0), requires_grad=True)
    out = model.module(x)
    with torch.no_grad():
        torch.testing.assert_close(out, tiny(x), rtol=1e-5, atol=1e-5)
    (grad,) = torch.autograd.grad(out[:, 0].sum(), x)
    assert grad.shape == x.shape and grad.abs().sum() > 0
    assert num_classes(model) == 1000


def test_a_torch_export_file_takes_preprocessing_from_its_sidecar(exported):
    """MODEL.pt2.json gives an exported model's preprocessing (and is hashed); without it or options the loader
    refuses to guess."""
    with pytest.raises(UsageError, match="tiny.pt2.json"):
        load_model(str(exported))
    sidecar = exported.with_name("tiny.pt2.json")
    sidecar.write_text(json.dumps({"input_size": list(TINY["input_size"]), "mean": [0.5], "std": [0.25]}))
    model = load_model(str(exported))
    assert model.data_config["input_size"] == TINY["input_size"] and model.data_config["std"] == (0.25,) * 3
    assert model.source["sha256"]["sidecar"] == sha256(sidecar)


def test_a_torch_export_file_that_would_unpickle_code_is_refused(tmp_path, exported):
    """torch.export.load unpickles sample inputs without weights_only when the safe load fails; a .pt2 whose
    sample inputs would run code is refused before loading, and the code never runs."""
    import io
    import zipfile

    marker = tmp_path / "code-ran"
    payload = io.BytesIO()
    torch.save(((torch.zeros(1),), {}, _RunsCode(marker)), payload)
    evil = tmp_path / "evil.pt2"
    with zipfile.ZipFile(exported) as src, zipfile.ZipFile(evil, "w") as out:
        for item in src.infolist():
            data = src.read(item)
            out.writestr(item, payload.getvalue() if item.filename.endswith("sample_inputs/model.pt") else data)
    with pytest.raises(ModelError) as info:
        load_model(str(evil), overrides=TINY)
    assert "never unpickles code" in one_line(info.value)
    assert not marker.exists()


def test_torchscript_loads_without_deprecation_warnings(tmp_path, tiny):
    """Loading a TorchScript file emits none of torch.jit.load's deprecation warnings."""
    path = tmp_path / "tiny.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.no_grad():
            torch.jit.trace(tiny, torch.zeros(1, 3, TINY_SIZE, TINY_SIZE)).save(str(path))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = load_model(str(path), overrides=TINY)
    assert not [w for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))]
    assert model.source["kind"] == "torchscript" and model.source["sha256"] == {"torchscript": sha256(path)}


def test_a_model_file_that_is_neither_is_one_clean_line(tmp_path):
    """Bytes that are neither TorchScript nor torch.export give one line, cut at no word."""
    path = tmp_path / "model.ts"
    path.write_bytes(b"\x00garbage" * 100)
    with pytest.raises(ModelError) as info:
        load_model(str(path), overrides=TINY)
    message = one_line(info.value)
    assert "neither a TorchScript nor a torch.export file" in message and message.endswith("--checkpoint FILE")


class _DictOutput(torch.nn.Module):
    """A classifier that returns a dict of logits and features, as many research models do."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.fc = torch.nn.Linear(4, 7)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.conv(x).mean((2, 3))
        return {"features": features, "logits": self.fc(features)}


def test_a_model_that_returns_a_dict_is_wrapped_to_give_logits(tmp_path):
    """A TorchScript model returning {'features', 'logits'} is wrapped in LogitsOnly: the pipeline sees (N, 7)."""
    original = _DictOutput().eval()
    path = tmp_path / "dict.pt"
    torch.jit.script(original).save(str(path))
    model = load_model(str(path), overrides=TINY)
    assert isinstance(model.module, LogitsOnly) and num_classes(model) == 7
    x = torch.randn(2, *TINY["input_size"])
    with torch.no_grad():
        torch.testing.assert_close(model.module(x), original(x)["logits"])


def test_logits_of_takes_what_is_unambiguous():
    """A tensor, the first tensor of a tuple, a dict's 'logits' or only tensor; else a ModelError naming keys."""
    t = torch.zeros(1, 3)
    assert logits_of(t) is t and logits_of((t, "aux")) is t and logits_of({"logits": t, "x": t + 1}) is t
    assert logits_of({"out": t}) is t
    with pytest.raises(ModelError, match="the model returned a dict with keys a, b; saliency needs class logits"):
        logits_of({"a": t, "b": t})
    with pytest.raises(ModelError, match="returned a str"):
        logits_of("nope")


# -- timm model folders and the hub cache ----------------------------------------------------------------
@pytest.fixture
def model_folder(tmp_path) -> tuple[Path, dict[str, torch.Tensor]]:
    """A timm model folder as timm's save_for_hf writes it (config.json + model.safetensors), 10 classes."""
    model = timm.create_model("test_resnet", num_classes=10)
    state = randomised(model, 15)
    model.load_state_dict(state)
    folder = tmp_path / "my-model"
    timm.models.save_for_hf(model, str(folder), safe_serialization=True)
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    return folder, state


def test_a_local_dir_model_loads_through_timm(model_folder):
    """local-dir:FOLDER (or the folder's path) loads timm's way, with the folder's weights and config, both
    hashed in the source."""
    folder, state = model_folder
    for spec in (f"local-dir:{folder}", str(folder)):
        model = load_model(spec)
        assert_same_weights(model.module, state)
        source = model.source
        assert source["kind"] == "timm" and source["hub"] == "local-dir" and source["architecture"] == "test_resnet"
        assert source["name"] == f"local-dir:{folder}" and source["weights"] == str(folder / "model.safetensors")
        assert source["sha256"] == {"config": sha256(folder / "config.json"),
                                    "weights": sha256(folder / "model.safetensors")}


def fake_hub_cache(root: Path, repo: str, files: dict[str, Path]) -> str:
    """A Hugging Face cache holding `files` for `repo` at one commit, laid out as huggingface_hub lays it out."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    base = root / f"models--{repo.replace('/', '--')}"
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(commit)
    snapshot = base / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name, path in files.items():
        (snapshot / name).write_bytes(path.read_bytes())
    return commit


def offline_cache(monkeypatch, root: Path) -> None:
    import huggingface_hub.constants as hub_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(root))


def test_pretrained_timm_weights_come_from_the_offline_hub_cache(tmp_path, monkeypatch, model_folder):
    """-m test_resnet without --checkpoint takes the weights cached for its hub repo (offline, nothing is
    downloaded), and hf-hub:REPO reads config and weights from the cache; both record digest and revision."""
    folder, state = model_folder
    weights = folder / "model.safetensors"
    resnet_state = randomised(timm.create_model("test_resnet"), 16)
    registry_weights = tmp_path / "registry.safetensors"
    save_file(resnet_state, str(registry_weights))
    root = tmp_path / "hub"
    commit = fake_hub_cache(root, "timm/test_resnet.r160_in1k", {"model.safetensors": registry_weights})
    fake_hub_cache(root, "someone/my-model", {"config.json": folder / "config.json", "model.safetensors": weights})
    offline_cache(monkeypatch, root)

    model = load_model("test_resnet")
    assert_same_weights(model.module, resnet_state)
    assert model.source["weights"] == "pretrained" and model.source["revision"] == commit
    assert model.source["sha256"] == {"weights": sha256(registry_weights)}

    model = load_model("hf-hub:someone/my-model")
    assert_same_weights(model.module, state)
    assert model.source["hub"] == "hf-hub" and model.source["sha256"] == {"config": sha256(folder / "config.json"),
                                                                          "weights": sha256(weights)}


# -- reloading a recorded model --------------------------------------------------------------------------
def recorded(model) -> tuple[dict, dict]:
    """source and data_config as run.json holds them (through JSON)."""
    return json.loads(json.dumps(model.source)), json.loads(json.dumps(model.data_config))


def reloads_the_same(model) -> None:
    source, cfg = recorded(model)
    assert source == model.source  # JSON keeps it as it is
    again = load_model_from_source(source, cfg, "cpu")
    assert again.source == model.source and again.data_config == model.data_config
    assert_same_weights(again.module, model.module.state_dict())
    assert again.labels == model.labels


def test_load_model_from_source_reloads_every_kind(tmp_path, tiny, resnet, exported, model_folder, bundled):
    """The default, a timm checkpoint with options and labels, torchvision, TorchScript, torch.export and a
    local-dir model all reload from their recorded source and data config with the same weights and config."""
    from torchvision import models

    reloads_the_same(bundled)
    gray = tmp_path / "gray.pth"
    torch.save({"state_dict_ema": randomised(timm.create_model("test_resnet", in_chans=1, num_classes=10), 17)}, gray)
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps([f"c{i}" for i in range(10)]))
    reloads_the_same(load_model("test_resnet", checkpoint=str(gray), labels_file=str(labels),
                                overrides={"crop_pct": 1.0}, options={"model_kwargs": {"drop_rate": 0.1}}))
    tv = tmp_path / "resnet18.pth"
    torch.save(randomised(models.resnet18(weights=None), 18), tv)
    reloads_the_same(load_model("torchvision:resnet18", checkpoint=str(tv), options={"weights": "IMAGENET1K_V1"}))
    script = tmp_path / "tiny.pt"
    with torch.no_grad():
        torch.jit.trace(tiny, torch.zeros(1, 3, TINY_SIZE, TINY_SIZE)).save(str(script))
    reloads_the_same(load_model(str(script), overrides=TINY))
    reloads_the_same(load_model(str(exported), overrides=TINY))
    reloads_the_same(load_model(f"local-dir:{model_folder[0]}"))


def test_load_model_from_source_refuses_a_changed_file(tmp_path, resnet):
    """A checkpoint rewritten since the run fails to reload with a ModelError naming the file; a run recorded
    before checkpoints were described (only 'weights') still reloads."""
    path = tmp_path / "model.safetensors"
    save_file(randomised(resnet, 19), str(path))
    source, cfg = recorded(load_model("test_resnet", checkpoint=str(path)))
    save_file(randomised(resnet, 20), str(path))
    with pytest.raises(ModelError) as info:
        load_model_from_source(source, cfg, "cpu")
    assert f"checkpoint file {path} changed since the run" in one_line(info.value)
    old = load_model_from_source({"kind": "timm", "name": "test_resnet", "weights": str(path)}, cfg, "cpu")
    assert_same_weights(old.module, randomised(resnet, 20))
