"""Hardening: every class of bad input or crash ends with a correct result or a clear one-line error, nothing
half-written or stale, memory bounded. Each test makes its own synthetic input (thin PNGs, float TIFFs, a FIFO,
a NaN model, a torn manifest, a nested output folder, SIGTERM).

Most runs use a tiny TorchScript CNN on 32 px inputs (a sidecar JSON gives its preprocessing), so a run takes a
couple of seconds on two cores."""

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
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "sample_images"
TIMEOUT = 240


class TinyNet(torch.nn.Module):
    """A small CNN; with `nan_above`, images whose mean input exceeds it get NaN logits (and NaN gradients)."""

    def __init__(self, nan_above: float = 1e9) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.fc = torch.nn.Linear(8, 10)
        self.nan_above = nan_above

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(torch.relu(self.conv(x)).mean((2, 3)))
        bad = (x.flatten(1).mean(1) > self.nan_above).unsqueeze(1)
        scale = torch.where(bad, torch.full_like(y, float("nan")), torch.ones_like(y))  # a constant: no grad path
        return y * scale


def tiny_model(folder: Path, nan_above: float = 1e9, name: str = "tiny.pt") -> Path:
    torch.manual_seed(0)
    path = folder / name
    torch.jit.script(TinyNet(nan_above).eval()).save(str(path))
    (folder / f"{name}.json").write_text(json.dumps({"input_size": [3, 32, 32], "mean": [0.5] * 3, "std": [0.5] * 3}))
    return path


