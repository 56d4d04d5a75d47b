"""What a run folder holds after any sequence of commands (runfolder/): a rerun with other settings never
mislabels (last settings win; `--tag` keeps a second configuration beside the first), evaluations add up, and a
folder that moved is still evaluated, reported and compared, its images checked by sha256.

A TorchScript two-layer net on 32 x 32 inputs and three small synthetic PNGs keep every run under a second."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from saliency_cli import api
from saliency_cli.api import EvaluateOptions, ExplainOptions
from saliency_cli.cli.app import main


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.fc = torch.nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    path = folder / "net.pt"
    torch.jit.script(Net().eval()).save(str(path))
    (folder / "net.pt.json").write_text(json.dumps({"input_size": [3, 32, 32], "mean": [0.5] * 3, "std": [0.5] * 3}))
    return path


def photos(folder: Path, n: int = 3) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3)).astype(np.uint8)).save(folder / f"img{i}.png")
    return folder


def explain(inputs: Path, out: Path, model: Path, samples: int, methods: tuple[str, ...] = ("smoothgrad",),
            **extra: object) -> dict:
    return api.explain(ExplainOptions(inputs=[str(inputs)], out=out, model=str(model), methods=list(methods),
                                      hyper={"samples": samples}, device="cpu", **extra))


def evaluate(run: Path, metrics: list[str], **extra: object):
    return api.evaluate(EvaluateOptions(runs=[run], metrics=metrics, device="cpu", **extra))


def page(html_path: Path) -> tuple[dict, list[dict]]:
    html = html_path.read_text(encoding="utf-8")

    def block(name: str) -> str:
        return re.search(rf'<script type="application/json" id="report-{name}">(.*?)</script>', html, re.S).group(1)

    return json.loads(block("meta")), json.loads(block("rows"))


def _main(args: list[str]) -> int:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    return int(exit_info.value.code or 0)


# -- reruns with other settings ------------------------------------------------------------------------------
def test_a_rerun_with_other_settings_replaces_the_column_and_tag_keeps_both(tmp_path: Path, model: Path) -> None:
    """`-n 2` then `-n 3` into one folder: both records stay in the manifest, but report, evaluate and compare see
    one `smoothgrad` whose settings are those of the files (-n 3, byte-equal to a fresh -n 3 run). `--tag two`
    then adds `smoothgrad@two` with its own files, byte-equal to a fresh untagged -n 2 run."""
    inputs = photos(tmp_path / "in")
    out, fresh2, fresh3 = tmp_path / "out", tmp_path / "fresh2", tmp_path / "fresh3"
    explain(inputs, out, model, 2)
    explain(inputs, out, model, 3)
    explain(inputs, fresh2, model, 2)
    explain(inputs, fresh3, model, 3)
    lines = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert sorted(r["params"]["samples"] for r in lines) == [2, 2, 2, 3, 3, 3]  # history is kept
    for i in range(3):
        assert np.array_equal(np.load(out / f"img{i}.png.smoothgrad.npy"),
                              np.load(fresh3 / f"img{i}.png.smoothgrad.npy"))
        assert not np.array_equal(np.load(fresh2 / f"img{i}.png.smoothgrad.npy"),
                                  np.load(fresh3 / f"img{i}.png.smoothgrad.npy"))

    report = api.report([out], out=tmp_path / "rep")
    assert report.columns == ["smoothgrad"]
    html = report.path.read_text(encoding="utf-8")
    assert "samples=3" in html and "samples=2" not in html
    ev = evaluate(out, ["sparseness"])
    assert list(ev.summary) == ["smoothgrad"] and ev.scored == 3
    cmp = api.compare(fresh3, out, out=tmp_path / "cmp")
    assert {p.method for p in cmp.pairs} == {"smoothgrad"} and len(cmp.pairs) == 3
    assert all(p.spearman == pytest.approx(1.0) for p in cmp.pairs)

    explain(inputs, out, model, 2, tag="two")
    for i in range(3):
        assert np.array_equal(np.load(out / f"img{i}.png.smoothgrad@two.npy"),
                              np.load(fresh2 / f"img{i}.png.smoothgrad.npy"))
        assert np.array_equal(np.load(out / f"img{i}.png.smoothgrad.npy"),
                              np.load(fresh3 / f"img{i}.png.smoothgrad.npy"))
    report = api.report([out], out=tmp_path / "rep2")
    assert report.columns == ["smoothgrad", "smoothgrad@two"]
    _, rows = page(report.path)
    for row in rows:  # each column links its own files
        assert row["c"]["0"]["n"].endswith(".smoothgrad.npy") and row["c"]["1"]["n"].endswith(".smoothgrad%40two.npy")
    ev = evaluate(out, ["sparseness"])
    assert sorted(ev.summary) == ["smoothgrad", "smoothgrad@two"] and ev.scored == 6
    again = explain(inputs, out, model, 2, tag="two")
    assert again["counts"] == {"ok": 0, "error": 0, "skipped": 3}


def test_a_montage_never_shows_a_replaced_map(tmp_path: Path, model: Path) -> None:
    """A rerun of one of a montage's methods with other settings removes the montage (it showed the old map); a
    later run of both methods, all skipped, draws it again from the files on disk."""
    inputs = photos(tmp_path / "in", n=1)
    out = tmp_path / "out"
    explain(inputs, out, model, 2, methods=("gradient", "smoothgrad"))
    montage = out / "img0.png.montage.png"
    assert montage.is_file()
    explain(inputs, out, model, 3)
    assert not montage.is_file()
    again = explain(inputs, out, model, 3, methods=("gradient", "smoothgrad"))
    assert again["counts"]["skipped"] == 2 and montage.is_file()


def test_a_bad_tag_is_a_usage_error() -> None:
    assert _main(["explain", "x.png", "--tag", "a/b"]) == 2


# -- evaluations add up ---------------------------------------------------------------------------------------
def test_a_later_evaluate_keeps_the_values_of_unchanged_maps_and_drops_changed_ones(tmp_path: Path, model: Path,
                                                                                    capsys) -> None:
    inputs = photos(tmp_path / "in")
    run = tmp_path / "run"
    explain(inputs, run, model, 2)
    first = json.loads(json.dumps(evaluate(run, ["sparseness"]).to_json()))
    evaluate(run, ["noise"])
    data = json.loads((run / "evaluation.json").read_text())
    assert set(data["metrics"]) == {"sparseness", "noise"}
    assert data["metrics"]["sparseness"]["evaluated_with"]["metrics"] == ["sparseness"]  # its own command's options
    before = {(e["key"], e["method"]): e["metrics"]["sparseness"] for e in first["images"]}
    assert {(e["key"], e["method"]): e["metrics"]["sparseness"] for e in data["images"]} == before
    assert data["summary"]["smoothgrad"]["sparseness"]["mean"] == pytest.approx(
        first["summary"]["smoothgrad"]["sparseness"]["mean"])
    plots = sorted(p.name for p in (run / "evaluation_plots").glob("*.png"))
    assert plots == ["bar_noise.png", "bar_sparseness.png"]
    header = (run / "evaluation.csv").read_text().splitlines()[0].split(",")
    assert header[5:] == ["noise", "sparseness"]

    explain(inputs, run, model, 3)  # every map changes
    capsys.readouterr()
    assert _main(["evaluate", str(run), "--metrics", "noise", "--device", "cpu", "-q"]) == 0
    said = [line for line in capsys.readouterr().err.splitlines() if "dropped" in line]
    assert len(said) == 1 and "dropped 3 earlier metric value(s) of 3 map(s)" in said[0]
    data = json.loads((run / "evaluation.json").read_text())
    assert set(data["metrics"]) == {"noise"}
    assert all(set(e["metrics"]) == {"noise"} for e in data["images"])
    assert sorted(p.name for p in (run / "evaluation_plots").glob("*.png")) == ["bar_noise.png"]
    assert (run / "evaluation.csv").read_text().splitlines()[0].split(",")[5:] == ["noise"]


# -- folders that move ----------------------------------------------------------------------------------------
def test_a_moved_folder_finds_its_images_and_checks_their_bytes(tmp_path: Path, model: Path, capsys) -> None:
    base = tmp_path / "base"
    inputs = photos(base / "in")
    run = base / "run"
    explain(inputs, run, model, 2)
    evaluate(run, ["sparseness"])

    moved = tmp_path / "elsewhere"  # the run folder and its images, moved together
    shutil.move(base, moved)
    ev = evaluate(moved / "run", ["sparseness"])
    assert ev.errors == [] and ev.scored == 3
    assert all(e["image"].startswith(str(moved / "in")) for e in ev.images)

    shutil.move(moved / "in", tmp_path / "photos")  # now the images are apart: found only through --images
    assert _main(["evaluate", str(moved / "run"), "--metrics", "sparseness", "--device", "cpu", "-q"]) == 3
    assert "--images" in capsys.readouterr().err
    assert _main(["evaluate", str(moved / "run"), "--metrics", "sparseness", "--device", "cpu", "-q",
                  "--images", str(tmp_path / "photos")]) == 0
    report = api.report([moved / "run"], out=tmp_path / "rep", images=tmp_path / "photos")
    _, rows = page(report.path)
    assert all((report.path.parent / row["h"]).resolve().is_file() for row in rows)

    # an image whose bytes changed is refused, the others are scored
    shutil.copy(tmp_path / "photos" / "img1.png", tmp_path / "img1.orig")
    Image.fromarray(np.zeros((40, 40, 3), dtype=np.uint8)).save(tmp_path / "photos" / "img1.png")
    ev = evaluate(moved / "run", ["sparseness"], images=tmp_path / "photos")
    assert ev.scored == 2 and len(ev.errors) == 1 and "sha256 differs" in ev.errors[0]["error"]
    assert _main(["evaluate", str(moved / "run"), "--metrics", "sparseness", "--device", "cpu", "-q",
                  "--images", str(tmp_path / "photos")]) == 3

    cmp = api.compare(moved / "run", moved / "run", out=tmp_path / "cmp")  # compare needs only the maps
    assert len(cmp.pairs) == 3
    shutil.copy(tmp_path / "img1.orig", tmp_path / "photos" / "img1.png")  # the original bytes back
    rerun = explain(tmp_path / "photos", moved / "run", model, 2)
    assert rerun["counts"]["skipped"] == 3 and rerun["counts"]["ok"] == 0
