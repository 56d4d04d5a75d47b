"""`saliency report`: one static, self-contained HTML page (index.html + thumbs/) over explain run folders.

    run folders -> run.json, every manifest part (records of every status), evaluation.json, comparison.json
      -> rows (one per image and target) x columns (one per method label) -> thumbnails -> index.html

The page works opened from disk (file://) and makes no network request: the row data is embedded as JSON in a
`<script type="application/json">` tag, the script and styles are inline, every link is a path relative to the
report folder, to a file inside it: the files it links that lie elsewhere are copied (hard-linked where possible)
under files/ (`Files`), so the folder can be published alone, unless `--link` keeps links to the run folders
(the page then says so). Rows are sorted by (image key, target) and the JSON is written one row per line with
sorted keys, so two reports of similar runs diff line by line. Sorting, filtering and pagination (50 rows a page
by default) are a few lines of plain JavaScript in the template (templates/report.html.j2), so 10,000 rows open
at once.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shlex
import shutil
from collections import Counter, defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import quote

from PIL import Image

from saliency_cli.errors import UsageError, counted
from saliency_cli.runfolder.comparison import COMPARISON, read_comparison
from saliency_cli.runfolder.evaluation import EVALUATION, read_result
from saliency_cli.runfolder.folder import Row, RunData, assign_labels, file_sha256, read_run
from saliency_cli.runfolder.records import Record
from saliency_cli.writers import finite, write_bytes

THUMBS = "thumbs"
FILES = "files"  # copies of the runs' files that the page links, when the report folder is elsewhere
COMPARE_METRICS = ("spearman", "iou")  # comparison.json values shown as metrics of the cells they belong to
COMPARE_HELP = {"spearman": "Spearman rank correlation", "iou": "overlap (IoU) of the top-10 % pixels"}
Progress = Callable[[int, int], None]


@dataclass
class ReportOptions:
    """`runs`: explain run folders; `out`: the report folder (default: the first run); `comparison`: a
    comparison.json to show (default: any in the run folders); `page_size` rows a page; `thumb_size` px wide;
    `banner`: a verdict shown at the top ({"title", "ok", "lines": failed gates, "held": gates that held}; `saliency
    check`'s); without one, the top lists the failed gates of the evaluations and comparisons shown."""

    runs: list[Path]
    out: Path | None = None
    comparison: Path | None = None
    page_size: int = 50
    thumb_size: int = 160
    banner: dict[str, Any] | None = None
    images: Path | None = None  # `--images DIR`: where the runs' images are now (runfolder.folder.RunData.images)
    link: bool = False  # link the runs' files where they are instead of copying them into `out` (--link)


@dataclass
class Report:
    """What was written: the page, its counts, and warnings (unreadable files, unmatched metrics)."""

    path: Path
    rows: int
    columns: list[str]
    thumbnails: int
    errors: int
    warnings: list[str] = field(default_factory=list)


def open_runs(folders: list[Path], images: Path | None = None) -> tuple[list[RunData], list[str]]:
    """The runs with a Row for every current record (every status; runfolder.current), labelled like `evaluate`
    labels them, and warnings about unreadable manifest lines."""
    if not folders:
        raise UsageError("give at least one run folder (see saliency report --help)")
    runs, warnings = [], []
    for folder in folders:
        run = read_run(folder, maps_only=False, require_model=False, images=images)
        if run.bad_lines:
            warnings.append(f"{folder}: {run.bad_lines} unreadable manifest lines skipped")
        runs.append(run)
    assign_labels(runs)
    return runs, warnings


@lru_cache(maxsize=256)
def _absolute(path: str) -> str:
    return os.path.abspath(path)


def link(target: Path | str, base: Path | str) -> str:
    """`target` as a URL relative to the folder `base` (both may be relative to the working folder). Called once
    per file of a page (30,000 times for 10,000 images and 3 methods), hence the string arithmetic."""
    t, b = os.fspath(target), _absolute(os.fspath(base))
    t = os.path.normpath(t if os.path.isabs(t) else os.path.join(_absolute("."), t))
    rel = t[len(b) + 1:] if t.startswith(b + os.sep) else os.path.relpath(t, b)
    return quote(rel.replace(os.sep, "/"))


# -- the files the page links --------------------------------------------------------------------------------
class Files:
    """How the page reaches a file it shows or links (overlay, .npy, source image, evaluation.json,
    comparison.json and strips). A file inside the report folder: a relative link. One outside it: copied under
    out/files/<run name>/<its path in the run folder> (a hard link where the filesystem allows), so that the
    report folder can be published alone; with `external` (--link), a relative link to where it is. The source
    images stay where they are when the report folder is a run folder (the default `report RUN`)."""

    def __init__(self, out: Path, runs: list[RunData], external: bool) -> None:
        self.out, self.external = out, external
        self.base = _absolute(os.fspath(out))
        names = Counter(run.name for run in runs)
        self.slots = {_absolute(os.fspath(run.folder)): run.name if names[run.name] == 1 else f"{run.name}-{i}"
                      for i, run in enumerate(runs)}
        self.images_in_place = self.base in self.slots
        self.links: dict[str, str] = {}
        self.copied = 0

    def inside(self, path: str) -> bool:
        return path == self.base or path.startswith(self.base + os.sep)

    def _where(self, path: str) -> str:
        """Where under out/files/ a file outside the report folder goes: its run's slot and its path there."""
        for folder, slot in self.slots.items():
            if path.startswith(folder + os.sep):
                return f"{slot}/{path[len(folder) + 1:]}"
        digest = hashlib.sha256(os.path.dirname(path).encode()).hexdigest()[:8]
        return f"other/{digest}/{os.path.basename(path)}"

    def link(self, target: Path | str, where: str | None = None) -> str | None:
        """The page's link to the file `target` (copied first when needed, to `where` under out/files/ if
        given); None when it must be copied but cannot be read."""
        path = os.path.normpath(_absolute(os.fspath(target)))
        if self.external or self.inside(path):
            return link(path, self.out)
        if path not in self.links:
            dst = self.out / FILES / (where or self._where(path))
            if not publish(Path(path), dst):
                return None
            self.copied += 1
            self.links[path] = link(dst, self.out)
        return self.links[path]

    def image(self, row: Row) -> str | None:
        """The link to a row's source image (None: not readable)."""
        image = row.image
        if not os.path.isfile(image):
            return None
        if self.images_in_place:
            return link(image, self.out)
        slot = self.slots.get(_absolute(os.fspath(row.run.folder)), "other")
        return self.link(image, f"{slot}/images/{row.record.key or Path(image).name}")

    def folder(self, run: RunData) -> str:
        """The header's link to a run folder: the folder, or its copy under out/files/."""
        path = _absolute(os.fspath(run.folder))
        if self.external or self.inside(path):
            return link(run.folder, self.out) + "/"
        dst = self.out / FILES / self.slots[path]
        dst.mkdir(parents=True, exist_ok=True)
        return link(dst, self.out) + "/"


def publish(src: Path, dst: Path) -> bool:
    """`dst` with the bytes of `src`: a hard link where the filesystem allows, else a copy (its time stamp kept);
    an existing `dst` of the same size and time is kept. False when `src` cannot be read."""
    try:
        st = src.stat()
        if dst.is_file():
            dt = dst.stat()
            if (dt.st_size, dt.st_mtime_ns) == (st.st_size, st.st_mtime_ns):
                return True
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copy2(src, tmp)
        os.replace(tmp, dst)
        return True
    except OSError:
        return False


# -- columns and rows ---------------------------------------------------------------------------------------
def _column_order(runs: list[RunData]) -> list[str]:
    """Method labels in the order the runs asked for the methods (then noise level, then name)."""
    order: dict[str, tuple[Any, ...]] = {}
    for i, run in enumerate(runs):
        asked = list((run.info.get("options") or {}).get("methods") or [])
        for row in run.rows:
            method = row.record.method
            pos = asked.index(method) if method in asked else len(asked)
            noise = row.record.params.get("noise")
            key = (i, pos, method, noise if isinstance(noise, int | float) else -1.0, row.label)
            order[row.label] = min(order.get(row.label, key), key)
    return sorted(order, key=lambda label: order[label])


def _row_id(rec: Record) -> tuple[str, str, int]:
    return rec.key, rec.sha256 or "", -1 if rec.target is None else rec.target


def _cell(row: Row, files: Files, thumb: str | None, values: list[float | None] | None) -> dict[str, Any]:
    rec = row.record
    cell: dict[str, Any] = {"s": rec.status, "e": rec.error}
    folder = os.fspath(row.run.folder)
    for short, what in (("o", rec.overlay), ("n", rec.npy)):
        target = files.link(os.path.join(folder, what)) if what else None
        if target is not None:
            cell[short] = target
    if thumb:
        cell["t"] = thumb
    if rec.score is not None:
        cell["p"] = rec.score
    if values is not None:
        cell["m"] = values
    return cell


def build_rows(runs: list[RunData], columns: list[str], files: Files, thumbs: dict[int, str],
               metrics: Metrics) -> list[dict[str, Any]]:
    """One row per (image key, file digest, target): {"k": key, "i": image path, "h": link to the image, "g":
    target, "l": class name, "p": probability, "s": status, "c": {column index: cell}}, each cell {"s": status,
    "e": error, "o": overlay link, "n": .npy link, "t": thumbnail, "p": probability, "m": metric values}."""
    col = {label: i for i, label in enumerate(columns)}
    rows: dict[tuple[str, str, int], dict[str, Any]] = {}
    for run in runs:
        for r in run.rows:
            rec = r.record
            ident = _row_id(rec)
            row = rows.get(ident)
            if row is None:
                row = rows[ident] = {"k": ident[0], "c": {}, "s": "ok", "g": ident[2], "i": rec.image}
                image = files.image(r)
                if image is not None:
                    row["h"] = image
            if row.get("l") is None and rec.label is not None:
                row["l"] = rec.label
            if row.get("p") is None and rec.score is not None:
                row["p"] = rec.score
            row["c"][str(col[r.label])] = _cell(r, files, thumbs.get(id(r)), metrics.cell(r))
    for row in rows.values():
        statuses = {c["s"] for c in row["c"].values()}
        row["s"] = "error" if "error" in statuses else ("ok" if "ok" in statuses else "skipped")
    return [rows[k] for k in sorted(rows)]


# -- thumbnails -----------------------------------------------------------------------------------------------
def _thumb(src: Path, dst: Path, size: int) -> bool:
    """A JPEG of the overlay `size` px wide (its colour bar included), unless an up-to-date one exists."""
    try:
        if dst.is_file() and dst.stat().st_mtime >= src.stat().st_mtime:
            return True
        with Image.open(src) as opened:
            im = opened.convert("RGB")
        im.thumbnail((size, size * 4), Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=85, optimize=True)
        write_bytes(dst, buf.getvalue())
        return True
    except OSError:
        return False


def make_thumbnails(runs: list[RunData], out: Path, size: int, on_progress: Progress | None) -> dict[int, str]:
    """Thumbnails of every overlay under out/thumbs/r<run index>/ (names mirror the overlays'); returns
    {id(row): link relative to out}. Four threads: Pillow decodes, resizes and encodes without the GIL."""
    jobs: list[tuple[Row, Path, Path]] = []
    for i, run in enumerate(runs):
        for row in run.rows:
            overlay = row.record.overlay
            if overlay and row.record.status in ("ok", "skipped"):
                jobs.append((row, run.folder / overlay, out / THUMBS / f"r{i}" / Path(overlay).with_suffix(".jpg")))
    unique = sorted({(src, dst) for _, src, dst in jobs})
    made: dict[Path, str] = {}
    with ThreadPoolExecutor(max_workers=4, thread_name_prefix="thumbs") as pool:
        futures = [pool.submit(_thumb, src, dst, size) for src, dst in unique]
        for n, ((_, dst), fut) in enumerate(zip(unique, futures, strict=True)):
            if fut.result():
                made[dst] = link(dst, out)
            if on_progress is not None:
                on_progress(n + 1, len(unique))
    return {id(row): made[dst] for row, _, dst in jobs if dst in made}


# -- metrics (evaluation.json) and comparisons (comparison.json) ---------------------------------------------
def _base_label(label: str, run: RunData) -> str:
    """A method label without the run prefix `assign_labels` (or a multi-run evaluate) put in front of it."""
    for prefix in _prefixes(run.name, str(run.folder)):
        if label.startswith(prefix):
            return label[len(prefix):]
    return label


@lru_cache(maxsize=256)
def _resolved(folder: str) -> Path:
    return Path(folder).resolve()


@lru_cache(maxsize=64)
def _prefixes(name: str, folder: str) -> tuple[str, ...]:
    return f"{name}/", f"{folder}/", f"{Path(folder).resolve()}/"


def _run_for(recorded: str | None, runs: list[RunData], home: Path, listed: int) -> RunData | None:
    """The run a file's entry belongs to: the same folder; the folder holding the file when the file covers one
    run; else the run of the same folder name."""
    if recorded:
        for run in runs:
            if _resolved(recorded) == _resolved(str(run.folder)):
                return run
    if listed <= 1:
        return next((run for run in runs if run.folder.resolve() == home.resolve()), None)
    name = Path(recorded or "").name
    return next((run for run in runs if run.name == name), None)


def _same_map(row: Row, npy_sha256: str | None) -> bool:
    """Whether a result about the map with that sha256 is about the row's .npy file as it is now: the record's
    sha256, else (an older record, or a file replaced since) the file's own."""
    if npy_sha256 is None or row.record.npy_sha256 == npy_sha256:
        return True
    return bool(row.record.npy) and file_sha256(row.run.folder / str(row.record.npy)) == npy_sha256


class Metrics:
    """Metric values per row of the report: `names` (display order), their metadata, and values by id(Row)."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self.meta: dict[str, dict[str, Any]] = {}
        self.values: dict[int, dict[str, float | None]] = defaultdict(dict)
        self.index: dict[tuple[str, str, int, str], Row] = {}

    def add_name(self, name: str, meta: dict[str, Any]) -> None:
        if name not in self.meta:
            self.names.append(name)
            self.meta[name] = meta

    def set(self, run: RunData, key: Any, target: Any, label: Any, values: dict[str, Any],
            npy_sha256: str | None = None) -> bool:
        """Attach `values` to the row of `run` with that key, target and (base) method label, unless they are about
        other bytes than its .npy file holds now (`npy_sha256`, when the result recorded it)."""
        if target is None:
            return False
        row = self.index.get((str(run.folder), str(key), int(target), _base_label(str(label), run)))
        if row is None or not _same_map(row, npy_sha256):
            return False
        self.values[id(row)].update({k: v for k, v in values.items() if k in self.meta})
        return True

    def cell(self, row: Row) -> list[float | None] | None:
        vals = self.values.get(id(row))
        if not vals:
            return None
        return [finite(vals.get(n)) for n in self.names]


def read_evaluations(runs: list[RunData], files: Files, metrics: Metrics, warnings: list[str]
                     ) -> list[dict[str, Any]]:
    """Every run folder's evaluation.json: per-image metrics attached to rows; returns the summaries to show."""
    shown, seen = [], set()
    for run in runs:
        path = run.folder / EVALUATION
        if not path.is_file() or path.resolve() in seen:
            continue
        seen.add(path.resolve())
        data = read_result(path, warnings)
        if data is None:
            continue
        for name, meta in (data.get("metrics") or {}).items():
            metrics.add_name(name, {"higher_is_better": bool(meta.get("higher_is_better")),
                                    "summary": str(meta.get("summary") or "")})
        listed = len(data.get("runs") or [])
        unmatched = 0
        for entry in data.get("images") or []:
            owner = _run_for(entry.get("run"), runs, run.folder, listed)
            if owner is None or not metrics.set(owner, entry.get("key"), entry.get("target"), entry.get("method"),
                                                entry.get("metrics") or {}, entry.get("npy_sha256")):
                unmatched += 1
        if unmatched:
            warnings.append(f"{path}: {unmatched} rows match no current map of the report's runs (not shown)")
        summary = data.get("summary") or {}
        table = [{"name": name, "higher_is_better": bool(meta.get("higher_is_better")), "summary": meta.get("summary"),
                  "cells": [mean_text((summary[label] or {}).get(name)) for label in summary]}
                 for name, meta in (data.get("metrics") or {}).items()]
        shown.append({"path": files.link(path), "run": run.name, "labels": list(summary), "table": table,
                      "gates": [g.get("message") for g in data.get("gates") or []]})
    return shown


def mean_text(stat: dict[str, Any] | None) -> str:
    """`mean ± ci95 (n=N)` of a {"mean", "ci95", "n"} summary (n: the images with a value), `-` when there is
    no value."""
    if not stat or stat.get("mean") is None:
        return "-"
    text = f"{stat['mean']:.3g}"
    return text + (f" \u00b1 {stat['ci95']:.2g}" if stat.get("ci95") is not None else "") + f" (n={stat.get('n', 0)})"


def comparison_files(runs: list[RunData], given: Path | None) -> list[Path]:
    """The comparison.json to show: the one given, else those in the run folders."""
    if given is not None:
        if not given.is_file():
            raise UsageError(f"--comparison {given}: no such file")
        return [given]
    found = {(run.folder / COMPARISON).resolve() for run in runs if (run.folder / COMPARISON).is_file()}
    return sorted(found)


def read_comparisons(runs: list[RunData], paths: list[Path], files: Files, metrics: Metrics,
                     warnings: list[str]) -> list[dict[str, Any]]:
    """Each comparison.json: its values attached to the cells of both runs when they are in the report, and a
    section (summary per method, the most changed pairs with their strips) to show."""
    sections = []
    for path in paths:
        data = read_comparison(path, warnings)
        if data is None:
            continue
        a, b = data.get("run_a") or {}, data.get("run_b") or {}
        pairs = data.get("pairs") or []
        for side, this, other in (("a", a, b), ("b", b, a)):
            run = _run_for(this.get("folder"), runs, Path("/nonexistent"), 2)
            if run is None:
                continue
            names = {n: f"vs {other.get('name') or 'other'}: {n}" for n in COMPARE_METRICS}
            for n, shown_name in names.items():
                metrics.add_name(shown_name, {"higher_is_better": True, "summary": f"{COMPARE_HELP[n]} of this map "
                                              f"and the map of run {other.get('folder')} (1 = unchanged)"})
            for pair in pairs:
                entry = pair.get(side) or {}
                metrics.set(run, entry.get("key"), entry.get("target"), entry.get("method"),
                            {shown_name: pair.get(n) for n, shown_name in names.items()}, entry.get("npy_sha256"))
        shown = [{**p, "strip_link": files.link(path.parent / p["strip"]) if p.get("strip") else None}
                 for p in pairs[:20]]
        table = [{"label": label, "spearman": mean_text(st.get("spearman")), "iou": mean_text(st.get("iou")),
                  "n": (st.get("spearman") or {}).get("n", 0)} for label, st in (data.get("summary") or {}).items()]
        sections.append({"path": files.link(path), "a": a, "b": b, "table": table,
                         "pairs": shown, "total": len(pairs), "pool": (data.get("options") or {}).get("pool", "?"),
                         "top_pct": f"{100 * float((data.get('options') or {}).get('top', 0.1)):g}",
                         "only_a": len(data.get("only_a") or []), "only_b": len(data.get("only_b") or []),
                         "gates": [g.get("message") for g in data.get("gates") or []]})
    return sections


# -- the header: what each run was ---------------------------------------------------------------------------
def _short(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k}={_short(v)}" for k, v in value.items() if v is not None)
    if isinstance(value, list | tuple):
        return "x".join(_short(v) for v in value) if all(isinstance(v, int) for v in value) else \
            "(" + ", ".join(_short(v) for v in value) + ")"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


PER_IMAGE = {"seed", "sigma", "noise_absolute"}  # shown as the sigma column (or the run's seed), not settings


def shared_settings(records: list[Record]) -> str:
    """The hyper-parameters of a method's records, `k=v, ...`; a value that differs between images (an adaptive
    noise level) as `k=lo to hi`."""
    values: dict[str, list[Any]] = defaultdict(list)
    for rec in records:
        params = rec.params
        for k, v in params.items():
            if k not in PER_IMAGE and not (k == "noise_relative" and "noise" in params):  # the same number twice
                values[k].append(v)
    parts = []
    for k, vs in values.items():
        distinct = sorted({json.dumps(v, sort_keys=True, default=str) for v in vs})
        if len(distinct) == 1:
            parts.append(f"{k}={_short(vs[0])}")
        elif all(isinstance(v, int | float) for v in vs):
            parts.append(f"{k}={_short(min(vs))} to {_short(max(vs))}")
        else:
            parts.append(f"{k} varies")
    return ", ".join(parts)


def _method_rows(run: RunData) -> list[dict[str, Any]]:
    """Per method label: its shared settings, the absolute noise sigma over images, counts and seconds/image."""
    by_label: dict[str, list[Record]] = defaultdict(list)
    for row in run.rows:
        by_label[row.label].append(row.record)
    out = []
    for label, recs in by_label.items():
        ok = [r for r in recs if r.status in ("ok", "skipped")]
        settings = shared_settings(ok or recs)
        sigmas = sorted(float(r.params["sigma"]) for r in ok if isinstance(r.params.get("sigma"), int | float))
        seconds = [r.seconds for r in ok if r.status == "ok"]
        sigma = None
        if sigmas:
            sigma = _short(sigmas[0]) if sigmas[0] == sigmas[-1] else f"{_short(sigmas[0])} to {_short(sigmas[-1])}"
        out.append({"label": label, "method": recs[0].method,
                    "settings": settings,
                    "sigma": sigma, "ok": sum(r.status == "ok" for r in recs),
                    "skipped": sum(r.status == "skipped" for r in recs),
                    "error": sum(r.status == "error" for r in recs),
                    "seconds": sum(seconds) / len(seconds) if seconds else None})
    return out


def display_text(opts: dict[str, Any]) -> str:
    """How the run's overlays were drawn, in words."""
    cmap = opts.get("colormap") or "inferno (unsigned maps), RdBu_r (signed maps)"
    pct = opts.get("percentile", 99.0)
    return (f"colormap {cmap}; overlay opacity {opts.get('alpha', 0.5)}; each map's colour scale ends at its own "
            f"{_short(pct)}th percentile")


def run_summary(run: RunData, files: Files) -> dict[str, Any]:
    """What the header says about a run: where, how (command, model, data config, seed, versions), counts."""
    info = run.info
    opts = info.get("options") or {}
    model = info.get("model") or {}
    model_text = {k: (Path(v).name if isinstance(v, str) and os.sep in v else v) for k, v in model.items()
                  if k not in ("files", "sha256")}
    sha = model.get("sha256") or {}
    statuses = [row.record.status for row in run.rows]
    command = info.get("command") or []
    return {
        "name": run.name, "folder": str(run.folder), "link": files.folder(run),
        "command": shlex.join(["saliency", *command[1:]]) if command else "", "cwd": info.get("cwd"),
        "model": _short(model_text), "model_sha": {k: str(v)[:12] for k, v in sha.items()},
        "data_config": _short(info.get("data_config") or {}), "device": info.get("device"),
        "seed": opts.get("seed"), "score": opts.get("score"), "target": opts.get("target"),
        "display": display_text(opts),
        "versions": _short(info.get("versions") or {}), "started": info.get("started"),
        "finished": info.get("finished"), "interrupted": info.get("interrupted"),
        "images": len({row.record.key for row in run.rows}),
        "counts": {s: statuses.count(s) for s in ("ok", "skipped", "error")},
        "methods": _method_rows(run), "bad_lines": run.bad_lines,
    }


def error_list(runs: list[RunData]) -> list[dict[str, Any]]:
    """Every failed map with its reason, sorted by image and method."""
    errors = [{"run": run.name, "key": row.record.key, "image": row.record.image,
               "method": row.label, "error": row.record.error or "no reason recorded"}
              for run in runs for row in run.rows if row.record.status == "error"]
    return sorted(errors, key=lambda e: (e["key"], e["method"], e["run"]))


# -- the page -------------------------------------------------------------------------------------------------
def _script_json(value: Any) -> str:
    """JSON safe inside a <script> element (`<`, `>`, `&`, `'` escaped as \\u00XX, as Jinja's tojson does)."""
    text = json.dumps(finite(value), sort_keys=True, ensure_ascii=False, allow_nan=False, default=str)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026").replace("'", "\\u0027")


def rows_json(rows: list[dict[str, Any]]) -> str:
    """The rows as a JSON list, one row per line (so two reports diff line by line)."""
    return "[\n" + ",\n".join(_script_json(r) for r in rows) + "\n]"


def gate_banner(evaluations: list[dict[str, Any]], comparisons: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The failed gates recorded in the evaluation.json and comparison.json shown, for the top of the page."""
    lines = [f"evaluate: {g}" for ev in evaluations for g in ev["gates"]]
    lines += [f"compare: {g}" for cmp in comparisons for g in cmp["gates"]]
    if not lines:
        return None
    return {"title": f"{counted(len(lines), 'gate')} failed", "ok": False, "lines": lines,
            "held": []}


def render_page(context: dict[str, Any]) -> str:
    """templates/report.html.j2 rendered with autoescape on (every path and label is escaped)."""
    import jinja2
    from markupsafe import Markup

    env = jinja2.Environment(loader=jinja2.PackageLoader("saliency_cli", "templates"),
                             autoescape=jinja2.select_autoescape(default=True, default_for_string=True),
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["num"] = lambda v: "" if v is None else (f"{v:.3g}" if isinstance(v, float) else str(v))
    context = {**context, "rows_json": Markup(rows_json(context.pop("rows"))),
               "meta_json": Markup(_script_json(context["meta"]))}
    return env.get_template("report.html.j2").render(**context)


def _check(opts: ReportOptions) -> None:
    if opts.page_size < 1:
        raise UsageError("--page-size must be at least 1")
    if not 32 <= opts.thumb_size <= 1024:
        raise UsageError("--thumb-size must be between 32 and 1024 (pixels)")


def build_report(opts: ReportOptions, on_progress: Progress | None = None) -> Report:
    """Read the runs, make the thumbnails, write out/index.html; see the module docstring."""
    _check(opts)
    runs, warnings = open_runs([Path(r) for r in opts.runs], opts.images)
    out = Path(opts.out) if opts.out is not None else runs[0].folder
    columns = _column_order(runs)
    metrics = Metrics()
    for run in runs:
        for row in run.rows:
            if row.record.target is not None:
                metrics.index[(str(run.folder), row.record.key, row.record.target,
                               _base_label(row.label, run))] = row
    files = Files(out, runs, external=opts.link)
    evaluations = read_evaluations(runs, files, metrics, warnings)
    comparisons = read_comparisons(runs, comparison_files(runs, opts.comparison), files, metrics, warnings)
    thumbs = make_thumbnails(runs, out, opts.thumb_size, on_progress)
    rows = build_rows(runs, columns, files, thumbs, metrics)
    errors = error_list(runs)
    from saliency_cli import __version__

    meta = {"columns": columns, "pageSize": opts.page_size, "thumb": opts.thumb_size,
            "metrics": [{"name": n, "higherIsBetter": metrics.meta[n]["higher_is_better"],
                         "summary": metrics.meta[n]["summary"]} for n in metrics.names]}
    external = opts.link and not all(files.inside(_absolute(os.fspath(run.folder))) for run in runs)
    context = {"runs": [run_summary(run, files) for run in runs], "columns": columns, "metrics": metrics.names,
               "external": external,
               "metric_meta": metrics.meta, "evaluations": evaluations, "comparisons": comparisons,
               "errors": errors, "rows": rows, "meta": meta, "n_rows": len(rows), "version": __version__,
               "warnings": warnings, "page_size": opts.page_size,
               "banner": opts.banner or gate_banner(evaluations, comparisons)}
    path = out / "index.html"
    write_bytes(path, render_page(context).encode("utf-8"))
    return Report(path, len(rows), columns, len(thumbs), len(errors), warnings)
