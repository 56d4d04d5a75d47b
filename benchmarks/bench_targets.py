"""The speed targets of the throughput issue on the CPU, in one process, rows interleaved (A B A B), medians.

    python benchmarks/bench_targets.py                 # the table (about 10 minutes on 2 cores)
    python benchmarks/bench_targets.py --rounds 2 --memory --maps   # also peak memory and map differences

Rows (whole `explain` runs through the API, the bundled model given in memory so that loading is not timed;
decoding, the fast copy, writing .npy/.png/manifest all count):
  smoothgrad N=50 against (a) the plain unfolded NCHW floor at its best chunk (a hand-written batched
  forward+backward of the same noisy samples) and (b) Captum NoiseTunnel(Saliency(abs=False)) at its best
  nt_samples_batch_size; noisegrad M=16 against smoothgrad N=16 on 8 images; fusiongrad 10x10 against
  smoothgrad N=100; integrated-gradients 50 steps against smoothgrad N=50.
--memory: peak resident memory of `saliency explain` smoothgrad N=50 on 8 images in a fresh process, this tree
  against the --baseline commit (`git archive REV`, read only; 59d976e is the tree before the throughput work).
--maps: noisegrad's maps with the new grouping (16 images per group, fast copy on and off) against the
  baseline's (one image per group), largest max |a - b| / max |b| over the sample images.
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
SAMPLES = REPO / "sample_images"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians are reported")
    p.add_argument("--images", type=int, default=6, help="images of the smoothgrad rows (default: all 6)")
    p.add_argument("--memory", action="store_true", help="also peak resident memory (fresh processes)")
    p.add_argument("--maps", action="store_true", help="also old vs new grouping map differences")
    p.add_argument("--no-table", action="store_true", help="skip the timing table")
    p.add_argument("--baseline", default="HEAD", help="the commit --memory and --maps compare with")
    return p.parse_args(argv)


def image_folder(n: int, root: Path) -> Path:
    """n sample images in a folder (the six, then copies under other names: same bytes, same noise)."""
    files = sorted(p for p in SAMPLES.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    folder = root / f"images{n}"
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        src = files[i % len(files)]
        shutil.copy(src, folder / f"{i:02d}_{src.name}")
    return folder


def explain_row(loaded: Any, folder: Path, out: Path, method: str, **hyper: Any) -> Callable[[], float]:
    """A whole `explain` run (in memory model, overwrite), returning its seconds."""
    from saliency_cli.api import ExplainOptions, explain

    noise = hyper.pop("noise", None)
    opts = ExplainOptions(inputs=[str(folder)], out=out, model=loaded, methods=[method], hyper=hyper,
                          noise=None if noise is None else [noise], device="cpu", overwrite=True)

    def run() -> float:
        t0 = time.perf_counter()
        info = explain(opts)
        assert info["counts"].get("error", 0) == 0, info["counts"]
        return time.perf_counter() - t0

    return run


def floor_row(model: torch.nn.Module, x: torch.Tensor, seeds: list[int], chunk: int, n: int = 50,
              noise: float = 0.15) -> Callable[[], float]:
    """The plain floor: unfolded NCHW model, the same noisy samples, `chunk` per forward/backward."""
    from saliency_cli.methods.base import gaussian, relative_sigma

    sigma = relative_sigma(x, noise)
    with torch.no_grad():
        targets = model(x).argmax(1).tolist()
    noisy = [x[i] + gaussian([torch.Generator().manual_seed(seeds[i])], n, x[i:i + 1])[0] * sigma[i]
             for i in range(len(x))]

    def run() -> float:
        flags = [p.requires_grad for p in model.parameters()]
        for p in model.parameters():
            p.requires_grad_(False)
        t0 = time.perf_counter()
        for i, xs in enumerate(noisy):
            total = torch.zeros_like(xs[0])
            for a in range(0, n, chunk):
                xc = xs[a:a + chunk].detach().requires_grad_(True)
                (g,) = torch.autograd.grad(model(xc)[:, targets[i]].sum(), xc)
                total += g.sum(0)
        seconds = time.perf_counter() - t0
        for p, f in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(f)
        return seconds

    return run


def captum_row(model: torch.nn.Module, x: torch.Tensor, batch: int | None, n: int = 50,
               noise: float = 0.15) -> Callable[[], float]:
    from captum.attr import NoiseTunnel, Saliency

    from saliency_cli.methods.base import relative_sigma

    tunnel = NoiseTunnel(Saliency(model))
    sigma = relative_sigma(x, noise)
    with torch.no_grad():
        targets = model(x).argmax(1).tolist()

    def run() -> float:
        t0 = time.perf_counter()
        for i in range(len(x)):
            tunnel.attribute(x[i:i + 1], nt_type="smoothgrad", nt_samples=n, nt_samples_batch_size=batch,
                             stdevs=float(sigma[i]), target=targets[i], abs=False)
        return time.perf_counter() - t0

    return run


def best(rows: dict[Any, Callable[[], float]], reps: int = 2) -> Any:
    """The key of the fastest row (median of `reps`, after a warm-up)."""
    med = {}
    for key, fn in rows.items():
        fn()
        med[key] = statistics.median(fn() for _ in range(reps))
    print(f"# sweep: {', '.join(f'{k}: {v:.2f} s' for k, v in med.items())}", file=sys.stderr)
    return min(med, key=med.__getitem__)


def interleaved(rows: dict[str, Callable[[], float]], rounds: int) -> dict[str, float]:
    for fn in rows.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {k: [] for k in rows}
    for r in range(rounds):
        for name, fn in rows.items():
            times[name].append(fn())
        print(f"# round {r + 1}: " + ", ".join(f"{k} {v[-1]:.2f}" for k, v in times.items()), file=sys.stderr)
    return {k: statistics.median(v) for k, v in times.items()}


def table(args: argparse.Namespace, root: Path) -> None:
    from _samples import load_images

    from saliency_cli.data import image_seed
    from saliency_cli.models import load_model

    loaded = load_model("default", device="cpu")
    model = loaded.module.eval()
    k = args.images
    x, digests = load_images(k, loaded.data_config)
    seeds = [image_seed(0, d) for d in digests]
    one = x[:1]
    chunk = best({c: floor_row(model, one, seeds[:1], c) for c in (8, 16, 25, 50)})
    batch = best({b: captum_row(model, one, b) for b in (8, 16, 25, None)})
    f6, f8, f16, f3 = image_folder(k, root), image_folder(8, root), image_folder(16, root), image_folder(3, root)
    rows = {
        "sg50 explain": explain_row(loaded, f6, root / "o1", "smoothgrad", samples=50, noise=0.15),
        f"floor chunk {chunk}": floor_row(model, x, seeds, chunk),
        f"captum batch {batch}": captum_row(model, x, batch),
        "noisegrad M=16 x8": explain_row(loaded, f8, root / "o2", "noisegrad", models=16, weight_noise=0.01),
        "sg16 x8": explain_row(loaded, f8, root / "o3", "smoothgrad", samples=16),
        "noisegrad M=16 x16": explain_row(loaded, f16, root / "o8", "noisegrad", models=16, weight_noise=0.01),
        "sg16 x16": explain_row(loaded, f16, root / "o9", "smoothgrad", samples=16),
        "fusiongrad 10x10 x3": explain_row(loaded, f3, root / "o4", "fusiongrad", models=10, samples=10,
                                           weight_noise=0.01),
        "sg100 x3": explain_row(loaded, f3, root / "o5", "smoothgrad", samples=100),
        "ig50 x3": explain_row(loaded, f3, root / "o6", "integrated-gradients", steps=50),
        "sg50 x3": explain_row(loaded, f3, root / "o7", "smoothgrad", samples=50),
    }
    med = interleaved(rows, args.rounds)
    count = {"x8": 8, "x16": 16, "x3": 3}
    per = {name: t / next((v for c, v in count.items() if name.endswith(c)), k) for name, t in med.items()}
    sg = per["sg50 explain"]
    print(f"\nCPU ({torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}), bundled model, "
          f"{args.rounds} interleaved rounds, medians, seconds per image\n")
    print("| what | seconds / image | ratio | target |")
    print("| --- | ---: | ---: | --- |")
    print(f"| explain smoothgrad N=50 (whole run) | {sg:.3f} | | |")
    print(f"| plain unfolded NCHW floor, best chunk ({chunk}) | {per[f'floor chunk {chunk}']:.3f} | "
          f"{sg / per[f'floor chunk {chunk}']:.2f}x | <= 0.6x |")
    print(f"| Captum NoiseTunnel(Saliency), best nt_samples_batch_size ({batch}) | "
          f"{per[f'captum batch {batch}']:.3f} | {per[f'captum batch {batch}'] / sg:.2f}x faster | >= 2x |")
    print(f"| noisegrad M=16 / smoothgrad N=16, 8 images | {per['noisegrad M=16 x8']:.3f} / {per['sg16 x8']:.3f} | "
          f"{per['noisegrad M=16 x8'] / per['sg16 x8']:.2f}x | <= 1.2x |")
    print(f"| the same, 16 images (full groups: no filler rows) | {per['noisegrad M=16 x16']:.3f} / "
          f"{per['sg16 x16']:.3f} | {per['noisegrad M=16 x16'] / per['sg16 x16']:.2f}x | <= 1.2x |")
    print(f"| fusiongrad 10x10 / smoothgrad N=100 | {per['fusiongrad 10x10 x3']:.3f} / {per['sg100 x3']:.3f} | "
          f"{per['fusiongrad 10x10 x3'] / per['sg100 x3']:.2f}x | <= 1.2x |")
    print(f"| integrated-gradients 50 steps / smoothgrad N=50 | {per['ig50 x3']:.3f} / {per['sg50 x3']:.3f} | "
          f"{per['ig50 x3'] / per['sg50 x3']:.2f}x | <= 1.1x |")


def committed_tree(root: Path, rev: str) -> Path:
    """The code of commit `rev` (`git archive`, nothing in the repository changes) in root/head."""
    head = root / "head"
    if head.exists():
        return head
    head.mkdir()
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(head)], input=archive, check=True)
    return head


def cli(tree: Path | None, args: list[str]) -> dict[str, Any]:
    """`saliency ARGS` in a fresh process with `tree` first on the path (None: this tree); its peak RSS."""
    code = ("import resource, sys, json; from saliency_cli.cli import main\n"
            "try:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
            "print(json.dumps({'maxrss_kb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}), file=sys.stderr)")
    env = {**os.environ, "PYTHONPATH": str(tree or REPO)}
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env,
                          cwd=tree or REPO)
    last = [line for line in proc.stderr.splitlines() if line.startswith("{")]
    if proc.returncode or not last:
        raise RuntimeError(proc.stderr[-2000:])
    return json.loads(last[-1])


def memory(root: Path, rev: str) -> None:
    head = committed_tree(root, rev)
    folder = image_folder(8, root)
    common = ["explain", str(folder), "-n", "50", "--device", "cpu", "-q", "--overwrite"]
    now = cli(None, [*common, "-o", str(root / "mem_now")])["maxrss_kb"]
    then = cli(head, [*common, "-o", str(root / "mem_head")])["maxrss_kb"]
    print(f"\npeak resident memory, smoothgrad N=50 on 8 images: {now / 1024:.0f} MiB now, "
          f"{then / 1024:.0f} MiB at {rev} ({now / then:.2f}x)")


def maps(root: Path, rev: str) -> None:
    import numpy as np

    head = committed_tree(root, rev)
    common = ["explain", str(SAMPLES), "--method", "noisegrad", "--models", "10", "--weight-noise", "0.01",
              "--reduce", "none", "--device", "cpu", "-q", "--overwrite"]
    runs = {"baseline (1 image / group)": (head, []), "new grouping, --no-fast": (None, ["--no-fast"]),
            "new grouping, fast copy": (None, [])}
    out: dict[str, dict[str, Any]] = {}
    for name, (tree, extra) in runs.items():
        folder = root / f"maps_{len(out)}"
        cli(tree, [*common, "-o", str(folder), *extra])
        recs = [json.loads(line) for line in (folder / "manifest.jsonl").read_text().splitlines()]
        out[name] = {Path(r["image"]).name: np.load(folder / r["outputs"]["npy"]) for r in recs
                     if r.get("status") == "ok"}
    ref = out["baseline (1 image / group)"]
    for name in list(runs)[1:]:
        worst = max(float(np.abs(out[name][k] - ref[k]).max() / np.abs(ref[k]).max()) for k in ref)
        print(f"noisegrad maps, {name} vs {rev}: largest max|a - b| / max|b| = {worst:.1e}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if not args.no_table:
            table(args, root)
        if args.memory:
            memory(root, args.baseline)
        if args.maps:
            maps(root, args.baseline)
    return 0


if __name__ == "__main__":
    sys.exit(main())
