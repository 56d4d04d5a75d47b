"""The explain engine: discover -> decode (threads) -> groups of images -> predict targets (no grad)
-> method(oracle, x, target, generators, ctx) -> reduce -> outputs (writer thread) -> manifest.

`ExplainRun(opts).run()` does one `saliency explain`; each step is one short method, the writing is in
pipeline/outputs.py, the planning in pipeline/plan.py, the finished-work index in pipeline/resume.py.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict
from datetime import datetime, timezone
from typing import IO, Any

import torch
from PIL import Image

from saliency_cli.data import InputItem, decode, discover, image_seed, input_bounds, preprocess
from saliency_cli.errors import ImageError, OutputError, SaliencyError, UsageError, first_line
from saliency_cli.methods import METHODS
from saliency_cli.methods.base import MethodContext
from saliency_cli.metrics import score_maps
from saliency_cli.models import attach_default_labels, load_model, resolve_device
from saliency_cli.numerics import seeded_generator
from saliency_cli.oracle import GradientOracle, default_batch_size
from saliency_cli.pipeline.decode import Decoded, decode_item, prefetch
from saliency_cli.pipeline.outputs import OnRecord, Outputs
from saliency_cli.pipeline.plan import ExplainOptions, Job, assign_identities, make_jobs, parse_target, validate
from saliency_cli.pipeline.resume import FinishedIndex
from saliency_cli.reduce import reduce_channels
from saliency_cli.writers import finite, write_json

CALIBRATION_IMAGES = 16  # images that run-level resolvers (weight noise `auto`) calibrate on


def versions() -> dict[str, str]:
    import timm

    from saliency_cli import __version__

    return {"saliency": __version__, "torch": torch.__version__, "timm": timm.__version__,
            "python": sys.version.split()[0]}


def jsonable(value: Any) -> Any:
    import json

    return json.loads(json.dumps(value, default=str))


class ExplainRun:
    """One `explain` run: owns the model, the oracle, the decoding threads and the outputs."""

    def __init__(self, opts: ExplainOptions, on_record: OnRecord | None = None,
                 on_start: Callable[[int], None] | None = None, echo: IO[str] | None = None) -> None:
        self.opts = opts
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

    def _set_up(self, items: list[InputItem]) -> None:
        opts = self.opts
        self.device = resolve_device(opts.device)
        if opts.precision == "fp16" and self.device.type == "cpu":
            raise UsageError("--precision fp16 needs a GPU; use bf16 or fp32 on the CPU")
        self._prepare_out()
        self.model = load_model(opts.model, checkpoint=opts.checkpoint, device=self.device,
                                overrides=opts.data_overrides, labels_file=opts.labels_file)
        batch = opts.batch_size or default_batch_size(self.device)
        self.oracle = GradientOracle(self.model.module, batch_size=batch, score=opts.score, precision=opts.precision,
                                     auto_backoff=opts.batch_size is None)
        bounds = input_bounds(self.model.data_config).to(self.device)
        self.ctx = MethodContext(bounds, seed=opts.seed, scorer=self._scorer)
        self.jobs = make_jobs(opts, METHODS)
        self.resolved = self._resolve_run_level(items)
        assign_identities(self.jobs, opts, self.model.source, self.model.data_config)
        self.finished = FinishedIndex(opts.out, enabled=not opts.overwrite)

    def _scorer(self, metric: str, oracle: GradientOracle, x: torch.Tensor, target: torch.Tensor,
                maps: torch.Tensor) -> torch.Tensor:
        return score_maps(metric, oracle, x, target, maps, self.ctx.bounds)

    def _resolve_run_level(self, items: list[InputItem]) -> dict[str, Any]:
        """Run-level values (`--weight-noise auto`) resolved once, by the methods' registered resolvers, on the
        first readable images of the run; every job then uses the same number."""
        resolved: dict[str, Any] = {}
        for job in self.jobs:
            for name, resolver in job.method.resolvers.items():
                if job.hyper.get(name) != "auto":
                    continue
                if name not in resolved:
                    resolved[name] = float(resolver("auto", self.oracle, self._calibration_images(items), self.ctx))
                job.hyper[name] = resolved[name]
        return resolved

    def _calibration_images(self, items: list[InputItem]) -> torch.Tensor:
        xs = []
        for item in items:
            try:
                xs.append(preprocess(decode(item.path.read_bytes()), self.model.data_config)[0])
            except (OSError, ImageError):
                continue
            if len(xs) >= CALIBRATION_IMAGES:
                break
        if not xs:
            raise UsageError("--weight-noise auto needs at least one readable image")
        return torch.stack(xs).to(self.device)

    def _run_info(self, items: list[InputItem], started: datetime) -> dict[str, Any]:
        info = {
            "command": sys.argv, "cwd": os.getcwd(), "versions": versions(), "device": str(self.device),
            "model": self.model.source, "data_config": self.model.data_config, "options": jsonable(asdict(self.opts)),
            "started": started.isoformat(), "inputs": len(items), "batch_size": self.oracle.batch_size,
        }
        if "weight_noise" in self.resolved:
            info["weight_noise_auto"] = self.resolved["weight_noise"]
        return info

    # -- the run --------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        opts = self.opts
        started = datetime.now(timezone.utc)
        items = discover(opts.inputs, opts.stdin_lines)
        if not items:
            raise UsageError("no images found in the inputs given")
        self._set_up(items)
        info = self._run_info(items, started)
        write_json(opts.out / "run.json", info)
        if self.on_start is not None:
            self.on_start(len(items))
        display = {"cmap": opts.colormap, "alpha": opts.alpha, "percentile": opts.percentile}
        self.outputs = Outputs(opts.out, seed=opts.seed, score=opts.score, label=self.model.label, display=display,
                               on_record=self.on_record, echo=self.echo)
        interrupted = True
        try:
            self._loop(items)
            interrupted = False
        finally:
            self.outputs.close(interrupted)
            info.update(finished=datetime.now(timezone.utc).isoformat(), counts=dict(self.outputs.counts),
                        interrupted=interrupted, batch_size_final=self.oracle.batch_size)
            write_json(opts.out / "run.json", info)
        return info

    def _group_size(self) -> int:
        cost = max(max(1, job.method.cost(job.hyper)) for job in self.jobs)
        return max(1, self.oracle.batch_size // cost)

    def _finished_jobs(self, item: InputItem, digest: str) -> dict[str, list[dict[str, Any]] | None]:
        return {job.tag: self.finished.get(item.key, job.config_id, digest) for job in self.jobs}

    def _loop(self, items: list[InputItem]) -> None:
        group_size = self._group_size()
        cfg = self.model.data_config
        decoders = ThreadPoolExecutor(max_workers=2, thread_name_prefix="decode")
        try:
            group: list[Decoded] = []
            work = lambda item: decode_item(item, cfg, self._finished_jobs)  # noqa: E731
            for d in prefetch(items, work, decoders, window=max(4, 2 * group_size)):
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
        """(image index in group, class) rows to explain."""
        kind, value = parse_target(self.opts.target)
        num_classes = probs.shape[1]
        if kind == "pred":
            return [(i, int(c)) for i, c in enumerate(probs.argmax(1).tolist())]
        if kind == "topk":
            top = probs.topk(min(value, num_classes), dim=1).indices.tolist()
            return [(i, int(c)) for i, row in enumerate(top) for c in row]
        cls = value if kind == "index" else self.model.class_index(value)
        if cls >= num_classes:
            raise UsageError(f"--target {cls}: the model has {num_classes} classes")
        return [(i, cls) for i in range(len(group))]

    def _explain_group(self, group: list[Decoded]) -> None:
        x = torch.stack([d.x for d in group]).to(self.device)  # type: ignore[misc]
        probs = self.oracle.logits(x).softmax(1)
        attach_default_labels(self.model, probs.shape[1])
        rows = self._targets(group, probs)
        idx = torch.tensor([i for i, _ in rows], device=self.device)
        target = torch.tensor([c for _, c in rows], device=self.device)
        xr = x[idx]  # (R, C, H, W): one row per (image, target)
        topk = parse_target(self.opts.target)[0] == "topk"
        panels: dict[int, list[tuple[str, Future[Image.Image | None]]]] = {r: [] for r in range(len(rows))}
        for job in self.jobs:
            todo = self._skip_finished(group, rows, job)
            if todo:
                self._run_job(job, group, rows, todo, xr, target, probs, topk, panels)
        for r, entries in panels.items():
            i, c = rows[r]
            if len(entries) > 1:
                self.outputs.write_strip(group[i], c if topk else None, entries)

    def _skip_finished(self, group: list[Decoded], rows: list[tuple[int, int]], job: Job) -> list[int]:
        """Record the rows of `job` already done as skipped; return the rows still to do."""
        todo = []
        for r, (i, c) in enumerate(rows):
            done = self.finished.get(group[i].item.key, job.config_id, group[i].digest)
            if not done:
                todo.append(r)
                continue
            for rec in done:
                if rec.get("target") == c:
                    self.outputs.skipped(rec)
        return todo

    def _run_job(self, job: Job, group: list[Decoded], rows: list[tuple[int, int]], todo: list[int],
                 xr: torch.Tensor, target: torch.Tensor, probs: torch.Tensor, topk: bool,
                 panels: dict[int, list[tuple[str, Future[Image.Image | None]]]]) -> None:
        gens = [seeded_generator(image_seed(self.opts.seed, group[rows[r][0]].digest), self.device) for r in todo]
        sel = torch.tensor(todo, device=self.device)
        t0 = time.perf_counter()
        try:
            result = job.method.fn(self.oracle, xr[sel], target[sel], generators=gens, ctx=self.ctx, **job.hyper)
            maps = reduce_channels(result.maps, job.reduce).float().cpu().numpy()
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
