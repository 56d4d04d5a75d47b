"""Throughput on a GPU (or a CPU smoke test): images/s of smoothgrad N=50, noisegrad M=10, fusiongrad 10x10 and
integrated-gradients 50 steps on the bundled model and a randomly initialised timm resnet50 at 224 px, for fp32
(plain), fp32 and bf16 on the fast copy (BatchNorm folded, channels_last) and bf16 + torch.compile; GPU memory
peak; the share of time the GPU was busy; bf16's (and fp16's) map rank correlation with fp32.

    python benchmarks/bench_gpu.py --out gpu_results             # on a CUDA machine, within --budget seconds
    python benchmarks/bench_gpu.py --device cpu --quick          # smoke test (small counts, 2 images)

Every figure is computed the way the pipeline computes it: groups of batch_size // width images, targets from
one no-grad pass per group, one generator per image, results back to the host once per group. Rows run in order
of importance and the next row is skipped once --budget seconds have passed (compile rows need 150 s left);
results are rewritten to OUT/gpu_bench.json and OUT/gpu_bench.md after every row, so a run cut short still
reports what it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

FULL = {"smoothgrad": {"samples": 50}, "noisegrad": {"models": 10, "weight_noise": 0.01},
        "fusiongrad": {"models": 10, "samples": 10, "weight_noise": 0.01}, "integrated-gradients": {"steps": 50}}
QUICK = {"smoothgrad": {"samples": 4}, "noisegrad": {"models": 2, "weight_noise": 0.01},
         "fusiongrad": {"models": 2, "samples": 2, "weight_noise": 0.01}, "integrated-gradients": {"steps": 4}}
VARIANTS = {"fp32": ("fp32", False, False), "fp32-fast": ("fp32", True, False), "bf16-fast": ("bf16", True, False),
            "fp16-fast": ("fp16", True, False), "bf16-fast-compile": ("bf16", True, True)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    p.add_argument("--quick", action="store_true", help="small counts and 2 images (a smoke test)")
    p.add_argument("--budget", type=float, default=330.0, help="seconds; later rows are skipped past it")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", REPO / "gpu_results")))
    p.add_argument("--models", default="default,resnet50", help="bundled (default) and/or timm names")
    p.add_argument("--compile", dest="with_compile", action="store_true",
                   help="include the compile rows in --quick mode too (always on otherwise)")
    p.add_argument("--passes", type=int, default=800, help="gradient passes per timed row (full mode)")
    return p.parse_args(argv)


class Bench:
    """The state of one benchmark run: device, models, inputs, the clock and the results written so far."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.device = torch.device(args.device)
        self.cuda = self.device.type == "cuda"
        self.start = time.perf_counter()
        self.rows: list[dict[str, Any]] = []
        self.notes: dict[str, Any] = {"environment": environment(self.device), "quick": args.quick}
        args.out.mkdir(parents=True, exist_ok=True)
        from _samples import load_images

        from saliency_cli.models import load_model

        self.bundled = load_model("default", device=self.device)
        self.cfg = self.bundled.data_config
        images, _ = load_images(6, self.cfg)
        self.images = images.to(self.device)

    def left(self) -> float:
        return self.args.budget - (time.perf_counter() - self.start)

    def model(self, name: str) -> torch.nn.Module:
        if name == "default":
            return self.bundled.module.eval()
        import timm

        torch.manual_seed(0)
        return timm.create_model(name, pretrained=False).eval().to(self.device)

    def inputs(self, n: int) -> torch.Tensor:
        reps = (n + len(self.images) - 1) // len(self.images)
        return self.images.repeat(reps, 1, 1, 1)[:n].contiguous()

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        self.notes["elapsed_s"] = round(time.perf_counter() - self.start, 1)
        write_results(self.args.out, self.rows, self.notes)
        shown = {k: v for k, v in row.items() if k not in ("maps",)}
        print(json.dumps(shown), flush=True)


