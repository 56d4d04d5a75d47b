"""End to end: the installed `saliency` command run as a subprocess with the bundled model on sample_images/.

Every run is on the CPU with a cheap setting (`--method gradient`, or smoothgrad with a few samples), so the
whole file takes about two minutes on two cores.
"""

from __future__ import annotations

import json
import os
import shutil
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
SAMPLE_FILES = sorted(p for p in SAMPLES.iterdir() if p.suffix.lower() in {".png", ".jpg", ".jpeg"})
_SCRIPT = Path(sys.executable).parent / "saliency"
SALIENCY = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "saliency_cli"]
MANIFEST_KEYS = {"image", "key", "status", "error", "method", "params", "target", "label", "score", "outputs",
                 "crop_box", "map_shape", "seconds"}
TIMEOUT = 300


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "SALIENCY_DEBUG"}
    env.update(extra)
    return env


def saliency(*args: str | Path, cwd: Path, stdin: str | None = None, env: dict[str, str] | None = None,
             command: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run `saliency explain ARGS --device cpu` and capture both streams."""
    cmd = [*(command or SALIENCY), "explain", *map(str, args), "--device", "cpu"]
    return subprocess.run(cmd, cwd=cwd, input=stdin if stdin is not None else "", capture_output=True, text=True,
                          env=env or _env(), timeout=TIMEOUT)


def copy_samples(dest: Path, *names: str) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copy(SAMPLES / name, dest / name)
    return dest


def manifest(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def mtimes(out: Path) -> dict[str, int]:
    return {p.relative_to(out).as_posix(): p.stat().st_mtime_ns for p in out.rglob("*")
            if p.suffix in (".npy", ".png")}


def assert_same_map(a: np.ndarray, b: np.ndarray) -> None:
    """Equal up to float round-off. CPU kernels sum in a different order for other batch shapes (about 1e-7
    relative here); a different noise draw changes a few-sample map by tens of per cent."""
    assert a.shape == b.shape
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5 * float(np.abs(a).max()))


def assert_one_line_error(proc: subprocess.CompletedProcess[str], code: int, *words: str) -> None:
    assert proc.returncode == code, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("saliency: error: "), lines[0]
    assert "Traceback" not in proc.stderr
    for word in words:
        assert word in lines[0], lines[0]
    assert proc.stdout == ""


# -- one run over all of sample_images/, shared by the tests that only read its outputs ----------------------
@pytest.fixture(scope="module")
def sample_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], Path]:
    tmp = tmp_path_factory.mktemp("sample_run")
    proc = saliency(SAMPLES, "-o", tmp / "out", "--method", "gradient", "--json", cwd=tmp)
    assert proc.returncode == 0, proc.stderr
    return proc, tmp / "out"


def test_sample_run_writes_a_map_and_an_overlay_per_image(sample_run):
    _, out = sample_run
    records = {r["key"]: r for r in manifest(out)}
    assert set(records) == {p.name for p in SAMPLE_FILES}
    for src in SAMPLE_FILES:
        m = np.load(out / f"{src.name}.gradient.npy")
        assert m.dtype == np.float32 and m.shape == (224, 224)
        assert np.isfinite(m).all() and m.max() > 0
        left, top, right, bottom = records[src.name]["crop_box"]
        with Image.open(SAMPLES / src.name) as original:
            assert 0 <= left < right <= original.width and 0 <= top < bottom <= original.height
        with Image.open(out / f"{src.name}.gradient.png") as png:
            assert png.mode == "RGB"
            # the crop at its own resolution, with the colour bar strip below it
            assert abs(png.width - (right - left)) <= 1 and bottom - top < png.height < 1.8 * (bottom - top)


def test_sample_run_manifest_has_every_documented_key(sample_run):
    _, out = sample_run
    records = manifest(out)
    assert len(records) == len(SAMPLE_FILES)  # one line per image and method
    for r in records:
        assert MANIFEST_KEYS <= set(r), MANIFEST_KEYS - set(r)
        assert r["status"] == "ok" and r["error"] is None and r["method"] == "gradient"
        assert r["params"]["seed"] == 0 and r["params"]["reduce"] == "abs-sum"
        assert isinstance(r["target"], int) and isinstance(r["label"], str) and r["label"]
        assert 0 < r["score"] <= 1 and r["seconds"] >= 0 and r["map_shape"] == [224, 224]
        assert set(r["outputs"]) == {"npy", "overlay"}
        assert all((out / p).is_file() for p in r["outputs"].values())
        assert Path(r["image"]).name == r["key"]
    labels = {r["key"]: r["label"] for r in records}
    assert "tabby" in labels["chelsea.png"] and labels["coffee.png"] == "espresso"


def test_sample_run_writes_run_json(sample_run):
    _, out = sample_run
    info = json.loads((out / "run.json").read_text())
    assert isinstance(info["command"], list) and "explain" in info["command"]
    assert {"saliency", "torch", "timm"} <= set(info["versions"])
    assert info["device"] == "cpu"
    assert info["model"]["kind"] == "default"
    assert info["data_config"]["input_size"] == [3, 224, 224]
    assert {"mean", "std", "crop_pct", "interpolation"} <= set(info["data_config"])
    assert info["counts"] == {"ok": len(SAMPLE_FILES), "error": 0, "skipped": 0}
    assert info["started"] <= info["finished"]


def test_json_prints_exactly_the_manifest_records_on_stdout(sample_run):
    proc, out = sample_run
    lines = proc.stdout.splitlines()
    assert len(lines) == len(SAMPLE_FILES)
    printed = [json.loads(line) for line in lines]  # every stdout line is one JSON object, nothing else
    assert all(isinstance(r, dict) for r in printed)
    assert printed == manifest(out)
    assert "explained" in proc.stderr  # the human summary goes to stderr


def test_outputs_get_ordinary_file_permissions(sample_run):
    _, out = sample_run
    expected = (out / "manifest.jsonl").stat().st_mode & 0o777  # opened normally: the umask's permissions
    for p in [*out.glob("*.npy"), *out.glob("*.png"), out / "run.json"]:
        assert p.stat().st_mode & 0o777 == expected, p


def test_same_name_in_two_folders_gives_two_outputs(tmp_path):
    (tmp_path / "in" / "a").mkdir(parents=True)
    (tmp_path / "in" / "b").mkdir()
    shutil.copy(SAMPLES / "chelsea.png", tmp_path / "in" / "a" / "x.png")
    shutil.copy(SAMPLES / "coffee.png", tmp_path / "in" / "b" / "x.png")
    proc = saliency("in", "-o", "out", "--method", "gradient", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "out"
    assert {r["key"] for r in manifest(out)} == {"a/x.png", "b/x.png"}
    a, b = np.load(out / "a" / "x.png.gradient.npy"), np.load(out / "b" / "x.png.gradient.npy")
    assert not np.allclose(a, b)
    assert (out / "a" / "x.png.gradient.png").is_file() and (out / "b" / "x.png.gradient.png").is_file()


def test_noise_sweep_writes_one_map_per_level_and_a_strip(tmp_path):
    copy_samples(tmp_path / "in", "chelsea.png")
    proc = saliency("in", "-o", "out", "--noise", "0.1,0.2", "-n", "2", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "out"
    records = manifest(out)
    assert [r["params"]["noise"] for r in records] == [0.1, 0.2]
    assert records[1]["params"]["sigma"] == pytest.approx(2 * records[0]["params"]["sigma"], rel=1e-5)
    low, high = (np.load(out / f"chelsea.png.smoothgrad.noise{level}.npy") for level in ("0.1", "0.2"))
    assert low.shape == high.shape == (224, 224) and not np.allclose(low, high)
    assert (out / "chelsea.png.smoothgrad.noise0.1.png").is_file()
    with Image.open(out / "chelsea.png.smoothgrad.sweep.png") as sweep:
        assert sweep.width > 3 * 256 and sweep.height < 2 * 256  # original + two levels in one row of 256 px panels


def test_several_methods_write_a_montage(tmp_path):
    copy_samples(tmp_path / "in", "coffee.png")
    proc = saliency("in", "-o", "out", "--method", "gradient,smoothgrad", "-n", "2", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "out"
    assert [r["method"] for r in manifest(out)] == ["gradient", "smoothgrad"]
    for name in ("coffee.png.gradient.npy", "coffee.png.smoothgrad.npy", "coffee.png.montage.png"):
        assert (out / name).is_file(), name
    with Image.open(out / "coffee.png.montage.png") as montage:
        assert montage.width > 3 * 256 and montage.height < 2 * 256  # the input crop + two methods in one row


def test_topk_writes_k_maps_per_image(tmp_path):
    copy_samples(tmp_path / "in", "chelsea.png", "coffee.png")
    proc = saliency("in", "-o", "out", "--method", "gradient", "--target", "topk:2", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "out"
    by_image: dict[str, list[dict]] = {}
    for r in manifest(out):
        by_image.setdefault(r["key"], []).append(r)
    assert sorted(by_image) == ["chelsea.png", "coffee.png"]
    for key, recs in by_image.items():
        assert len(recs) == 2 and recs[0]["target"] != recs[1]["target"]
        assert recs[0]["score"] >= recs[1]["score"]
        for r in recs:
            assert r["outputs"]["npy"] == f"{key}.gradient.class{r['target']}.npy"
            assert np.load(out / r["outputs"]["npy"]).shape == (224, 224)
    assert by_image["coffee.png"][0]["target"] == 967  # espresso first
    assert not np.allclose(*(np.load(out / r["outputs"]["npy"]) for r in by_image["coffee.png"]))


def test_target_index_explains_that_class_and_reduce_none_keeps_channels(tmp_path):
    copy_samples(tmp_path / "in", "chelsea.png", "coffee.png")
    proc = saliency("in", "-o", "out", "--method", "gradient", "--target", "281", "--reduce", "none", "--json",
                    cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["key"] for r in records] == ["chelsea.png", "coffee.png"]
    for r in records:
        assert r["target"] == 281 and r["label"] == "tabby, tabby cat"
        assert r["map_shape"] == [3, 224, 224] and r["params"]["reduce"] == "none"
        m = np.load(tmp_path / "out" / r["outputs"]["npy"])
        assert m.dtype == np.float32 and m.shape == (3, 224, 224) and np.isfinite(m).all()
        assert m.min() < 0 < m.max()  # the raw signed gradients
        assert (tmp_path / "out" / r["outputs"]["overlay"]).is_file()
    scores = {r["key"]: r["score"] for r in records}
    assert scores["coffee.png"] < 0.01 < scores["chelsea.png"]  # the class, not the prediction, is explained


def test_python_dash_m_reads_paths_from_stdin(tmp_path):
    copy_samples(tmp_path / "in", "chelsea.png", "coffee.png", "rocket.jpg")
    paths = f"{tmp_path / 'in' / 'rocket.jpg'}\n\n{tmp_path / 'in' / 'coffee.png'}\n"
    proc = saliency("-", "-o", "out", "--method", "gradient", cwd=tmp_path, stdin=paths,
                    command=[sys.executable, "-m", "saliency_cli"])
    assert proc.returncode == 0, proc.stderr
    records = manifest(tmp_path / "out")
    assert [r["key"] for r in records] == ["rocket.jpg", "coffee.png"]
    assert records[1]["label"] == "espresso"
    assert np.load(tmp_path / "out" / "coffee.png.gradient.npy").shape == (224, 224)
    assert not (tmp_path / "out" / "chelsea.png.gradient.npy").exists()


# -- errors ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("args", "code", "word"), [
    (["--method", "not-a-method"], 2, "not-a-method"),
    (["--reduce", "median"], 2, "--reduce"),
    (["-n", "0"], 2, "--samples"),
    (["--noise", "-0.1"], 2, "--noise"),
    (["--target", "topk:x"], 2, "--target"),
    (["--target", "no such class"], 2, "--target"),  # found out after the model is loaded
    (["-m", "not_a_model_xyz"], 1, "not_a_model_xyz"),
], ids=["method", "reduce", "samples", "noise", "target-topk", "target-name", "model"])
def test_bad_options_exit_with_one_line(tmp_path, args, code, word):
    copy_samples(tmp_path / "in", "coffee.png")
    proc = saliency("in", "-o", "out", *args, cwd=tmp_path)
    assert_one_line_error(proc, code, word)
    assert not list(tmp_path.glob("out/**/*.npy"))


def test_missing_input_path_exits_2(tmp_path):
    copy_samples(tmp_path / "in", "coffee.png")
    proc = saliency("in/coffee.png", "in/no_such_image.png", "-o", "out", "--method", "gradient", cwd=tmp_path)
    assert_one_line_error(proc, 2, "no_such_image.png")
    assert not (tmp_path / "out").exists()


def test_unwritable_output_folder_exits_1(tmp_path):
    copy_samples(tmp_path / "in", "coffee.png")
    (tmp_path / "a_file").write_text("not a folder")
    proc = saliency("in", "-o", "a_file/out", "--method", "gradient", cwd=tmp_path)
    assert_one_line_error(proc, 1, "a_file")


def test_debug_shows_the_traceback(tmp_path):
    copy_samples(tmp_path / "in", "coffee.png")
    proc = saliency("in", "-o", "out", "-m", "not_a_model_xyz", cwd=tmp_path, env=_env(SALIENCY_DEBUG="1"))
    assert proc.returncode == 1
    assert "Traceback (most recent call last)" in proc.stderr and "not_a_model_xyz" in proc.stderr


def test_bad_files_are_recorded_and_the_rest_explained(tmp_path):
    src = copy_samples(tmp_path / "in", "chelsea.png", "coffee.png")
    (src / "empty.png").write_bytes(b"")
    (src / "truncated.jpg").write_bytes((SAMPLES / "rocket.jpg").read_bytes()[:3000])
    (src / "text.png").write_text("this is not an image\n")
    proc = saliency("in", "-o", "out", "--method", "gradient", "--json", cwd=tmp_path)
    assert proc.returncode == 3, proc.stderr
    out = tmp_path / "out"
    records = {r["key"]: r for r in manifest(out)}
    assert len(records) == 5 and [json.loads(line) for line in proc.stdout.splitlines()] == manifest(out)
    for good in ("chelsea.png", "coffee.png"):
        assert records[good]["status"] == "ok"
        assert (out / f"{good}.gradient.npy").is_file() and (out / f"{good}.gradient.png").is_file()
    assert "empty" in records["empty.png"]["error"]
    for bad in ("empty.png", "truncated.jpg", "text.png"):
        r = records[bad]
        assert r["status"] == "error" and r["error"] and "\n" not in r["error"] and r["outputs"] == {}
        assert not list(out.glob(f"{bad}.*"))
        assert sum(bad in line for line in proc.stderr.splitlines()) == 1  # one line each on stderr
    assert "Traceback" not in proc.stderr
    assert json.loads((out / "run.json").read_text())["counts"] == {"ok": 2, "error": 3, "skipped": 0}


@pytest.mark.slow
def test_rerun_skips_finished_images_and_overwrite_redoes_them(tmp_path):
    copy_samples(tmp_path / "in", "chelsea.png", "coffee.png")
    out = tmp_path / "out"
    args = ("in", "-o", "out", "-n", "2", "--json")
    first = saliency(*args, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    before = mtimes(out)
    maps = {k: np.load(out / k) for k in before if k.endswith(".npy")}
    assert len(before) == 4

    again = saliency(*args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    skipped = [json.loads(line) for line in again.stdout.splitlines()]
    assert [r["status"] for r in skipped] == ["skipped", "skipped"]
    assert {r["outputs"]["npy"] for r in skipped} == set(maps)
    assert mtimes(out) == before  # nothing recomputed or rewritten
    assert [r["status"] for r in manifest(out)] == ["ok", "ok", "skipped", "skipped"]

    redo = saliency(*args, "--overwrite", cwd=tmp_path)
    assert redo.returncode == 0, redo.stderr
    assert [json.loads(line)["status"] for line in redo.stdout.splitlines()] == ["ok", "ok"]
    after = mtimes(out)
    assert all(after[k] != before[k] for k in before)
    for k, m in maps.items():
        assert np.array_equal(np.load(out / k), m)  # same settings, same batches: the same bits

    more = saliency("in", "-o", "out", "-n", "3", "--json", cwd=tmp_path)  # another setting: recomputed
    assert [json.loads(line)["status"] for line in more.stdout.splitlines()] == ["ok", "ok"]
    assert not np.allclose(np.load(out / "coffee.png.smoothgrad.npy"), maps["coffee.png.smoothgrad.npy"])

    # back to -n 2: the files now hold the -n 3 maps, so the earlier -n 2 records must not count as finished
    back = saliency(*args, cwd=tmp_path)
    assert [json.loads(line)["status"] for line in back.stdout.splitlines()] == ["ok", "ok"]
    for k, m in maps.items():
        assert np.array_equal(np.load(out / k), m)


@pytest.mark.slow
def test_ctrl_c_exits_130_and_leaves_only_whole_files(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    for i in range(40):
        shutil.copy(SAMPLES / "chelsea.png", src / f"cat{i:02d}.png")
    out = tmp_path / "out"
    cmd = [*SALIENCY, "explain", "in", "-o", "out", "-n", "50", "--device", "cpu"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env())
    try:
        deadline = time.monotonic() + TIMEOUT
        while not ((out / "manifest.jsonl").is_file() and (out / "manifest.jsonl").stat().st_size > 0):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no manifest line"
            time.sleep(0.05)
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=30)
        waited = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, stderr
    assert waited < 10, waited
    assert "interrupted" in stderr and "Traceback" not in stderr and stdout == ""
    leftovers = [p.name for p in out.rglob("*") if p.name.startswith(".") and ".tmp" in p.name]
    assert leftovers == []
    records = manifest(out)  # every line whole
    assert 1 <= len(records) < 40
    for r in records:
        assert all((out / p).is_file() for p in r["outputs"].values())
    for p in out.rglob("*.npy"):
        assert np.load(p).shape == (224, 224)
    for p in out.rglob("*.png"):
        with Image.open(p) as img:
            img.load()
    assert json.loads((out / "run.json").read_text())["interrupted"] is True


@pytest.mark.slow
def test_same_seed_same_maps_whatever_batch_order_or_path(tmp_path):
    copy_samples(tmp_path / "in", "chelsea.png", "coffee.png", "rocket.jpg")
    (tmp_path / "elsewhere").mkdir()
    shutil.copy(SAMPLES / "coffee.png", tmp_path / "elsewhere" / "renamed.png")
    names = ("chelsea.png", "coffee.png", "rocket.jpg")
    runs = {}
    for label, args in {
        "auto": ("in", "--batch-size", "auto"),
        "one": ("in", "--batch-size", "1"),
        "reordered": ("in/rocket.jpg", "elsewhere/renamed.png", "in/chelsea.png", "--batch-size", "5"),
        "seed1": ("in/coffee.png", "--seed", "1"),
    }.items():
        proc = saliency(*args, "-o", label, "-n", "4", cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        runs[label] = tmp_path / label
    for name in names:
        reference = np.load(runs["auto"] / f"{name}.smoothgrad.npy")
        assert_same_map(reference, np.load(runs["one"] / f"{name}.smoothgrad.npy"))
    reordered = runs["reordered"]
    assert_same_map(np.load(runs["auto"] / "rocket.jpg.smoothgrad.npy"),
                    np.load(reordered / "in" / "rocket.jpg.smoothgrad.npy"))
    assert_same_map(np.load(runs["auto"] / "chelsea.png.smoothgrad.npy"),
                    np.load(reordered / "in" / "chelsea.png.smoothgrad.npy"))
    coffee = np.load(runs["auto"] / "coffee.png.smoothgrad.npy")
    assert_same_map(coffee, np.load(reordered / "elsewhere" / "renamed.png.smoothgrad.npy"))  # same bytes
    other_seed = np.load(runs["seed1"] / "coffee.png.smoothgrad.npy")
    assert np.abs(other_seed - coffee).max() > 0.01 * np.abs(coffee).max()  # the tolerance above is meaningful


# Central regions (fractions of the 224 x 224 input frame: top, bottom, left, right) chosen by looking at the
# crops: the cat's eyes and nose, the coffee in the cup, the rocket's body. The border is the outer 10 % ring.
OBJECT_REGIONS = {"chelsea.png": (0.25, 0.75, 0.15, 0.85), "coffee.png": (0.2, 0.65, 0.2, 0.8),
                  "rocket.jpg": (0.25, 0.95, 0.42, 0.58)}


def test_smoothgrad_is_brighter_on_the_object_than_on_the_border(tmp_path):
    copy_samples(tmp_path / "in", *OBJECT_REGIONS)
    proc = saliency("in", "-o", "out", "-n", "16", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    for name, (top, bottom, left, right) in OBJECT_REGIONS.items():
        m = np.load(tmp_path / "out" / f"{name}.smoothgrad.npy")
        h, w = m.shape
        inside = m[int(top * h):int(bottom * h), int(left * w):int(right * w)].mean()
        ring = np.ones_like(m, dtype=bool)
        ring[h // 10:h - h // 10, w // 10:w - w // 10] = False
        assert inside > 1.5 * m[ring].mean(), name
