"""Writing files atomically (temp file + rename): .npy maps, .png images, bytes, JSON; the output folder's lock."""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import socket
import tempfile
from pathlib import Path
from typing import IO, Any

import numpy as np
from PIL import Image

_UMASK = os.umask(0o022)  # read once at import (os.umask can only be read by setting it) and put back
os.umask(_UMASK)


HOST = socket.gethostname().replace(".", "-") or "host"
TEMP_MARK = ".tmp"


def _temp_prefix(path: Path) -> str:
    """`.NAME.HOST.PID.`: a temporary file says which process on which machine writes it, so a later run can
    remove the strays of a killed run without touching those of a live one (shards share folders)."""
    return f".{path.name}.{HOST}.{os.getpid()}."


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic(path: Path, write: Any, suffix: str) -> None:
    """Write to a temporary file beside `path`, fsync it, rename it over `path`, fsync the folder: after a crash
    or power loss the path holds the old content or the whole new one, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=f"{TEMP_MARK}{suffix}", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; outputs get the usual permissions
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. permission denied: it exists
        return True
    return True


STRAY_AGE = 24 * 3600.0  # a temporary file of another machine is a stray after a day


def remove_stray_temporaries(folder: Path) -> int:
    """Delete temporary files left under `folder` by killed runs: this machine's whose process is gone, and any
    older than a day. Returns how many were removed."""
    import time

    removed = 0
    pattern = re.compile(r"^\.(?P<name>.+)\.(?P<host>[^.]+)\.(?P<pid>\d+)\..*\.tmp")
    now = time.time()
    for f in folder.rglob(".*.tmp*"):
        match = pattern.match(f.name)
        try:
            if not f.is_file():
                continue
            stale = now - f.stat().st_mtime > STRAY_AGE
            mine_dead = match is not None and match["host"] == HOST and not _alive(int(match["pid"]))
            if match is not None and (stale or mine_dead):
                f.unlink()
                removed += 1
        except OSError:
            continue
    return removed


def finite(value: Any) -> Any:
    """A copy of nested lists/dicts with NaN and infinities as None (JSON has no NaN): the one JSON sanitiser."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value


def jsonable(value: Any) -> Any:
    """`value` as JSON would read it back (tuples as lists, paths and other objects as strings)."""
    return json.loads(json.dumps(value, default=str))


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def write_npy(path: Path, array: np.ndarray) -> str:
    """Write the array as a .npy file; returns the sha256 of the file's bytes."""
    data = npy_bytes(array)
    _atomic(path, lambda f: f.write(data), ".npy")
    return hashlib.sha256(data).hexdigest()


def write_png(path: Path, image: Image.Image, text: dict[str, str] | None = None) -> None:
    """A PNG written atomically; `text`: tEXt chunks (key -> value) stored with it."""
    info = None
    if text:
        from PIL.PngImagePlugin import PngInfo

        info = PngInfo()
        for key, value in text.items():
            info.add_text(key, value)
    _atomic(path, lambda f: image.save(f, format="PNG", pnginfo=info), ".png")


def write_bytes(path: Path, data: bytes) -> None:
    _atomic(path, lambda f: f.write(data), path.suffix)


def write_json(path: Path, data: Any) -> None:
    write_bytes(path, json.dumps(data, indent=2, default=str).encode())


class RunLock:
    """An exclusive lock on an output folder (or one shard's part of it) for one run: a second run into the same
    place stops at once with the holder's pid and host instead of interleaving its records. `fcntl.flock` is
    released by the kernel when the process dies, so a killed run leaves no stale lock."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: IO[str] | None = None

    def __enter__(self) -> RunLock:
        import fcntl

        from saliency_cli.errors import OutputError

        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115 - closed in __exit__
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise OutputError(f"{self.path.parent} is being written by another saliency run ({holder}); wait for it "
                              "or give another --out") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {HOST}")
        f.flush()
        self._file = f
        return self

    def __exit__(self, *exc: object) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
