"""Scale-out: the shard function, the launchers' environments, and real multi-process runs into one folder
(torchrun with 2 processes, --shard run one after the other, a killed shard rerun alone, merge, evaluate).

Runs use OMP_NUM_THREADS=1 everywhere: torchrun sets it for its workers, and CPU kernels round differently with
another thread count, so a one-process reference must use the same."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from saliency_cli.pipeline.shards import Shard, from_environment, parse_shard, resolve_shard, shard_of

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "sample_images"
# astronaut.png falls in shard 0 of 2, chelsea.png and coffee.png in shard 1 (shard_of below)
IMAGES = ("astronaut.png", "chelsea.png", "coffee.png")
ENV = {**{k: v for k, v in os.environ.items() if k not in ("SALIENCY_DEBUG", "RANK", "WORLD_SIZE", "LOCAL_RANK")},
       "OMP_NUM_THREADS": "1"}
QUICK = ["--method", "gradient,smoothgrad", "-n", "4", "--device", "cpu", "-q"]


# -- the shard function -----------------------------------------------------------------------------------------
KEYS = [f"class{i % 7}/img_{i:05d}.jpg" for i in range(1000)]


def test_every_key_is_in_exactly_one_shard_for_every_n():
    for n in range(1, 9):
        owners = [[i for i in range(n) if Shard(i, n).owns(k)] for k in KEYS]
        assert all(len(o) == 1 for o in owners), n


def test_shares_are_balanced_within_binomial_noise():
    """Each of N shares of 1000 keys is within 4 standard deviations of 1000/N (a per-key assignment cannot do
    better: the shares are binomial), and for N = 2 within 10 % of each other."""
    for n in range(2, 9):
        sizes = [sum(shard_of(k, n) == i for k in KEYS) for i in range(n)]
        mean, sd = 1000 / n, (1000 * (1 / n) * (1 - 1 / n)) ** 0.5
        assert all(abs(s - mean) < 4 * sd for s in sizes), (n, sizes)
        if n == 2:
            assert max(sizes) / min(sizes) <= 1.1, sizes


def test_the_share_depends_on_the_key_and_n_only():
    """Independent of order and of which other keys exist: an independent reference formula, on shuffled subsets."""
    rng = random.Random(3)
    subset = rng.sample(KEYS, 100)
    rng.shuffle(subset)
    for key in subset:
        expected = int.from_bytes(hashlib.sha256(f"shard:{key}".encode()).digest()[:8], "little") % 5
        assert shard_of(key, 5) == expected


@pytest.mark.parametrize("env, expected", [
    ({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}, Shard(3, 8, 1, "torchrun")),
    ({"SLURM_PROCID": "2", "SLURM_NTASKS": "4", "SLURM_LOCALID": "0"}, Shard(2, 4, 0, "slurm")),
    ({"SLURM_ARRAY_TASK_ID": "12", "SLURM_ARRAY_TASK_MIN": "10", "SLURM_ARRAY_TASK_COUNT": "5"},
     Shard(2, 5, None, "slurm-array")),
    ({"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_PROCID": "1",
      "SLURM_NTASKS": "2", "SLURM_LOCALID": "1"}, Shard(3, 6, 1, "slurm-array+tasks")),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}, Shard()),
    ({}, Shard()),
])
def test_launcher_environments(env, expected):
    assert from_environment(env) == expected


def test_an_explicit_shard_wins_and_bad_ones_are_usage_errors():
    from saliency_cli.errors import UsageError

    assert resolve_shard("1/4", {"RANK": "0", "WORLD_SIZE": "2"}) == Shard(1, 4, None, "--shard")
    for bad in ("4/4", "1", "-1/3", "a/b", "0/0"):
        with pytest.raises(UsageError, match="--shard"):
            parse_shard(bad)


# -- real runs ----------------------------------------------------------------------------------------------------
def _inputs(tmp: Path) -> Path:
    src = tmp / "in"
    src.mkdir()
    for name in IMAGES:
        shutil.copy(SAMPLES / name, src / name)
    assert [shard_of(n, 2) for n in IMAGES] == [0, 1, 1]
    return src


def _explain(*args: str | Path, cwd: Path, launcher: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    cmd = [*(launcher or [sys.executable, "-m", "saliency_cli"]), "explain", *map(str, args)]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600, env=ENV)


def _records(out: Path) -> list[dict]:
    lines = []
    for part in sorted(out.glob("manifest*.jsonl")):
        lines += [json.loads(line) for line in part.read_text().splitlines() if line.strip()]
    return lines


def _maps(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.npy"))}


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("shards")
    src = _inputs(tmp)
    proc = _explain(src, "-o", tmp / "one", *QUICK, cwd=tmp)
    assert proc.returncode == 0, proc.stderr
    return src, tmp / "one"


@pytest.mark.slow
def test_torchrun_two_processes_give_the_one_process_bytes(reference, tmp_path):
    src, one = reference
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "-m", "saliency_cli"]
    proc = _explain(src, "-o", tmp_path / "two", *QUICK, cwd=tmp_path, launcher=launcher)
    assert proc.returncode == 0, proc.stderr
    assert _maps(tmp_path / "two") == _maps(one)
    keys = sorted((r["key"], r["method"]) for r in _records(tmp_path / "two"))
    assert keys == sorted((n, m) for n in IMAGES for m in ("gradient", "smoothgrad"))
    parts = sorted(p.name for p in (tmp_path / "two").glob("manifest*.jsonl"))
    assert parts == ["manifest.shard-0-of-2.jsonl", "manifest.shard-1-of-2.jsonl"]


def test_shards_run_one_after_the_other_then_merge_and_evaluate(reference, tmp_path):
    src, one = reference
    out = tmp_path / "out"
    for shard in ("0/2", "1/2"):
        proc = _explain(src, "-o", out, *QUICK, "--shard", shard, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
    assert _maps(out) == _maps(one)
    again = _explain(src, "-o", out, *QUICK, "--shard", "1/3", cwd=tmp_path)  # another N: nothing redone
    assert again.returncode == 0 and "0 explained, 6 skipped" in again.stderr
    ev = subprocess.run([sys.executable, "-m", "saliency_cli", "evaluate", str(out), "--metrics", "sparseness",
                         "--device", "cpu", "-q"], cwd=tmp_path, capture_output=True, text=True, env=ENV, timeout=300)
    assert ev.returncode == 0, ev.stderr
    scored = json.loads((out / "evaluation.json").read_text())["images"]
    assert sorted((r["key"], r["method"]) for r in scored) == sorted(
        (n, m) for n in IMAGES for m in ("gradient", "smoothgrad"))
    for _ in range(2):  # idempotent
        merged = subprocess.run([sys.executable, "-m", "saliency_cli", "merge", str(out)], cwd=tmp_path,
                                capture_output=True, text=True, env=ENV, timeout=120)
        assert merged.returncode == 0, merged.stderr
        assert [p.name for p in out.glob("manifest*.jsonl")] == ["manifest.jsonl"]
        info = json.loads((out / "run.json").read_text())
        assert info["counts"]["ok"] == 6 and info["counts"]["skipped"] == 6 and len(info["shards"]) == 3


def test_weight_noise_auto_is_the_same_in_every_shard(reference, tmp_path):
    src, _ = reference
    args = ["--method", "noisegrad", "--models", "2", "--device", "cpu", "-q"]
    one = _explain(src, "-o", tmp_path / "one", *args, cwd=tmp_path)
    assert one.returncode == 0, one.stderr
    for shard in ("0/2", "1/2"):
        assert _explain(src, "-o", tmp_path / "two", *args, "--shard", shard, cwd=tmp_path).returncode == 0
    def s_used(out: Path) -> dict[str, float]:  # calibrated on each image alone, recorded per record
        return {r["key"]: r["params"]["weight_noise"] for r in _records(out) if r["params"].get("weight_noise_auto")}

    assert len(s_used(tmp_path / "one")) == len(IMAGES)
    assert s_used(tmp_path / "two") == s_used(tmp_path / "one")
    assert _maps(tmp_path / "two") == _maps(tmp_path / "one")


def test_a_killed_shard_rerun_alone_completes_the_folder(reference, tmp_path):
    src, one = reference
    out = tmp_path / "out"
    assert _explain(src, "-o", out, *QUICK, "--shard", "0/2", cwd=tmp_path).returncode == 0
    cmd = [sys.executable, "-m", "saliency_cli", "explain", str(src), "-o", str(out), *QUICK, "--shard", "1/2"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
    part = out / "manifest.shard-1-of-2.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (part.exists() and part.read_text().strip()):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    done_before = len(_records(out))
    assert done_before < 6
    rerun = _explain(src, "-o", out, *QUICK, "--shard", "1/2", cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr
    assert _maps(out) == _maps(one)
    ok = sorted((r["key"], r["method"]) for r in _records(out) if r["status"] == "ok")
    assert ok == sorted((n, m) for n in IMAGES for m in ("gradient", "smoothgrad"))
