"""`saliency compare`: similarity 1 of a run with itself, low similarity and a failing gate (exit 4, naming the
image, the method and the value) against random maps, matching by sha256 then key, and the report showing it.
Runs are small synthetic folders (run.json, manifest, .npy maps, overlays): no model is loaded."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from saliency_cli.cli.app import main
from saliency_cli.render import overlay

IMAGES = ("cat.png", "dog.png", "sub/fox.png")


def _blobs(seed: int, size: int = 64) -> np.ndarray:
    """A smooth map: a few Gaussian blobs at random places, plus a little pixel noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    m = sum(np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / 0.01) for cx, cy in rng.random((3, 2)))
    return (m + 0.01 * rng.random((size, size))).astype(np.float32)


def make_run(folder: Path, methods: tuple[str, ...] = ("gradient", "smoothgrad"), images: tuple[str, ...] = IMAGES,
             seed: int = 0, rename: dict[str, str] | None = None, size: int = 64) -> Path:
    """A run folder as `explain` writes it, with one map per image and method; `rename` gives some images other
    keys (same bytes, so the same sha256)."""
    folder.mkdir(parents=True)
    photos = folder.parent / f"{folder.name}_images"
    records = []
    for n, name in enumerate(images):
        key = (rename or {}).get(name, name)
        photo = Image.fromarray(np.full((48, 48, 3), 40 * n + 20, dtype=np.uint8))
        (photos / key).parent.mkdir(parents=True, exist_ok=True)
        photo.save(photos / key)
        sha = hashlib.sha256(name.encode()).hexdigest()  # stands for the file's content: follows the image
        for j, method in enumerate(methods):
            m = _blobs(seed * 100 + n * 10 + j, size)
            (folder / key).parent.mkdir(parents=True, exist_ok=True)
            np.save(folder / f"{key}.{method}.npy", m)
            overlay(photo, m).save(folder / f"{key}.{method}.png")
            records.append({"image": str(photos / key), "key": key, "status": "ok", "error": None, "method": method,
                            "params": {"seed": 0, "reduce": "abs-sum", "score": "logit"}, "target": 281,
                            "label": "tabby", "score": 0.5, "outputs": {"npy": f"{key}.{method}.npy",
                                                                         "overlay": f"{key}.{method}.png"},
                            "crop_box": [0, 0, 48, 48], "map_shape": [size, size], "seconds": 0.1, "sha256": sha})
    (folder / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    info = {"model": {"kind": "default"}, "data_config": {"input_size": [3, 64, 64]}, "cwd": str(folder.parent),
            "options": {"methods": list(methods), "seed": 0}, "versions": {"saliency": "test"}}
    (folder / "run.json").write_text(json.dumps(info))
    return folder


def randomised(src: Path, dst: Path) -> Path:
    """A copy of a run whose .npy maps are replaced by random maps of the same shape."""
    shutil.copytree(src, dst)
    rng = np.random.default_rng(123)
    for path in dst.rglob("*.npy"):
        np.save(path, rng.random(np.load(path).shape).astype(np.float32))
    return dst


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    captured = capsys.readouterr()
    return int(exit_info.value.code or 0), captured.out, captured.err


def test_a_run_compared_with_itself_is_similar_everywhere(tmp_path, capsys):
    run = make_run(tmp_path / "a")
    code, _, err = run_cli(["compare", str(run), str(run), "-o", str(tmp_path / "cmp"),
                            "--fail-under", "spearman=0.99", "--fail-under", "iou=0.99"], capsys)
    assert code == 0, err
    data = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    assert len(data["pairs"]) == len(IMAGES) * 2
    assert all(p["spearman"] == pytest.approx(1.0) and p["iou"] == pytest.approx(1.0) for p in data["pairs"])
    assert data["summary"]["gradient"]["spearman"]["mean"] == pytest.approx(1.0)
    csv_lines = (tmp_path / "cmp" / "comparison.csv").read_text().splitlines()
    assert csv_lines[0].startswith("key,image,method,spearman,iou") and len(csv_lines) == 1 + len(IMAGES) * 2
    strips = sorted((tmp_path / "cmp" / "comparison").rglob("*.png"))
    assert len(strips) == 5 and Image.open(strips[0]).width > 600  # A, B and the top regions side by side


def test_random_maps_are_dissimilar_and_the_gate_names_image_method_and_value(tmp_path, capsys):
    a = make_run(tmp_path / "a")
    b = randomised(a, tmp_path / "b")
    code, out, err = run_cli(["compare", str(a), str(b), "--fail-under", "spearman=0.8", "--json", "-q"], capsys)
    assert code == 4
    data = json.loads((b / "comparison.json").read_text())  # default --out: RUN_B
    rhos = [p["spearman"] for p in data["pairs"]]
    assert max(abs(r) for r in rhos) < 0.5 and rhos == sorted(rhos)  # most changed first
    gate_lines = [line for line in err.splitlines() if line.startswith("saliency: gate failed: ")]
    assert len(gate_lines) == 2  # one per method, naming its worst image
    for method in ("gradient", "smoothgrad"):
        worst = min((p for p in data["pairs"] if p["method"] == method), key=lambda p: p["spearman"])
        line = next(g for g in gate_lines if f"spearman of {method} on " in g)
        match = re.fullmatch(rf"saliency: gate failed: spearman of {method} on (\S+) is (-?[0-9.e-]+) < 0\.8 "
                             r"\(3 of 3 images below 0\.8\)", line)
        assert match, line
        assert match.group(1) == worst["key"] and float(match.group(2)) == pytest.approx(worst["spearman"], abs=1e-3)
    assert json.loads(out)["gates"] == [g.removeprefix("saliency: gate failed: ") for g in gate_lines]


def test_pooling_makes_the_ranking_robust_to_pixel_noise(tmp_path, capsys):
    """224 px maps, the same blobs with fresh pixel noise: pooled to 56 x 56 (the default), the two maps rank
    far more alike than pixel by pixel (--pool 224)."""
    a = make_run(tmp_path / "a", methods=("gradient",), size=224)
    b = tmp_path / "b"
    shutil.copytree(a, b)
    rng = np.random.default_rng(5)
    for path in b.rglob("*.npy"):
        m = np.load(path)
        np.save(path, (m + 0.1 * rng.random(m.shape)).astype(np.float32))
    rho = {}
    for pool in (56, 224):
        code, _, err = run_cli(["compare", str(a), str(b), "-q", "--pool", str(pool), "-o", str(tmp_path / str(pool))],
                               capsys)
        assert code == 0, err
        pairs = json.loads((tmp_path / str(pool) / "comparison.json").read_text())["pairs"]
        rho[pool] = {p["key"]: p["spearman"] for p in pairs}
    assert all(rho[56][k] > rho[224][k] + 0.04 for k in rho[56]), rho
    assert sum(rho[56].values()) > sum(rho[224].values()) + 3 * 0.08, rho


def test_images_are_matched_by_sha256_then_by_key(tmp_path, capsys):
    """Renamed files (same bytes) still pair up; a method only one run has is reported as unmatched."""
    a = make_run(tmp_path / "a")
    b = make_run(tmp_path / "b", methods=("gradient",), rename={"cat.png": "renamed/kitty.png"})
    code, _, err = run_cli(["compare", str(a), str(b), "-q"], capsys)
    assert code == 0, err
    data = json.loads((b / "comparison.json").read_text())
    pairs = {(p["a"]["key"], p["b"]["key"]) for p in data["pairs"]}
    assert pairs == {("cat.png", "renamed/kitty.png"), ("dog.png", "dog.png"), ("sub/fox.png", "sub/fox.png")}
    assert all(p["spearman"] == pytest.approx(1.0) for p in data["pairs"])  # same seed: the same maps
    assert len(data["only_a"]) == 3 and all("(smoothgrad)" in k for k in data["only_a"])


def test_two_methods_on_one_model(tmp_path, capsys):
    """A run of one method against a run of another: their maps are paired, labelled `A vs B`."""
    a = make_run(tmp_path / "a", methods=("gradient",))
    b = make_run(tmp_path / "b", methods=("smoothgrad",), seed=1)
    code, _, err = run_cli(["compare", str(a), str(b), "-q"], capsys)
    assert code == 0, err
    data = json.loads((b / "comparison.json").read_text())
    assert {p["method"] for p in data["pairs"]} == {"gradient vs smoothgrad"} and len(data["pairs"]) == 3


@pytest.mark.parametrize("args, words", [
    (["--fail-under", "pearson=0.5"], ["--fail-under pearson", "spearman, iou"]),
    (["--fail-under", "spearman"], ["--fail-under", "METRIC=NUMBER"]),
    (["--top", "0"], ["--top"]),
])
def test_usage_errors(tmp_path, capsys, args, words):
    run = make_run(tmp_path / "a")
    code, _, err = run_cli(["compare", str(run), str(run), *args], capsys)
    assert code == 2
    assert all(w in err for w in words), err


def test_not_a_run_folder_is_a_usage_error(tmp_path, capsys):
    code, _, err = run_cli(["compare", str(tmp_path), str(tmp_path)], capsys)
    assert code == 2 and "not an explain run folder" in err


def test_the_report_shows_the_comparison(tmp_path, capsys):
    """`saliency report RUN_B` finds comparison.json: a section with the most changed maps and their strips, and
    each cell of B carries its similarity to A as a sortable metric."""
    a = make_run(tmp_path / "a")
    b = randomised(a, tmp_path / "b")
    assert run_cli(["compare", str(a), str(b), "-q"], capsys)[0] == 0
    code, _, err = run_cli(["report", str(b), "-q"], capsys)
    assert code == 0, err
    html = (b / "index.html").read_text()
    assert "Comparison: a &rarr; b" in html and 'href="comparison/' in html
    meta = json.loads(re.search(r'<script type="application/json" id="report-meta">(.*?)</script>', html,
                                re.S).group(1))
    assert [m["name"] for m in meta["metrics"]] == ["vs a: spearman", "vs a: iou"]
    rows = json.loads(re.search(r'<script type="application/json" id="report-rows">(.*?)</script>', html,
                                re.S).group(1))
    data = json.loads((b / "comparison.json").read_text())
    cat = next(p for p in data["pairs"] if p["key"] == "cat.png" and p["method"] == "gradient")
    row = next(r for r in rows if r["k"] == "cat.png")
    assert row["c"]["0"]["m"][0] == pytest.approx(cat["spearman"])
