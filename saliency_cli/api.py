"""`explain(...)`: the whole run, usable from Python without the CLI.

inputs -> discover -> decode+preprocess (background threads) -> groups of images -> predict targets (no grad)
       -> method(oracle, x, target, generators, ctx) -> reduce -> writers (background, atomic) -> manifest
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from saliency_cli import __version__
from saliency_cli.data import (
    InputItem,
    decode,
    discover,
    file_digest,
    image_seed,
    input_bounds,
    preprocess,
    visible_region,
)
from saliency_cli.errors import ImageError, OutputError, SaliencyError, UsageError
from saliency_cli.methods import REGISTRY, Context, Method
from saliency_cli.models import attach_default_labels, load_model, resolve_device
from saliency_cli.oracle import SCORES, GradientOracle
from saliency_cli.reduce import REDUCTIONS, reduce_channels
from saliency_cli.render import overlay, strip
from saliency_cli.writers import Manifest, read_manifest, write_json, write_npy, write_png

PRECISIONS = ("fp32", "bf16", "fp16")
# Hyper-parameters a user may set on the command line, with the checks their values must pass.
HYPER_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "samples": (lambda v: int(v) >= 1, "must be at least 1"),
    "steps": (lambda v: int(v) >= 1, "must be at least 1"),
    "models": (lambda v: int(v) >= 1, "must be at least 1"),
    "iterations": (lambda v: int(v) >= 1, "must be at least 1"),
    "chains": (lambda v: int(v) >= 1, "must be at least 1"),
    "grid": (lambda v: int(v) >= 2, "must be at least 2"),
    "confidence": (lambda v: 0 < float(v) < 1, "must be between 0 and 1"),
    "keep": (lambda v: 0 < float(v) < 1, "must be between 0 and 1"),
    "step_size": (lambda v: float(v) > 0, "must be positive"),
    "objective": (lambda v: v in ("noise", "aupc"), "must be noise or aupc"),
    "baseline": (lambda v: v in ("black", "mean", "blur", "uniform"), "must be black, mean, blur or uniform"),
    "quadrature": (lambda v: v in ("gausslegendre", "riemann-left", "riemann-right", "riemann-middle", "trapezoid"),
                   "must be gausslegendre, riemann-left, riemann-right, riemann-middle or trapezoid"),
    "ggig_reduce": (lambda v: v in ("max", "trapezoid"), "must be max or trapezoid"),
}


def default_batch_size(device: torch.device) -> int:
    """Inputs per forward/backward when `--batch-size auto`. On a 2-core CPU, chunks of at most 16 images of
    224 px ran fastest per sample (36 ms, against 40 at 8 and 52 at 50; benchmarks/bench_explain.py); GPUs start
    large and back off on OOM."""
    return {"cpu": 16, "mps": 16}.get(device.type, 64)


@dataclass
class ExplainOptions:
    """Everything `saliency explain` takes. Unset hyper-parameters (None) take each method's default."""

    inputs: list[str]
    out: Path = Path("saliency_out")
    model: str = "default"
    checkpoint: str | None = None
    methods: list[str] = field(default_factory=lambda: ["smoothgrad"])
    noise: list[float | str] | None = None  # levels, or ["auto"] (smoothtaylor's adaptive noising)
    hyper: dict[str, Any] = field(default_factory=dict)
    target: str = "pred"
    device: str = "auto"
    precision: str = "fp32"
    batch_size: int | None = None  # None: auto
    seed: int = 0
    reduce: str | None = None  # None: each method's default
    score: str = "logit"
    colormap: str | None = None
    alpha: float = 0.5
    percentile: float = 99.0
    overwrite: bool = False
    cheap: bool = False  # each method's recommended cheaper settings (`saliency methods`) instead of its defaults
    data_overrides: dict[str, Any] = field(default_factory=dict)
    labels_file: str | None = None
    stdin_lines: list[str] | None = None


