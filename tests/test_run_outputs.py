"""What the files made from run folders say (issue 16): object boxes matched four ways with the coverage named
and every summary over its own n; a report folder that can be published alone; compare naming what differs
between two runs. Runs of a tiny timm model (`test_resnet`, random weights, 32 px) on synthetic images."""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file
from test_report import browser  # noqa: F401 - the headless Chromium fixture

from saliency_cli import api
from saliency_cli.cli.app import main
from saliency_cli.cli.evaluate import comparison_rows
from saliency_cli.pipeline.evaluate import EvaluateOptions

# a.png and f.png get no box; b by its key, c by its path as given to explain, d by its file name, e by its
# absolute path
IMAGES = ("a.png", "sub/b.png", "c.png", "sub2/d.png", "e.png", "f.png")
SIDE = 40  # original pixels of the synthetic images


def _main(args: list[str]) -> int:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    return int(exit_info.value.code or 0)


def _checkpoint(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    save_file(timm.create_model("test_resnet", pretrained=False).eval().state_dict(), str(path))
    return path


def explain(work: Path, out: str, checkpoint: Path, *extra: str) -> None:
    """`saliency explain imgs -o OUT` run from `work` (image paths recorded relative, as given)."""
    before = os.getcwd()
    os.chdir(work)
    try:
        code = _main(["explain", "imgs", "-o", out, "-m", "test_resnet", "--checkpoint", str(checkpoint),
                      "--input-size", "32", "--method", "gradient,smoothgrad", "-n", "2", "--device", "cpu", "-q",
                      *extra])
    finally:
        os.chdir(before)
    assert code == 0


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """work/imgs/ with the six synthetic images, two tiny checkpoints (other weights), and run `work/run`."""
    root = tmp_path_factory.mktemp("runout")
    rng = np.random.default_rng(4)
    for name in IMAGES:
        (root / "imgs" / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)).save(root / "imgs" / name)
    _checkpoint(root / "tiny.safetensors", 0)
    _checkpoint(root / "other.safetensors", 1)
    explain(root, "run", root / "tiny.safetensors")
    return root


