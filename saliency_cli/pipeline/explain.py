"""The explain engine: discover -> decode (threads) -> groups of images -> predict targets (no grad)
-> method(oracle, x, target, generators, ctx) -> reduce -> outputs (writer thread) -> manifest.

`ExplainRun(opts).run()` does one `saliency explain`; each step is one short method, the writing is in
pipeline/outputs.py, the planning in pipeline/plan.py, the finished-work index in runfolder/finished.py.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

import torch

from saliency_cli.data import InputItem, discover, image_seed, input_bounds
from saliency_cli.errors import OutputError, SaliencyError, StdoutClosed, UsageError, first_line, raise_if_signalled
from saliency_cli.methods import METHODS
from saliency_cli.methods.base import MethodContext
from saliency_cli.metrics import score_maps
from saliency_cli.models import attach_default_labels, find_class, labels_before_loading, num_classes
from saliency_cli.numerics import seeded_generator
from saliency_cli.oracle import (
    FastModel,
    GradientOracle,
    checked_fast_copy,
    default_batch_size,
    to_device,
)
from saliency_cli.pipeline.decode import Decoded, decode_item, default_workers, prefetch
from saliency_cli.pipeline.outputs import OnRecord, Outputs, Panel, strip_name
from saliency_cli.pipeline.plan import ExplainOptions, Job, assign_identities, make_jobs, parse_target, validate
from saliency_cli.pipeline.shards import resolve_shard
from saliency_cli.pipeline.tensors import InMemory, load_run_model, run_device
from saliency_cli.reduce import reduce_channels
from saliency_cli.runfolder.finished import FinishedIndex
from saliency_cli.runfolder.records import Record
from saliency_cli.runfolder.runinfo import write_info
from saliency_cli.writers import RunLock, finite, jsonable, remove_stray_temporaries

MAX_GROUP = 256  # images per group at most (noisegrad's width is 1: a batch size of 1024 would hold 1024 images)


def versions() -> dict[str, str]:
    import timm

    from saliency_cli import __version__

    return {"saliency": __version__, "torch": torch.__version__, "timm": timm.__version__,
            "python": sys.version.split()[0]}


def target_index(kind: str, value: Any, classes: int, find: Callable[[str], int]) -> tuple[str, Any]:
    """A parsed `--target` checked against a model's `classes`, a class name turned into its index by `find`."""
    if kind == "index" and value >= classes:
        raise UsageError(f"--target {value}: the model has {classes} classes (0 to {classes - 1})")
    if kind == "name":
        return "index", find(value)
    return kind, value