@dataclass
class Job:
    """One (method, noise level) of the run, with its resolved hyper-parameters."""

    method: Method
    hyper: dict[str, Any]
    level: float | None  # the noise level when the run sweeps noise, else None
    reduce: str
    config_id: str = ""

    @property
    def tag(self) -> str:
        return self.method.name + ("" if self.level is None else f".noise{self.level:g}")


@dataclass
class Decoded:
    item: InputItem
    digest: str = ""
    image: Image.Image | None = None
    x: torch.Tensor | None = None
    box: list[float] | None = None
    error: str | None = None
    done: dict[str, list[dict[str, Any]]] | None = None  # finished records by job tag, when skipping


def validate(opts: ExplainOptions) -> list[str]:
    """Check the options before anything is loaded; returns warnings (options no chosen method uses)."""
    if not opts.methods:
        raise UsageError("--method: give at least one method")
    for name in opts.methods:
        if name not in REGISTRY:
            raise UsageError(f"--method {name!r} is not a method (see `saliency methods`)")
    if len(set(opts.methods)) != len(opts.methods):
        raise UsageError("--method lists a method twice")
    if opts.reduce is not None and opts.reduce not in REDUCTIONS:
        raise UsageError(f"--reduce {opts.reduce!r}: expected one of {', '.join(REDUCTIONS)}")
    if opts.precision not in PRECISIONS:
        raise UsageError(f"--precision {opts.precision!r}: expected one of {', '.join(PRECISIONS)}")
    if opts.score not in SCORES:
        raise UsageError(f"--score {opts.score!r}: expected one of {', '.join(SCORES)}")
    if opts.noise is not None:
        if not opts.noise:
            raise UsageError("--noise: give at least one level")
        if "auto" in opts.noise:
            others = [m for m in opts.methods if "noise" in REGISTRY[m].defaults and m != "smoothtaylor"]
            if len(opts.noise) > 1 or others:
                raise UsageError("--noise auto is smoothtaylor's adaptive noising: use it alone, with smoothtaylor"
                                 + (f" (not {', '.join(others)})" if others else ""))
        for level in opts.noise:
            if isinstance(level, str):
                continue
            if not math.isfinite(level) or level < 0:
                raise UsageError(f"--noise {level:g}: noise levels must be zero or positive")
    if opts.batch_size is not None and opts.batch_size < 1:
        raise UsageError("--batch-size must be at least 1 (or auto)")
    if not 0 <= opts.alpha <= 1:
        raise UsageError("--alpha must be between 0 and 1")
    if not 0 < opts.percentile <= 100:
        raise UsageError("--percentile must be in (0, 100]")
    if opts.colormap is not None:
        import matplotlib

        if opts.colormap not in matplotlib.colormaps:
            raise UsageError(f"--colormap {opts.colormap!r} is not a matplotlib colormap")
    parse_target(opts.target)
    for key, value in opts.hyper.items():
        check = HYPER_CHECKS.get(key)
        if check is not None and value is not None and not check[0](value):
            raise UsageError(f"--{key.replace('_', '-')} {value}: {check[1]}")
    used = set().union(*(REGISTRY[m].defaults for m in opts.methods))
    warnings = [f"--{k.replace('_', '-')} is not used by {', '.join(opts.methods)}"
                for k, v in opts.hyper.items() if v is not None and k not in used]
    if opts.noise is not None and "noise" not in used:
        warnings.append(f"--noise is not used by {', '.join(opts.methods)}")
    return warnings


def parse_target(spec: str) -> tuple[str, Any]:
    """`pred`, a class index, `topk:K`, or a class name -> (kind, value)."""
    s = spec.strip()
    if s == "pred":
        return "pred", None
    if s.startswith("topk:"):
        try:
            k = int(s[5:])
        except ValueError:
            raise UsageError(f"--target {spec!r}: topk:K needs a whole number K") from None
        if k < 1:
            raise UsageError(f"--target {spec!r}: K must be at least 1")
        return "topk", k
    if s.lstrip("-").isdigit():
        if int(s) < 0:
            raise UsageError(f"--target {spec!r}: class indices start at 0")
        return "index", int(s)
    if not s:
        raise UsageError("--target: empty value")
    return "name", s


