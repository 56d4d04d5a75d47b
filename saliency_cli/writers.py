"""Output files: .npy maps, .png images and the manifest, each written atomically (temp file + rename)."""

from __future__ import annotations

import json
import math
import os
import tempfile
import threading
from pathlib import Path
from typing import IO, Any

import numpy as np
from PIL import Image

_UMASK = os.umask(0o022)  # read once at import (os.umask can only be read by setting it) and put back
os.umask(_UMASK)


def _atomic(path: Path, write: Any, suffix: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; outputs get the usual permissions
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def finite(value: Any) -> Any:
    """A copy of nested lists/dicts with NaN and infinities as None (JSON has no NaN): the one JSON sanitiser."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value


def write_npy(path: Path, array: np.ndarray) -> None:
    _atomic(path, lambda f: np.save(f, array, allow_pickle=False), ".npy")


def write_png(path: Path, image: Image.Image) -> None:
    _atomic(path, lambda f: image.save(f, format="PNG"), ".png")


def write_bytes(path: Path, data: bytes) -> None:
    _atomic(path, lambda f: f.write(data), path.suffix)


def write_json(path: Path, data: Any) -> None:
    write_bytes(path, json.dumps(data, indent=2, default=str).encode())


class Manifest:
    """Appends one JSON line per record and flushes it; the caller writes a record after its files exist."""

    def __init__(self, path: Path, echo: IO[str] | None = None) -> None:
        self.path = path
        self.echo = echo
        self._lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()

    def append(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, default=str, allow_nan=False)
        with self._lock:
            self._file.write(line + "\n")
            self._file.flush()
            os.fsync(self._file.fileno())
            if self.echo is not None:
                self.echo.write(line + "\n")
                self.echo.flush()

    def close(self) -> None:
        self._file.close()


def read_manifest(path: Path) -> list[dict[str, Any]]:
    """Records of an existing manifest; a torn last line (from a crash) is ignored."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records
