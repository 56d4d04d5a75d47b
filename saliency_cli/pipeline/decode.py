"""Decoding in background threads: read an input's bytes, hash them, skip it when all its work is done,
otherwise decode and preprocess it while the model computes on the previous group."""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from saliency_cli.data import MAX_PIXELS, InputItem, decode, file_digest, preprocess, read_input
from saliency_cli.errors import ImageError, first_line
from saliency_cli.runfolder.records import Record

Records = list[Record]


@dataclass
class Decoded:
    """One input after decoding: its digest, the image, the model input x (C, H, W) and crop box, or the error;
    `done` holds the finished records by job tag when every job of the image is already done."""

    item: InputItem
    digest: str = ""
    image: Image.Image | None = None
    x: torch.Tensor | None = None
    box: list[float] | None = None
    error: str | None = None
    done: dict[str, Records] | None = None


def decode_item(item: InputItem, data_config: dict[str, Any],
                finished: Callable[[InputItem, str], dict[str, Records | None]],
                max_pixels: int = MAX_PIXELS) -> Decoded:
    """Read, hash and (unless `finished(item, digest)` says every job is done) decode and preprocess one input."""
    d = Decoded(item)
    try:
        data = read_input(item.path)
    except OSError as e:
        d.error = f"cannot read file: {e.strerror or e}"
        return d
    except ImageError as e:
        d.error = str(e)
        return d
    d.digest = file_digest(data)
    done = finished(item, d.digest)
    if all(done.values()):
        d.done = {k: v for k, v in done.items() if v}
        return d
    try:
        d.image = decode(data, max_pixels=max_pixels, data_config=data_config)
        d.x, d.box = preprocess(d.image, data_config)
    except ImageError as e:
        d.error = str(e)
    except Exception as e:  # noqa: BLE001 - one bad image must not stop the run
        d.error = first_line(e)
    return d


def prefetch(items: Iterable[InputItem], work: Callable[[InputItem], Decoded], pool: ThreadPoolExecutor,
             window: int) -> Iterator[Decoded]:
    """`work(item)` for every item on the pool, at most `window` ahead, yielded in input order."""
    pending: deque[Future[Decoded]] = deque()
    it = iter(items)
    for item in it:
        pending.append(pool.submit(work, item))
        if len(pending) >= window:
            break
    while pending:
        yield pending.popleft().result()
        nxt = next(it, None)
        if nxt is not None:
            pending.append(pool.submit(work, nxt))


def default_workers() -> int:
    """Decoding threads when `--workers` is not given: one per CPU core, at most 8 (PIL decodes and the resize
    release the GIL; more threads than cores only contend with the model's own threads)."""
    return max(1, min(8, os.cpu_count() or 1))
