"""`saliency report` and `explain --report`: the page's content and links, and the page in a real headless
Chromium (Debian's `chromium` + `chromium-driver`, driven by Selenium with the system chromedriver, nothing
downloaded): every thumbnail loads, no network request, no console error, sorting by a metric reorders the
rows, a screenshot that is not blank, and 10,000 rows open in under 2 seconds."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest
from PIL import Image

from saliency_cli import api
from saliency_cli.cli.app import main

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
CAT = "cat <&> #1.png"  # a file name that must be escaped in HTML and quoted in links


def _main(args: list[str]) -> int:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    return int(exit_info.value.code or 0)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, sample_dir) -> Path:
    """A real run on the bundled model (CPU) of a folder `in <&>`: two images (one named `cat <&> #1.png`) and a
    broken file,
    gradient and integrated gradients (signed), written with `--report`, then evaluated (cheap metrics)."""
    base = tmp_path_factory.mktemp("report")
    inputs = base / "in <&>"  # escaped in the header's command line and the error list
    inputs.mkdir()
    shutil.copy(sample_dir / "chelsea.png", inputs / CAT)
    shutil.copy(sample_dir / "coffee.png", inputs / "coffee.png")
    (inputs / "broken.png").write_bytes(b"not an image")
    run = base / "run"
    code = _main(["explain", str(inputs), "--method", "gradient,integrated-gradients", "--steps", "4", "-o", str(run),
                  "--device", "cpu", "-q", "--report"])
    assert code == 3  # the broken file failed, the rest was explained
    assert (run / "index.html").is_file() and len(list((run / "thumbs").rglob("*.jpg"))) == 4
    assert _main(["evaluate", str(run), "--metrics", "sparseness,noise", "--device", "cpu", "-q"]) == 0
    return run


def page_data(html: str) -> tuple[dict, list[dict]]:
    """The report's embedded metadata and rows."""
    def block(name: str) -> str:
        return re.search(rf'<script type="application/json" id="report-{name}">(.*?)</script>', html, re.S).group(1)

    return json.loads(block("meta")), json.loads(block("rows"))


def test_the_page_lists_every_image_method_metric_and_error(run_dir, tmp_path):
    """Rows sorted by key (one per image and class, the broken file too), a cell per method with a thumbnail,
    the overlay, the .npy and the evaluation's metrics; the header says model, data config, seed, versions."""
    result = api.report([run_dir], out=tmp_path / "rep")
    assert result.rows == 3 and result.columns == ["gradient", "integrated-gradients"] and result.errors == 2
    html = result.path.read_text(encoding="utf-8")
    meta, rows = page_data(html)
    assert [r["k"] for r in rows] == ["broken.png", CAT, "coffee.png"]
    assert [r["s"] for r in rows] == ["error", "ok", "ok"]
    assert [m["name"] for m in meta["metrics"]] == ["sparseness", "noise"]
    cat = rows[1]
    assert cat["l"] == "tabby, tabby cat" and 0 < cat["p"] < 1
    evaluation = json.loads((run_dir / "evaluation.json").read_text())
    expected = next(e for e in evaluation["images"] if e["key"] == CAT and e["method"] == "integrated-gradients")
    assert cat["c"]["1"]["m"] == pytest.approx([expected["metrics"]["sparseness"], expected["metrics"]["noise"]])
    assert "not an image in a known format" in rows[0]["c"]["0"]["e"]
    for text in ("efficientnet_lite0", "input_size=3x224x224", "seed 0", "torch=", "2 failed maps",
                 "steps=4", "not an image in a known format", "How to read this page"):
        assert text in html, text
    assert "<&>" not in html and "in &lt;&amp;&gt;" in html  # the header is escaped (autoescape)
    assert "cat \\u003c\\u0026\\u003e #1.png" in html  # and so is the row data inside its <script>