def make_jobs(opts: ExplainOptions, source: dict[str, Any], data_config: dict[str, Any]) -> list[Job]:
    jobs = []
    for name in opts.methods:
        method = REGISTRY[name]
        given = {k: v for k, v in opts.hyper.items() if v is not None and k in method.defaults}
        base = {**method.defaults, **(method.cheap if opts.cheap else {}), **given}
        levels: list[float | None] = [None]
        if "noise" in method.defaults and opts.noise is not None:
            levels = [float(v) for v in opts.noise] if len(opts.noise) > 1 else [None]  # a sweep is numeric
            if len(opts.noise) == 1:
                base["noise"] = opts.noise[0]
        for level in levels:
            hyper = dict(base) if level is None else {**base, "noise": level}
            job = Job(method, hyper, level, opts.reduce or method.reduce)
            identity = {"method": name, "hyper": hyper, "reduce": job.reduce, "target": opts.target,
                        "seed": opts.seed, "score": opts.score, "precision": opts.precision,
                        "model": source, "data_config": data_config, "version": __version__}
            job.config_id = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]
            jobs.append(job)
    return jobs


def _finished(out: Path, overwrite: bool) -> dict[tuple[str, str, str], list[dict[str, Any]]]:
    """Earlier ok records by (key, config id, file digest) whose files all still exist. Output names do not depend
    on the settings, so only the latest record that wrote a file counts (not one that a later run overwrote)."""
    if overwrite:
        return {}
    done: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    claimed: set[str] = set()  # output files written by a later record
    for rec in reversed(read_manifest(out / "manifest.jsonl")):
        if rec.get("status") != "ok":
            continue
        outputs = list((rec.get("outputs") or {}).values())
        latest = not claimed.intersection(outputs)
        claimed.update(outputs)
        if not latest or not rec.get("config") or not all((out / p).is_file() for p in outputs):
            continue
        done.setdefault((rec["key"], rec["config"], rec.get("sha256", "")), []).insert(0, rec)
    return done


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__


