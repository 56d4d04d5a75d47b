"""`saliency check`: the CI examples in docs/ci run as written (a first run passes against the baseline it made;
a baseline whose map differs fails with exit 4 and a report naming the gate), the exit-code precedence
(a step that could not run > a failed gate 4 > failed inputs 3 > 0) with the report always written, and usage
errors that leave nothing behind. The precedence tests use synthetic run folders (no model is loaded)."""

from __future__ import annotations

import html
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from test_compare import make_run, randomised

from saliency_cli import api
from saliency_cli.pipeline.check import CheckOptions

ROOT = Path(__file__).resolve().parents[1]
CI = ROOT / "docs" / "ci"


# -- the workflow files, run as written --------------------------------------------------------------------
def saliency_commands() -> list[str]:
    """The `saliency` commands of both example workflows, in order; the two files must run the same ones."""
    github = yaml.safe_load((CI / "github-actions.yml").read_text(encoding="utf-8"))
    steps = [step.get("run", "") for job in github["jobs"].values() for step in job["steps"]]
    gitlab = yaml.safe_load((CI / "gitlab-ci.yml").read_text(encoding="utf-8"))
    lines = [line for job in gitlab.values() if isinstance(job, dict) for line in job.get("script", [])]
    from_github = [s.strip() for s in steps if re.search(r"\bsaliency ", s)]
    from_gitlab = [s.strip() for s in lines if re.search(r"\bsaliency ", s)]
    assert from_github == from_gitlab and len(from_github) == 2, (from_github, from_gitlab)
    return from_github


def run_as_written(command: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """The command through bash, with this virtualenv's `saliency` first on PATH (the only substitution)."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    return subprocess.run(["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def pooled_spearman(a: np.ndarray, b: np.ndarray, side: int = 56) -> float:
    """Spearman correlation of |a| and |b| average-pooled to side x side (numpy only, no saliency code)."""
    def pool(m: np.ndarray) -> np.ndarray:
        h, w = m.shape
        return np.abs(m).reshape(side, h // side, side, w // side).mean(axis=(1, 3)).ravel()

    ra, rb = (np.argsort(np.argsort(pool(m))).astype(float) for m in (a, b))
    return float(np.corrcoef(ra, rb)[0, 1])


def verdict(page: Path) -> str:
    """The text of the report's banner."""
    found = re.search(r'<div id="verdict".*?</div>\s*</div>|<div id="verdict".*?</div>', page.read_text(), re.S)
    assert found, "the report has no verdict banner"
    return html.unescape(re.sub(r"<[^>]+>", " ", found.group(0)))


@pytest.mark.slow
def test_the_ci_examples_pass_then_fail_with_exit_4_and_a_report(tmp_path, sample_dir):
    """In a checkout holding two of the sample images: the first run makes the baseline and passes (the same
    seed gives the same maps); after one baseline map is replaced by noise (pooled Spearman with the new map far
    below the 0.8 bound), the same commands exit 4 and the rewritten report names that image's gate."""
    commands = saliency_commands()
    (tmp_path / "sample_images").mkdir()
    for name in ("chelsea.png", "rocket.jpg"):
        shutil.copy(sample_dir / name, tmp_path / "sample_images" / name)

    for command in commands:
        proc = run_as_written(command, tmp_path)
        assert proc.returncode == 0, (command, proc.stderr)
    base, out = tmp_path / "ci" / "saliency-baseline", tmp_path / "saliency-check"
    for name in ("chelsea.png", "rocket.jpg"):
        assert np.array_equal(np.load(base / f"{name}.smoothgrad.npy"), np.load(out / f"{name}.smoothgrad.npy"))
    assert "passed" in verdict(out / "index.html") and "failed" not in verdict(out / "index.html")

    target = base / "rocket.jpg.smoothgrad.npy"
    original = np.load(target)
    noise = np.random.default_rng(7).random(original.shape).astype(np.float32)
    np.save(target, noise)
    assert pooled_spearman(noise, np.load(out / "rocket.jpg.smoothgrad.npy")) < 0.5
    codes = [run_as_written(command, tmp_path) for command in commands]
    assert codes[0].returncode == 0  # the baseline exists: that step does nothing
    assert codes[1].returncode == 4, codes[1].stderr
    assert "gate failed" in codes[1].stderr and "rocket.jpg" in codes[1].stderr
    banner = verdict(out / "index.html")
    assert "exit 4" in banner and "--min-spearman" in banner and "spearman of smoothgrad on rocket.jpg" in banner
    assert "chelsea.png" not in banner


# -- precedence and the report, on synthetic runs ------------------------------------------------------------
def test_a_failed_gate_exits_4_and_the_report_names_it(tmp_path):
    base = randomised(make_run(tmp_path / "src"), tmp_path / "base")
    result = api.check(CheckOptions(run=make_run(tmp_path / "run"), baseline=base, min_spearman=0.8))
    assert result.exit_code == 4 and result.gates
    banner = verdict(tmp_path / "run" / "index.html")
    assert "exit 4" in banner and all(f"spearman of {m}" in banner for m in ("gradient", "smoothgrad"))


def test_a_run_against_itself_passes_and_says_so(tmp_path):
    base = make_run(tmp_path / "base")
    result = api.check(CheckOptions(run=shutil.copytree(base, tmp_path / "run"), baseline=base, min_spearman=0.99,
                                    min_iou=0.99))
    assert result.exit_code == 0 and not result.gates
    banner = verdict(tmp_path / "run" / "index.html")
    assert "passed (2 gates held)" in banner and "--min-spearman 0.99" in banner


@pytest.mark.parametrize("gate_fails, expected", [(False, 3), (True, 4)])
def test_failed_inputs_exit_3_unless_a_gate_failed(tmp_path, gate_fails, expected):
    """Inputs that failed in the explain step give 3; a failed gate wins with 4; both are in the banner."""
    src = make_run(tmp_path / "src")
    base = randomised(src, tmp_path / "base") if gate_fails else src
    result = api.check(CheckOptions(run=shutil.copytree(src, tmp_path / "run"), baseline=base, min_spearman=0.8),
                       inputs_failed=True)
    assert result.exit_code == expected
    banner = verdict(tmp_path / "run" / "index.html")
    assert f"exit {expected}" in banner and "some inputs failed" in banner
    assert bool(re.search(r"gates? failed", banner)) == gate_fails


def test_a_step_that_cannot_run_wins_and_the_report_is_still_written(tmp_path):
    """A baseline sharing no image with the run: the comparison cannot run (its usage error, 2), and the report
    says so."""
    base = make_run(tmp_path / "base", images=("other.png",))
    result = api.check(CheckOptions(run=make_run(tmp_path / "run"), baseline=base, min_spearman=0.8))
    assert result.exit_code == 2 and result.broken
    banner = verdict(tmp_path / "run" / "index.html")
    assert "could not run" in banner and "share no image" in banner


# -- usage errors: exit 2, nothing created -----------------------------------------------------------------------
@pytest.mark.parametrize("args, words", [
    (["--min-spearman", "0.8"], "--baseline-run"),
    (["--baseline-run", "NOPE"], "not an explain run folder"),
    (["--baseline-run", "out"], "is the folder being checked"),  # -o is tmp_path/out and the cwd is tmp_path
    (["--fail-under", "bogus=1"], "bogus"),
    (["--fail-over", "deletion"], "METRIC=NUMBER"),
])
def test_usage_errors_exit_2_before_anything_is_created(tmp_path, sample_dir, args, words):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "saliency_cli", "check", str(sample_dir / "chelsea.png"), "-o",
                           str(out), *args], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert words in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not out.exists()