def test_links_resolve_from_another_folder_and_nothing_is_remote(run_dir, tmp_path):
    """Every href/src (in the HTML and in the row data) is a relative path that exists, seen from the report
    folder; the page names no http(s) URL at all (no CDN, no web font)."""
    out = tmp_path / "elsewhere" / "deep"
    html = api.report([run_dir], out=out).path.read_text(encoding="utf-8")
    _, rows = page_data(html)
    links = re.findall(r'(?:href|src)="([^"]+)"', html)
    links += [v for r in rows for c in r["c"].values() for k, v in c.items() if k in "ton"] + [r["h"] for r in rows]
    assert len(links) > 10
    for target in links:
        if target.startswith(("data:", "#")):
            continue
        assert not target.startswith("/") and "://" not in target, target
        assert (out / unquote(target)).exists(), target
    assert not re.search(r"https?://", html)


def test_two_reports_of_a_run_are_byte_identical(run_dir, tmp_path):
    """Rows in a stable order, no time stamp of the report itself: rewriting the page changes nothing."""
    first = api.report([run_dir], out=tmp_path / "rep").path.read_bytes()
    second = api.report([run_dir], out=tmp_path / "rep").path.read_bytes()
    assert first == second
    assert first.count(b"\n") > 3 + 200  # one row per line in the JSON, diffable


def test_bad_arguments_are_usage_errors(tmp_path, capsys):
    assert _main(["report", str(tmp_path)]) == 2
    assert "not an explain run folder" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["report", "compare"])
def test_help_needs_no_torch(command):
    code = ("import sys; sys.modules['torch'] = None; sys.argv[0] = 'saliency'; "
            "from saliency_cli.cli import main; main()")
    proc = subprocess.run([sys.executable, "-c", code, command, "--help"], capture_output=True, text=True,
                          timeout=60, env={"COLUMNS": "200", "PATH": ""})
    assert proc.returncode == 0 and "saliency" in proc.stdout, proc.stderr


# -- in a real browser --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def browser():
    """Headless Chromium via the system chromedriver, or the reason it cannot start (a str): each test then fails
    (never skips, and is no setup error) saying what to install."""
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        yield (f"Chromium is not installed ({CHROMIUM}, {CHROMEDRIVER}): run `sudo apt-get install -y chromium "
               "chromium-driver` (bash scripts/test.sh installs them when run as root)")
        return
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        yield "selenium is not installed: pip install -e '.[test]'"
        return
    previous = os.environ.get("SE_OFFLINE")
    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must not download a driver or a browser
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1600",
                "--no-first-run", "--disable-background-networking", "--disable-component-update", "--hide-scrollbars"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)
    yield driver
    driver.quit()
    if previous is None:
        os.environ.pop("SE_OFFLINE", None)
    else:
        os.environ["SE_OFFLINE"] = previous


def _need(browser) -> None:
    if isinstance(browser, str):
        pytest.fail(browser)


def _open(driver, page: Path) -> None:
    driver.get_log("browser")  # drop what earlier pages logged
    driver.get_log("performance")
    driver.get(page.resolve().as_uri())


def _requests(driver) -> list[str]:
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    return urls


def _row_keys(driver) -> list[str]:
    return driver.execute_script("return [...document.querySelectorAll('#body > tr')].map(tr => tr.dataset.key)")


def test_the_page_in_chromium(run_dir, tmp_path, browser):
    """Opened from disk: thumbnails loaded, only file:// requests, no console error; sorting by a metric orders
    the rows by it (reversed on a second click); the filter narrows the rows; the screenshot is not blank."""
    _need(browser)
    page = api.report([run_dir], out=tmp_path / "rep").path
    _open(browser, page)
    widths = browser.execute_script("return [...document.images].map(i => i.complete ? i.naturalWidth : 0)")
    assert len(widths) == 4 and all(w > 0 for w in widths), widths
    requests = _requests(browser)
    assert any(u.endswith(".jpg") for u in requests)
    assert all(u.startswith(("file://", "data:")) for u in requests), requests
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors

    meta, rows = page_data(page.read_text(encoding="utf-8"))
    mi = [m["name"] for m in meta["metrics"]].index("sparseness")
    values = {r["k"]: (r["c"].get("0", {}).get("m") or [None] * 2)[mi] for r in rows}
    ascending = sorted((k for k in values if values[k] is not None), key=values.get) + [
        k for k in values if values[k] is None]
    button = browser.find_element("css selector", f'button[data-sort="m:0:{mi}"]')
    button.click()
    assert _row_keys(browser) == ascending
    button.click()
    descending = sorted((k for k in values if values[k] is not None), key=values.get, reverse=True) + [
        k for k in values if values[k] is None]
    assert _row_keys(browser) == descending and descending != ascending
    browser.find_element("id", "q").send_keys("coffee")
    assert _row_keys(browser) == ["coffee.png"]

    shot = tmp_path / "report.png"
    browser.find_element("id", "q").clear()
    browser.save_screenshot(str(shot))
    colours = Image.open(shot).convert("RGB").getcolors(maxcolors=1 << 24) or []
    assert len(colours) > 1000, len(colours)


