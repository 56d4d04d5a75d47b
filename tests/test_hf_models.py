"""Hugging Face transformers image classifiers as people save them: a tiny random ViT, Swin, ConvNeXt and ResNet,
each written by `save_pretrained` next to its image processor (a non-square size, a crop_pct < 1, a non-square
centre crop, custom id2label), explained through the command line in this process.

The references are transformers' own: the processor's `pixel_values` (PIL backend), the model's `.logits` and
an autograd gradient of them, and the processor's resize and crop geometry written out here from its settings.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

transformers = pytest.importorskip("transformers")
transformers.utils.logging.disable_progress_bar()  # save_pretrained's bars would mix with the CLI's stderr

REPO = Path(__file__).resolve().parents[1]
METHODS = "gradient,smoothgrad,integrated-gradients,fusiongrad"
FAST = ("-n", "2", "--steps", "2", "--models", "2", "--reduce", "none", "--no-fast", "--device", "cpu", "-q")


def cli(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str, str]:
    """`saliency ARGS` in this process: (exit code, stdout, stderr)."""
    from saliency_cli.cli.app import main

    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    captured = capsys.readouterr()
    return int(exit_info.value.code or 0), captured.out, captured.err


def manifest(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines() if line.strip()]


def one_line(code: int, err: str, expected_code: int) -> str:
    assert code == expected_code, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("saliency: error: ") and "Traceback" not in err, err
    return lines[0]


# -- the models ---------------------------------------------------------------------------------------------
def _vit() -> tuple[torch.nn.Module, object]:
    cfg = transformers.ViTConfig(image_size=(40, 56), patch_size=8, hidden_size=32, num_hidden_layers=2,
                                 num_attention_heads=2, intermediate_size=64, num_labels=3)
    return (transformers.ViTForImageClassification(cfg),
            transformers.ViTImageProcessorPil(size={"height": 40, "width": 56}))


def _swin() -> tuple[torch.nn.Module, object]:
    cfg = transformers.SwinConfig(image_size=(32, 48), patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 2],
                                  window_size=2, num_labels=3)
    return (transformers.SwinForImageClassification(cfg),
            transformers.ViTImageProcessorPil(size={"height": 32, "width": 48}, resample=3,
                                              image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]))


def _convnext() -> tuple[torch.nn.Module, object]:
    cfg = transformers.ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, num_labels=3)
    return (transformers.ConvNextForImageClassification(cfg),
            transformers.ConvNextImageProcessorPil(size={"shortest_edge": 48}, crop_pct=0.8))


def _resnet() -> tuple[torch.nn.Module, object]:
    cfg = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3,
                                    problem_type="multi_label_classification")
    return (transformers.ResNetForImageClassification(cfg),
            transformers.BitImageProcessorPil(size={"shortest_edge": 40}, crop_size={"height": 32, "width": 40},
                                              do_convert_rgb=True))


BUILDERS = {"vit": _vit, "swin": _swin, "convnext": _convnext, "resnet": _resnet}
NAMES = {"vit": ["tabby", "beagle", "heron"], "swin": ["oak", "elm", "ash"], "convnext": ["red", "green", "blue"],
         "resnet": ["rain", "snow", "fog"]}


def save_model(kind: str, folder: Path, seed: int = 0) -> None:
    """A random `kind` model with custom id2label, saved with its processor by save_pretrained."""
    torch.manual_seed(seed)
    model, processor = BUILDERS[kind]()
    names = NAMES[kind]
    model.config.id2label = dict(enumerate(names))
    model.config.label2id = {n: i for i, n in enumerate(names)}
    model.eval().save_pretrained(folder)
    processor.save_pretrained(folder)


def expected_box(kind: str, w: int, h: int) -> list[float]:
    """The region of a w x h photo the processor keeps, written out from its settings (transformers' code:
    get_resize_output_image_size keeps the aspect ratio with int(); center_crop starts at (size - crop) // 2)."""
    def short_side(s: int) -> tuple[int, int]:  # (resized w, resized h) with the shorter side s
        return (s, int(s * h / w)) if w <= h else (int(s * w / h), s)

    if kind in ("vit", "swin"):  # a plain resize to height x width: the whole photo, squashed
        return [0.0, 0.0, float(w), float(h)]
    if kind == "convnext":  # shortest edge 48 < 384: resize the short side to int(48 / 0.8), crop 48 x 48
        (rw, rh), (cw, ch) = short_side(int(48 / 0.8)), (48, 48)
    else:  # BiT: shortest edge 40, then a 40 x 32 (w x h) centre crop
        (rw, rh), (cw, ch) = short_side(40), (40, 32)
    left, top = (rw - cw) // 2, (rh - ch) // 2
    sx, sy = w / rw, h / rh
    return [left * sx, top * sy, (left + cw) * sx, (top + ch) * sy]


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A landscape PNG and a portrait JPEG of odd sizes, random pixels."""
    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (53, 71, 3), dtype=np.uint8)).save(folder / "wide.png")
    Image.fromarray(rng.integers(0, 256, (67, 45, 3), dtype=np.uint8)).save(folder / "tall.jpg", quality=95)
    return folder


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def hf_model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    folder = tmp_path_factory.mktemp(request.param)
    save_model(request.param, folder)
    return request.param, folder


def reference(folder: Path, image: Path, target: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """transformers alone: the processor's pixel values, the logits and the gradient of logit `target`."""
    model = transformers.AutoModelForImageClassification.from_pretrained(folder).eval()
    processor = transformers.AutoImageProcessor.from_pretrained(folder, backend="pil")
    x = processor(images=Image.open(image).convert("RGB"), return_tensors="pt").pixel_values.requires_grad_(True)
    logits = model(pixel_values=x).logits
    (grad,) = torch.autograd.grad(logits[0, target], x)
    return x.detach(), logits.detach()[0], grad[0]


# -- explain ------------------------------------------------------------------------------------------------
def test_maps_labels_and_crop_boxes_are_the_models_own(hf_model, photos, tmp_path, capsys):
    """Every method runs; the gradient map is autograd's at the processor's pixel values; the class is the
    reference's top logit, named by id2label; the score is its softmax (sigmoid for the multi-label ResNet)
    probability; the crop box is the processor's geometry."""
    kind, folder = hf_model
    out = tmp_path / "out"
    code, _, err = cli(capsys, "explain", photos, "-m", folder, "-o", out, "--method", METHODS, *FAST)
    assert code == 0, err
    records = manifest(out)
    assert len(records) == 8 and all(r["status"] == "ok" for r in records), records
    for r in records:
        image = photos / r["key"]
        w, h = Image.open(image).size
        x, logits, grad = reference(folder, image, r["target"])
        assert r["target"] == int(logits.argmax())
        assert r["label"] == NAMES[kind][r["target"]]
        sigmoid = kind == "resnet"
        p = logits.sigmoid() if sigmoid else logits.softmax(0)
        assert r["probability"] == ("sigmoid" if sigmoid else "softmax")
        assert r["score"] == pytest.approx(float(p[r["target"]]), rel=1e-4)
        assert r["crop_box"] == pytest.approx(expected_box(kind, w, h), abs=0.01)
        m = np.load(out / r["outputs"]["npy"])
        assert m.shape == tuple(x.shape[1:]) and np.isfinite(m).all()
        if r["method"] == "gradient":
            ref = grad.numpy()
            assert np.linalg.norm(m - ref) <= 1e-4 * np.linalg.norm(ref), (kind, r["key"])
    run = json.loads((out / "run.json").read_text())
    source = run["model"]
    assert source["kind"] == "transformers" and source["processor"]["backend"] == "pil"
    assert source["sha256"]["weights"] == __import__("hashlib").sha256(
        (folder / "model.safetensors").read_bytes()).hexdigest()
    assert run["data_config"]["input_size"] == list(x.shape[1:])


def test_the_input_is_the_processors_pixel_values(hf_model, photos):
    """data.preprocess with the model's data config gives exactly processor(images=img).pixel_values."""
    from saliency_cli.data import decode, preprocess
    from saliency_cli.models import load_model

    _, folder = hf_model
    loaded = load_model(str(folder))
    processor = transformers.AutoImageProcessor.from_pretrained(folder, backend="pil")
    for image in sorted(photos.iterdir()):
        img = decode(image.read_bytes(), data_config=loaded.data_config)
        x, _ = preprocess(img, loaded.data_config)
        expected = processor(images=Image.open(image).convert("RGB"), return_tensors="pt").pixel_values[0]
        assert torch.equal(x, expected)


def test_a_changed_weights_file_redoes_the_images(photos, tmp_path, capsys):
    """A rerun skips what is done; new weights saved into the same folder redo every image, with other maps."""
    folder, out = tmp_path / "vit", tmp_path / "out"
    save_model("vit", folder, seed=0)
    args = ("explain", photos, "-m", folder, "-o", out, "--method", "gradient", *FAST)

    def run() -> dict[str, tuple[str, np.ndarray]]:
        code, _, err = cli(capsys, *args)
        assert code == 0, err
        return {r["key"]: (r["status"], np.load(out / r["outputs"]["npy"])) for r in manifest(out)[-2:]}

    first = run()
    assert {s for s, _ in first.values()} == {"ok"}
    assert {s for s, _ in run().values()} == {"skipped"}
    save_model("vit", folder, seed=1)
    second = run()
    assert {s for s, _ in second.values()} == {"ok"}
    assert all(not np.array_equal(first[k][1], second[k][1]) for k in first)


def test_explicit_prefix_and_the_local_cache(photos, tmp_path, capsys, monkeypatch):
    """`-m transformers:DIR` and `-m transformers:ORG/NAME` from a Hugging Face cache laid out as the hub client
    lays it out give the same maps; a repo not in the cache is one line naming the cache, at once."""
    import huggingface_hub.constants as hub_constants

    folder = tmp_path / "vit"
    save_model("vit", folder)
    cache = tmp_path / "cache"
    snapshot = cache / "models--acme--tiny-vit" / "snapshots" / ("a" * 40)
    shutil.copytree(folder, snapshot)
    (cache / "models--acme--tiny-vit" / "refs").mkdir()
    (cache / "models--acme--tiny-vit" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    maps = []
    for spec in (f"transformers:{folder}", "transformers:acme/tiny-vit"):
        out = tmp_path / spec.replace("/", "_").replace(":", "_")
        code, _, err = cli(capsys, "explain", photos / "wide.png", "-m", spec, "-o", out, "--method", "gradient",
                           *FAST)
        assert code == 0, err
        maps.append(np.load(out / manifest(out)[0]["outputs"]["npy"]))
    assert np.array_equal(maps[0], maps[1])
    source = json.loads((tmp_path / "transformers_acme_tiny-vit" / "run.json").read_text())["model"]
    assert source["repo"] == "acme/tiny-vit" and source["revision"] == "a" * 40
    code, _, err = cli(capsys, "explain", photos, "-m", "transformers:acme/absent", "-o", tmp_path / "x",
                       "--method", "gradient", "-q")
    line = one_line(code, err, 1)
    assert "acme/absent" in line and str(cache) in line


def test_info_says_what_the_processor_does(tmp_path, capsys):
    folder = tmp_path / "convnext"
    save_model("convnext", folder)
    code, out, err = cli(capsys, "info", "-m", folder)
    assert code == 0, err
    # a 320 x 240 photo: short side to int(48 / 0.8) = 60, so 80 x 60, then the 48 x 48 centre crop
    assert "resized to 80 x 60 (bicubic), then centre-cropped to 48 x 48" in out
    assert "ConvNextImageProcessorPil" in out


def test_a_timm_folder_option_on_a_transformers_folder_says_so(tmp_path, capsys):
    folder = tmp_path / "vit"
    save_model("vit", folder)
    code, _, err = cli(capsys, "explain", REPO / "sample_images" / "coffee.png", "-m", f"local-dir:{folder}",
                       "-o", tmp_path / "out", "-q")
    line = one_line(code, err, 1)
    assert "transformers" in line and f"-m {folder}" in line


def test_without_transformers_the_error_names_the_extra(tmp_path):
    """transformers blocked from importing: one line naming the hf extra, exit 1."""
    folder = tmp_path / "vit"
    save_model("vit", folder)
    code = ("import sys; sys.modules['transformers'] = None; sys.argv[0] = 'saliency'; "
            "from saliency_cli.cli import main; main()")
    proc = subprocess.run([sys.executable, "-c", code, "explain", str(REPO / "sample_images" / "coffee.png"),
                           "-m", str(folder), "-o", str(tmp_path / "out"), "-q", "--device", "cpu"],
                          capture_output=True, text=True, timeout=300)
    line = one_line(proc.returncode, proc.stderr, 1)
    assert 'pip install "saliency-cli[hf]"' in line


# -- the tensor API -----------------------------------------------------------------------------------------
def test_attribute_takes_a_transformers_model_and_its_processor(photos, tmp_path):
    """attribute(model, x) on the model object itself, with data_config_from(processor) (the default, torchvision
    backend processor object given): the gradient is autograd's of `.logits`; the data config is the folder's."""
    import saliency_cli
    from saliency_cli.models import load_model

    folder = tmp_path / "swin"
    save_model("swin", folder)
    image = photos / "tall.jpg"
    x, logits, grad = reference(folder, image, 1)
    model = transformers.AutoModelForImageClassification.from_pretrained(folder).eval()
    processor = transformers.AutoImageProcessor.from_pretrained(folder)
    cfg = saliency_cli.data_config_from(processor)
    assert cfg == load_model(str(folder)).data_config
    assert tuple(cfg["mean"]) == (0.485, 0.456, 0.406) and tuple(cfg["std"]) == (0.229, 0.224, 0.225)
    m = saliency_cli.attribute(model, x, method="gradient", target=1, data_config=cfg, fast=False)
    assert torch.linalg.norm(m[0] - grad) <= 1e-4 * torch.linalg.norm(grad)
    assert math.isfinite(float(m.sum()))


def test_prob_score_of_a_multi_label_model_is_its_sigmoid(photos, tmp_path):
    """score="prob" on a multi-label model differentiates the sigmoid of the class's logit, not a softmax."""
    import saliency_cli

    folder = tmp_path / "resnet"
    save_model("resnet", folder)
    model = transformers.AutoModelForImageClassification.from_pretrained(folder).eval()
    processor = transformers.AutoImageProcessor.from_pretrained(folder, backend="pil")
    x = processor(images=Image.open(photos / "wide.png").convert("RGB"), return_tensors="pt").pixel_values
    xr = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(model(pixel_values=xr).logits[0, 2].sigmoid(), xr)
    m = saliency_cli.attribute(model, x, method="gradient", target=2, score="prob", fast=False,
                               data_config=saliency_cli.data_config_from(processor))
    assert torch.linalg.norm(m[0] - grad[0]) <= 1e-4 * torch.linalg.norm(grad[0])


def test_a_run_reloads_its_transformers_model_until_the_weights_change(photos, tmp_path, capsys):
    """load_model_from_source (what evaluate uses) gives back the run's model and data config from run.json, and
    refuses once the weights file's bytes changed."""
    from saliency_cli.errors import ModelError
    from saliency_cli.models import load_model_from_source

    folder, out = tmp_path / "convnext", tmp_path / "out"
    save_model("convnext", folder)
    code, _, err = cli(capsys, "explain", photos / "wide.png", "-m", folder, "-o", out, "--method", "gradient", "-q")
    assert code == 0, err
    run = json.loads((out / "run.json").read_text())
    reloaded = load_model_from_source(run["model"], run["data_config"], "cpu")
    assert json.loads(json.dumps(reloaded.data_config)) == run["data_config"]
    own = transformers.AutoModelForImageClassification.from_pretrained(folder).state_dict()
    assert all(torch.equal(reloaded.module.model.state_dict()[k], v) for k, v in own.items())
    save_model("convnext", folder, seed=1)
    with pytest.raises(ModelError, match="changed since the run"):
        load_model_from_source(run["model"], run["data_config"], "cpu")
