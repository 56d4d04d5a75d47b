"""The sample images as model inputs, shared by the benchmark scripts (run as `python benchmarks/NAME.py`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from saliency_cli.data import decode, file_digest, preprocess

SAMPLES = Path(__file__).resolve().parent.parent / "sample_images"


def load_images(n: int, cfg: dict[str, Any]) -> tuple[torch.Tensor, list[str]]:
    """The first n sample images, preprocessed: (n, C, H, W), and their digests (for the per-image seeds)."""
    files = sorted(p for p in SAMPLES.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))[:n]
    xs, digests = [], []
    for f in files:
        data = f.read_bytes()
        x, _ = preprocess(decode(data), cfg)
        xs.append(x)
        digests.append(file_digest(data))
    return torch.stack(xs), digests
