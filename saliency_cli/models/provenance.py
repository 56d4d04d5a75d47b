"""Provenance: the sha256 of every file a model was read from (in 1 MiB blocks) and of in-memory state dicts, and
the local caches (torch hub, Hugging Face hub) where files are looked up without downloading anything."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch

from saliency_cli.errors import ModelError

_HASH_BLOCK = 1 << 20  # files are hashed in 1 MiB blocks, never read whole into memory


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(_HASH_BLOCK), b""):
                digest.update(block)
    except OSError as e:
        raise ModelError(f"cannot read {path}: {e.strerror or e}") from None
    return digest.hexdigest()


def _record_file(source: dict[str, Any], role: str, path: str | Path) -> None:
    """Note in `source` a file the model was read from and its sha256, under `role` (checkpoint, labels, ...)."""
    source.setdefault("files", {})[role] = str(path)
    source.setdefault("sha256", {})[role] = file_sha256(path)


def state_dict_sha256(module: torch.nn.Module) -> str:
    """The sha256 of a module's state dict: every entry's name, dtype, shape and bytes, in order (tensors on a
    device are copied to the host one at a time)."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        t = tensor.detach()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}:".encode())
        flat = t.to("cpu").contiguous().reshape(-1)
        try:
            digest.update(flat.view(torch.uint8).numpy().tobytes())
        except (RuntimeError, TypeError):  # a dtype without a plain byte view (quantised tensors)
            digest.update(repr(flat).encode())
    return digest.hexdigest()


def _torch_hub_cached(url: str | None) -> Path | None:
    """The torch hub cache's copy of the file at `url`, if a past download left one (nothing is downloaded)."""
    from urllib.parse import urlparse

    if not url:
        return None
    path = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name
    return path if path.is_file() else None


def _hub_files(repo: str, names: list[str]) -> dict[str, Path]:
    """Those of `names` that the Hugging Face cache holds for `repo` (`owner/name[@revision]`)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return {}
    repo_id, _, revision = repo.partition("@")
    found: dict[str, Path] = {}
    for name in names:
        path = try_to_load_from_cache(repo_id, name, revision=revision or None)
        if isinstance(path, str):
            found[name] = Path(path)
    return found
