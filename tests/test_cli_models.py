"""Real models as people have them, through the command line: a timm train.py checkpoint, a torchvision state
dict, a grayscale 10-class model and a torch.export program each explain two sample images end to end; the
model options reach the loader; a rerun is keyed by the content of the model's files, not their paths.

Every model is a tiny one built here from random initialisation and saved the way its tool saves it, explained
at 32-64 px with `--method gradient` on the CPU. The command runs in this process (`cli.app.main`), except where
the test is about the process itself (`--version`, stdout redirected to a file, no torch before a usage error).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "sample_images"
IMAGES = ("chelsea.png", "coffee.png")
SIZE = "32"


def cli(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str, str]:
    """`saliency ARGS` in this process: (exit code, stdout, stderr)."""
    from saliency_cli.cli.app import main

    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    captured = capsys.readouterr()
    return int(exit_info.value.code or 0), captured.out, captured.err


def explain(capsys: pytest.CaptureFixture[str], images: Path, out: Path, *args: object) -> tuple[int, str, str]:
    return cli(capsys, "explain", images, "-o", out, "--method", "gradient", "--device", "cpu", "-q", *args)


def manifest(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines() if line.strip()]


def run_json(out: Path) -> dict:
    return json.loads((out / "run.json").read_text())


def assert_explained(out: Path, code: int, err: str, statuses: tuple[str, ...] = ("ok", "ok")) -> list[dict]:
    assert code == 0, err
    records = manifest(out)[-len(statuses):]
    assert tuple(r["status"] for r in records) == statuses, records
    for r in records:
        assert (out / r["outputs"]["npy"]).is_file()
    return records


def one_line_error(code: int, err: str, expected_code: int) -> str:
    assert code == expected_code, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("saliency: error: ") and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    for name in IMAGES:
        shutil.copy(SAMPLES / name, folder / name)
    return folder


def random_resnet(seed: int, **kwargs: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("test_resnet", pretrained=False, **kwargs).eval()


# -- one test per kind of model people have ------------------------------------------------------------------
def test_a_timm_train_checkpoint_explains_with_its_ema_weights(tmp_path, images, capsys):
    """What timm's train.py saves (args as a Namespace, weights, EMA weights, an optimizer state) explains with
    the EMA weights, and run.json says so."""
    model, ema = random_resnet(0), random_resnet(1)
    path = tmp_path / "last.pth.tar"
    torch.save({"epoch": 3, "arch": "test_resnet", "args": argparse.Namespace(model="test_resnet", lr=0.1),
                "state_dict": model.state_dict(), "state_dict_ema": ema.state_dict(),
                "optimizer": torch.optim.SGD(model.parameters(), lr=0.1).state_dict(), "version": 2}, path)
    code, _, err = explain(capsys, images, tmp_path / "out", "-m", "test_resnet", "--checkpoint", path,
                           "--input-size", SIZE)
    assert_explained(tmp_path / "out", code, err)
    taken = run_json(tmp_path / "out")["model"]["checkpoint"]
    assert taken["key"] == "state_dict_ema" and taken["ema"] is True and taken["arch"] == "test_resnet"


def test_a_torchvision_state_dict_explains_with_its_weights_preprocessing(tmp_path, images, capsys):
    """`-m torchvision:resnet18 --checkpoint f.pth --weights IMAGENET1K_V1`: torchvision's builder, its weights'
    interpolation and class names (here at a 64 px crop to stay quick)."""
    import torchvision

    torch.manual_seed(0)
    path = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    code, _, err = explain(capsys, images, tmp_path / "out", "-m", "torchvision:resnet18", "--checkpoint", path,
                           "--weights", "IMAGENET1K_V1", "--input-size", "64")
    records = assert_explained(tmp_path / "out", code, err)
    info = run_json(tmp_path / "out")
    assert info["model"]["kind"] == "torchvision" and info["model"]["options"]["weights"] == "IMAGENET1K_V1"
    assert info["data_config"]["interpolation"] == "bilinear" and info["data_config"]["input_size"] == [3, 64, 64]
    categories = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.meta["categories"]
    assert all(r["label"] == categories[r["target"]] for r in records)


def test_a_grayscale_ten_class_model_explains_one_channel_images(tmp_path, images, capsys):
    """`--in-chans 1 --num-classes 10` with a 1-channel timm checkpoint: the images go in as one gray channel
    (the maps keep it with --reduce none) and the targets are among the 10 classes."""
    path = tmp_path / "gray.safetensors"
    save_file(random_resnet(0, in_chans=1, num_classes=10).state_dict(), str(path))
    code, _, err = explain(capsys, images, tmp_path / "out", "-m", "test_resnet", "--checkpoint", path,
                           "--in-chans", "1", "--num-classes", "10", "--input-size", SIZE, "--reduce", "none")
    records = assert_explained(tmp_path / "out", code, err)
    info = run_json(tmp_path / "out")
    assert info["data_config"]["input_size"] == [1, 32, 32] and len(info["data_config"]["mean"]) == 1
    assert info["model"]["options"] == {"in_chans": 1, "num_classes": 10}
    for r in records:
        assert np.load(tmp_path / "out" / r["outputs"]["npy"]).shape == (1, 32, 32) and 0 <= r["target"] < 10


def test_a_torch_export_program_explains_with_the_given_preprocessing(tmp_path, images, capsys):
    """`-m model.pt2 --input-size 32 --mean 0.5 --std 0.5`: a torch.export program (exported at batch 1)."""
    path = tmp_path / "model.pt2"
    torch.export.save(torch.export.export(random_resnet(0), (torch.zeros(1, 3, 32, 32),)), str(path))
    code, _, err = explain(capsys, images, tmp_path / "out", "-m", path, "--input-size", SIZE, "--mean", "0.5",
                           "--std", "0.5")
    assert_explained(tmp_path / "out", code, err)
    assert run_json(tmp_path / "out")["model"]["kind"] == "export"


# -- results keyed by content --------------------------------------------------------------------------------
def test_overwriting_the_checkpoint_or_the_labels_redoes_the_work(tmp_path, images, capsys, monkeypatch):
    """A rerun into the same folder skips what is done; overwriting the checkpoint with other weights (same path)
    redoes every image with other maps; so does changing the labels file. The model is loaded, and the
    checkpoint hashed, once per run."""
    import saliency_cli.models.provenance as models
    import saliency_cli.pipeline.tensors as tensors

    loads: list[str] = []
    hashed: list[str] = []
    real_load, real_hash = tensors.load_model, models.file_sha256
    monkeypatch.setattr(tensors, "load_model", lambda *a, **k: loads.append(str(a[0])) or real_load(*a, **k))
    monkeypatch.setattr(models, "file_sha256", lambda p: hashed.append(str(p)) or real_hash(p))
    path, labels, out = tmp_path / "mine.safetensors", tmp_path / "labels.txt", tmp_path / "out"
    labels.write_text("\n".join(f"class {i}" for i in range(1000)))
    args = ("-m", "test_resnet", "--checkpoint", path, "--input-size", SIZE, "--labels", labels)

    def run(expected: tuple[str, ...]) -> dict[str, np.ndarray]:
        loads.clear()
        hashed.clear()
        code, _, err = explain(capsys, images, out, *args)
        records = assert_explained(out, code, err, expected)
        assert len(loads) == 1 and hashed.count(str(path)) == 1, (loads, hashed)
        return {r["key"]: np.load(out / r["outputs"]["npy"]) for r in records}

    save_file(random_resnet(0).state_dict(), str(path))
    first = run(("ok", "ok"))
    run(("skipped", "skipped"))
    save_file(random_resnet(1).state_dict(), str(path))
    second = run(("ok", "ok"))
    assert all(not np.array_equal(first[k], second[k]) for k in first)
    labels.write_text("\n".join(f"kind {i}" for i in range(1000)))
    records = manifest(out)
    run(("ok", "ok"))
    assert {r["label"] for r in manifest(out)[-2:]} <= {f"kind {i}" for i in range(1000)}
    assert len(manifest(out)) == len(records) + 2


# -- the model options, --version, info, suggestions -----------------------------------------------------------
def test_model_options_reach_info_and_info_json_is_data_on_stdout(tmp_path, capsys):
    """`saliency info --json` with the model options prints parseable data on stdout: 10 classes, 1 channel."""
    path = tmp_path / "gray.safetensors"
    save_file(random_resnet(0, in_chans=1, num_classes=10).state_dict(), str(path))
    code, out, err = cli(capsys, "info", "-m", "test_resnet", "--checkpoint", path, "--in-chans", "1",
                         "--num-classes", "10", "--input-size", SIZE, "--device", "cpu", "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["num_classes"] == 10 and data["data_config"]["input_size"] == [1, 32, 32]
    assert data["model"]["options"] == {"in_chans": 1, "num_classes": 10}


def test_model_kwargs_are_passed_to_timm(tmp_path, capsys):
    """`--model-kwargs '{"num_classes": 7}'` reaches timm.create_model (then no checkpoint is needed to differ)."""
    path = tmp_path / "seven.safetensors"
    save_file(random_resnet(0, num_classes=7, drop_rate=0.5).state_dict(), str(path))
    code, out, err = cli(capsys, "info", "-m", "test_resnet", "--checkpoint", path, "--model-kwargs",
                         '{"num_classes": 7, "drop_rate": 0.5}', "--input-size", SIZE, "--device", "cpu", "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["num_classes"] == 7 and data["model"]["options"]["model_kwargs"] == {"num_classes": 7,
                                                                                    "drop_rate": 0.5}


def without_torch(*args: str) -> subprocess.CompletedProcess[str]:
    """`saliency ARGS` in a fresh interpreter where `import torch` fails."""
    code = ("import sys; sys.modules['torch'] = None; sys.argv[0] = 'saliency'; "
            "from saliency_cli.cli import main; main()")
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=60,
                          env={"COLUMNS": "200", "PATH": ""})


@pytest.mark.parametrize("args, words", [
    (["--model-kwargs", "{drop_rate: 0}"], ["--model-kwargs", "not valid JSON"]),
    (["--model-kwargs", "[1, 2]"], ["--model-kwargs", "JSON object"]),
    (["--num-classes", "0"], ["--num-classes", "at least 1"]),
    (["--in-chans", "three"], ["--in-chans"]),
])
def test_bad_model_options_are_one_line_usage_errors_before_torch(args, words):
    for command in (["explain", "x.jpg"], ["info"]):
        proc = without_torch(*command, *args)
        line = one_line_error(proc.returncode, proc.stderr, 2)
        assert all(w in line for w in words), line


def test_version_prints_the_version():
    from saliency_cli import __version__

    proc = subprocess.run([sys.executable, "-m", "saliency_cli", "--version"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == f"saliency {__version__}", proc.stderr


def test_info_redirected_to_a_file_holds_the_data(tmp_path):
    """`saliency info > f`: the data is on stdout, so the file is not empty."""
    target = tmp_path / "info.txt"
    with open(target, "w") as f:
        proc = subprocess.run([sys.executable, "-m", "saliency_cli", "info", "--device", "cpu"], stdout=f,
                              stderr=subprocess.PIPE, text=True, timeout=300, env={**os.environ, "COLUMNS": "200"})
    assert proc.returncode == 0, proc.stderr
    text = target.read_text()
    assert "data_config" in text and "num_classes" in text and "efficientnet_lite0" in text


def test_a_mistyped_timm_name_suggests_the_closest_names(tmp_path, images, capsys):
    code, _, err = explain(capsys, images, tmp_path / "out", "-m", "resnet5O")
    line = one_line_error(code, err, 1)
    assert "did you mean" in line and "resnet50" in line
