"""Speed of the weight-noise methods on the bundled model, CPU (run by hand, not in CI).

    python benchmarks/bench_methods.py                       # small settings: 1 image, fusiongrad 3 x 3
    python benchmarks/bench_methods.py --images 2 --models 10 --samples 10   # the issue's 10 x 10

Compares, in seconds per image:
- ours: `fusiongrad` as the CLI runs it (one clean copy of the weights, noise written in place, the N noisy
  inputs of a noisy model batched through the oracle, parameters frozen);
- reference-style: a deep copy of the model, `load_state_dict` of the clean weights before each draw,
  `param.mul_(Normal(1, s).sample(...))` per parameter, one forward/backward per noisy input (batch 1) and the
  abs, channel-summed map averaged, as in the authors' code.
and the cost of one weight-noise draw in both styles. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

import torch
from _samples import load_images  # noqa: E402 - benchmarks/ is the script folder

from saliency_cli.data import image_seed, input_bounds
from saliency_cli.methods import METHODS, MethodContext
from saliency_cli.methods.noisegrad import FUSION_NOISE, weight_generator
from saliency_cli.models import load_model
from saliency_cli.oracle import GradientOracle


def reference_fusiongrad(model: torch.nn.Module, x: torch.Tensor, target: int, s: float, sigma: float,
                         models: int, samples: int) -> torch.Tensor:
    """The authors' loop, for one image x (1, C, H, W): returns the mean abs, channel-summed map (H, W)."""
    net = copy.deepcopy(model).eval()  # the reference perturbs its own copy of the model
    clean = copy.deepcopy(net.state_dict())
    dist = torch.distributions.Normal(1.0, s)
    total = torch.zeros(x.shape[-2:])
    for _ in range(models):
        net.load_state_dict(clean)
        with torch.no_grad():
            for p in net.parameters():
                p.mul_(dist.sample(p.size()))
        for _ in range(samples):
            xn = (x + torch.randn_like(x) * sigma).requires_grad_(True)
            (g,) = torch.autograd.grad(net(xn)[0, target], xn)
            total += g.abs().sum(1)[0]
    return total / (models * samples)


def time_draws(oracle: GradientOracle, model: torch.nn.Module, draws: int, s: float) -> tuple[float, float]:
    """Median seconds per weight-noise draw: ours (`parameters_edited`) and reference-style (load_state_dict of
    a deep copy's clean state, then `mul_` by Normal(1, s) samples). Medians, because the machine is shared."""
    ours: list[float] = []
    with oracle.parameters_edited() as editor:
        editor.scale_by_noise(weight_generator(0, 0, "cpu"), s)  # warm-up
        for m in range(draws):
            t0 = time.perf_counter()
            editor.scale_by_noise(weight_generator(0, m, "cpu"), s)
            ours.append(time.perf_counter() - t0)
    net = copy.deepcopy(model)
    clean = copy.deepcopy(net.state_dict())
    dist = torch.distributions.Normal(1.0, s)
    ref: list[float] = []
    for _ in range(draws + 1):
        t0 = time.perf_counter()
        net.load_state_dict(clean)
        with torch.no_grad():
            for p in net.parameters():
                p.mul_(dist.sample(p.size()))
        ref.append(time.perf_counter() - t0)
    return statistics.median(ours), statistics.median(ref[1:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=1, help="sample images to explain (default 1)")
    ap.add_argument("--models", type=int, default=3, help="noisy models M (default 3; the method's default is 10)")
    ap.add_argument("--samples", type=int, default=3, help="input samples N per model (default 3; default 10)")
    ap.add_argument("--weight-noise", type=float, default=0.2)
    ap.add_argument("--batch-size", type=int, default=8, help="oracle batch size (the CLI's CPU default is 8)")
    ap.add_argument("--draws", type=int, default=10, help="weight-noise draws to time")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--repeats", type=int, default=1, help="repeats per image; the fastest is kept (default 1)")
    ap.add_argument("--skip-reference", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    loaded = load_model("default", device="cpu")
    model = loaded.module.eval()
    x, digests = load_images(args.images, loaded.data_config)
    ctx = MethodContext(input_bounds(loaded.data_config), seed=0)
    oracle = GradientOracle(model, batch_size=args.batch_size)
    target = oracle.logits(x).argmax(1)
    hyper = {"weight_noise": args.weight_noise, "models": args.models, "noise": FUSION_NOISE, "samples": args.samples}
    mn = f"{args.models} x {args.samples}"
    rows: list[tuple[str, str, float]] = []

    fusion = METHODS["fusiongrad"].fn
    fusion(oracle, x[:1], target[:1], generators=[torch.Generator().manual_seed(0)], ctx=ctx,
           **{**hyper, "models": 1, "samples": 1})  # warm-up

    def run_ours(i: int) -> None:  # one image at a time, as the CLI groups a 100-pass method on the CPU
        gen = torch.Generator().manual_seed(image_seed(0, digests[i]))
        fusion(oracle, x[i:i + 1], target[i:i + 1], generators=[gen], ctx=ctx, **hyper)

    def run_reference(i: int) -> None:
        sigma = float(FUSION_NOISE * (x[i].max() - x[i].min()))
        reference_fusiongrad(model, x[i:i + 1], int(target[i]), args.weight_noise, sigma, args.models, args.samples)

    # Interleaved (ours, reference) per image and repeat, best repeat kept: on a shared machine this compares
    # the two under the same load, and the minimum is the least disturbed measurement.
    impls = {"ours": run_ours} if args.skip_reference else {"ours": run_ours, "reference": run_reference}
    best = {name: [float("inf")] * len(x) for name in impls}
    for _ in range(args.repeats):
        for i in range(len(x)):
            for name, fn in impls.items():
                t0 = time.perf_counter()
                fn(i)
                best[name][i] = min(best[name][i], time.perf_counter() - t0)
    ours = statistics.mean(best["ours"])
    rows.append((f"fusiongrad {mn}, ours (batch {args.batch_size})", "s / image", ours))
    if "reference" in best:
        ref = statistics.mean(best["reference"])
        rows.append((f"fusiongrad {mn}, reference-style (batch 1)", "s / image", ref))
        rows.append(("speed-up (reference / ours)", "x", ref / ours))

    draw_ours, draw_ref = time_draws(oracle, model, args.draws, args.weight_noise)
    n_params = sum(p.numel() for p in model.parameters())
    rows.append((f"weight-noise draw, ours ({n_params / 1e6:.2f} M parameters)", "ms / draw", 1e3 * draw_ours))
    rows.append(("weight-noise draw, reference-style (load_state_dict + mul_)", "ms / draw", 1e3 * draw_ref))
    rows.append(("weight draws' share of ours", "%", 100 * args.models * draw_ours / ours))

    load = f", load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    print(f"\ntorch {torch.__version__}, {torch.get_num_threads()} threads, {len(x)} image(s), CPU{load}\n")
    print("| measurement | unit | value |")
    print("| --- | --- | ---: |")
    for name, unit, value in rows:
        print(f"| {name} | {unit} | {value:.3f} |")


if __name__ == "__main__":
    main()