def images(folder: Path, n: int = 3, size: int = 40) -> Path:
    """n distinct small RGB PNGs; image i has mean brightness rising with i."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        arr = np.clip(rng.integers(0, 90, (size, size, 3)) + 80 * i, 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(folder / f"img{i}.png")
    return folder


def run(*args: str | Path, cwd: Path, timeout: float = TIMEOUT, env: dict | None = None
        ) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "saliency_cli", *map(str, args)]
    base = {k: v for k, v in os.environ.items() if k != "SALIENCY_DEBUG"}
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env={**base, **(env or {})})


def explain(inputs: Path | str, out: Path, model: Path, *extra: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return run("explain", inputs, "-o", out, "-m", model, "--device", "cpu", "--method", "gradient", "-q", *extra,
               cwd=cwd)


def records(out: Path) -> list[dict]:
    lines = []
    for part in sorted(out.glob("manifest*.jsonl")):
        lines += [json.loads(line) for line in part.read_text().splitlines() if line.strip()]
    return lines


def counts_of(out: Path) -> dict:
    return json.loads((out / "run.json").read_text())["counts"]


def one_line_error(proc: subprocess.CompletedProcess[str], code: int, *words: str) -> None:
    assert proc.returncode == code, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("saliency: error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    for word in words:
        assert word in lines[0], lines[0]


# -- 1. a record that cannot be written never vanishes --------------------------------------------------------
def test_nan_maps_on_some_images_are_error_records_and_counts_match(tmp_path):
    """A model that gives NaN only on bright images: those are `error` records naming the non-finite map, the
    others are ok, every image has exactly one record, run.json's counts equal the manifest's, exit 3."""
    src = images(tmp_path / "in", n=3)
    model = tiny_model(tmp_path, nan_above=0.2)  # img2 (mean about 0.75 -> 0.5 normalised) is bright
    proc = explain(src, tmp_path / "out", model, "--method", "gradient,smoothgrad", "-n", "2", cwd=tmp_path)
    assert proc.returncode == 3, proc.stderr
    recs = records(tmp_path / "out")
    per_image = {}
    for r in recs:
        per_image.setdefault(r["key"], []).append(r)
    assert sorted(per_image) == ["img0.png", "img1.png", "img2.png"]
    assert all(len(v) == 2 for v in per_image.values())  # one per method
    bad = [r for r in recs if r["status"] == "error"]
    assert {r["key"] for r in bad} == {"img2.png"} and all("finite" in r["error"] for r in bad)
    counts = counts_of(tmp_path / "out")
    assert counts == {"ok": 4, "error": 2, "skipped": 0}


def test_a_nan_weight_noise_is_refused_before_anything_runs(tmp_path):
    proc = run("explain", tmp_path, "--method", "noisegrad", "--weight-noise", "nan", cwd=tmp_path)
    one_line_error(proc, 2, "--weight-noise")


# -- 2. torn or corrupt manifests ----------------------------------------------------------------------------
def test_a_torn_and_corrupt_manifest_is_skipped_with_one_warning_and_appended_on_a_new_line(tmp_path):
    src = images(tmp_path / "in", n=2)
    model = tiny_model(tmp_path)
    out = tmp_path / "out"
    assert explain(src, out, model, cwd=tmp_path).returncode == 0
    manifest = out / "manifest.jsonl"
    good = manifest.read_bytes()
    junk = b'null\n[1,2]\n42\n\xff\xfe\n{"key": 3, "status": "ok"}\n{"image": "x", "key": "y", "status": "ok", ' \
        b'"method": "gradient", "target": "seven"}\n{"image": "half'
    manifest.write_bytes(good + junk)  # ends in a torn line without newline
    proc = explain(src, out, model, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    warnings = [line for line in proc.stderr.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "7 unreadable line" in warnings[0]
    lines = manifest.read_bytes().split(b"\n")
    assert lines[-4] == b'{"image": "half'  # the torn line stays as it was, alone on its line
    new = [json.loads(line) for line in lines[-3:] if line.strip()]
    assert [r["status"] for r in new] == ["skipped", "skipped"]  # the earlier good records still count


# -- 3. durability ----------------------------------------------------------------------------------------------
def test_stray_temporaries_of_a_dead_run_are_removed(tmp_path):
    from saliency_cli.writers import HOST

    src = images(tmp_path / "in", n=1)
    model = tiny_model(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stray = out / f".img0.png.gradient.npy.{HOST}.{int(dead.stdout)}.abc123.tmp.npy"
    stray.write_bytes(b"half")
    assert explain(src, out, model, cwd=tmp_path).returncode == 0
    assert not stray.exists()


def test_sigterm_finishes_like_ctrl_c_with_exit_143(tmp_path):
    src = images(tmp_path / "in", n=40)
    model = tiny_model(tmp_path)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "saliency_cli", "explain", str(src), "-o", str(out), "-m", str(model), "--device",
           "cpu", "--method", "smoothgrad", "-n", "2000", "--batch-size", "64", "-q"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not records(out) if (out / "manifest.jsonl").exists() else time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "Traceback" not in err and "terminated" in err
    info = json.loads((out / "run.json").read_text())
    assert info["interrupted"] is True and "finished" in info
    assert sum(info["counts"].values()) == len(records(out)) < 40
    assert not list(out.rglob("*.tmp*"))
    for r in records(out):
        if r["status"] == "ok":
            np.load(out / r["outputs"]["npy"])  # every file a record points at is whole


# -- 4, 5. output inside the input, keys that shift ----------------------------------------------------------
def test_an_output_folder_inside_the_input_is_never_read_back(tmp_path):
    src = images(tmp_path / "in", n=2)
    model = tiny_model(tmp_path)
    out = src / "explanations"
    assert explain(src, out, model, cwd=tmp_path).returncode == 0
    proc = explain(src, out, model, cwd=tmp_path)
    assert proc.returncode == 0
    assert "under the output folder" in proc.stderr
    assert sorted(r["key"] for r in records(out)) == ["img0.png", "img0.png", "img1.png", "img1.png"]


def test_adding_an_input_from_elsewhere_redoes_nothing(tmp_path):
    """The common root moves up (keys gain a prefix), but finished work is recognised by content."""
    src = images(tmp_path / "a" / "in", n=2)
    other = images(tmp_path / "b", n=1, size=48)
    model = tiny_model(tmp_path)
    out = tmp_path / "out"
    assert explain(src, out, model, cwd=tmp_path).returncode == 0
    proc = run("explain", src, other / "img0.png", "-o", out, "-m", model, "--device", "cpu", "--method",
               "gradient", "-q", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    second = records(out)[2:]
    assert sorted(r["status"] for r in second) == ["ok", "skipped", "skipped"]


# -- 6. montages follow their panels ------------------------------------------------------------------------
def test_a_montage_is_rewritten_when_one_of_its_panels_changes(tmp_path):
    src = images(tmp_path / "in", n=1)
    model = tiny_model(tmp_path)
    out = tmp_path / "out"
    assert explain(src, out, model, "--method", "gradient,smoothgrad", "-n", "2", cwd=tmp_path).returncode == 0
    montage = out / "img0.png.montage.png"
    before = montage.read_bytes()
    assert explain(src, out, model, "--method", "gradient,smoothgrad", "-n", "3", cwd=tmp_path).returncode == 0
    assert montage.read_bytes() != before
    statuses = [(r["method"], r["status"]) for r in records(out)[2:]]
    assert sorted(statuses) == [("gradient", "skipped"), ("smoothgrad", "ok")]


# -- 7. evaluate counts its failures ----------------------------------------------------------------------------
def test_evaluate_records_rows_it_cannot_score_and_exits_3(tmp_path):
    src = images(tmp_path / "in", n=2)
    model = tiny_model(tmp_path)
    out = tmp_path / "out"
    assert explain(src, out, model, cwd=tmp_path).returncode == 0
    np.save(out / "img0.png.gradient.npy", np.zeros((0, 0), dtype=np.float32))
    proc = run("evaluate", out, "--metrics", "deletion,sparseness", "--device", "cpu", "-q", cwd=tmp_path)
    assert proc.returncode == 3, proc.stderr
    ev = json.loads((out / "evaluation.json").read_text())
    assert ev["scored"] == 1 and len(ev["errors"]) == 1 and ev["errors"][0]["image"].endswith("img0.png")
    (out / "img1.png.gradient.npy").unlink()
    proc = run("evaluate", out, "--metrics", "sparseness", "--device", "cpu", "-q", cwd=tmp_path)
    assert proc.returncode == 3 and "0 scored" in proc.stderr


# -- 8, 9, 10, 12. bounded memory and odd files ---------------------------------------------------------------
def run_measured(args: list[str | Path], cwd: Path) -> tuple[int, float]:
    """Exit code and peak resident memory (MB, VmHWM) of one `saliency ARGS` run in an interpreter of its own."""
    # VmHWM, not ru_maxrss: a child started with vfork/posix_spawn inherits the parent's (pytest's) ru_maxrss
    code = ("import runpy, sys; sys.argv = ['saliency'] + sys.argv[1:]\n"
            "try:\n    runpy.run_module('saliency_cli', run_name='__main__')\nexcept SystemExit as e:\n"
            "    rc = e.code\n"
            "hwm = [line for line in open('/proc/self/status') if line.startswith('VmHWM')][0].split()[1]\n"
            "print(rc, int(hwm) / 1024)")
    proc = subprocess.run([sys.executable, "-c", code, *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=TIMEOUT)
    rc, peak = proc.stdout.strip().splitlines()[-1].split()
    return int(rc), float(peak)


def test_thin_huge_resize_fifo_float_tiffs_and_inf_pixels_in_one_run(tmp_path):
    """A 1 x 20000 PNG (tiny on disk, 1.3 G pixels once resized) and a FIFO are refused with a record; a float
    TIFF in [0, 1] decodes like its 8-bit twin; a float TIFF with an infinite pixel is refused. The run goes on,
    and its peak memory stays small."""
    src = tmp_path / "in"
    images(src, n=1)
    Image.fromarray(np.full((1, 20000, 3), 120, np.uint8)).save(src / "thin.png")
    os.mkfifo(src / "pipe.png")
    rng = np.random.default_rng(1)
    pixels = rng.random((40, 40)).astype(np.float32)
    Image.fromarray(pixels, mode="F").save(src / "float.tif")
    Image.fromarray(np.round(pixels * 255).astype(np.uint8), mode="L").save(src / "eight.png")
    bad = pixels.copy()
    bad[3, 3] = np.inf
    Image.fromarray(bad, mode="F").save(src / "inf.tif")
    model = tiny_model(tmp_path)
    out = tmp_path / "out"
    rc, peak = run_measured(["explain", src, src / "pipe.png", "-o", out, "-m", model, "--device", "cpu",
                             "--method", "gradient", "-q"], tmp_path)
    assert rc == 3
    by_key = {r["key"]: r for r in records(out)}
    assert by_key["thin.png"]["status"] == "error" and "resized" in by_key["thin.png"]["error"]
    assert by_key["pipe.png"]["status"] == "error" and "FIFO" in by_key["pipe.png"]["error"]
    assert by_key["inf.tif"]["status"] == "error" and "infinite" in by_key["inf.tif"]["error"]
    assert by_key["float.tif"]["status"] == "ok" and by_key["eight.png"]["status"] == "ok"
    a, b = np.load(out / "float.tif.gradient.npy"), np.load(out / "eight.png.gradient.npy")
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * float(np.abs(b).max()))
    assert peak < 1500


def test_a_huge_photo_is_drawn_reduced_and_decoded_in_draft_mode(tmp_path):
    """A 6000 x 4000 JPEG: the overlay is at most --overlay-size on its long side, the crop box is still in the
    photo's own pixels, and the whole run stays well under a gigabyte."""
    src = tmp_path / "in"
    src.mkdir()
    with Image.open(SAMPLES / "rocket.jpg") as im:
        im.convert("RGB").resize((6000, 4000)).save(src / "big.jpg", quality=85)
    model = tiny_model(tmp_path)
    out = tmp_path / "out"
    rc, peak = run_measured(["explain", src, "-o", out, "-m", model, "--device", "cpu", "--method", "gradient", "-q",
                             "--overlay-size", "1024"], tmp_path)
    assert rc == 0
    (rec,) = records(out)
    left, top, right, bottom = rec["crop_box"]
    side = 4000 * 32 / 36  # the sidecar keeps timm's crop_pct 0.875: resize to 36, crop 32
    assert right - left == pytest.approx(side, abs=3) and bottom - top == pytest.approx(side, abs=3)
    with Image.open(out / rec["outputs"]["overlay"]) as ov:
        assert max(ov.size) <= 1024 + 200  # the overlay (plus its colour bar, if any)
    assert peak < 1500


