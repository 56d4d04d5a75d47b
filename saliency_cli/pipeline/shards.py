"""Sharding one run over many processes: which process explains which image, and where each writes.

No scheduler and no communication: every process lists the same inputs and keeps the images whose key hashes to
its shard, `sha256("shard:" + key) mod N`, so the share of an image depends on its key (its path relative to the
inputs' common root) and N only, never on discovery order, stdin order or on what is already done. The shares are
balanced statistically: each shard gets 1/N of the images, give or take sqrt(files * (1/N) * (1 - 1/N)).

The shard comes from `--shard I/N` or from the launcher: torchrun (RANK, WORLD_SIZE, LOCAL_RANK), Slurm tasks
(SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID), Slurm job arrays (SLURM_ARRAY_TASK_ID, SLURM_ARRAY_TASK_MIN,
SLURM_ARRAY_TASK_COUNT; tasks of an array job split each array task's share further). A shard of N > 1 writes its
own manifest part, run record and lock (`manifest.shard-I-of-N.jsonl`, ...), so no two processes write one file.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

from saliency_cli.errors import UsageError
from saliency_cli.runfolder.parts import manifest_name
from saliency_cli.runfolder.runinfo import run_name


@dataclass(frozen=True)
class Shard:
    """Shard `index` of `count` (0-based); `local_rank` picks the GPU on a node; `source` says where it came from."""

    index: int = 0
    count: int = 1
    local_rank: int | None = None
    source: str = "none"

    @property
    def suffix(self) -> str:
        """`.shard-I-of-N` for the files of a shard, empty for an unsharded run."""
        return "" if self.count == 1 else f".shard-{self.index}-of-{self.count}"

    def manifest_name(self) -> str:
        return manifest_name(self.suffix)

    def run_name(self) -> str:
        return run_name(self.suffix)

    def owns(self, key: str) -> bool:
        return self.count == 1 or shard_of(key, self.count) == self.index

    def describe(self) -> dict[str, object]:
        return {"index": self.index, "count": self.count, "local_rank": self.local_rank, "source": self.source}


def shard_of(key: str, count: int) -> int:
    """The shard (0..count-1) that explains the image with this key."""
    digest = hashlib.sha256(f"shard:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % count


def parse_shard(text: str) -> Shard:
    """`I/N` with 0 <= I < N."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not match:
        raise UsageError(f"--shard {text!r}: expected I/N, e.g. 0/4 (shards are numbered from 0)")
    index, count = int(match[1]), int(match[2])
    if count < 1 or not 0 <= index < count:
        raise UsageError(f"--shard {text!r}: need 0 <= I < N")
    return Shard(index, count, source="--shard")


def _int(env: Mapping[str, str], name: str) -> int | None:
    value = env.get(name)
    if value is None or not value.strip().lstrip("-").isdigit():
        return None
    return int(value)


def from_environment(env: Mapping[str, str] | None = None) -> Shard:
    """The shard a launcher gave this process (torchrun, then Slurm tasks and arrays), or the whole run."""
    env = os.environ if env is None else env
    world, rank = _int(env, "WORLD_SIZE"), _int(env, "RANK")
    if world is not None and rank is not None and world > 1:
        return Shard(rank, world, _int(env, "LOCAL_RANK"), "torchrun")
    tasks, proc = _int(env, "SLURM_NTASKS"), _int(env, "SLURM_PROCID")
    tasks, proc = (tasks, proc) if tasks and proc is not None else (1, 0)
    local = _int(env, "SLURM_LOCALID") if tasks > 1 else None
    array, low, size = (_int(env, "SLURM_ARRAY_TASK_ID"), _int(env, "SLURM_ARRAY_TASK_MIN"),
                        _int(env, "SLURM_ARRAY_TASK_COUNT"))
    if array is not None and size:
        position = array - (low or 0)
        if not 0 <= position < size:
            raise UsageError(f"Slurm array task {array} is outside MIN {low} + COUNT {size}")
        return Shard(position * tasks + proc, size * tasks, local, "slurm-array" if tasks == 1 else "slurm-array+tasks")
    if tasks > 1:
        return Shard(proc, tasks, local, "slurm")
    return Shard()


def resolve_shard(text: str | None, env: Mapping[str, str] | None = None) -> Shard:
    """An explicit `--shard I/N` wins over the launcher's environment."""
    return parse_shard(text) if text else from_environment(env)
