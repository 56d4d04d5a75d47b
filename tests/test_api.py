"""The Python API: `saliency_cli.attribute(model, x, ...)` on tensors gives exactly the command line's maps for the
same preprocessed image (deterministic methods, and stochastic ones given the seeds the command line derived),
never leaves the user's module changed, checks its arguments like the command line; `api.explain` takes an
in-memory module and records it by the content of its weights."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file

from saliency_cli import api
from saliency_cli.data import decode, image_seed, preprocess
from saliency_cli.errors import ModelError, UsageError
from saliency_cli.models import LoadedModel, load_model, load_model_from_source, state_dict_sha256

REPO = Path(__file__).resolve().parents[1]
IMAGES = ("chelsea.png", "coffee.png")
CONFIG = {"input_size": (3, 32, 32), "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}


def random_resnet(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("test_resnet", pretrained=False).eval()


class TinyNet(torch.nn.Module):
    """A plain module (no timm config) with BatchNorm and dropout, whose train mode would change its outputs
    and its buffers."""

    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                                        torch.nn.Dropout(0.5), torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten(),
                                        torch.nn.Linear(16, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def tiny_net(seed: int = 0) -> TinyNet:
    torch.manual_seed(seed)
    return TinyNet()


def images_tensor(model: LoadedModel | None = None, cfg: dict | None = None) -> torch.Tensor:
    """The sample images decoded and preprocessed as the command line does: (2, C, H, W)."""
    cfg = cfg if cfg is not None else model.data_config  # type: ignore[union-attr]
    return torch.stack([preprocess(decode((REPO / "sample_images" / n).read_bytes(), data_config=cfg), cfg)[0]
                        for n in IMAGES])


def snapshot(module: torch.nn.Module) -> tuple[dict[str, torch.Tensor], list[bool], list[bool]]:
    return ({k: v.clone() for k, v in module.state_dict().items()}, [p.requires_grad for p in module.parameters()],
            [m.training for m in module.modules()])


def assert_unchanged(module: torch.nn.Module, before: tuple) -> None:
    state, flags, modes = before
    now = module.state_dict()
    assert now.keys() == state.keys() and all(torch.equal(now[k], state[k]) for k in state)
    assert [p.requires_grad for p in module.parameters()] == flags
    assert [m.training for m in module.modules()] == modes


# -- attribute() reproduces the command line ------------------------------------------------------------------
@pytest.fixture(scope="module")
def cli_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[dict]]:
    """`saliency explain` on two sample images with a tiny timm checkpoint: gradient, smoothgrad -n 4 and
    fusiongrad (2 noisy models x 4 samples, weight noise `auto`: calibrated on the run's images), run seed 7,
    --reduce none (the .npy keeps (C, H, W))."""
    from saliency_cli.cli.app import main

    root = tmp_path_factory.mktemp("cli")
    folder = root / "images"
    folder.mkdir()
    for name in IMAGES:
        (folder / name).write_bytes((REPO / "sample_images" / name).read_bytes())
    checkpoint = root / "tiny.safetensors"
    save_file(random_resnet(0).state_dict(), str(checkpoint))
    out = root / "out"
    with pytest.raises(SystemExit) as exit_info:
        main(["explain", str(folder), "-o", str(out), "-m", "test_resnet", "--checkpoint", str(checkpoint),
              "--input-size", "32", "--method", "gradient,smoothgrad,fusiongrad", "-n", "4", "--models", "2",
              "--weight-noise", "auto", "--seed", "7", "--reduce", "none", "--device", "cpu", "-q"])
    assert exit_info.value.code == 0
    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert len(records) == 6 and all(r["status"] == "ok" for r in records)
    return out, checkpoint, records


def cli_maps(out: Path, records: list[dict], method: str) -> tuple[np.ndarray, list[dict]]:
    """The command line's maps of `method`, in the order of IMAGES, and their records."""
    rows = sorted((r for r in records if r["method"] == method), key=lambda r: IMAGES.index(Path(r["image"]).name))
    return np.stack([np.load(out / r["outputs"]["npy"]) for r in rows]), rows


def test_attribute_gives_exactly_the_cli_gradient(cli_run):
    """A deterministic method: the same preprocessed images give the .npy maps bit for bit."""
    out, checkpoint, records = cli_run
    model = load_model("test_resnet", checkpoint=str(checkpoint), overrides={"input_size": (3, 32, 32)})
    expected, _ = cli_maps(out, records, "gradient")
    maps = api.attribute(model, images_tensor(model), method="gradient")
    assert maps.shape == (2, 3, 32, 32) and maps.dtype == torch.float32
    assert np.array_equal(maps.numpy(), expected)


@pytest.mark.parametrize("method, settings", [("smoothgrad", {"samples": 4}),
                                              ("fusiongrad", {"samples": 4, "models": 2, "weight_noise": "auto"})])
def test_attribute_with_the_seeds_the_cli_derived_gives_its_stochastic_maps(cli_run, method, settings):
    """Each image's generator seed is `image_seed(params.seed, sha256)` from its manifest record (fusiongrad's
    noisy models also draw from the run seed itself, and its weight noise `auto` is calibrated on each image
    alone by the same code: the s of each record is the s the API reports for that image)."""
    out, checkpoint, records = cli_run
    model = load_model("test_resnet", checkpoint=str(checkpoint), overrides={"input_size": (3, 32, 32)})
    expected, rows = cli_maps(out, records, method)
    seeds = [image_seed(r["params"]["seed"], r["sha256"]) for r in rows]
    maps, stats = api.attribute(model, images_tensor(model), method=method, seed=rows[0]["params"]["seed"],
                                image_seeds=seeds, return_stats=True, **settings)
    np.testing.assert_allclose(maps.numpy(), expected, rtol=0, atol=1e-6 * float(np.abs(expected).max()))
    if "weight_noise" in settings:
        assert [r["params"]["weight_noise"] for r in rows] == stats["weight_noise"].tolist()
        assert all(r["params"]["weight_noise_auto"] is True for r in rows)
    other = api.attribute(model, images_tensor(model), method=method, seed=7, image_seeds=[1, 2], **settings)
    assert not np.allclose(other.numpy(), expected)


def test_package_level_attribute_is_lazy_and_is_the_api_function():
    """`import saliency_cli` imports no torch; `saliency_cli.attribute` is api.attribute."""
    code = ("import sys, saliency_cli; assert 'torch' not in sys.modules, 'torch imported'; "
            "f = saliency_cli.attribute; import saliency_cli.api as a; assert f is a.attribute; print('ok')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


# -- the user's module and inputs -------------------------------------------------------------------------------
def test_the_users_module_is_left_exactly_as_it_was():
    """A module in train mode, with some parameters frozen, stays so, with the same weights and BatchNorm
    statistics, after a gradient method and after fusiongrad (which edits the weights while it runs); eval mode
    is used meanwhile (two calls agree although dropout is on in train mode)."""
    net = tiny_net().train()
    net.body[0].bias.requires_grad_(False)
    before = snapshot(net)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    first = api.attribute(net, x, method="gradient", bounds=(-1, 1), target=[0, 3])
    assert_unchanged(net, before)
    assert torch.equal(first, api.attribute(net, x, method="gradient", bounds=(-1, 1), target=[0, 3]))
    api.attribute(net, x, method="fusiongrad", bounds=(-1, 1), samples=2, models=2)
    assert_unchanged(net, before)
    assert net.training and not x.requires_grad


def test_targets_seeds_and_outputs():
    """target None is each image's top-1 class; an int or one index per image; a map per image that does not
    depend on its batch (the default seeds derive from the image's values); stats come with return_stats."""
    net = tiny_net().eval()
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    top = net(x).argmax(1)
    kw = {"data_config": {"mean": (0.5,) * 3, "std": (0.25,) * 3}}
    assert torch.equal(api.attribute(net, x, "gradient", **kw), api.attribute(net, x, "gradient", target=top, **kw))
    assert torch.equal(api.attribute(net, x, "gradient", target=2, **kw),
                       api.attribute(net, x, "gradient", target=torch.tensor([2, 2, 2]), **kw))
    maps, stats = api.attribute(net, x, "smoothgrad", samples=3, return_stats=True, **kw)
    alone = api.attribute(net, x[2:], "smoothgrad", samples=3, **kw)
    torch.testing.assert_close(maps[2:], alone, rtol=1e-5, atol=1e-7)
    assert set(stats) >= {"sigma"} and stats["sigma"].shape == (3,)


@pytest.mark.parametrize("kwargs, words", [
    ({"method": "gradient", "samples": 4}, ["gradient has no setting samples", "none"]),
    ({"method": "smoothgrad", "steps": 4}, ["no setting steps", "samples", "noise"]),
    ({"method": "smoothgrad", "samples": 0}, ["--samples"]),
    ({"method": "integrated-gradients", "quadrature": "simpson"}, ["--quadrature", "simpson"]),
    ({"method": "nosuch"}, ["nosuch", "gradient"]),
    ({"method": "gradient", "target": 5}, ["target", "0 to 4"]),
    ({"method": "gradient", "target": [1]}, ["target", "1 class indices for 2 images"]),
    ({"method": "smoothgrad", "image_seeds": [1]}, ["image_seeds", "2 whole numbers"]),
    ({"method": "gradient", "bounds": (1, -1)}, ["bounds"]),
    ({"method": "gradient", "bounds": (-1, 1), "data_config": CONFIG}, ["not both"]),
    ({"method": "gradient", "precision": "fp64"}, ["--precision"]),
])
def test_bad_arguments_are_usage_errors(kwargs, words):
    x = torch.zeros(2, 3, 16, 16)
    kwargs = {"data_config": CONFIG, **kwargs} if "bounds" not in kwargs else kwargs
    with pytest.raises(UsageError) as error:
        api.attribute(tiny_net(), x, **kwargs)
    assert all(w in str(error.value) for w in words), str(error.value)


def test_a_plain_module_needs_its_input_range_and_a_timm_model_brings_its_own():
    """Without data_config or bounds a plain module is refused with the fix in the message; a timm model's own
    data config gives the range (smoothgrad at noise 0 is then the gradient)."""
    with pytest.raises(UsageError, match="data_config=.*bounds="):
        api.attribute(tiny_net(), torch.zeros(1, 3, 16, 16), method="gradient")
    resnet = random_resnet(0)
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(api.attribute(resnet, x, "smoothgrad", samples=2, noise=0.0),
                               api.attribute(resnet, x, "gradient"), rtol=1e-5, atol=1e-7)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_model_runs_on_its_device_and_the_maps_come_back_on_the_inputs():
    net = tiny_net().cuda().train()
    before = snapshot(net)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    on_cpu = api.attribute(net, x, "smoothgrad", samples=4, bounds=(-1, 1))
    on_gpu = api.attribute(net, x.cuda(), "smoothgrad", samples=4, bounds=(-1, 1))
    assert on_cpu.device.type == "cpu" and on_gpu.device.type == "cuda"
    torch.testing.assert_close(on_gpu.cpu(), on_cpu)
    assert_unchanged(net, before)
    assert next(net.parameters()).device.type == "cuda"


# -- explain() with a model in memory ---------------------------------------------------------------------------
def explain_in_memory(folder: Path, out: Path, model: object, **kwargs: object) -> tuple[dict, list[dict]]:
    opts = api.ExplainOptions(inputs=[str(folder)], out=out, model=model, methods=["gradient"], reduce="none",
                              **kwargs)  # type: ignore[arg-type]
    info = api.explain(opts)
    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    return info, records


def counts(info: dict) -> dict[str, int]:
    return {k: v for k, v in info["counts"].items() if v}


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    images = tmp_path / "images"
    images.mkdir()
    for name in IMAGES:
        (images / name).write_bytes((REPO / "sample_images" / name).read_bytes())
    return images


def test_explain_takes_a_module_in_memory_and_records_its_weights(tmp_path, folder):
    """run.json records {"kind": "module", "name", "sha256": {"state_dict"}}; the maps are attribute()'s; the
    module stays in train mode, unchanged; a rerun skips, changed weights redo; evaluate cannot reload it and
    says so."""
    net = tiny_net().train()
    before = snapshot(net)
    overrides = {"input_size": (3, 32, 32), "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}
    out = tmp_path / "out"
    info, records = explain_in_memory(folder, out, net, data_overrides=overrides)
    assert counts(info) == {"ok": 2}
    source = json.loads((out / "run.json").read_text())["model"]
    assert source == {"kind": "module", "name": "TinyNet", "sha256": {"state_dict": state_dict_sha256(net)}}
    assert json.loads((out / "run.json").read_text())["options"]["model"] == "<in-memory TinyNet>"
    assert_unchanged(net, before)
    x = images_tensor(cfg={**overrides, "interpolation": "bilinear", "crop_pct": 0.875, "crop_mode": "center"})
    expected = api.attribute(net, x, "gradient", data_config=overrides, target=[r["target"] for r in records])
    assert np.array_equal(np.stack([np.load(out / r["outputs"]["npy"]) for r in records]), expected.numpy())
    assert counts(explain_in_memory(folder, out, net, data_overrides=overrides)[0]) == {"skipped": 2}
    with torch.no_grad():
        net.body[-1].bias.add_(1.0)
    assert counts(explain_in_memory(folder, out, net, data_overrides=overrides)[0]) == {"ok": 2}
    with pytest.raises(ModelError, match="in-memory module"):
        load_model_from_source(source, json.loads((out / "run.json").read_text())["data_config"], "cpu")


def test_explain_with_a_plain_module_needs_its_data_config(tmp_path, folder):
    with pytest.raises(UsageError, match="data_overrides"):
        explain_in_memory(folder, tmp_path / "out", tiny_net())


def test_explain_takes_a_loaded_model_and_notices_edits_made_after_loading(tmp_path, folder):
    """A LoadedModel keeps its source (evaluate can reload it from its file) plus the sha256 of its weights as
    given: edited in memory after loading, the file no longer reloads it, and that is an error, not a silent
    other model."""
    checkpoint = tmp_path / "tiny.safetensors"
    save_file(random_resnet(0).state_dict(), str(checkpoint))
    loaded = load_model("test_resnet", checkpoint=str(checkpoint), overrides={"input_size": (3, 32, 32)})
    explain_in_memory(folder, tmp_path / "a", loaded)
    run = json.loads((tmp_path / "a" / "run.json").read_text())
    assert run["model"]["kind"] == "timm" and run["model"]["state_dict_sha256"] == state_dict_sha256(loaded.module)
    reloaded = load_model_from_source(run["model"], run["data_config"], "cpu")
    assert state_dict_sha256(reloaded.module) == run["model"]["state_dict_sha256"]
    with torch.no_grad():
        next(loaded.module.parameters()).mul_(2.0)
    explain_in_memory(folder, tmp_path / "b", loaded)
    run = json.loads((tmp_path / "b" / "run.json").read_text())
    with pytest.raises(ModelError, match="changed in memory"):
        load_model_from_source(run["model"], run["data_config"], "cpu")


# -- the README ---------------------------------------------------------------------------------------------
def test_the_readme_documents_the_python_api():
    section = (REPO / "README.md").read_text(encoding="utf-8").split("## Python API")[1].split("\n## ")[0]
    for words in ("saliency_cli.attribute(", "NoiseTunnel(Saliency(model))", 'image_seed(rec["params"]["seed"], '
                  'rec["sha256"])', "ExplainOptions(", "image_seeds=", "data_config=model.data_config"):
        assert words in section, words