def _clean(value: Any) -> Any:
    """JSON-safe numbers: NaN/Inf become None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class Run:
    """One `explain` run: owns the model, the oracle, the thread pools and the manifest."""

    def __init__(self, opts: ExplainOptions, on_record: Callable[[dict[str, Any]], None] | None = None,
                 on_start: Callable[[int], None] | None = None, echo: Any = None) -> None:
        self.opts = opts
        self.warnings = validate(opts)
        self.on_record = on_record
        self.on_start = on_start
        self.echo = echo
        self.counts = {"ok": 0, "error": 0, "skipped": 0}

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

    def run(self) -> dict[str, Any]:
        opts = self.opts
        started = datetime.now(timezone.utc)
        items = discover(opts.inputs, opts.stdin_lines)
        if not items:
            raise UsageError("no images found in the inputs given")
        device = resolve_device(opts.device)
        if opts.precision == "fp16" and device.type == "cpu":
            raise UsageError("--precision fp16 needs a GPU; use bf16 or fp32 on the CPU")
        self._prepare_out()
        model = load_model(opts.model, checkpoint=opts.checkpoint, device=device,
                           overrides=opts.data_overrides, labels_file=opts.labels_file)
        self.model = model
        self.device = device
        batch = opts.batch_size or default_batch_size(device)
        self.oracle = GradientOracle(model.module, batch_size=batch, score=opts.score, precision=opts.precision,
                                     auto_backoff=opts.batch_size is None)
        lo, hi = input_bounds(model.data_config)
        self.ctx = Context(lo=lo, hi=hi, seed=opts.seed).to(device)
        self.jobs = make_jobs(opts, model.source, model.data_config)
        self.finished = _finished(opts.out, opts.overwrite)
        auto_jobs = [job for job in self.jobs if job.hyper.get("weight_noise") == "auto"]
        weight_noise_auto = self._calibrate(items) if auto_jobs else None
        for job in auto_jobs:
            job.hyper["weight_noise"] = weight_noise_auto
        info = {
            "command": sys.argv, "cwd": os.getcwd(), "versions": versions(), "device": str(device),
            "model": model.source,
            "data_config": model.data_config, "options": _jsonable(asdict(opts)),
            "started": started.isoformat(), "inputs": len(items), "batch_size": batch,
        }
        if weight_noise_auto is not None:
            info["weight_noise_auto"] = weight_noise_auto
        write_json(opts.out / "run.json", info)
        if self.on_start is not None:
            self.on_start(len(items))
        self.manifest = Manifest(opts.out / "manifest.jsonl", echo=self.echo)
        interrupted = False
        try:
            self._loop(items)
        except KeyboardInterrupt:
            interrupted = True
            raise
        finally:
            self.manifest.close()
            info.update(finished=datetime.now(timezone.utc).isoformat(), counts=dict(self.counts),
                        interrupted=interrupted, batch_size_final=self.oracle.batch_size)
            write_json(opts.out / "run.json", info)
        return info

    def _calibrate(self, items: list[InputItem], limit: int = 16) -> float:
        """`--weight-noise auto`: the weight noise at which noisy models lose about 5 % of their top-1
        agreement with the clean model, found by bisection on (up to `limit` of) the run's images."""
        from saliency_cli.methods.noisegrad import calibrate_weight_noise

        xs = []
        for item in items:
            try:
                xs.append(preprocess(decode(item.path.read_bytes()), self.model.data_config)[0])
            except (OSError, ImageError):
                continue
            if len(xs) >= limit:
                break
        if not xs:
            raise UsageError("--weight-noise auto needs at least one readable image")
        x = torch.stack(xs).to(self.device)
        return float(calibrate_weight_noise(self.oracle, x, seed=self.opts.seed))

    # -- the pipeline ---------------------------------------------------------------------------------
    def _decode(self, item: InputItem) -> Decoded:
        d = Decoded(item)
        try:
            data = item.path.read_bytes()
        except OSError as e:
            d.error = f"cannot read file: {e.strerror or e}"
            return d
        d.digest = file_digest(data)
        done = {job.tag: self.finished.get((item.key, job.config_id, d.digest)) for job in self.jobs}
        if all(done.values()):
            d.done = {k: v for k, v in done.items() if v}
            return d
        try:
            d.image = decode(data)
            d.x, d.box = preprocess(d.image, self.model.data_config)
        except ImageError as e:
            d.error = str(e)
        except Exception as e:  # noqa: BLE001 - one bad image must not stop the run
            d.error = _first_line(e)
        return d

    def _decoded(self, items: list[InputItem], pool: ThreadPoolExecutor, window: int) -> Iterator[Decoded]:
        pending: deque[Future[Decoded]] = deque()
        it = iter(items)
        for item in it:
            pending.append(pool.submit(self._decode, item))
            if len(pending) >= window:
                break
        while pending:
            yield pending.popleft().result()
            nxt = next(it, None)
            if nxt is not None:
                pending.append(pool.submit(self._decode, nxt))

    def _group_size(self) -> int:
        cost = max(max(1, job.method.cost(job.hyper)) for job in self.jobs)
        return max(1, self.oracle.batch_size // cost)

    def _loop(self, items: list[InputItem]) -> None:
        group_size = self._group_size()
        decoders = ThreadPoolExecutor(max_workers=2, thread_name_prefix="decode")
        self.writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="write")
        interrupted = True
        try:
            group: list[Decoded] = []
            for d in self._decoded(items, decoders, window=max(4, 2 * group_size)):
                if d.error is not None:
                    for job in self.jobs:
                        self._submit_record(self._record(d, job, status="error", error=d.error))
                    continue
                if d.done is not None:
                    for job in self.jobs:
                        for rec in d.done.get(job.tag, []):
                            self._submit_record({**rec, "status": "skipped", "image": str(d.item.path),
                                                 "seconds": 0.0})
                    continue
                group.append(d)
                if len(group) >= group_size:
                    self._explain_group(group)
                    group = []
            if group:
                self._explain_group(group)
            interrupted = False
        finally:
            decoders.shutdown(wait=False, cancel_futures=True)
            # On Ctrl-C, queued writes are dropped and the running one finishes: only whole files remain.
            self.writer.shutdown(wait=True, cancel_futures=interrupted)

    def _targets(self, group: list[Decoded], probs: torch.Tensor) -> list[tuple[int, int]]:
        """(image index in group, class) rows to explain."""
        kind, value = parse_target(self.opts.target)
        num_classes = probs.shape[1]
        if kind == "pred":
            return [(i, int(c)) for i, c in enumerate(probs.argmax(1).tolist())]
        if kind == "topk":
            k = min(value, num_classes)
            top = probs.topk(k, dim=1).indices.tolist()
            return [(i, int(c)) for i, row in enumerate(top) for c in row]
        cls = value if kind == "index" else self.model.class_index(value)
        if cls >= num_classes:
            raise UsageError(f"--target {cls}: the model has {num_classes} classes")
        return [(i, cls) for i in range(len(group))]

    def _explain_group(self, group: list[Decoded]) -> None:
        x = torch.stack([d.x for d in group]).to(self.device)  # type: ignore[misc]
        logits = self.oracle.logits(x)
        probs = logits.softmax(1)
        attach_default_labels(self.model, probs.shape[1])
        rows = self._targets(group, probs)
        idx = torch.tensor([i for i, _ in rows], device=self.device)
        target = torch.tensor([c for _, c in rows], device=self.device)
        xr = x[idx]  # (R, C, H, W): one row per (image, target)
        topk = parse_target(self.opts.target)[0] == "topk"
        panels: dict[int, list[tuple[str, Future[Image.Image | None]]]] = {r: [] for r in range(len(rows))}
        for job in self.jobs:
            done_rows = [r for r, (i, _) in enumerate(rows)
                         if self.finished.get((group[i].item.key, job.config_id, group[i].digest))]
            todo = [r for r in range(len(rows)) if r not in done_rows]
            for r in done_rows:
                i, c = rows[r]
                for rec in self.finished[(group[i].item.key, job.config_id, group[i].digest)]:
                    if rec.get("target") == c:
                        self._submit_record({**rec, "status": "skipped", "seconds": 0.0})
            if not todo:
                continue
            gens = [self._generator(group[rows[r][0]].digest) for r in todo]
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
                    self._submit_record(self._record(group[rows[r][0]], job, status="error", error=_first_line(e)))
                continue
            seconds = (time.perf_counter() - t0) / len(todo)
            for j, r in enumerate(todo):
                i, c = rows[r]
                d = group[i]
                row_stats = {k: _clean(v[j]) for k, v in stats.items()}
                fut = self.writer.submit(self._write_outputs, d, job, c, float(probs[i, c]), maps[j],
                                         row_stats, seconds, topk)
                panels[r].append((job.tag, fut))
        for r, entries in panels.items():
            i, c = rows[r]
            if len(entries) > 1:
                self.writer.submit(self._write_strip, group[i], c if topk else None, entries)

    def _generator(self, digest: str) -> torch.Generator:
        """A fresh generator on the model's device, seeded from (run seed, image bytes) only."""
        return torch.Generator(device=self.device).manual_seed(image_seed(self.opts.seed, digest))

    # -- outputs --------------------------------------------------------------------------------------
    def _paths(self, d: Decoded, name: str) -> tuple[Path, str]:
        rel = f"{d.item.key}.{name}"
        return self.opts.out / rel, rel

    def _params(self, job: Job) -> dict[str, Any]:
        """Every hyper-parameter used, with the run's seed, reduction and score."""
        return {**job.hyper, "seed": self.opts.seed, "reduce": job.reduce, "score": self.opts.score}

    def _record(self, d: Decoded, job: Job, *, status: str, error: str | None = None, **extra: Any) -> dict[str, Any]:
        params = self._params(job)
        rec: dict[str, Any] = {
            "image": str(d.item.path), "key": d.item.key, "status": status, "error": error,
            "method": job.method.name, "params": params, "target": None, "label": None, "score": None,
            "outputs": {}, "crop_box": d.box, "map_shape": None, "seconds": 0.0,
            "sha256": d.digest or None, "config": job.config_id,
        }
        rec.update(extra)
        return rec

    def _write_outputs(self, d: Decoded, job: Job, cls: int, prob: float, m: np.ndarray, stats: dict[str, Any],
                       seconds: float, topk: bool) -> Image.Image | None:
        name = job.tag + (f".class{cls}" if topk else "")
        npy, npy_rel = self._paths(d, name + ".npy")
        png, png_rel = self._paths(d, name + ".png")
        try:
            if not np.isfinite(m).all():
                raise ValueError("the map is not finite (every noise sample gave NaN/Inf gradients)")
            write_npy(npy, m.astype(np.float32))
            assert d.image is not None and d.box is not None
            image = overlay(visible_region(d.image, d.box), m, cmap=self.opts.colormap, alpha=self.opts.alpha,
                            percentile=self.opts.percentile)
            write_png(png, image)
        except Exception as e:  # noqa: BLE001
            self._emit(self._record(d, job, status="error", error=_first_line(e), target=cls,
                                    label=self.model.label(cls), score=prob))
            return None
        params = self._params(job)
        if "sigma" in stats:
            params["sigma"] = stats.pop("sigma")
        rec = self._record(d, job, status="ok", target=cls, label=self.model.label(cls), score=_clean(prob),
                           outputs={"npy": npy_rel, "overlay": png_rel}, map_shape=list(m.shape),
                           seconds=round(seconds, 4))
        rec["params"] = params
        if stats:
            rec["stats"] = stats
        self._emit(rec)
        return image

    def _write_strip(self, d: Decoded, cls: int | None, entries: list[tuple[str, Future[Image.Image | None]]]) -> None:
        assert d.image is not None and d.box is not None
        panels = [("original", visible_region(d.image, d.box))]
        panels += [(tag, fut.result()) for tag, fut in entries if fut.result() is not None]  # type: ignore[misc]
        if len(panels) < 3:
            return
        levels = {tag.split(".noise")[0] for tag, _ in entries}
        name = (f"{next(iter(levels))}.sweep" if len(levels) == 1 else "montage") + (
            f".class{cls}" if cls is not None else "")
        path, _ = self._paths(d, name + ".png")
        write_png(path, strip(panels))

    def _emit(self, rec: dict[str, Any]) -> None:
        self.manifest.append(rec)
        self.counts[rec["status"]] = self.counts.get(rec["status"], 0) + 1
        if self.on_record is not None:
            self.on_record(rec)

    def _submit_record(self, rec: dict[str, Any]) -> None:
        """Records without files still go through the writer thread, so the manifest keeps one order."""
        self.writer.submit(self._emit, rec)


def versions() -> dict[str, str]:
    import timm

    return {"saliency": __version__, "torch": torch.__version__, "timm": timm.__version__,
            "python": sys.version.split()[0]}


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def explain(opts: ExplainOptions, on_record: Callable[[dict[str, Any]], None] | None = None,
            on_start: Callable[[int], None] | None = None, echo: Any = None) -> dict[str, Any]:
    """Run `saliency explain` from Python; returns run.json's content (with `counts`)."""
    return Run(opts, on_record=on_record, on_start=on_start, echo=echo).run()