def _synthetic_run(folder: Path, source: Path, n: int) -> None:
    """A run folder of n images x 3 methods whose records share a few real overlays (thumbnails are made once
    per overlay file), with an evaluation.json scoring every map: the size of a big CI run's page."""
    folder.mkdir(parents=True)
    overlays = sorted(p.name for p in source.glob("*.png") if "montage" not in p.name)[:3]
    for name in overlays:
        shutil.copy(source / name, folder / name)
        shutil.copy(source / (name[:-4] + ".npy"), folder / (name[:-4] + ".npy"))
    rng = np.random.default_rng(0)
    lines, images = [], []
    for i in range(n):
        for j, method in enumerate(("gradient", "smoothgrad", "fusiongrad")):
            key = f"set{i % 7}/img{i:05d}.jpg"
            lines.append(json.dumps({"image": f"/data/{key}", "key": key, "status": "ok", "error": None,
                                     "method": method, "params": {"seed": 0, "sigma": 0.5}, "target": i % 1000,
                                     "label": f"class {i % 1000}", "score": float(rng.random()),
                                     "outputs": {"npy": overlays[j][:-4] + ".npy", "overlay": overlays[j]},
                                     "sha256": f"{i:064x}", "map_shape": [224, 224]}))
            images.append({"run": str(folder), "key": key, "method": method, "target": i % 1000,
                           "metrics": {"insertion": float(rng.random()), "deletion": float(rng.random())}})
    (folder / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    (folder / "run.json").write_text(json.dumps({"model": {"kind": "default"}, "data_config": {},
                                                 "options": {"methods": ["gradient", "smoothgrad", "fusiongrad"]}}))
    metrics = {"insertion": {"higher_is_better": True, "summary": "insertion AUC"},
               "deletion": {"higher_is_better": False, "summary": "deletion AUC"}}
    (folder / "evaluation.json").write_text(json.dumps({"runs": [str(folder)], "metrics": metrics,
                                                        "images": images, "summary": {}}))


def test_ten_thousand_rows_open_in_under_two_seconds(run_dir, tmp_path, browser):
    """10,000 images x 3 methods with two metrics each: the page is drawn (first 50 rows, thumbnails) in < 2 s
    from navigation start, and sorting all rows by a metric takes well under a second."""
    _need(browser)
    run = tmp_path / "big"
    _synthetic_run(run, run_dir, 10_000)
    started = time.perf_counter()
    result = api.report([run])
    built = time.perf_counter() - started
    assert result.rows == 10_000
    _open(browser, result.path)
    ready = browser.execute_script("return window.saliencyReportReady")
    assert ready is not None and ready < 2000, f"first page drawn after {ready:.0f} ms"
    assert len(_row_keys(browser)) == 50
    t0 = browser.execute_script("return performance.now()")
    browser.find_element("css selector", 'button[data-sort="m:1:0"]').click()
    sort_ms = browser.execute_script("return performance.now()") - t0
    assert sort_ms < 1000, sort_ms
    print(f"\n10,000 rows: report built in {built:.1f} s, page drawn {ready:.0f} ms after navigation, "
          f"sorted in {sort_ms:.0f} ms, index.html {result.path.stat().st_size / 1e6:.1f} MB")