# -- 13. clear errors, early ------------------------------------------------------------------------------------
@pytest.mark.parametrize("args, words", [
    (["--mean", "nan,0.5,0.5"], ["--mean"]),
    (["--noise", "50", "--method", "smoothgrad"], ["--noise", "between"]),
    (["--interpolation", "cubic-ish"], ["--interpolation"]),
    (["-o", " "], ["--out"]),
    (["--method", "integrated-gradients", "--quadrature", "trapezoid", "--steps", "1"], ["trapezoid", "--steps 2"]),
    (["--device", "meta"], ["--device"]),
    (["--target", "4000"], ["--target 4000", "10 classes"]),
])
def test_bad_values_are_rejected_before_any_work(tmp_path, args, words):
    src = images(tmp_path / "in", n=1)
    model = tiny_model(tmp_path)
    proc = run("explain", src, "-m", model, "--device", "cpu", "-o", tmp_path / "out", "-q", *args, cwd=tmp_path)
    one_line_error(proc, 2, *words)
    assert not records(tmp_path / "out") if (tmp_path / "out").exists() else True


def test_evaluate_rejects_an_empty_metric_list(tmp_path):
    proc = run("evaluate", tmp_path, "--metrics", ",", cwd=tmp_path)
    one_line_error(proc, 2, "--metrics")


