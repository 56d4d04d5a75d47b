"""Planning a run: the options, their validation (before anything is loaded), the jobs and the targets.

A job is one (method, noise level) of the run with its resolved hyper-parameters and its identity (`config_id`),
a hash of everything that determines its maps; finished work is recognised by it (runfolder/finished.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from saliency_cli import __version__
from saliency_cli.errors import UsageError, unknown
from saliency_cli.methods.settings import CONVERGENCE_SETTINGS, SETTINGS

PRECISIONS = ("fp32", "bf16", "fp16")
SCORES = ("logit", "prob", "logprob")
REDUCTIONS = ("sum", "abs-sum", "max-abs", "none", "mean-abs-sum")


TAG = re.compile(r"[A-Za-z0-9_-]{1,40}")


@dataclass
class ExplainOptions:
    """Everything `saliency explain` takes. Unset hyper-parameters (None) take each method's default.

    hyper: method hyper-parameters by settings-table name (`samples`, `weight_noise`, ...); `noise` is a list of
    levels (several: a sweep, one map per level) or ["auto"] (smoothtaylor's adaptive noising).
    model_options: `load_model`'s options. For an in-memory model, `data_overrides` gives (or completes) its data
    config: a plain module needs input_size, mean and std there; a timm model or a LoadedModel brings its own.
    """

    inputs: list[str]
    out: Path = Path("saliency_out")
    model: Any = "default"  # a model spec (models.load_model), or an in-memory nn.Module / LoadedModel (api.explain)
    checkpoint: str | None = None
    model_options: dict[str, Any] = field(default_factory=dict)  # num_classes, in_chans, img_size, model_kwargs, ...
    methods: list[str] = field(default_factory=lambda: ["smoothgrad"])
    noise: list[float | str] | None = None
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
    shard: str | None = None  # `I/N`; None: from the launcher's environment (torchrun, Slurm), else the whole run
    max_pixels: int = 150_000_000  # decoded pixels of one image at most (data.MAX_PIXELS)
    overlay_size: int = 2048  # overlays are drawn on a copy at most this long on its long side
    # Speed: maps equal within float32 rounding as the network amplifies it; part of a job's identity
    fast: bool = True  # passes on a private copy with BatchNorm folded into the convolutions (+ channels_last)
    compile: bool = False  # torch.compile the network once per run
    workers: int | None = None  # decoding threads; None: min(8, CPU cores)
    tag: str | None = None  # a label for this configuration: its own file names (KEY.METHOD@TAG.npy) and column


@dataclass
class Job:
    """One (method, noise level) of the run, with its resolved hyper-parameters."""

    method: Any  # methods.base.Method
    hyper: dict[str, Any]
    level: float | None  # the noise level when the run sweeps noise, else None
    reduce: str
    config_id: str = ""
    label: str | None = None  # `--tag`: a configuration's own file names and method label

    @property
    def tag(self) -> str:
        """The name of the job's output files: `method`, `method+base` over another base than the gradient
        (`smoothgrad+integrated-gradients`), `@LABEL` with `--tag LABEL`, then `.noiseLEVEL` in a sweep."""
        base = self.hyper.get("base")
        name = self.method.name + ("" if base in (None, "gradient") else f"+{base}")
        name += "" if self.label is None else f"@{self.label}"
        return name + ("" if self.level is None else f".noise{self.level:g}")


def _check_methods(opts: ExplainOptions, methods: Collection[str]) -> None:
    if not opts.methods:
        raise UsageError("--method: give at least one method")
    for name in opts.methods:
        if name not in methods:
            raise unknown("--method", "method", name, methods, see="see saliency methods")
    if len(set(opts.methods)) != len(opts.methods):
        raise UsageError("--method lists a method twice")


def _check_choices(opts: ExplainOptions) -> None:
    for option, value, allowed in (("--reduce", opts.reduce, REDUCTIONS), ("--precision", opts.precision, PRECISIONS),
                                   ("--score", opts.score, SCORES)):
        if value is not None and value not in allowed:
            raise unknown(option, "value", value, allowed)
    if opts.batch_size is not None and opts.batch_size < 1:
        raise UsageError("--batch-size must be at least 1 (or auto)")
    if not 0 <= opts.alpha <= 1:
        raise UsageError("--alpha must be between 0 and 1")
    if not 0 < opts.percentile <= 100:
        raise UsageError("--percentile must be in (0, 100]")
    if opts.colormap is not None:
        import matplotlib

        if opts.colormap not in matplotlib.colormaps:
            raise unknown("--colormap", "colormap", opts.colormap, sorted(matplotlib.colormaps),
                          see="a matplotlib colormap")
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", opts.device.strip()):
        raise UsageError(f"--device {opts.device!r}: expected auto, cpu, cuda, cuda:N or mps")
    if not str(opts.out).strip():
        raise UsageError("-o/--out: give a folder")
    if opts.max_pixels < 1:
        raise UsageError("--max-pixels must be at least 1")
    if opts.overlay_size < 16:
        raise UsageError("--overlay-size must be at least 16 pixels")
    if opts.workers is not None and opts.workers < 1:
        raise UsageError("--workers must be at least 1")


def _check_noise(opts: ExplainOptions, methods: dict[str, Any]) -> None:
    if opts.noise is not None and "auto" in opts.noise:
        others = [m for m in opts.methods if "noise" in methods[m].defaults and m != "smoothtaylor"]
        if len(opts.noise) > 1 or others:
            raise UsageError("--noise auto is smoothtaylor's adaptive noising: use it alone, with smoothtaylor"
                             + (f" (not {', '.join(others)})" if others else ""))
        if opts.hyper.get("noise_unit") == "absolute":
            raise UsageError("--noise auto searches an absolute sigma already: drop --noise-unit absolute")


def _check_smoothers(opts: ExplainOptions, methods: dict[str, Any]) -> None:
    """--reduce mean-abs-sum, -n auto and --models auto only where a method offers them."""
    if opts.reduce == "mean-abs-sum":
        bad = [m for m in opts.methods if methods[m].reduce != "mean-abs-sum"]
        if bad:
            raise UsageError(f"--reduce mean-abs-sum is the display of noisegrad and fusiongrad (not {', '.join(bad)})")
    if opts.hyper.get("samples") == "auto":
        if "fusiongrad" in opts.methods:
            raise UsageError("-n auto: fusiongrad's rounds run over noisy models; use --models auto")
        if "smoothtaylor" in opts.methods and opts.noise is not None and "auto" in opts.noise:
            raise UsageError("-n auto needs a fixed --noise with smoothtaylor (not --noise auto)")


def check_inputs(opts: ExplainOptions) -> None:
    """Every input named (and every path read from stdin for `-`) exists: a usage error the command line gives
    before torch loads (the run's discovery says the same later for the library's callers)."""
    named = [arg for arg in opts.inputs if arg != "-"]
    if "-" in opts.inputs:
        named += [line.strip() for line in opts.stdin_lines or [] if line.strip()]
    for arg in named:
        if not os.path.lexists(arg):
            raise UsageError(f"input {arg} does not exist")


def check_options(opts: ExplainOptions, method_names: Collection[str]) -> None:
    """Every check that needs neither torch nor the method objects: method names, choices, numbers, each setting
    against its row of the settings table, the target's syntax. The command line runs it before importing torch."""
    _check_methods(opts, method_names)
    _check_choices(opts)
    if opts.noise is not None:
        SETTINGS["noise"].validate(opts.noise)
    parse_target(opts.target)
    if opts.tag is not None and not TAG.fullmatch(opts.tag):
        raise UsageError(f"--tag {opts.tag!r}: use 1 to 40 letters, digits, '_' or '-' (it goes into file names)")
    for key, value in opts.hyper.items():
        if value is None:
            continue
        if key not in SETTINGS:
            raise UsageError(f"unknown setting {key!r} (see `saliency methods`)")
        SETTINGS[key].validate(value)


def _check_combinations(jobs: list[Job]) -> None:
    """Settings that are each valid but not together."""
    for job in jobs:
        if job.hyper.get("quadrature") == "trapezoid" and int(job.hyper.get("steps", 2)) < 2:
            raise UsageError(f"{job.method.name}: --quadrature trapezoid needs --steps 2 or more")


def validate(opts: ExplainOptions, methods: dict[str, Any]) -> list[str]:
    """Check the options before anything is loaded; returns warnings (options no chosen method uses)."""
    check_options(opts, methods)
    _check_noise(opts, methods)
    _check_smoothers(opts, methods)
    jobs = make_jobs(opts, methods)
    _check_combinations(jobs)
    used = set().union(*(job.hyper for job in jobs), *(methods[m].uses(opts.hyper.get("base")) for m in opts.methods))
    given = [k for k, v in opts.hyper.items() if v is not None] + (["noise"] if opts.noise is not None else [])
    return [f"{SETTINGS[k].flag} is not used by {', '.join(opts.methods)}"
            + (" (only with -n auto or --models auto)" if k in CONVERGENCE_SETTINGS else "")
            for k in given if k not in used or (k in CONVERGENCE_SETTINGS and not any(k in j.hyper for j in jobs))]


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


def job_identity(job: Job, opts: ExplainOptions, source: dict[str, Any], data_config: dict[str, Any]) -> str:
    """A 16-hex-digit hash of everything that determines a job's maps (method, settings, target, seed, score,
    precision, the fast copy and compilation (they move maps by rounding that this kind of network amplifies),
    model source with its files' hashes, data config, version)."""
    identity = {"method": job.method.name, "hyper": job.hyper, "reduce": job.reduce, "target": opts.target,
                "seed": opts.seed, "score": opts.score, "precision": opts.precision,
                "model": source, "data_config": data_config, "version": __version__}
    if not opts.fast or opts.compile:  # the defaults keep the identities of earlier runs
        identity.update(fast=opts.fast, compile=opts.compile)
    if job.label is not None:  # another tag: other files, so not the same finished work
        identity["tag"] = job.label
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


def make_jobs(opts: ExplainOptions, methods: dict[str, Any]) -> list[Job]:
    """One job per method and noise level, hyper-parameters = defaults < cheap (with --cheap) < given."""
    jobs = []
    for name in opts.methods:
        method = methods[name]
        base = method.hyper_for(opts.hyper, opts.cheap)  # over another base (--base), its settings too
        levels: list[float | None] = [None]
        if "noise" in method.defaults and opts.noise is not None:
            levels = [float(v) for v in opts.noise] if len(opts.noise) > 1 else [None]  # a sweep is numeric
            if len(opts.noise) == 1:
                base["noise"] = opts.noise[0]
        for level in levels:
            hyper = dict(base) if level is None else {**base, "noise": level}
            jobs.append(Job(method, hyper, level, opts.reduce or _default_reduce(method, hyper, methods),
                            label=opts.tag))
    return jobs


def _default_reduce(method: Any, hyper: dict[str, Any], methods: dict[str, Any]) -> str:
    """The method's channel reduction; a smoother whose default is the gradient's `abs-sum` takes its base's
    over another base (integrated-gradients, input-x-gradient, ggig: the signed `sum`)."""
    base = hyper.get("base")
    if method.reduce == "abs-sum" and base not in (None, "gradient") and base in methods:
        return str(methods[base].reduce)
    return str(method.reduce)


def assign_identities(jobs: list[Job], opts: ExplainOptions, source: dict[str, Any],
                      data_config: dict[str, Any]) -> None:
    """Give every job its config id, once its run-level values (e.g. weight noise `auto`) are resolved."""
    for job in jobs:
        job.config_id = job_identity(job, opts, source, data_config)