class ExplainRun:
    """One `explain` run: owns the model, the oracle, the decoding threads and the outputs."""

    def __init__(self, opts: ExplainOptions, on_record: OnRecord | None = None,
                 on_start: Callable[[int], None] | None = None, echo: IO[str] | None = None,
                 on_warning: Callable[[str], None] | None = None) -> None:
        self.opts = opts
        self.on_warning = on_warning
        self.warnings = validate(opts, METHODS)
        self.on_record = on_record
        self.on_start = on_start
        self.echo = echo

    # -- set-up ---------------------------------------------------------------------------------------
    def _prepare_out(self) -> None:
        out = self.opts.out
        try:
            out.mkdir(parents=True, exist_ok=True)
            probe = out / f".write-test-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise OutputError(f"output folder {out} is not writable ({e.strerror or e})") from None

    def _check_out(self) -> None:
        """The output folder can be made and written, checked without creating anything (that waits until the
        model is loaded and the target checked: a usage error leaves no folder, no lock)."""
        out = Path(os.path.abspath(self.opts.out))
        if out.exists() and not out.is_dir():
            raise OutputError(f"output folder {self.opts.out} is not a folder")
        existing = next(p for p in (out, *out.parents) if p.exists())
        if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
            raise OutputError(f"output folder {self.opts.out} is not writable ({existing} is not writable)")

    def _check_known_target(self) -> None:
        """`--target NAME` or a class index against the class names known before loading (a labels file, or
        ImageNet's for the bundled model and timm ImageNet models): no weights are read for a typo."""
        kind, value = parse_target(self.opts.target)
        if kind not in ("name", "index") or isinstance(self.opts.model, InMemory):
            return
        labels = labels_before_loading(self.opts.model, self.opts.checkpoint, self.opts.model_options,
                                       self.opts.labels_file)
        if labels is not None:
            target_index(kind, value, len(labels), lambda name: find_class(name, labels))

    def _load(self) -> None:
        """The device, the model, the oracle and the target, before anything is written."""
        opts = self.opts
        self.device = run_device(opts, self.shard.local_rank)
        if opts.precision == "fp16" and self.device.type == "cpu":
            raise UsageError("--precision fp16 needs a GPU; use bf16 or fp32 on the CPU")
        self.model = load_run_model(opts, self.device)
        batch = opts.batch_size or default_batch_size(self.device)
        fast, self.fast_info = self._fast_model()
        self.oracle = GradientOracle(self.model.module, batch_size=batch, score=opts.score, precision=opts.precision,
                                     auto_backoff=opts.batch_size is None, fast=fast, compile=opts.compile,
                                     probability=self.model.probability)
        self._check_target()

    def _set_up(self) -> None:
        """Inside the locked output folder: the jobs, their identities and the finished work."""
        opts = self.opts
        bounds = input_bounds(self.model.data_config).to(self.device)
        self.ctx = MethodContext(bounds, seed=opts.seed, scorer=self._scorer)
        self.jobs = make_jobs(opts, METHODS)
        assign_identities(self.jobs, opts, self.model.source, self.model.data_config)
        self.finished = FinishedIndex(opts.out, enabled=not opts.overwrite)
        if self.finished.bad_lines:
            self._warn(f"{self.finished.bad_lines} unreadable line(s) of the manifest in {opts.out} were skipped")

    def _fast_model(self) -> tuple[FastModel | None, dict[str, Any]]:
        """The oracle's private copy of the model (`--fast`: BatchNorm folded, channels_last where the device
        gains; oracle.fast_copy), checked against the model on two random inputs of its input size. The maps
        equal the model's within float32 rounding; what was done goes to run.json."""
        if not self.opts.fast:
            return None, {"folded": 0, "channels_last": False, "max_rel_diff": None, "reason": "--no-fast"}
        return checked_fast_copy(self.model.module, self.device, self.model.data_config.get("input_size"))

    def _check_target(self) -> None:
        """`--target` against the model's classes, before any image is explained: the class count, the default
        labels and the parsed target (a class name as its index) are found once here for the whole run."""
        self.classes = classes = num_classes(self.model)
        attach_default_labels(self.model, classes)
        kind, value = parse_target(self.opts.target)
        self.target_kind, self.target_value = target_index(kind, value, classes, self.model.class_index)

    def _scorer(self, metric: str, oracle: GradientOracle, x: torch.Tensor, target: torch.Tensor,
                maps: torch.Tensor) -> torch.Tensor:
        return score_maps(metric, oracle, x, target, maps, self.ctx.bounds)

    def _run_info(self, items: list[InputItem], started: datetime) -> dict[str, Any]:
        info = {
            "command": sys.argv, "cwd": os.getcwd(), "versions": versions(), "device": str(self.device),
            "model": self.model.source, "data_config": self.model.data_config, "options": jsonable(asdict(self.opts)),
            "started": started.isoformat(), "inputs": len(items), "batch_size": self.oracle.batch_size,
            "fast": self.fast_info, "compile": self.opts.compile, "group_size": self._group_size(),
            "decode_workers": self._workers(),
        }
        if self.shard.count > 1:
            info.update(shard=self.shard.describe(), inputs_total=len(self.everything))
        return info

    # -- the run --------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        opts = self.opts
        started = datetime.now(timezone.utc)
        excluded: list[Path] = []
        everything = discover(opts.inputs, opts.stdin_lines, exclude=opts.out, excluded=excluded)
        if excluded:
            self._warn(f"{len(excluded)} file(s) under the output folder {opts.out} are outputs, not inputs: left out")
        if not everything:
            raise UsageError("no images found in the inputs given")
        self.shard = resolve_shard(opts.shard)
        self.everything = everything
        items = [item for item in everything if self.shard.owns(item.key)]
        self._check_out()
        self._check_known_target()
        self._load()
        raise_if_signalled()  # a Ctrl-C swallowed while a library was imported: stop before anything is made
        with contextlib.ExitStack() as stack:
            self._prepare_out()
            stack.enter_context(RunLock(opts.out / f".saliency.lock{self.shard.suffix}"))
            remove_stray_temporaries(opts.out)
            self._set_up()
            return self._run_locked(items, started)

    def _run_locked(self, items: list[InputItem], started: datetime) -> dict[str, Any]:
        opts = self.opts
        info = self._run_info(items, started)
        write_info(opts.out, info, self.shard.suffix)
        if self.on_start is not None:
            self.on_start(len(items))
        display = {"cmap": opts.colormap, "alpha": opts.alpha, "percentile": opts.percentile}
        self.outputs = Outputs(opts.out, seed=opts.seed, score=opts.score, label=self.model.label, display=display,
                               probability=self.model.probability,
                               on_record=self.on_record, echo=self.echo, overlay_size=opts.overlay_size,
                               manifest_name=self.shard.manifest_name())
        interrupted = True
        try:
            self._loop(items)
            interrupted = False
        finally:
            self.outputs.close(interrupted)
            info.update(finished=datetime.now(timezone.utc).isoformat(), counts=dict(self.outputs.counts),
                        interrupted=interrupted, batch_size_final=self.oracle.batch_size)
            if self.outputs.echo_broken:
                info["stopped"] = "stdout closed by its reader"
            write_info(opts.out, info, self.shard.suffix)
        if self.outputs.echo_broken:
            raise StdoutClosed(f"stdout was closed by its reader; stopped after {sum(info['counts'].values())} "
                               f"records (all in {opts.out}/manifest.jsonl)")
        return info

    def _warn(self, message: str) -> None:
        if self.on_warning is not None:
            self.on_warning(message)

    def _group_size(self) -> int:
        """Images per group: `batch_size // width` for the widest job, so that every oracle call of every job is
        full (width: the inputs per image a method sends in one call, e.g. 1 for noisegrad's noisy models), at
        most MAX_GROUP. The decoder holds at most about two groups of inputs ahead (`_loop`)."""
        widths = []
        for job in self.jobs:
            try:
                widths.append(job.method.oracle_width(job.hyper))
            except (TypeError, ValueError):  # a count not known before the run (e.g. `auto`): one image a group
                widths.append(self.oracle.batch_size)
        return max(1, min(MAX_GROUP, self.oracle.batch_size // max(widths)))

    def _workers(self) -> int:
        return self.opts.workers or default_workers()

    def _finished_jobs(self, item: InputItem, digest: str) -> dict[str, list[Record] | None]:
        done = {job.tag: self.finished.get(item.key, job.config_id, digest) for job in self.jobs}
        if len(self.jobs) > 1 and self.target_kind != "topk" and all(done.values()):
            strip = self.opts.out / strip_name(item.key, [job.tag for job in self.jobs], None)
            if not strip.is_file():
                done[strip.name] = None  # decode it: the strip is drawn again from the files on disk
        return done

    def _loop(self, items: list[InputItem]) -> None:
        group_size = self._group_size()
        self._images_per_group = group_size
        topk = self.target_kind == "topk"
        self._rows_per_group = group_size * (min(int(self.target_value), self.classes) if topk else 1)
        cfg = self.model.data_config
        workers = self._workers()
        decoders = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="decode")
        try:
            group: list[Decoded] = []
            work = lambda item: decode_item(item, cfg, self._finished_jobs, self.opts.max_pixels)  # noqa: E731
            for d in prefetch(items, work, decoders, window=max(4, workers, 2 * group_size)):
                raise_if_signalled()
                self.outputs.check()
                if self.outputs.echo_broken:
                    return
                if d.error is not None:
                    for job in self.jobs:
                        self.outputs.error(d, job, d.error)
                elif d.done is not None:
                    for job in self.jobs:
                        for rec in d.done.get(job.tag, []):
                            self.outputs.skipped(rec, image=str(d.item.path))
                else:
                    group.append(d)
                if len(group) >= group_size:
                    self._explain_group(group)
                    group = []
            if group:
                self._explain_group(group)
        finally:
            decoders.shutdown(wait=False, cancel_futures=True)

    # -- one group of images --------------------------------------------------------------------------
    def _targets(self, group: list[Decoded], probs: torch.Tensor) -> list[tuple[int, int]]:
        """(image index in group, class) rows to explain (the target was checked at set-up)."""
        kind, value = self.target_kind, self.target_value
        if kind == "pred":
            return [(i, int(c)) for i, c in enumerate(probs.argmax(1).tolist())]
        if kind == "topk":
            top = probs.topk(min(value, self.classes), dim=1).indices.tolist()
            return [(i, int(c)) for i, row in enumerate(top) for c in row]
        return [(i, value) for i in range(len(group))]

    def _explain_group(self, group: list[Decoded]) -> None:
        inputs = [d.x for d in group if d.x is not None]
        inputs += [inputs[-1]] * max(0, self._images_per_group - len(group))  # a fixed shape, see _run_job
        x = to_device(torch.stack(inputs), self.device)  # pinned memory and an asynchronous copy on CUDA
        logits = self.oracle.logits(x)[:len(group)]
        probs = self.oracle.class_probabilities(logits)
        rows = self._targets(group, probs)
        idx = torch.tensor([i for i, _ in rows], device=self.device)
        target = torch.tensor([c for _, c in rows], device=self.device)
        xr = x[idx]  # (R, C, H, W): one row per (image, target)
        topk = self.target_kind == "topk"
        panels: dict[int, list[tuple[str, Panel]]] = {r: [] for r in range(len(rows))}
        for job in self.jobs:
            todo = self._skip_finished(group, rows, job, panels)
            if todo:
                self._run_job(job, group, rows, todo, xr, target, probs, topk, panels)
        for r, entries in panels.items():
            i, c = rows[r]
            changed = any(isinstance(panel, Future) for _, panel in entries)
            if len(entries) > 1 and (changed or not self.outputs.strip_path(group[i], c if topk else None,
                                                                             entries).is_file()):
                self.outputs.write_strip(group[i], c if topk else None, entries)
            elif changed:  # an earlier run's montage of this image shows the map this one replaced
                self.outputs.remove_montage(group[i], c if topk else None)

    def _skip_finished(self, group: list[Decoded], rows: list[tuple[int, int]], job: Job,
                       panels: dict[int, list[tuple[str, Panel]]]) -> list[int]:
        """Record the rows of `job` already done as skipped (their overlays still count as montage panels);
        return the rows still to do."""
        todo = []
        for r, (i, c) in enumerate(rows):
            done = [rec for rec in self.finished.get(group[i].item.key, job.config_id, group[i].digest) or []
                    if rec.target == c]
            if not done:
                todo.append(r)
                continue
            for rec in done:
                self.outputs.skipped(rec, image=str(group[i].item.path))
                if rec.overlay:
                    panels[r].append((job.tag, rec.overlay))
        return todo

    def _run_job(self, job: Job, group: list[Decoded], rows: list[tuple[int, int]], todo: list[int],
                 xr: torch.Tensor, target: torch.Tensor, probs: torch.Tensor, topk: bool,
                 panels: dict[int, list[tuple[str, Panel]]]) -> None:
        gens = [seeded_generator(image_seed(self.opts.seed, group[rows[r][0]].digest), self.device) for r in todo]
        # Fixed shapes: every call of a job sees as many rows as a full group has (copies of the last row fill a
        # short one; their results are dropped), so an image's map is the same bytes whatever shares its group.
        filler = max(0, self._rows_per_group - len(todo))
        gens += [seeded_generator(0, self.device) for _ in range(filler)]
        sel = torch.tensor(todo + [todo[-1]] * filler, device=self.device)
        t0 = time.perf_counter()
        try:
            result = job.method.fn(self.oracle, xr[sel], target[sel], generators=gens, ctx=self.ctx, **job.hyper)
            maps = reduce_channels(result.maps, job.reduce, result.display).float().cpu().numpy()
            stats = {k: v.detach().cpu().tolist() for k, v in result.stats.items()}
        except (KeyboardInterrupt, SaliencyError):
            raise
        except Exception as e:  # noqa: BLE001 - recorded per image, the run goes on
            if os.environ.get("SALIENCY_DEBUG") == "1":
                raise
            for r in todo:
                self.outputs.error(group[rows[r][0]], job, first_line(e))
            return
        seconds = (time.perf_counter() - t0) / len(todo)
        for j, r in enumerate(todo):
            i, c = rows[r]
            row_stats = {k: finite(v[j]) for k, v in stats.items()}
            fut = self.outputs.write_map(group[i], job, c, float(probs[i, c]), maps[j], row_stats, seconds, topk)
            panels[r].append((job.tag, fut))
