"""SmoothGrad speed on the CPU: the plain floor, this library, and Captum, in one process (run by hand, not in CI).

    python benchmarks/bench_explain.py                      # full: 6 sample images, N=50, 3 repeats
    python benchmarks/bench_explain.py --images 2 --chunks 8,16,50 --repeats 1   # a quick check

(a) floor: a hand-written batched forward+backward of the same noisy samples (x + noise precomputed, parameters'
    requires_grad off, eval mode, autograd.grad of the summed target logits), at its best chunk size.
(b) this library: saliency_cli.methods.METHODS["smoothgrad"].fn through GradientOracle(batch_size=
    default_batch_size(cpu)); (b') the whole `explain` API (decode, preprocess, write .npy/.png/manifest).
(c) Captum: NoiseTunnel(Saliency(model)), nt_type "smoothgrad", the same absolute sigma, abs=False, with the default
    nt_samples_batch_size (all samples at once) and with its best one.

Every figure is the best (minimum) of --repeats timings, in seconds per image. The chunk table (seconds per noisy
sample for each chunk size) is what `api.default_batch_size` is chosen from.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images-dir", type=Path, default=REPO / "sample_images", help="folder of images")
    p.add_argument("--images", type=int, default=0, help="use the first K images (0: all)")
    p.add_argument("--samples", "-n", type=int, default=50, help="noise samples per image")
    p.add_argument("--noise", type=float, default=0.15, help="noise level, relative to each image's range")
    p.add_argument("--chunks", default="4,8,10,16,25,50", help="chunk sizes (noisy inputs per forward/backward)")
    p.add_argument("--captum-chunks", default=None, help="nt_samples_batch_size values to try (default: --chunks)")
    p.add_argument("--repeats", type=int, default=3, help="timings per figure; the minimum is reported")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    p.add_argument("--no-captum", action="store_true", help="skip (c)")
    p.add_argument("--no-explain", action="store_true", help="skip (b')")
    return p.parse_args(argv)


def best_of(repeats: int, fn: Callable[[], object]) -> float:
    """The minimum wall time of `repeats` calls of fn (after fn has run once as a warm-up by the caller)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


@contextlib.contextmanager
def params_frozen(model: torch.nn.Module) -> Iterator[None]:
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(f)