# -- 15. quiet stderr and a closed stdout --------------------------------------------------------------------
def test_a_closed_stdout_under_json_stops_cleanly_with_the_right_counts(tmp_path):
    src = images(tmp_path / "in", n=30)
    model = tiny_model(tmp_path)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "saliency_cli", "explain", str(src), "-o", str(out), "-m", str(model), "--device",
           "cpu", "--method", "gradient", "--json", "--batch-size", "2"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    first = proc.stdout.readline()
    proc.stdout.close()  # like `| head -1`
    _, err = proc.communicate(timeout=120)
    assert json.loads(first)["status"] == "ok"
    assert proc.returncode == 141, err
    assert b"Traceback" not in err and b"stdout was closed" in err
    info = json.loads((out / "run.json").read_text())
    assert sum(info["counts"].values()) == len(records(out))


def test_a_normal_run_prints_only_its_summary_on_stderr(tmp_path):
    src = images(tmp_path / "in", n=2)
    model = tiny_model(tmp_path)
    proc = explain(src, tmp_path / "out", model, cwd=tmp_path)
    assert proc.returncode == 0
    assert [line for line in proc.stderr.splitlines() if line.strip()] == [
        f"2 images, 2 maps: 2 explained, 0 skipped, 0 failed -> {tmp_path / 'out'}"]


# -- 16. two runs into one folder ---------------------------------------------------------------------------------
def test_a_second_run_into_a_locked_folder_exits_1_naming_the_holder(tmp_path):
    from saliency_cli.writers import RunLock

    src = images(tmp_path / "in", n=1)
    model = tiny_model(tmp_path)
    out = tmp_path / "out"
    with RunLock(out / ".saliency.lock"):
        proc = explain(src, out, model, cwd=tmp_path)
    one_line_error(proc, 1, "another saliency run", f"pid {os.getpid()}")
    assert explain(src, out, model, cwd=tmp_path).returncode == 0  # free again


# -- 11. noise memory does not grow with -n -------------------------------------------------------------------
def test_noise_memory_is_bounded_by_the_batch_not_by_the_sample_count(tmp_path):
    """800 samples of a 224 px image would be 960 MB of noise and noisy inputs drawn at once; drawn per chunk,
    the run's peak memory grows by far less than that over a 16-sample run."""
    model = tiny_model(tmp_path)
    (tmp_path / "tiny.pt.json").write_text(json.dumps({"input_size": [3, 224, 224], "mean": [0.5] * 3,
                                                       "std": [0.5] * 3}))
    images(tmp_path / "in", n=1, size=256)
    peaks = [run_measured(["explain", "in", "-o", f"out{n}", "-m", model, "--device", "cpu", "--method",
                           "smoothgrad", "-n", str(n), "-q"], tmp_path)[1] for n in (16, 800)]
    assert (tmp_path / "out800" / "in" / "img0.png.smoothgrad.npy").exists() or list(
        (tmp_path / "out800").glob("*.npy"))
    assert peaks[1] - peaks[0] < 250, peaks
