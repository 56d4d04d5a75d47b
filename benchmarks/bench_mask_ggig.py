"""Speed of `mask` (many chains as one batch vs one sequential chain) and `ggig`, bundled model, CPU.

Run by hand, not in CI:

    python benchmarks/bench_mask_ggig.py                         # 2 images, mask 640 passes, ggig estimate
    python benchmarks/bench_mask_ggig.py --mask-passes 5000 --ggig-iterations 100   # the full defaults (slow)
    python benchmarks/bench_mask_ggig.py --quality               # also: cheap vs default maps (slower)

(a) mask: `--chains` chains as one batch (the images' chains batched together through the oracle) against one
    sequential chain per image (the reference's way: batch 1, one forward pass after another), both with the
    same total of forward passes per image. Reported per image and per forward pass.
(b) ggig: seconds per image at the defaults (51 points x 100 ascent steps = 5100 gradient passes), estimated
    from `--ggig-iterations` ascent steps (each step costs the same: one gradient call over all path points,
    so time is linear in the number of steps), and measured in full at the cheap setting of the registry.
Prints a markdown table.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch

from saliency_cli.data import decode, file_digest, image_seed, input_bounds, preprocess
from saliency_cli.methods import REGISTRY, Context
from saliency_cli.models import load_model
from saliency_cli.oracle import GradientOracle

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


def generators(digests: list[str], seed: int = 0) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(image_seed(seed, d)) for d in digests]


def timed(fn: Any) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    """Pearson correlation of two maps (any shape)."""
    a, b = a.flatten().double(), b.flatten().double()
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()).clamp(min=1e-30))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=2, help="sample images to explain")
    ap.add_argument("--mask-passes", type=int, default=640, help="forward passes per image in the mask runs")
    ap.add_argument("--chains", type=int, default=64, help="chains of the batched mask run")
    ap.add_argument("--batch-size", type=int, default=64, help="oracle batch size of the batched runs")
    ap.add_argument("--ggig-iterations", type=int, default=3,
                    help="ascent steps actually run at 51 path points to estimate the 100-step default")
    ap.add_argument("--quality", action="store_true",
                    help="also compare the cheap settings' maps with the defaults' (runs the defaults in full)")
    args = ap.parse_args()

    model = load_model("default", device="cpu")
    x, digests = load_images(args.images, model.data_config)
    lo, hi = input_bounds(model.data_config)
    ctx = Context(lo=lo, hi=hi, seed=0)
    oracle = GradientOracle(model.module, batch_size=args.batch_size)
    target = oracle.logits(x).argmax(1)  # also warms the model up
    b = x.shape[0]
    rows: list[tuple[str, str, str]] = []
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {b} images, oracle batch {args.batch_size}")

    # (a) mask ----------------------------------------------------------------------------------------------
    mask = REGISTRY["mask"]
    hyper = {**mask.defaults, "iterations": args.mask_passes}
    seq_oracle = GradientOracle(model.module, batch_size=1)
    t_seq = 0.0
    for i in range(b):  # the reference: one chain, one image, one forward pass at a time
        dt, _ = timed(lambda i=i: mask.fn(seq_oracle, x[i : i + 1], target[i : i + 1],
                                          generators=generators(digests[i : i + 1]), ctx=ctx,
                                          **{**hyper, "chains": 1}))
        t_seq += dt
    t_bat, _ = timed(lambda: mask.fn(oracle, x, target, generators=generators(digests), ctx=ctx,
                                     **{**hyper, "chains": args.chains}))
    passes = args.mask_passes
    for name, t in (("1 chain, sequential (reference)", t_seq), (f"{args.chains} chains, batched", t_bat)):
        rows.append((f"mask {passes} passes: {name}", f"{t / b:.2f}", f"{1000 * t / (b * passes):.2f} ms/pass"))
    rows.append(("mask speed-up (batched vs sequential)", "", f"{t_seq / t_bat:.1f}x"))
    rows.append((f"mask at the defaults ({mask.defaults['iterations']} passes), extrapolated", "",
                 f"{t_bat / (b * passes) * mask.defaults['iterations']:.1f} s/image"))
    cheap = {**mask.defaults, **mask.cheap}
    dt, _ = timed(lambda: mask.fn(oracle, x, target, generators=generators(digests), ctx=ctx, **cheap))
    rows.append((f"mask cheap {mask.cheap}", f"{dt / b:.2f}", f"{mask.cost(cheap)} passes"))

    # (b) ggig ----------------------------------------------------------------------------------------------
    ggig = REGISTRY["ggig"]
    one = slice(0, 1)  # one image: 51 path points already fill several oracle batches
    reduced = {**ggig.defaults, "iterations": args.ggig_iterations}
    dt, _ = timed(lambda: ggig.fn(oracle, x[one], target[one], generators=generators(digests[one]), ctx=ctx,
                                  **reduced))
    per_step = dt / args.ggig_iterations
    rows.append((f"ggig defaults, {args.ggig_iterations} of {ggig.defaults['iterations']} steps run", f"{dt:.2f}",
                 f"{1000 * dt / ggig.cost(reduced):.2f} ms/pass"))
    rows.append(("ggig defaults (51 x 100), estimated", f"{per_step * ggig.defaults['iterations']:.1f}",
                 f"{ggig.cost(ggig.defaults)} passes"))
    cheap_g = {**ggig.defaults, **ggig.cheap}
    dt, cheap_map = timed(lambda: ggig.fn(oracle, x[one], target[one], generators=generators(digests[one]),
                                          ctx=ctx, **cheap_g))
    rows.append((f"ggig cheap {ggig.cheap}", f"{dt:.2f}", f"{ggig.cost(cheap_g)} passes"))
    flat = ggig.fn(oracle, x[one], target[one], generators=generators(digests[one]), ctx=ctx,
                   **{**cheap_g, "step_size": 0.0})
    rows.append(("ggig cheap: corr(map, map with step size 0)",
                 "", f"{correlation(cheap_map.maps.sum(1), flat.maps.sum(1)):.4f}"))

    if args.quality:
        dt, full_g = timed(lambda: ggig.fn(oracle, x[one], target[one], generators=generators(digests[one]),
                                           ctx=ctx, **ggig.defaults))
        rows.append(("ggig defaults, measured", f"{dt:.1f}", ""))
        rows.append(("ggig corr(cheap, defaults), channel sum", "",
                     f"{correlation(cheap_map.maps.sum(1), full_g.maps.sum(1)):.3f}"))
        full_m = mask.fn(oracle, x, target, generators=generators(digests), ctx=ctx, **mask.defaults)
        cheap_m = mask.fn(oracle, x, target, generators=generators(digests), ctx=ctx, **cheap)
        other = mask.fn(oracle, x, target, generators=generators(digests, seed=1), ctx=ctx, **mask.defaults)
        for i in range(b):
            rows.append((f"mask image {i}: corr(cheap, defaults) / corr(defaults, defaults other seed)", "",
                         f"{correlation(cheap_m.maps[i, 0], full_m.maps[i, 0]):.3f} / "
                         f"{correlation(other.maps[i, 0], full_m.maps[i, 0]):.3f}"))

    print("\n| run | s / image | note |\n| --- | --- | --- |")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} |")


if __name__ == "__main__":
    main()