def floor_smoothgrad(model: torch.nn.Module, noisy: torch.Tensor, target: int, chunk: int) -> torch.Tensor:
    """(a): mean input gradient over precomputed noisy samples (N, C, H, W), `chunk` samples per pass."""
    total = torch.zeros_like(noisy[0])
    for a in range(0, noisy.shape[0], chunk):
        xc = noisy[a:a + chunk].detach().requires_grad_(True)
        (g,) = torch.autograd.grad(model(xc)[:, target].sum(), xc)
        total += g.sum(0)
    return total / noisy.shape[0]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from saliency_cli.api import ExplainOptions, explain
    from saliency_cli.data import decode, discover, file_digest, image_seed, input_bounds, preprocess
    from saliency_cli.methods import METHODS, MethodContext
    from saliency_cli.methods.base import gaussian, relative_sigma
    from saliency_cli.models import load_model
    from saliency_cli.oracle import GradientOracle, default_batch_size

    device = torch.device("cpu")
    chunks = [int(c) for c in args.chunks.split(",")]
    captum_chunks = [int(c) for c in (args.captum_chunks or args.chunks).split(",")]
    n, noise, reps = args.samples, args.noise, args.repeats

    t0 = time.perf_counter()
    loaded = load_model("default", device=device)
    load_seconds = time.perf_counter() - t0
    model = loaded.module.eval()
    items = discover([str(args.images_dir)])
    if args.images:
        items = items[: args.images]
    xs, targets, seeds = [], [], []
    for item in items:
        data = item.path.read_bytes()
        xs.append(preprocess(decode(data), loaded.data_config)[0])
        seeds.append(image_seed(0, file_digest(data)))
    x = torch.stack(xs).to(device)
    with torch.no_grad():
        targets = model(x).argmax(1).tolist()
    k = len(items)
    ctx = MethodContext(input_bounds(loaded.data_config), seed=0)
    sigma = relative_sigma(x, noise)  # (B,) absolute sigma per image
    # The same noisy samples the library draws: each image's generator seeded from (seed 0, its bytes).
    noisy = [x[i] + gaussian([torch.Generator().manual_seed(seeds[i])], n, x[i:i + 1])[0] * sigma[i]
             for i in range(k)]
    print(f"# {k} images, N={n}, noise {noise}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"model load {load_seconds:.2f} s", file=sys.stderr)

    # -- (a) the floor and (b) the library, at every chunk size ---------------------------------------------------
    def run_floor(chunk: int) -> list[torch.Tensor]:
        with params_frozen(model):
            return [floor_smoothgrad(model, noisy[i], targets[i], chunk) for i in range(k)]

    def run_library(chunk: int) -> list[torch.Tensor]:
        oracle = GradientOracle(model, batch_size=chunk)
        fn = METHODS["smoothgrad"].fn
        return [fn(oracle, x[i:i + 1], torch.tensor([targets[i]]),
                   generators=[torch.Generator().manual_seed(seeds[i])], ctx=ctx, noise=noise, samples=n).maps[0]
                for i in range(k)]

    floor_per_chunk: dict[int, float] = {}
    library_per_chunk: dict[int, float] = {}
    for chunk in chunks:
        run_floor(chunk)  # warm-up (kernel selection for this batch shape)
        floor_per_chunk[chunk] = best_of(reps, lambda c=chunk: run_floor(c)) / k
        run_library(chunk)
        library_per_chunk[chunk] = best_of(reps, lambda c=chunk: run_library(c)) / k
        print(f"# chunk {chunk}: floor {floor_per_chunk[chunk]:.3f} s/image, library "
              f"{library_per_chunk[chunk]:.3f} s/image", file=sys.stderr)

    # the library computes what the floor computes (same samples, same statistic)
    ref, lib = run_floor(chunks[0]), run_library(chunks[0])
    worst = max(float((a - b).abs().max() / a.abs().max()) for a, b in zip(ref, lib, strict=True))
    best_chunk = min(floor_per_chunk, key=floor_per_chunk.__getitem__)
    a_time = floor_per_chunk[best_chunk]
    default_chunk = default_batch_size(device)
    if default_chunk in library_per_chunk:
        b_time = library_per_chunk[default_chunk]
    else:
        run_library(default_chunk)
        b_time = best_of(reps, lambda: run_library(default_chunk)) / k

    # -- (b') the whole explain API ---------------------------------------------------------------------------------
    bp_time = None
    if not args.no_explain:
        with tempfile.TemporaryDirectory() as tmp:
            opts = ExplainOptions(inputs=[str(item.path) for item in items], out=Path(tmp) / "out",
                                  methods=["smoothgrad"], noise=[noise], hyper={"samples": n}, device="cpu",
                                  overwrite=True)

            times = []
            for _ in range(reps):
                t0 = time.perf_counter()
                load_model("default", device=device)  # explain() loads the model itself: take that out
                load = time.perf_counter() - t0
                t0 = time.perf_counter()
                explain(opts)
                times.append((time.perf_counter() - t0 - load) / k)
            bp_time = min(times)

    # -- (c) Captum -------------------------------------------------------------------------------------------------
    c_default = c_best = None
    c_best_chunk = None
    if not args.no_captum:
        from captum.attr import NoiseTunnel, Saliency

        tunnel = NoiseTunnel(Saliency(model))

        def run_captum(batch: int | None) -> list[torch.Tensor]:
            return [tunnel.attribute(x[i:i + 1], nt_type="smoothgrad", nt_samples=n, nt_samples_batch_size=batch,
                                     stdevs=float(sigma[i]), target=targets[i], abs=False)[0] for i in range(k)]

        run_captum(None)
        c_default = best_of(reps, lambda: run_captum(None)) / k
        captum_per_chunk = {}
        for chunk in captum_chunks:
            if chunk >= n:  # the same as the default (all samples at once)
                captum_per_chunk[chunk] = c_default
                continue
            run_captum(chunk)
            captum_per_chunk[chunk] = best_of(reps, lambda c=chunk: run_captum(c)) / k
        c_best_chunk = min(captum_per_chunk, key=captum_per_chunk.__getitem__)
        c_best = min(c_default, captum_per_chunk[c_best_chunk])

    # -- report -----------------------------------------------------------------------------------------------------
    print(f"SmoothGrad, bundled EfficientNet-Lite0, {k} images 224 px, N={n}, noise {noise}, CPU "
          f"({torch.get_num_threads()} threads), best of {reps}\n")
    print("| | seconds / image | ratio |")
    print("| --- | ---: | --- |")
    print(f"| (a) plain batched forward+backward, best chunk {best_chunk} | {a_time:.3f} | |")
    print(f"| (b) saliency smoothgrad (METHODS fn, chunk {default_chunk}) | {b_time:.3f} | "
          f"b/a = {b_time / a_time:.2f} |")
    if bp_time is not None:
        print(f"| (b') saliency `explain` API (decode, write, manifest) | {bp_time:.3f} | "
              f"b'/b = {bp_time / b_time:.2f} |")
    if c_default is not None and c_best is not None:
        print(f"| (c) Captum NoiseTunnel(Saliency), default batch (all {n}) | {c_default:.3f} | "
              f"c/b = {c_default / b_time:.2f} |")
        print(f"| (c) Captum NoiseTunnel(Saliency), best nt_samples_batch_size {c_best_chunk} | {c_best:.3f} | "
              f"c/b = {c_best / b_time:.2f} |")
    print(f"\nlibrary vs floor, same samples: largest difference {worst:.1e} of the map's maximum\n")
    print("| chunk size | floor ms / sample | library ms / sample |")
    print("| ---: | ---: | ---: |")
    for chunk in chunks:
        mark = " (fastest)" if chunk == best_chunk else ""
        floor_ms, library_ms = 1000 * floor_per_chunk[chunk] / n, 1000 * library_per_chunk[chunk] / n
        print(f"| {chunk}{mark} | {floor_ms:.1f} | {library_ms:.1f} |")
    ok_floor = b_time <= 1.10 * a_time
    ok_captum = c_default is None or c_default >= 2 * b_time
    print(f"\ntargets: b within 1.10x of a: {'yes' if ok_floor else 'NO'}; "
          f"b at least 2x faster than Captum's default: {'yes' if ok_captum else 'NO' if c_default else 'not run'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
