"""What a user notices in a first hour: one Ctrl-C at any moment of a run exits 130 with one line, `saliency info`
reads as `key: value` lines (and --json for machines), and a single overlay says which image, class and method
it shows (its .npy untouched)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "sample_images"


@pytest.mark.parametrize("delay", [0.05, 0.4, 1.0, 2.0])
def test_one_ctrl_c_at_any_moment_exits_130_with_one_line(tmp_path, delay):
    """From the first moment the program runs (imports, the model's loading, the run): exit 130, one line, no
    traceback, whatever a library does with the interrupt while it is imported."""
    code = "import sys; print('go', flush=True); sys.argv[0] = 'saliency'; from saliency_cli.cli import main; main()"
    env = {k: v for k, v in os.environ.items() if k != "SALIENCY_DEBUG"}
    proc = subprocess.Popen([sys.executable, "-c", code, "explain", str(SAMPLES), "-o", str(tmp_path / "out"),
                             "--device", "cpu", "-n", "4", "-q"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "go"
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 130, err
    assert [line for line in err.splitlines() if line.strip()] == ["saliency: interrupted"], err


def test_info_prints_key_value_lines_and_json(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "SALIENCY_DEBUG"}
    proc = subprocess.run([sys.executable, "-m", "saliency_cli", "info", "--device", "cpu"], capture_output=True,
                          text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert "{" not in proc.stdout and "(" not in proc.stdout and "'" not in proc.stdout  # no dict or tuple reprs
    assert "num_classes: 1000" in lines and "  input_size: 3, 224, 224" in lines and "data_config:" in lines
    assert all(": " in line or line.endswith(":") for line in lines), lines
    proc = subprocess.run([sys.executable, "-m", "saliency_cli", "info", "--device", "cpu", "--json"],
                          capture_output=True, text=True, timeout=240, env=env)
    data = json.loads(proc.stdout)
    assert data["num_classes"] == 1000 and data["data_config"]["input_size"] == [3, 224, 224]


def test_a_single_overlay_has_a_title_and_montage_panels_read_back_without_it(tmp_path):
    """The overlay PNG starts with a strip naming the image, class and method (its height recorded in the PNG);
    the .npy is the map alone; a montage drawn later from overlays on disk shows them without their strips."""
    from saliency_cli.render import TITLE_KEY, overlay, with_title, without_title
    from saliency_cli.writers import write_png

    region = Image.fromarray(np.full((60, 90, 3), 200, np.uint8))
    plain = overlay(region, np.tile(np.linspace(0, 1, 90, dtype=np.float32), (60, 1)))
    titled = with_title(plain, ["cat.png: predicted tabby, tabby cat (281), p = 0.433", "smoothgrad samples=50"])
    assert titled.width == plain.width and titled.height > plain.height
    top = np.asarray(titled)[: titled.height - plain.height]
    assert (top < 128).any() and (top == 255).mean() > 0.5  # dark text on white
    path = tmp_path / "o.png"
    write_png(path, titled, {TITLE_KEY: str(titled.height - plain.height)})
    with Image.open(path) as im:
        back = np.asarray(without_title(im).convert("RGB"))
    np.testing.assert_array_equal(back, np.asarray(plain))
    write_png(path, plain)  # an overlay of an earlier version, without a strip: kept whole
    with Image.open(path) as im:
        np.testing.assert_array_equal(np.asarray(without_title(im).convert("RGB")), np.asarray(plain))


def test_the_overlay_of_a_run_is_titled_and_its_npy_is_the_map(tmp_path):
    from test_hardening import images, records, tiny_model

    src = images(tmp_path / "in", n=1, size=96)
    model = tiny_model(tmp_path)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "saliency_cli", "explain", str(src), "-o", str(out), "-m",
                           str(model), "--device", "cpu", "--method", "gradient", "-q"], capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr
    [rec] = records(out)
    assert np.load(out / rec["outputs"]["npy"]).shape == (32, 32)
    with Image.open(out / rec["outputs"]["overlay"]) as im:
        strip = int(im.info["saliency-title-height"])
        left, top, right, bottom = rec["crop_box"]
        assert strip > 0 and im.height > strip + (bottom - top) and abs(im.width - (right - left)) <= 1