def environment(device: torch.device) -> dict[str, Any]:
    env: dict[str, Any] = {"torch": torch.__version__, "device": str(device), "threads": torch.get_num_threads()}
    if device.type == "cuda":
        env.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                   cudnn=torch.backends.cudnn.version(), tf32_cudnn=torch.backends.cudnn.allow_tf32,
                   memory_gib=round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1))
    return env


def make_oracle(model: torch.nn.Module, variant: str, batch: int, device: torch.device) -> Any:
    from saliency_cli.oracle import GradientOracle, channels_last_gains, fast_copy

    precision, fast, compiled = VARIANTS[variant]
    copy_ = fast_copy(model, channels_last=channels_last_gains(device))[0] if fast else None
    return GradientOracle(model, batch_size=batch, precision=precision, fast=copy_, compile=compiled,
                          auto_backoff=True)


def explain_all(oracle: Any, method: str, hyper: dict[str, Any], x: torch.Tensor, ctx: Any) -> torch.Tensor:
    """The pipeline's loop over x: groups of batch_size // width, targets from a no-grad pass, results back once
    per group. Returns the abs-sum maps (N, H, W) on the host."""
    from saliency_cli.methods import METHODS
    from saliency_cli.numerics import seeded_generator
    from saliency_cli.pipeline.explain import MAX_GROUP

    m = METHODS[method]
    full = {**m.defaults, **hyper}
    group = max(1, min(MAX_GROUP, oracle.batch_size // m.oracle_width(full)))
    out = []
    for a in range(0, len(x), group):
        xs = x[a:a + group]
        target = oracle.logits(xs).argmax(1)
        gens = [seeded_generator(1000 + a + i, x.device) for i in range(len(xs))]
        maps = m.fn(oracle, xs, target, generators=gens, ctx=ctx, **full).maps
        out.append(maps.abs().sum(1).float().cpu())
    return torch.cat(out)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_row(b: Bench, model_name: str, method: str, variant: str, batch: int) -> dict[str, Any]:
    from saliency_cli.data import input_bounds
    from saliency_cli.methods import METHODS, MethodContext

    model = b.model(model_name)
    hyper = (QUICK if b.args.quick else FULL)[method]
    m = METHODS[method]
    cost = m.cost({**m.defaults, **hyper})
    group = max(1, batch // m.oracle_width({**m.defaults, **hyper}))
    n = 2 if b.args.quick else max(2 * group, b.args.passes // cost)
    ctx = MethodContext(input_bounds(b.cfg), seed=0).to(b.device)
    oracle = make_oracle(model, variant, batch, b.device)
    x = b.inputs(n)
    t0 = time.perf_counter()
    explain_all(oracle, method, hyper, x[:group], ctx)  # warm-up (and the compile, for compiled rows)
    sync(b.device)
    warm = time.perf_counter() - t0
    if b.cuda:
        torch.cuda.reset_peak_memory_stats(b.device)
    t0 = time.perf_counter()
    maps = explain_all(oracle, method, hyper, x, ctx)
    sync(b.device)
    seconds = time.perf_counter() - t0
    row = {"model": model_name, "method": method, "variant": variant, "batch_size": oracle.batch_size,
           "group": group, "images": n, "passes_per_image": cost, "images_per_s": round(n / seconds, 2),
           "passes_per_s": round(n * cost / seconds, 1), "warmup_s": round(warm, 2), "maps": maps[:6]}
    if b.cuda:
        row["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(b.device) / 2**30, 2)
    return row


def busy_share(b: Bench, model_name: str, seconds: float = 4.0) -> dict[str, Any]:
    """Share of wall time the GPU was busy in steady state (smoothgrad bf16 on the fast copy, default batch):
    nvidia-smi's utilization.gpu sampled every 100 ms while the work runs, and the union of the kernels'
    intervals in a torch.profiler trace of one group (the profiler's own overhead makes this one a lower bound)."""
    from saliency_cli.data import input_bounds
    from saliency_cli.methods import MethodContext

    hyper = (QUICK if b.args.quick else FULL)["smoothgrad"]
    oracle = make_oracle(b.model(model_name), "bf16-fast", 64, b.device)
    ctx = MethodContext(input_bounds(b.cfg), seed=0).to(b.device)
    x = b.inputs(8)
    explain_all(oracle, "smoothgrad", hyper, x, ctx)
    sync(b.device)
    out: dict[str, Any] = {"model": model_name, "method": "smoothgrad", "variant": "bf16-fast", "metric": "busy"}
    smi = shutil.which("nvidia-smi")
    if smi:
        index = b.device.index or 0
        proc = subprocess.Popen([smi, f"--id={index}", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                                 "-lms", "100"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        t0, images = time.perf_counter(), 0
        while time.perf_counter() - t0 < seconds:
            explain_all(oracle, "smoothgrad", hyper, x, ctx)
            images += len(x)
        sync(b.device)
        wall = time.perf_counter() - t0
        proc.terminate()
        samples = [float(v) for v in (proc.communicate(timeout=5)[0] or "").split() if v.replace(".", "").isdigit()]
        out.update(nvidia_smi_util_pct=round(statistics.median(samples[2:-1] or samples), 1) if samples else None,
                   images_per_s=round(images / wall, 2))
    out["profiler_busy_pct"] = _profiled_busy(b, oracle, hyper, x[:2], ctx)
    return out


def _profiled_busy(b: Bench, oracle: Any, hyper: dict[str, Any], x: torch.Tensor, ctx: Any) -> float | None:
    try:
        from torch.autograd import DeviceType
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            sync(b.device)
            t0 = time.perf_counter()
            explain_all(oracle, "smoothgrad", hyper, x, ctx)
            sync(b.device)
            wall_us = 1e6 * (time.perf_counter() - t0)
        spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                       if e.device_type == DeviceType.CUDA)
        busy, end = 0.0, float("-inf")
        for s, e in spans:
            if e > end:
                busy += e - max(s, end)
                end = e
        return round(100 * busy / wall_us, 1) if spans else None
    except Exception as e:  # noqa: BLE001 - an informative extra; the profiler's API moves between versions
        print(f"# profiler busy share not measured: {type(e).__name__}: {e}", file=sys.stderr)
        return None


def precision_ranks(b: Bench) -> list[dict[str, Any]]:
    """Spearman (per image) of the fp16/bf16 maps with the fp32 maps of the same rows (same noise)."""
    from saliency_cli.numerics import spearman

    out = []
    rows = [r for r in b.rows if "maps" in r]
    ref = {(r["model"], r["method"]): r["maps"] for r in rows if r["variant"] == "fp32-fast"}
    for r in rows:
        key = (r["model"], r["method"])
        if r["variant"] in ("fp32", "bf16-fast", "fp16-fast") and key in ref:
            rho = spearman(r["maps"], ref[key])
            diff = float(((r["maps"] - ref[key]).flatten(1).abs().amax(1) / ref[key].flatten(1).abs().amax(1)).max())
            out.append({"model": key[0], "method": key[1], "variant": r["variant"],
                        "metric": "maps against fp32-fast", "spearman_min": round(float(rho.min()), 4),
                        "spearman_median": round(float(rho.median()), 4), "max_rel_diff": float(f"{diff:.2e}")})
    return out


def whole_run(b: Bench) -> dict[str, Any]:
    """A whole `explain` run (decode threads, pinned copies, writer thread) of smoothgrad in bf16 on the bundled
    model over the sample images copied to 66 (quick: 2) files: images/s end to end, the model given in memory."""
    from saliency_cli.api import ExplainOptions, explain

    n = 2 if b.args.quick else 66
    hyper = (QUICK if b.args.quick else FULL)["smoothgrad"]
    files = sorted(p for p in (REPO / "sample_images").iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "in"
        folder.mkdir()
        for i in range(n):
            shutil.copy(files[i % len(files)], folder / f"{i:03d}_{files[i % len(files)].name}")
        opts = ExplainOptions(inputs=[str(folder)], out=Path(tmp) / "out", model=b.bundled, methods=["smoothgrad"],
                              hyper=dict(hyper), device=str(b.device), precision="bf16", overwrite=True)
        t0 = time.perf_counter()
        info = explain(opts)
        seconds = time.perf_counter() - t0
    return {"model": "default", "method": "smoothgrad", "variant": "bf16-fast", "metric": "whole explain run",
            "images": n, "images_per_s": round(n / seconds, 2), "counts": info["counts"],
            "fast": info.get("fast"), "group_size": info.get("group_size")}


def plan(b: Bench) -> list[tuple[str, Callable[[], dict[str, Any]], float]]:
    """(name, row, seconds that must be left to start it), in order of importance."""
    models = [m.strip() for m in b.args.models.split(",") if m.strip()]
    batch = 64 if b.cuda else 16
    rows: list[tuple[str, Callable[[], dict[str, Any]], float]] = []
    for model in models:
        for method in FULL:
            for variant in ("fp32", "fp32-fast", "bf16-fast"):
                rows.append((f"{model} {method} {variant}",
                             lambda mo=model, me=method, v=variant: time_row(b, mo, me, v, batch), 10.0))
    big = models[-1]
    if b.cuda:
        rows.append((f"{big} smoothgrad fp16-fast", lambda: time_row(b, big, "smoothgrad", "fp16-fast", batch), 10.0))
        rows.append((f"{big} smoothgrad bf16-fast batch 256",
                     lambda: {**time_row(b, big, "smoothgrad", "bf16-fast", 256), "note": "batch 256"}, 15.0))
        rows.append((f"{big} busy", lambda: busy_share(b, big), 20.0))
    rows.append(("whole run", lambda: whole_run(b), 20.0))
    if b.cuda or b.args.with_compile:
        for model in models[::-1]:
            rows.append((f"{model} smoothgrad bf16-fast-compile",
                         lambda mo=model: time_row(b, mo, "smoothgrad", "bf16-fast-compile", batch), 150.0))
    return rows


def write_results(out: Path, rows: list[dict[str, Any]], notes: dict[str, Any]) -> None:
    clean = [{k: v for k, v in r.items() if k != "maps"} for r in rows]
    (out / "gpu_bench.json").write_text(json.dumps({"notes": notes, "rows": clean}, indent=1, default=str))
    lines = [f"# bench_gpu: {json.dumps(notes['environment'])}", "",
             "| model | method | variant | batch | images/s | passes/s | peak GiB | warm-up s |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in clean:
        if "passes_per_s" in r:
            lines.append(f"| {r['model']} | {r['method']} | {r['variant']} | {r['batch_size']} | {r['images_per_s']} "
                         f"| {r['passes_per_s']} | {r.get('peak_memory_gib', '')} | {r['warmup_s']} |")
    lines.append("")
    lines += [f"- {json.dumps(r)}" for r in clean if "passes_per_s" not in r]
    (out / "gpu_bench.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("bench_gpu: no CUDA device; use --device cpu --quick for a smoke test", file=sys.stderr)
        return 2
    b = Bench(args)
    skipped = []
    for name, row, needs in plan(b):
        if b.left() < needs:
            skipped.append(name)
            continue
        try:
            b.add(row())
        except Exception as e:  # noqa: BLE001 - one failing row must not lose the others
            b.add({"row": name, "error": f"{type(e).__name__}: {e}"[:500]})
        if b.cuda:
            torch.cuda.empty_cache()
    for r in precision_ranks(b):
        b.add(r)
    b.notes["skipped"] = skipped
    write_results(args.out, b.rows, b.notes)
    print(f"bench_gpu: {len(b.rows)} rows in {time.perf_counter() - b.start:.0f} s, skipped {len(skipped)} "
          f"-> {args.out}/gpu_bench.md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
