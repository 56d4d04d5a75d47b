"""Speed of `mask` (many chains as one batch vs one sequential chain) and `ggig`, bundled model, CPU.

Run by hand, not in CI:

    python benchmarks/bench_mask_ggig.py --threads 1             # 2 images, mask 640 passes, ggig estimate
    python benchmarks/bench_mask_ggig.py --mask-passes 5000 --ggig-iterations 100   # the full defaults (slow)
    python benchmarks/bench_mask_ggig.py --quality               # also: cheap vs default maps (slower)

(a) mask: `--chains` chains as one batch (the images' chains batched together through the oracle) against one
    sequential chain per image (the reference's way: batch 1, one forward pass after another), both with the
    same total of forward passes per image. Reported per image and per forward pass.
(b) ggig: seconds per image at the defaults (51 points x 100 ascent steps = 5100 gradient passes), estimated
    from `--ggig-iterations` ascent steps (each step costs the same: one gradient call over all path points,
    so time is linear in the number of steps), and measured in full at the cheap setting of the registry.
Prints a markdown table with wall and process CPU seconds. On a machine shared with other jobs, use
`--threads 1` and read the CPU column: with 2 threads on 2 busy cores, every parallel region of a small
(batch 1) forward pass waits for a descheduled thread, which inflates the sequential run's wall time several
fold and with it the apparent speed-up.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

import torch
from _samples import load_images  # noqa: E402 - benchmarks/ is the script folder

from saliency_cli.data import image_seed, input_bounds
from saliency_cli.methods import METHODS, MethodContext
from saliency_cli.models import load_model
from saliency_cli.oracle import GradientOracle


def generators(digests: list[str], seed: int = 0) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(image_seed(seed, d)) for d in digests]


class Clock:
    """Wall and process CPU seconds of a call. On a shared machine the CPU seconds of a 1-thread run are the
    steadier figure: they do not grow while other processes hold the cores."""

    def __init__(self, wall: float = 0.0, cpu: float = 0.0) -> None:
        self.wall, self.cpu = wall, cpu

    def __add__(self, other: Clock) -> Clock:
        return Clock(self.wall + other.wall, self.cpu + other.cpu)

    def per(self, n: float) -> str:
        return f"{self.wall / n:.2f} | {self.cpu / n:.2f}"


def timed(fn: Any) -> tuple[Clock, Any]:
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return Clock(time.perf_counter() - w0, time.process_time() - c0), out


def correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    """Pearson correlation of two maps (any shape)."""
    a, b = a.flatten().double(), b.flatten().double()
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()).clamp(min=1e-30))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=2, help="sample images to explain")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--mask-passes", type=int, default=640, help="forward passes per image in the mask runs")
    ap.add_argument("--chains", type=int, default=64, help="chains of the batched mask run")
    ap.add_argument("--batch-sizes", default="8,64", help="oracle batch sizes of the batched mask runs")
    ap.add_argument("--ggig-batch-size", type=int, default=8, help="oracle batch size of the ggig runs (CLI: 8)")
    ap.add_argument("--ggig-iterations", type=int, default=3,
                    help="ascent steps actually run at 51 path points to estimate the 100-step default")
    ap.add_argument("--quality", action="store_true",
                    help="also compare the cheap settings' maps with the defaults' (runs the defaults in full)")
    args = ap.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    model = load_model("default", device="cpu")
    x, digests = load_images(args.images, model.data_config)
    ctx = MethodContext(input_bounds(model.data_config), seed=0)
    target = GradientOracle(model.module, batch_size=8).logits(x).argmax(1)  # also warms the model up
    b = x.shape[0]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {b} images, "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores\n", flush=True)
    print("| run | wall s / image | CPU s / image | note |\n| --- | --- | --- | --- |", flush=True)

    def row(name: str, seconds: str, note: str) -> None:
        print(f"| {name} | {seconds or ' | '} | {note} |", flush=True)

    # (a) mask ----------------------------------------------------------------------------------------------
    mask = METHODS["mask"]
    passes = args.mask_passes
    hyper = {**mask.defaults, "iterations": passes}
    seq_oracle = GradientOracle(model.module, batch_size=1)
    t_seq = Clock()
    for i in range(b):  # the reference: one chain, one image, one forward pass at a time
        dt, _ = timed(lambda i=i: mask.fn(seq_oracle, x[i : i + 1], target[i : i + 1],
                                          generators=generators(digests[i : i + 1]), ctx=ctx,
                                          **{**hyper, "chains": 1}))
        t_seq += dt
    row(f"mask {passes} passes: 1 chain, sequential (reference)", t_seq.per(b),
        f"{1000 * t_seq.cpu / (b * passes):.1f} ms CPU/pass")
    best = Clock(float("inf"), float("inf"))
    for bs in (int(v) for v in args.batch_sizes.split(",")):
        oracle = GradientOracle(model.module, batch_size=bs)
        dt, _ = timed(lambda oracle=oracle: mask.fn(oracle, x, target, generators=generators(digests), ctx=ctx,
                                                    **{**hyper, "chains": args.chains}))
        best = min(best, dt, key=lambda c: c.cpu)
        row(f"mask {passes} passes: {args.chains} chains batched, oracle batch {bs}", dt.per(b),
            f"{1000 * dt.cpu / (b * passes):.1f} ms CPU/pass; speed-up {t_seq.wall / dt.wall:.2f}x wall, "
            f"{t_seq.cpu / dt.cpu:.2f}x CPU")
    row(f"mask defaults ({mask.cost(mask.defaults)} passes), from the best batched run",
        best.per(b * passes / mask.cost(mask.defaults)), "extrapolated (time is linear in the passes)")
    cheap = {**mask.defaults, **mask.cheap}
    row(f"mask cheap {mask.cheap}", best.per(b * passes / mask.cost(cheap)), "extrapolated")

    # (b) ggig ----------------------------------------------------------------------------------------------
    ggig = METHODS["ggig"]
    oracle = GradientOracle(model.module, batch_size=args.ggig_batch_size)
    one = slice(0, 1)  # one image: 51 path points already fill several oracle batches
    reduced = {**ggig.defaults, "iterations": args.ggig_iterations}
    dt, _ = timed(lambda: ggig.fn(oracle, x[one], target[one], generators=generators(digests[one]), ctx=ctx,
                                  **reduced))
    row(f"ggig 51 points x {args.ggig_iterations} steps", dt.per(1), f"{1000 * dt.cpu / ggig.cost(reduced):.1f} ms "
        "CPU/gradient pass")
    row(f"ggig defaults (51 x {ggig.defaults['iterations']} = {ggig.cost(ggig.defaults)} passes)",
        dt.per(args.ggig_iterations / ggig.defaults["iterations"]), "estimated: time is linear in the steps")
    cheap_g = {**ggig.defaults, **ggig.cheap}
    dt, cheap_map = timed(lambda: ggig.fn(oracle, x[one], target[one], generators=generators(digests[one]),
                                          ctx=ctx, **cheap_g))
    row(f"ggig cheap {ggig.cheap} ({ggig.cost(cheap_g)} passes)", dt.per(1), "measured")
    flat = ggig.fn(oracle, x[one], target[one], generators=generators(digests[one]), ctx=ctx,
                   **{**cheap_g, "step_size": 0.0})
    row("ggig cheap: corr(map, same with step size 0), channel sum", "",
        f"{correlation(cheap_map.maps.sum(1), flat.maps.sum(1)):.4f}; score gain "
        f"{float(cheap_map.stats['score_gain'][0]):.2e}")

    if args.quality:
        dt, full_g = timed(lambda: ggig.fn(oracle, x[one], target[one], generators=generators(digests[one]),
                                           ctx=ctx, **ggig.defaults))
        row("ggig defaults, measured", dt.per(1), "")
        row("ggig corr(cheap, defaults), channel sum", "",
            f"{correlation(cheap_map.maps.sum(1), full_g.maps.sum(1)):.3f}")
        oracle = GradientOracle(model.module, batch_size=8)
        full_m = mask.fn(oracle, x, target, generators=generators(digests), ctx=ctx, **mask.defaults)
        cheap_m = mask.fn(oracle, x, target, generators=generators(digests), ctx=ctx, **cheap)
        other = mask.fn(oracle, x, target, generators=generators(digests, seed=1), ctx=ctx, **mask.defaults)
        for i in range(b):
            row(f"mask image {i}: corr(cheap, defaults) / corr(defaults, defaults with another seed)", "",
                f"{correlation(cheap_m.maps[i, 0], full_m.maps[i, 0]):.3f} / "
                f"{correlation(other.maps[i, 0], full_m.maps[i, 0]):.3f}")


if __name__ == "__main__":
    main()