# -- api.check explaining first --------------------------------------------------------------------------------
def test_api_check_explains_first_then_gates_and_reports(tmp_path, sample_dir, tiny):
    """api.check with explain options: the run is explained into its --out (a broken input: exit 3), a second run
    against it holds --min-spearman 0.99 (the gradient is deterministic), and a step that cannot run (evaluating a
    run of an in-memory model, which run.json cannot reload) wins with exit 1; both reports are written."""
    images = tmp_path / "in"
    images.mkdir()
    for name in ("chelsea.png", "coffee.png"):
        shutil.copy(sample_dir / name, images / name)
    (images / "broken.png").write_bytes(b"not an image")

    def explain_into(out: str) -> api.ExplainOptions:
        return api.ExplainOptions(inputs=[str(images)], out=tmp_path / out, model=tiny, methods=["gradient"])

    first = api.check(CheckOptions(run=tmp_path / "ignored"), explain_into("base"))
    assert first.exit_code == 3 and first.inputs_failed and not first.gates
    assert "some inputs failed" in verdict(tmp_path / "base" / "index.html")
    second = api.check(CheckOptions(run=tmp_path / "ignored", baseline=tmp_path / "base", min_spearman=0.99,
                                    fail_under={"sparseness": 0.0}), explain_into("cur"))
    assert second.exit_code == 1 and second.passed == ["--min-spearman 0.99"]
    banner = verdict(tmp_path / "cur" / "index.html")
    assert "exit 1" in banner and "evaluate could not run" in banner and "in-memory module" in banner
    assert not (tmp_path / "ignored").exists()


def test_saliency_report_lists_the_failed_gates_of_its_comparison_at_the_top(tmp_path):
    """Without `check`, the report's top banner lists the failed gates recorded in the comparison.json shown."""
    from saliency_cli.api import compare, report

    base = make_run(tmp_path / "base")
    changed = randomised(base, tmp_path / "changed")
    cmp = compare(base, changed, fail_under={"spearman": 0.8})
    assert cmp.failures
    report([changed])
    banner = verdict(changed / "index.html")
    assert f"{len(cmp.failures)} gate" in banner
    assert all(f"compare: {f.message()}" in banner for f in cmp.failures)
    plain = make_run(tmp_path / "plain")
    report([plain])
    assert 'id="verdict"' not in (plain / "index.html").read_text()
