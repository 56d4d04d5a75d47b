"""The floor of an input-gradient method on the CPU: one batched forward+backward, plain against the oracle's
private fast copy (BatchNorm folded, channels_last), bf16 autocast, oneDNN off, and no_grad against
inference_mode for forward-only passes; with the gradients' accuracy against an fp64 reference (run by hand).

    python benchmarks/bench_floor.py                    # bundled model, 16 noisy inputs of 224 px, 5 rounds
    python benchmarks/bench_floor.py --rounds 3 --compile   # also torch.compile (compile time + per-pass time)

Rows are timed interleaved (A B C ... A B C ...) and reported as medians, so that a machine shared with other
jobs slows every row alike. Accuracy: max |g - g64| / max |g64| and ||g - g64|| / ||g64|| over the inputs (worst
input), g64 from a float64 copy of the model; for single gradients of a ReLU6 network the first is dominated by
units whose activation flips across a kink under rounding, so it is large for every fp32 variant alike.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from _samples import load_images  # noqa: E402 - benchmarks/ is the script folder

from saliency_cli.models import load_model
from saliency_cli.numerics import spearman
from saliency_cli.oracle import GradientOracle, fast_copy


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--inputs", type=int, default=16, help="noisy inputs per pass (default 16, the CPU batch)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds; medians are reported")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    p.add_argument("--compile", action="store_true", help="also time torch.compile of the fast copy")
    p.add_argument("--no-accuracy", action="store_true", help="skip the fp64 comparison")
    p.add_argument("--chunk-sweep", action="store_true", help="also the fast copy's cost per input by chunk size")
    return p.parse_args(argv)


def noisy_inputs(n: int, cfg: dict[str, Any]) -> torch.Tensor:
    """n noisy copies of the sample images (noise 0.15 of each image's range), as smoothgrad draws them."""
    x, _ = load_images(6, cfg)
    g = torch.Generator().manual_seed(0)
    reps = x.repeat((n + len(x) - 1) // len(x), 1, 1, 1)[:n]
    span = (reps.flatten(1).amax(1) - reps.flatten(1).amin(1)).view(-1, 1, 1, 1)
    return reps + 0.15 * span * torch.randn(reps.shape, generator=g)


def channels_last_copy(model: torch.nn.Module) -> GradientOracle:
    """channels_last without folding: a deep copy with its 4-D weights and its inputs in channels_last."""
    from saliency_cli.oracle import FastModel

    clone = copy.deepcopy(model).to(memory_format=torch.channels_last)
    return GradientOracle(clone, batch_size=10_000, fast=FastModel(clone, [], channels_last=True))


def variants(model: torch.nn.Module, example: torch.Tensor) -> dict[str, GradientOracle]:
    big = 10_000  # every input in one pass
    fold, _ = fast_copy(model, channels_last=False, example=example[:2])
    fold_cl, _ = fast_copy(model, channels_last=True, example=example[:2])
    return {
        "plain (NCHW, unfolded)": GradientOracle(model, batch_size=big),
        "channels_last, unfolded": channels_last_copy(model),
        "folded, NCHW": GradientOracle(model, batch_size=big, fast=fold),
        "folded + channels_last (default)": GradientOracle(model, batch_size=big, fast=fold_cl),
        "plain, bf16 autocast": GradientOracle(model, batch_size=big, precision="bf16"),
        "folded + channels_last, bf16 autocast": GradientOracle(model, batch_size=big, fast=fold_cl,
                                                                 precision="bf16"),
    }


@contextlib.contextmanager
def no_onednn() -> Iterator[None]:
    with torch.backends.mkldnn.flags(enabled=False):
        yield


def interleaved(rows: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Median seconds of each row, the rows timed one after the other in every round (after one warm-up)."""
    for fn in rows.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in rows}
    for _ in range(rounds):
        for name, fn in rows.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def accuracy(model: torch.nn.Module, oracles: dict[str, GradientOracle], x: torch.Tensor,
             target: torch.Tensor) -> dict[str, tuple[float, float]]:
    """(max-relative, relative L2) error of each variant's gradients against float64, worst input."""
    m64 = copy.deepcopy(model).double().eval()
    for p in m64.parameters():
        p.requires_grad_(False)
    refs = []
    for a in range(0, len(x), 8):
        xs = x[a:a + 8].double().requires_grad_(True)
        (g,) = torch.autograd.grad(m64(xs).gather(1, target[a:a + 8].view(-1, 1)).sum(), xs)
        refs.append(g)
    ref = torch.cat(refs).flatten(1)
    out = {}
    for name, oracle in oracles.items():
        g = oracle.gradients(x, target)[0].double().flatten(1)
        err = g - ref
        out[name] = (float((err.abs().amax(1) / ref.abs().amax(1)).max()),
                     float((err.norm(dim=1) / ref.norm(dim=1)).max()))
    return out


def map_accuracy(loaded: Any, fast: GradientOracle) -> list[tuple[str, str, float, float]]:
    """Maps of the six sample images (smoothgrad N=16, integrated-gradients 16 steps): plain fp32 and the fast
    copy against an fp64 copy of the model (same noise), and the fast copy against plain. (method, pair,
    max-relative, relative L2), worst image."""
    from saliency_cli.data import image_seed, input_bounds
    from saliency_cli.methods import METHODS, MethodContext

    model = loaded.module.eval()
    x, digests = load_images(6, loaded.data_config)
    ctx = MethodContext(input_bounds(loaded.data_config), seed=0)
    m64 = copy.deepcopy(model).double().eval()
    oracles = {"plain": GradientOracle(model, batch_size=16), "fast": fast, "fp64": GradientOracle(m64, batch_size=16)}
    with torch.no_grad():
        target = model(x).argmax(1)
    rows = []
    for method, hyper in (("smoothgrad", {"samples": 16, "noise": 0.15}), ("integrated-gradients", {"steps": 16})):
        fn, full = METHODS[method].fn, {**METHODS[method].defaults, **hyper}
        maps = {}
        for name, oracle in oracles.items():
            gens = [torch.Generator().manual_seed(image_seed(0, d)) for d in digests]
            xs = x.double() if name == "fp64" else x
            maps[name] = fn(oracle, xs, target, generators=gens, ctx=ctx, **full).maps.double().flatten(1)
        for a, b in (("plain", "fp64"), ("fast", "fp64"), ("fast", "plain")):
            err = maps[a] - maps[b]
            rows.append((method, f"{a} vs {b}", float((err.abs().amax(1) / maps[b].abs().amax(1)).max()),
                         float((err.norm(dim=1) / maps[b].norm(dim=1)).max())))
    return rows


def compile_figures(model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor, rounds: int) -> dict[str, float]:
    """Seconds of the first (compiling) call and median seconds of later calls, compiled fast copy vs eager."""
    fast, _ = fast_copy(model, channels_last=True, example=x[:2])
    eager = GradientOracle(model, batch_size=10_000, fast=fast)
    compiled = GradientOracle(model, batch_size=10_000, fast=fast, compile=True)
    t0 = time.perf_counter()
    compiled.gradients(x, target)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    compiled.logits(x)
    first_logits = time.perf_counter() - t0
    med = interleaved({"eager": lambda: eager.gradients(x, target), "compiled": lambda: compiled.gradients(x, target)},
                      rounds)
    return {"compile_gradients_s": first, "compile_logits_s": first_logits, "eager_s": med["eager"],
            "compiled_s": med["compiled"]}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_model("default", device="cpu")
    model = loaded.module.eval()
    x = noisy_inputs(args.inputs, loaded.data_config)
    with torch.no_grad():
        target = model(x).argmax(1)
    oracles = variants(model, x)
    fast = oracles["folded + channels_last (default)"]
    rows: dict[str, Callable[[], object]] = {k: (lambda o=o: o.gradients(x, target)) for k, o in oracles.items()}
    rows["folded + channels_last, oneDNN off"] = lambda: _with(no_onednn, lambda: fast.gradients(x, target))
    grads = interleaved(rows, args.rounds)
    plain = oracles["plain (NCHW, unfolded)"]
    fwd: dict[str, Callable[[], object]] = {
        "forward, plain, no_grad": lambda: plain.logits(x),
        "forward, folded + channels_last, no_grad": lambda: fast.logits(x),
        "forward, folded + channels_last, inference_mode": lambda: _with(torch.inference_mode,
                                                                          lambda: fast.logits(x)),
    }
    forwards = interleaved(fwd, args.rounds)
    print(f"# bundled model, {args.inputs} noisy inputs of 224 px, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {args.rounds} interleaved rounds (medians)\n")
    base = grads["plain (NCHW, unfolded)"]
    print("| forward + backward (input gradients) | ms / input | vs plain |")
    print("| --- | ---: | ---: |")
    for name, t in grads.items():
        print(f"| {name} | {1e3 * t / args.inputs:.1f} | {t / base:.2f}x |")
    fbase = forwards["forward, plain, no_grad"]
    print("\n| forward only (logits) | ms / input | vs plain |")
    print("| --- | ---: | ---: |")
    for name, t in forwards.items():
        print(f"| {name} | {1e3 * t / args.inputs:.1f} | {t / fbase:.2f}x |")
    if not args.no_accuracy:
        acc = accuracy(model, oracles, x, target)
        print("\n| gradients against fp64 | max-relative error | relative L2 error |")
        print("| --- | ---: | ---: |")
        for name, (mx, l2) in acc.items():
            print(f"| {name} | {mx:.1e} | {l2:.1e} |")
        ref = oracles["plain (NCHW, unfolded)"].gradients(x, target)[0].abs().sum(1)
        print("\n| maps of the sample images | pair | max-relative | relative L2 |")
        print("| --- | --- | ---: | ---: |")
        for method, pair, mx, l2 in map_accuracy(loaded, fast):
            print(f"| {method} | {pair} | {mx:.1e} | {l2:.1e} |")
        for name in ("plain, bf16 autocast", "folded + channels_last, bf16 autocast"):
            rho = spearman(oracles[name].gradients(x, target)[0].abs().sum(1), ref)
            print(f"\nsingle-gradient Spearman, {name} vs fp32: min {float(rho.min()):.3f}, "
                  f"median {float(rho.median()):.3f}")
    if args.chunk_sweep:
        xs = noisy_inputs(50, loaded.data_config)
        with torch.no_grad():
            ts = model(xs).argmax(1)
        sweep = {c: GradientOracle(model, batch_size=c, fast=fast.fast) for c in (8, 10, 13, 17, 25, 50)}
        med = interleaved({c: (lambda o=o: o.gradients(xs, ts)) for c, o in sweep.items()}, args.rounds)
        print("\nfast copy, 50 inputs in chunks of at most c: " + ", ".join(f"{c}: {1e3 * t / 50:.1f} ms / input"
                                                                       for c, t in med.items()))
    if args.compile:
        c = compile_figures(model, x, target, args.rounds)
        print(f"\ntorch.compile of the fast copy: first gradient call {c['compile_gradients_s']:.1f} s, first "
              f"logits call {c['compile_logits_s']:.1f} s; then {1e3 * c['compiled_s'] / args.inputs:.1f} ms / input "
              f"against {1e3 * c['eager_s'] / args.inputs:.1f} eager")
    return 0


def _with(ctx: Callable[[], contextlib.AbstractContextManager[Any]], fn: Callable[[], object]) -> object:
    with ctx():
        return fn()


if __name__ == "__main__":
    sys.exit(main())
