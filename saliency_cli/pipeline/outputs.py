"""The outputs of an explain run: one writer thread for every file and manifest line, in one order, with counts.

Files are written atomically (writers.py); a record is appended to the manifest only after its files exist.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import IO, Any

import numpy as np
from PIL import Image

from saliency_cli.data import visible_region
from saliency_cli.errors import OutputError, first_line
from saliency_cli.pipeline.decode import Decoded
from saliency_cli.pipeline.plan import Job
from saliency_cli.render import (
    TITLE_KEY,
    input_caption,
    montage_title,
    overlay,
    overlay_title,
    settings_text,
    strip,
    with_title,
    without_title,
)
from saliency_cli.runfolder.records import MANIFEST, Manifest, Record
from saliency_cli.writers import finite, write_npy, write_png

OnRecord = Callable[[dict[str, Any]], None]
Panel = Future[Image.Image | None] | str  # an overlay being written, or one on disk (relative to --out)


def strip_name(key: str, tags: list[str], cls: int | None) -> str:
    """KEY.montage.png (several methods) or KEY.METHOD.sweep.png (one method, several noise levels)."""
    levels = {tag.split(".noise")[0] for tag in tags}
    name = (f"{next(iter(levels))}.sweep" if len(levels) == 1 else "montage") + (
        f".class{cls}" if cls is not None else "")
    return f"{key}.{name}.png"


class Outputs:
    """The run's writer thread, manifest and counts. Display options: colormap, alpha, percentile."""

    def __init__(self, out: Path, *, seed: int, score: str, label: Callable[[int], str], display: dict[str, Any],
                 on_record: OnRecord | None = None, echo: IO[str] | None = None,
                 manifest_name: str = MANIFEST, overlay_size: int = 2048, probability: str = "softmax") -> None:
        self.overlay_size = overlay_size
        self.probability = probability  # how `score` was taken from the logits: softmax, or sigmoid (multi-label)
        self.out = out
        self.seed = seed
        self.score = score
        self.label = label
        self.display = display
        self.on_record = on_record
        self.counts = {"ok": 0, "error": 0, "skipped": 0}
        self.shown: dict[str, Record] = {}  # overlay path -> its record (montage titles)
        self.manifest = Manifest(out / manifest_name, echo=echo)
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="write")
        self.failure: BaseException | None = None  # the first exception raised in the writer thread

    def _submit(self, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        """Run fn on the writer thread; an exception there (a full disk, an unwritable manifest) is kept and
        raised in the main thread by `check()`, never lost with its future."""
        self.check()
        fut = self.pool.submit(fn, *args)
        fut.add_done_callback(self._watch)
        return fut

    def _watch(self, fut: Future[Any]) -> None:
        if not fut.cancelled() and fut.exception() is not None and self.failure is None:
            self.failure = fut.exception()

    def check(self) -> None:
        """Raise OutputError when the writer thread failed: the run stops, visibly."""
        if self.failure is not None:
            raise OutputError(f"writing outputs failed: {first_line(self.failure)}") from self.failure

    @property
    def echo_broken(self) -> bool:
        """stdout (`--json`) was closed by its reader, e.g. `| head`."""
        return self.manifest.echo_broken

    def close(self, interrupted: bool) -> None:
        """Wait for the writes; on Ctrl-C queued writes are dropped and the running one finishes."""
        self.pool.shutdown(wait=True, cancel_futures=interrupted)
        self.manifest.close()
        if not interrupted:
            self.check()

    # -- records --------------------------------------------------------------------------------------
    def params(self, job: Job) -> dict[str, Any]:
        """Every hyper-parameter used, with the run's seed, reduction and score."""
        return {**job.hyper, "seed": self.seed, "reduce": job.reduce, "score": self.score}

    def record(self, d: Decoded, job: Job, *, status: str, error: str | None = None, name: str | None = None,
               **extra: Any) -> Record:
        rec = Record(image=str(d.item.path), key=d.item.key, status=status, error=error, method=job.method.name,
                     params=self.params(job), crop_box=d.box, sha256=d.digest or None, config=job.config_id,
                     name=name or job.tag, image_rel=self.relative(d.item.path), tag=job.label, **extra)
        rec.extra["probability"] = self.probability  # what `score` is: a softmax or (multi-label) sigmoid probability
        return rec

    def relative(self, image: Path | str) -> str:
        """The image's path relative to the output folder: how a folder moved together with its images finds
        them again."""
        return os.path.relpath(os.path.abspath(image), os.path.abspath(self.out))

    def submit_record(self, rec: Record) -> None:
        """Records without files still go through the writer thread, so the manifest keeps one order."""
        self._submit(self._emit, rec)

    def error(self, d: Decoded, job: Job, reason: str) -> None:
        self.submit_record(self.record(d, job, status="error", error=reason))

    def skipped(self, rec: Record, image: str | None = None) -> None:
        if image is not None:
            rec = replace(rec, image=image, image_rel=self.relative(image))
        self.submit_record(replace(rec, status="skipped", seconds=0.0))

    def _emit(self, rec: Record) -> None:
        self.manifest.append(rec)
        if rec.overlay:
            self.shown[rec.overlay] = rec
        self.counts[rec.status] = self.counts.get(rec.status, 0) + 1
        if self.on_record is not None:
            self.on_record(rec.to_json())

    # -- files ----------------------------------------------------------------------------------------
    def _paths(self, d: Decoded, name: str) -> tuple[Path, str]:
        rel = f"{d.item.key}.{name}"
        return self.out / rel, rel

    def write_map(self, d: Decoded, job: Job, cls: int, prob: float, m: np.ndarray, stats: dict[str, Any],
                  seconds: float, topk: bool) -> Future[Image.Image | None]:
        """Queue the .npy, the overlay and the record of one map; the future gives the overlay (None on error)."""
        return self._submit(self._write_map, d, job, cls, prob, m, stats, seconds, topk)

    def _write_map(self, d: Decoded, job: Job, cls: int, prob: float, m: np.ndarray, stats: dict[str, Any],
                   seconds: float, topk: bool) -> Image.Image | None:
        name = job.tag + (f".class{cls}" if topk else "")
        npy, npy_rel = self._paths(d, name + ".npy")
        png, png_rel = self._paths(d, name + ".png")
        params = self.params(job)
        for key in ("sigma", "noise_absolute", "noise_relative"):  # the noise in both units (sigma: absolute)
            if key in stats:
                params[key] = stats.pop(key)
        if params.get("weight_noise") == "auto" and "weight_noise" in stats:  # calibrated on this image alone
            params.update(weight_noise=stats.pop("weight_noise"), weight_noise_auto=True)
        try:
            if not np.isfinite(m).all():
                raise ValueError("the map is not finite (every noise sample gave NaN/Inf gradients)")
            npy_sha256 = write_npy(npy, m.astype(np.float32))
            rec = self.record(d, job, status="ok", target=cls, label=self.label(cls), score=finite(prob),
                              outputs={"npy": npy_rel, "overlay": png_rel}, map_shape=list(m.shape),
                              seconds=round(seconds, 4), name=name, npy_sha256=npy_sha256)
            rec.params = params
            if stats:
                rec.extra["stats"] = stats
            assert d.image is not None and d.box is not None
            image = overlay(self._region(d), m, **self.display)
            titled = with_title(image, overlay_title(d.item.key, rec.to_json(), job.tag, topk=topk))
            write_png(png, titled, {TITLE_KEY: str(titled.height - image.height)})
        except Exception as e:  # noqa: BLE001
            self._emit(self.record(d, job, status="error", error=first_line(e), target=cls, label=self.label(cls),
                                   score=prob, name=name))
            return None
        self._emit(rec)
        return image  # without its title: a montage panel has its own caption

    def _region(self, d: Decoded) -> Image.Image:
        """The part of the image the model saw, reduced to at most `overlay_size` on its long side (a 48 MP photo's
        overlay would take gigabytes at full size)."""
        assert d.image is not None and d.box is not None
        region = visible_region(d.image, d.box)
        if max(region.size) > self.overlay_size:
            region.thumbnail((self.overlay_size, self.overlay_size), Image.Resampling.LANCZOS)
        return region

    def write_strip(self, d: Decoded, cls: int | None, entries: list[tuple[str, Panel]]) -> None:
        """Queue the montage (several methods) or sweep strip (one method, several noise levels) of one image.
        Each panel is an overlay being written now (a future) or, for a job finished earlier, its overlay file
        (a path relative to --out), so a montage is rewritten whenever any of its panels changes."""
        self._submit(self._write_strip, d, cls, entries)

    def strip_path(self, d: Decoded, cls: int | None, entries: list[tuple[str, Panel]]) -> Path:
        return self.out / strip_name(d.item.key, [tag for tag, _ in entries], cls)

    def remove_montage(self, d: Decoded, cls: int | None) -> None:
        """Queue the removal of the image's montage (an earlier run's, showing a map that was just replaced)."""
        path, _ = self._paths(d, "montage" + (f".class{cls}" if cls is not None else "") + ".png")
        self._submit(lambda: path.unlink(missing_ok=True))

    def _panel(self, panel: Panel) -> Image.Image | None:
        if isinstance(panel, Future):
            return panel.result()
        try:
            with Image.open(self.out / panel) as im:
                return without_title(im).convert("RGB")
        except OSError:
            return None

    def _write_strip(self, d: Decoded, cls: int | None, entries: list[tuple[str, Panel]]) -> None:
        assert d.image is not None and d.box is not None
        region = self._region(d)
        panels: list[tuple[str, Image.Image]] = [(input_caption(region), region)]
        records = []
        for tag, panel in entries:
            image = self._panel(panel)
            rel = panel if isinstance(panel, str) else f"{d.item.key}.{tag}" + (f".class{cls}" if cls is not None
                                                                                  else "") + ".png"
            shown = self.shown.pop(rel, None)
            rec = shown.to_json() if shown is not None else {}
            if image is not None:
                records.append(rec)
                panels.append((f"{tag}\n{settings_text(rec.get('params'))}", image))
        if len(panels) < 3:
            return
        path = self.strip_path(d, cls, entries)
        title = montage_title(d.item.key, records[0] if records else None, seed=self.seed, score=self.score,
                              topk=cls is not None)
        write_png(path, strip(panels, title=title))
