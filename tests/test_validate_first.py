"""Nothing is created before the options are known good: after any usage error (exit 2, one line) there is no
output folder, no lock, no file. Closed values name the closest ones on a typo ("did you mean"), and `--target`
is checked against the class names as soon as they are known, without reading weights when they are known
before (ImageNet's for the bundled model and timm ImageNet models, a labels file's)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_hardening import images, one_line_error, tiny_model

REPO = Path(__file__).resolve().parents[1]
CAT = str(REPO / "sample_images" / "chelsea.png")


def run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "SALIENCY_DEBUG"}
    return subprocess.run([sys.executable, "-m", "saliency_cli", *args], cwd=tmp_path, capture_output=True,
                          text=True, timeout=240, env=env)


def labels(tmp_path: Path, n: int) -> str:
    path = tmp_path / "labels.txt"
    path.write_text("".join(f"class{i}\n" for i in range(n)))
    return str(path)


CASES = [
    (["--method", "smoothgard"], ["--method", "'smoothgrad'", "saliency methods"]),
    (["--method", "gradient,integrated-gradient"], ["'integrated-gradients'"]),
    (["--std", "0"], ["std"]),
    (["--reduce", "mean-abs-su"], ["--reduce", "'mean-abs-sum'"]),
    (["--score", "probb"], ["--score", "'prob'"]),
    (["--quadrature", "trapezoidal"], ["--quadrature", "'trapezoid'"]),
    (["--colormap", "viridsi"], ["--colormap", "'viridis'"]),
    (["--interpolation", "bicubik"], ["--interpolation", "'bicubic'"]),
    (["--precision", "fp16", "--device", "cpu"], ["fp16"]),
    (["--target", "5", "--labels", "LABELS3"], ["--target 5", "3 classes"]),
    (["--labels", "LABELS3"], ["3 names", "1000 classes"]),
    (["--target", "class9", "--labels", "LABELS3"], ["class9"]),
]


@pytest.mark.parametrize("args, words", CASES, ids=[" ".join(a) for a, _ in CASES])
def test_a_usage_error_creates_nothing(tmp_path, args, words):
    args = [labels(tmp_path, 3) if a == "LABELS3" else a for a in args]
    out = tmp_path / "out"
    proc = run(tmp_path, "explain", CAT, "-o", str(out), "--device", "cpu", *args)
    one_line_error(proc, 2, *words)
    assert not out.exists()


def test_empty_out_and_missing_input_are_usage_errors_that_create_nothing(tmp_path):
    before = sorted(tmp_path.iterdir())
    one_line_error(run(tmp_path, "explain", CAT, "-o", ""), 2, "-o/--out")
    one_line_error(run(tmp_path, "explain", "missing.png", "-o", "out"), 2, "missing.png", "does not exist")
    assert sorted(tmp_path.iterdir()) == before


def test_a_class_index_known_only_after_loading_is_checked_before_the_folder_is_made(tmp_path):
    """The TorchScript model's class count (10) is found by loading it; the folder still does not exist."""
    model = tiny_model(tmp_path)
    src = images(tmp_path / "in", n=1)
    out = tmp_path / "out"
    proc = run(tmp_path, "explain", str(src), "-o", str(out), "-m", str(model), "--device", "cpu", "--target", "12")
    one_line_error(proc, 2, "--target 12", "10 classes")
    assert not out.exists()
    proc = run(tmp_path, "explain", str(src), "-o", str(out), "-m", str(model), "--device", "cpu", "--target", "cat")
    one_line_error(proc, 2, "cat", "no class names")
    assert not out.exists()


@pytest.mark.parametrize("target, words", [("tabbby", ["--target", "did you mean", "'tabby'"]),
                                           ("99999", ["--target 99999", "1000 classes"])])
@pytest.mark.parametrize("model", ["default", "resnet18"])
def test_target_names_of_imagenet_models_are_checked_without_building_the_model(tmp_path, monkeypatch, capsys,
                                                                                 target, words, model):
    """The bundled model and a timm ImageNet name: the error comes before any model is built."""
    from saliency_cli.cli.app import main
    from saliency_cli.models import loader

    def refuse(*args, **kwargs):
        raise AssertionError("the model was built")

    monkeypatch.setattr(loader, "_build", refuse)
    with pytest.raises(SystemExit) as exit_info:
        main(["explain", CAT, "-o", str(tmp_path / "out"), "--device", "cpu", "-m", model, "--target", target])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert all(w in err for w in words), err
    assert not (tmp_path / "out").exists()


def test_a_fifo_inside_a_folder_gets_an_error_record_like_one_named_directly(tmp_path):
    from test_hardening import records

    src = images(tmp_path / "in", n=1)
    os.mkfifo(src / "pipe.png")
    model = tiny_model(tmp_path)
    out = tmp_path / "out"
    proc = run(tmp_path, "explain", str(src), "-o", str(out), "-m", str(model), "--device", "cpu", "--method",
               "gradient", "-q")
    assert proc.returncode == 3, proc.stderr
    by_key = {r["key"]: r for r in records(out)}
    assert by_key["pipe.png"]["status"] == "error" and "FIFO" in by_key["pipe.png"]["error"]
    assert by_key["img0.png"]["status"] == "ok"