# -- boxes ------------------------------------------------------------------------------------------------
def test_boxes_match_four_ways_and_every_summary_says_its_n(work, tmp_path, monkeypatch):
    full, left = [0, 0, SIDE, SIDE], [0, 0, SIDE // 2, SIDE]
    boxes = {"sub/b.png": full, "imgs/c.png": full, "d.png": full, str(work / "imgs" / "e.png"): left}
    box_file = tmp_path / "boxes.json"
    box_file.write_text(json.dumps(boxes))
    monkeypatch.chdir(tmp_path)  # not the folder explain ran in: the given paths still match
    out = tmp_path / "run"
    shutil.copytree(work / "run", out)  # its images are still found where explain ran (run.json's cwd)
    ev = api.evaluate(EvaluateOptions(runs=[out], metrics=["energy", "pointing"], boxes=box_file, device="cpu",
                                      plots=False))
    data = json.loads((out / "evaluation.json").read_text())
    assert data["warnings"] == ["boxes for 4 of 6 images; no box for: a.png, f.png"]
    for method in ("gradient", "smoothgrad"):
        energy = {r["key"]: r["metrics"]["energy"] for r in data["images"] if r["method"] == method}
        assert energy["a.png"] is None and energy["f.png"] is None
        assert energy["sub/b.png"] == energy["c.png"] == energy["sub2/d.png"] == 1.0  # the whole image
        assert 0 < energy["e.png"] < 1  # its left half only
        values = [energy[k] for k in ("sub/b.png", "c.png", "sub2/d.png", "e.png")]
        summary = data["summary"][method]["energy"]
        assert summary["n"] == 4 and data["summary"][method]["pointing"]["n"] == 4
        assert summary["mean"] == pytest.approx(sum(values) / 4)
        sd = math.sqrt(sum((v - sum(values) / 4) ** 2 for v in values) / 3)
        assert summary["ci95"] == pytest.approx(3.182446 * sd / 2, rel=1e-3)  # t(0.975, 3 df) over the 4 values
    rows = list(csv.DictReader((out / "evaluation.csv").open()))
    assert [r["energy"] for r in rows if r["kind"] == "n"] == ["4", "4"]
    _, table = comparison_rows(ev)
    assert [row[0] for row in table] == ["energy ↑", "pointing ↑"]  # no row claiming the run's image count
    assert all(cell.endswith("(n=4)") or cell.endswith("(n=4) *") for row in table for cell in row[1:]), table
    html = api.report([out]).path.read_text(encoding="utf-8")
    assert html.count("(n=4)") == 4 and "(n=6)" not in html  # 2 metrics x 2 methods


def test_a_box_named_by_an_ambiguous_file_name_is_refused(work, tmp_path):
    """Two images are called x.png: a box named `x.png` could be either; their paths or keys work."""
    from saliency_cli.errors import UsageError
    from saliency_cli.metrics.localisation import lookup

    table = {"x.png": [(0.0, 0.0, 1.0, 1.0)], "imgs/one/y.png": [(0.0, 0.0, 2.0, 2.0)]}
    with pytest.raises(UsageError, match="several images"):
        lookup(table, "/w/imgs/two/x.png", "two/x.png", {"x.png"}, "imgs/two/x.png")
    assert lookup(table, "/w/imgs/one/y.png", "one/y.png", {"y.png"}, "./imgs/one//y.png") == [(0.0, 0.0, 2.0, 2.0)]


# -- compare: what else differs ----------------------------------------------------------------------------
def test_compare_names_other_models_preprocessing_and_settings(work, tmp_path, capsys):
    """B: other weights, crop_pct 0.8, smoothgrad -n 4. comparison.json, the notes under the table and each
    failing gate say so (gradient's gate does not blame smoothgrad's settings); a run made with the same
    weights read from another path, same settings, differs in nothing."""
    explain(work, "run_b", work / "other.safetensors", "-n", "4", "--crop-pct", "0.8")
    shutil.copy(work / "tiny.safetensors", work / "tiny_copy.safetensors")
    explain(work, "run_c", work / "tiny_copy.safetensors")
    model_a, model_b = (f"test_resnet sha256 {hashlib.sha256((work / n).read_bytes()).hexdigest()[:8]}.."
                        for n in ("tiny.safetensors", "other.safetensors"))
    code = _main(["compare", str(work / "run"), str(work / "run_b"), "-o", str(tmp_path / "ab"),
                  "--fail-under", "spearman=0.9999", "--strips", "0"])
    err = capsys.readouterr().err
    assert code == 4
    diff = json.loads((tmp_path / "ab" / "comparison.json").read_text())["differences"]
    assert diff["model"] == {"a": model_a, "b": model_b}
    assert diff["data_config"] == {"crop_pct": [0.95, 0.8]}
    assert diff["methods"] == {"smoothgrad": {"samples": [2, 4]}}
    moved = f"the runs used different models: A {model_a}, B {model_b}"
    assert f"note: {moved}" in err and "note: different preprocessing: crop_pct 0.95 vs 0.8" in err
    gates = [line for line in err.splitlines() if line.startswith("saliency: gate failed: ")]
    assert len(gates) == 2
    for line in gates:
        assert line.endswith(")") and moved in line and "different preprocessing: crop_pct 0.95 vs 0.8" in line
        assert ("different settings of smoothgrad: samples 2 vs 4" in line) == ("of smoothgrad on" in line)

    assert _main(["compare", str(work / "run"), str(work / "run_c"), "-o", str(tmp_path / "ac"), "-q"]) == 0
    same = json.loads((tmp_path / "ac" / "comparison.json").read_text())["differences"]
    assert same == {"model": None, "data_config": {}, "methods": {}, "sentences": []}


# -- a report folder published alone -------------------------------------------------------------------------
def _page_links(site: Path) -> list[str]:
    """Every href/src of the page and of its row data (overlay, .npy, thumbnail, image), unquoted."""
    from urllib.parse import unquote

    from test_report import page_data

    html = (site / "index.html").read_text(encoding="utf-8")
    _, rows = page_data(html)
    links = re.findall(r'(?:href|src)="([^"]+)"', html)
    links += [v for r in rows for c in r["c"].values() for k, v in c.items() if k in ("o", "n", "t")]
    links += [r["h"] for r in rows if "h" in r]
    return [unquote(link) for link in links if not link.startswith(("data:", "#"))]


def test_a_report_folder_copied_alone_opens_with_every_file(work, tmp_path, browser):  # noqa: F811
    """report RUN -o DIR, then DIR copied elsewhere and the run folder moved away: in headless Chromium every
    image loads and only file:// URLs inside the copy are requested; every link of the page (overlays, .npy,
    thumbnails, images, evaluation.json, comparison.json, its strips, the run's folder) is a file or folder
    inside the copy."""
    from test_report import _open, _requests

    run = tmp_path / "run"
    shutil.copytree(work / "run", run)
    assert _main(["evaluate", str(run), "--metrics", "sparseness", "--device", "cpu", "-q"]) == 0
    assert _main(["compare", str(work / "run"), str(run), "--strips", "2", "-q"]) == 0
    site = tmp_path / "public" / "site"
    result = api.report([run], out=site)
    assert result.rows == 6 and result.thumbnails == 12
    published = tmp_path / "elsewhere" / "site"
    shutil.copytree(site, published)
    run.rename(tmp_path / "gone")  # nothing may still point into the run folder
    links = _page_links(published)
    assert sum(".npy" in link for link in links) == 12 and sum("comparison/" in link for link in links) == 2
    assert any(link.endswith("evaluation.json") for link in links)
    assert any(link.endswith("comparison.json") for link in links)
    assert sum(link.endswith((".png", ".jpg")) and "images/" in link for link in links) == 6  # the source images
    for target in links:
        assert not target.startswith("/") and "://" not in target and ".." not in target.split("/"), target
        assert (published / target).exists(), target
    _open(browser, published / "index.html")
    widths = browser.execute_script("return [...document.images].map(i => i.complete ? i.naturalWidth : 0)")
    assert len(widths) == 12 and all(w > 0 for w in widths), widths
    requests = _requests(browser)
    inside = (published.resolve().as_uri() + "/")
    assert requests and all(u.startswith(inside) or u.startswith("data:") for u in requests), requests
    assert "external-links" not in (published / "index.html").read_text(encoding="utf-8")


def test_report_with_link_says_its_links_are_external_and_the_default_copies_nothing(work, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(work / "run", run)
    linked = api.report([run], out=tmp_path / "linked", link=True).path
    html = linked.read_text(encoding="utf-8")
    assert 'id="external-links"' in html and not (tmp_path / "linked" / "files").exists()
    assert all((linked.parent / t).exists() for t in _page_links(linked.parent))
    assert any(t.startswith("../run/") for t in _page_links(linked.parent))
    default = api.report([run]).path  # the page inside the run folder: its files are there already
    assert default == run / "index.html" and not (run / "files").exists()
    assert 'id="external-links"' not in default.read_text(encoding="utf-8")
