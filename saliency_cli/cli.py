"""The `saliency` command line: parse options, call the library, report. No tensor code here.

Data (JSON records) goes to stdout; messages and progress go to stderr. Library errors become exit codes in
one place, `main()`: 0 all explained, 1 fatal, 2 usage, 3 some inputs failed, 130 interrupted.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

# Before torch is imported: OpenMP threads that spin while waiting starve each other as soon as anything else
# runs on the machine (a forward pass of the bundled model took 4x longer on 2 shared cores); sleeping waiters
# cost little when the machine is quiet. A value the user set wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from saliency_cli.errors import SaliencyError, UsageError  # noqa: E402
from saliency_cli.options import parse_batch_size

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Attribution maps (SmoothGrad and its successors) for image classifiers.")
err = Console(stderr=True, highlight=False, soft_wrap=True)

EXIT_OK, EXIT_FATAL, EXIT_USAGE, EXIT_PARTIAL, EXIT_INTERRUPTED = 0, 1, 2, 3, 130

# -- options shared between commands, defined once ------------------------------------------------------------
Model = Annotated[str, typer.Option("--model", "-m", help="'default' (bundled EfficientNet-Lite0), a timm "
                                   "name, or a TorchScript file")]
Checkpoint = Annotated[str | None, typer.Option(help="Local weights (.safetensors or .pth state dict) for a "
                                                "timm architecture")]
Device = Annotated[str, typer.Option(help="auto (cuda, mps, cpu), cpu, cuda, cuda:N or mps")]
InputSize = Annotated[str | None, typer.Option(help="Model input size, H,W or S (TorchScript models)")]
Mean = Annotated[str | None, typer.Option(help="Normalisation mean per channel, comma list")]
Std = Annotated[str | None, typer.Option(help="Normalisation std per channel, comma list")]
CropPct = Annotated[float | None, typer.Option(help="Resize to size/crop_pct, then center-crop")]
Interpolation = Annotated[str | None, typer.Option(help="Resize interpolation (bilinear, bicubic, ...)")]
Labels = Annotated[str | None, typer.Option(help="Class names: text file (one per line) or JSON list")]
JsonOut = Annotated[bool, typer.Option("--json", help="Machine-readable output on stdout")]


def _floats(text: str | None, option: str) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"{option} {text!r}: expected numbers separated by commas") from None


def _levels(values: list[float] | None) -> list[float | str] | None:
    return None if values is None else [*values]


def _data_overrides(input_size: str | None, mean: str | None, std: str | None, crop_pct: float | None,
                    interpolation: str | None) -> dict[str, Any]:
    size = _floats(input_size, "--input-size")
    if size is not None and (len(size) not in (1, 2) or any(s < 1 or s != int(s) for s in size)):
        raise UsageError(f"--input-size {input_size!r}: expected S or H,W in whole pixels")
    if crop_pct is not None and not 0 < crop_pct <= 1:
        raise UsageError("--crop-pct must be in (0, 1]")
    return {
        "input_size": None if size is None else (3, int(size[0]), int(size[-1])),
        "mean": _floats(mean, "--mean"), "std": _floats(std, "--std"),
        "crop_pct": crop_pct, "interpolation": interpolation,
    }


@app.command()
def explain(
    inputs: Annotated[list[str], typer.Argument(help="Image files, folders (recursive), or - for paths on stdin")],
    model: Model = "default",
    checkpoint: Checkpoint = None,
    method: Annotated[str, typer.Option(help="Method name, or a comma list (see `saliency methods`)")] = "smoothgrad",
    noise: Annotated[str | None, typer.Option(help="Noise level relative to each image's range; a comma list "
                                              "sweeps, one map per level; smoothtaylor: auto")] = None,
    samples: Annotated[int | None, typer.Option("--samples", "-n", help="Noise samples per image")] = None,
    steps: Annotated[int | None, typer.Option(help="Path points (integrated-gradients, ggig)")] = None,
    baseline: Annotated[str | None, typer.Option(help="black, mean, blur or uniform")] = None,
    quadrature: Annotated[str | None, typer.Option(help="gausslegendre, riemann-left, riemann-right, "
                                                   "riemann-middle or trapezoid")] = None,
    weight_noise: Annotated[str | None, typer.Option(help="Multiplicative weight noise s, or 'auto'")] = None,
    models: Annotated[int | None, typer.Option("--models", help="Noisy models (noisegrad, fusiongrad)")] = None,
    confidence: Annotated[float | None, typer.Option(help="adaptgrad: confidence of staying in range")] = None,
    iterations: Annotated[int | None, typer.Option(help="ggig ascent steps; mask forward passes")] = None,
    step_size: Annotated[float | None, typer.Option(help="ggig ascent step size")] = None,
    ggig_reduce: Annotated[str | None, typer.Option(help="ggig: max or trapezoid over path points")] = None,
    objective: Annotated[str | None, typer.Option(help="smoothtaylor --noise auto: minimise noise (AUTVC) or "
                                                  "aupc")] = None,
    grid: Annotated[int | None, typer.Option(help="mask: cells per side")] = None,
    chains: Annotated[int | None, typer.Option(help="mask: independent chains run as one batch")] = None,
    keep: Annotated[float | None, typer.Option(help="mask: initial on-fraction of cells")] = None,
    target: Annotated[str, typer.Option(help="pred, a class index, a class name, or topk:K")] = "pred",
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder")] = Path("saliency_out"),
    device: Device = "auto",
    precision: Annotated[str, typer.Option(help="fp32, bf16 or fp16 (autocast; maps stay fp32)")] = "fp32",
    batch_size: Annotated[str, typer.Option(help="Most inputs per forward/backward, or auto")] = "auto",
    seed: Annotated[int, typer.Option(help="Run seed; each image's noise also depends on its bytes")] = 0,
    reduce: Annotated[str | None, typer.Option(help="Channel reduction: sum, abs-sum, max-abs or none "
                                               "(default: the method's)")] = None,
    score: Annotated[str, typer.Option(help="Differentiate the logit, prob or logprob")] = "logit",
    colormap: Annotated[str | None, typer.Option(help="matplotlib colormap of the overlays")] = None,
    alpha: Annotated[float, typer.Option(help="Heatmap opacity in the overlays")] = 0.5,
    percentile: Annotated[float, typer.Option(help="Display clipping percentile")] = 99.0,
    overwrite: Annotated[bool, typer.Option(help="Redo images already finished in --out")] = False,
    cheap: Annotated[bool, typer.Option(help="Each method's cheaper recommended settings (see `saliency methods`) "
                                        "instead of its defaults; explicit options still win")] = False,
    input_size: InputSize = None,
    mean: Mean = None,
    std: Std = None,
    crop_pct: CropPct = None,
    interpolation: Interpolation = None,
    labels: Labels = None,
    json_out: JsonOut = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar")] = False,
) -> None:
    """Explain every image: .npy maps, overlays and a manifest under --out."""
    from saliency_cli.api import ExplainOptions
    from saliency_cli.api import explain as run_explain

    batch = parse_batch_size(batch_size)
    weight: float | str | None = weight_noise
    if weight_noise is not None and weight_noise != "auto":
        parsed = _floats(weight_noise, "--weight-noise")
        if not parsed or len(parsed) != 1 or parsed[0] < 0:
            raise UsageError(f"--weight-noise {weight_noise!r}: expected a number >= 0 or auto")
        weight = parsed[0]
    hyper = {"samples": samples, "steps": steps, "baseline": baseline, "quadrature": quadrature,
             "weight_noise": weight, "models": models, "confidence": confidence, "iterations": iterations,
             "step_size": step_size, "ggig_reduce": ggig_reduce,
             "objective": objective, "grid": grid, "chains": chains, "keep": keep}
    stdin_lines = sys.stdin.read().splitlines() if "-" in inputs else None
    opts = ExplainOptions(
        inputs=inputs, out=out, model=model, checkpoint=checkpoint,
        methods=[m.strip() for m in method.split(",") if m.strip()],
        noise=["auto"] if noise == "auto" else _levels(_floats(noise, "--noise")),
        hyper=hyper, target=target, device=device, precision=precision, batch_size=batch, seed=seed,
        reduce=reduce, score=score, colormap=colormap, alpha=alpha, percentile=percentile,
        overwrite=overwrite, cheap=cheap,
        data_overrides=_data_overrides(input_size, mean, std, crop_pct, interpolation), labels_file=labels,
        stdin_lines=stdin_lines,
    )
    show_progress = not (quiet or json_out) and err.is_terminal
    progress = _Progress(show_progress)
    try:
        info = run_explain(opts, on_record=progress.record, on_start=progress.start,
                           echo=sys.stdout if json_out else None)
    finally:
        progress.stop()
    counts = info["counts"]
    if not json_out or not quiet:
        err.print(f"{counts.get('ok', 0)} explained, {counts.get('skipped', 0)} skipped, "
                  f"{counts.get('error', 0)} failed -> {out}")
    if counts.get("error", 0):
        raise typer.Exit(EXIT_PARTIAL)


class _Progress:
    """A rich progress bar on stderr (images per second), or nothing."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.bar: Any = None
        self.seen: set[str] = set()

    def start(self, total: int) -> None:
        if not self.enabled:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(TextColumn("explaining"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[rate]}"), TimeRemainingColumn(), console=err)
        self.task = self.bar.add_task("explain", total=total, rate="")
        self.bar.start()

    def record(self, rec: dict[str, Any]) -> None:
        if rec.get("status") == "error":
            err.print(f"[red]error[/red] {rec['image']} ({rec['method']}): {rec['error']}", markup=True)
        if self.bar is None or rec["key"] in self.seen:
            return
        self.seen.add(rec["key"])
        self.bar.advance(self.task)
        elapsed = self.bar.tasks[0].elapsed or 0.0
        if elapsed > 0:
            self.bar.update(self.task, rate=f"{len(self.seen) / elapsed:.2f} images/s")

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()


@app.command("methods")
def list_methods(json_out: JsonOut = False) -> None:
    """Every method: summary, paper, defaults, whether it is stochastic, and its cost per image."""
    from saliency_cli.methods import REGISTRY

    rows: list[dict[str, Any]] = [{"name": m.name, "summary": m.summary, "paper": m.paper, "defaults": m.defaults,
             "stochastic": m.stochastic, "cost": m.cost(m.defaults), "reduce": m.reduce,
             "needs_gradients": m.needs_gradients, "cheap": m.cheap,
             "cheap_cost": m.cost({**m.defaults, **m.cheap}) if m.cheap else None}
            for m in REGISTRY.values()]
    if json_out:
        typer.echo(json.dumps(rows, indent=2))
        return
    from rich.table import Table

    table = Table(title="saliency methods (cost: passes per image at the defaults)")
    for col in ("name", "summary", "defaults", "stochastic", "cost", "paper"):
        table.add_column(col)
    for r in rows:
        defaults = ", ".join(f"{k}={v}" for k, v in r["defaults"].items()) or "-"
        cost = str(r["cost"]) + (f" (cheap: {r['cheap_cost']})" if r["cheap"] else "")
        table.add_row(r["name"], r["summary"], defaults, "yes" if r["stochastic"] else "no", cost, r["paper"])
    Console().print(table)


@app.command()
def info(
    model: Model = "default",
    checkpoint: Checkpoint = None,
    device: Device = "auto",
    input_size: InputSize = None,
    mean: Mean = None,
    std: Std = None,
    crop_pct: CropPct = None,
    interpolation: Interpolation = None,
    labels: Labels = None,
    json_out: JsonOut = False,
) -> None:
    """The resolved model, its data config, class count and device."""
    import torch

    from saliency_cli.api import versions
    from saliency_cli.models import attach_default_labels, load_model, resolve_device

    dev = resolve_device(device)
    loaded = load_model(model, checkpoint=checkpoint, device=dev, labels_file=labels,
                        overrides=_data_overrides(input_size, mean, std, crop_pct, interpolation))
    c, h, w = loaded.data_config["input_size"]
    with torch.no_grad():
        num_classes = loaded.module(torch.zeros(1, c, h, w, device=dev)).shape[-1]
    attach_default_labels(loaded, num_classes)
    parameters = sum(p.numel() for p in loaded.module.parameters())
    data = {"model": loaded.source, "data_config": loaded.data_config, "num_classes": num_classes,
            "labels": "yes" if loaded.labels else "no", "parameters": parameters,
            "device": str(dev), "versions": versions()}
    if json_out:
        typer.echo(json.dumps(data, indent=2, default=str))
        return
    for k, v in data.items():
        err.print(f"[bold]{k}[/bold]: {v}")


def _register_evaluate() -> None:
    """`saliency evaluate` lives in saliency_cli/evaluate/command.py."""
    from saliency_cli.evaluate.command import evaluate

    app.command("evaluate")(evaluate)


_register_evaluate()


def main() -> None:
    """Entry point: run the app and turn every outcome into one exit code."""
    debug = os.environ.get("SALIENCY_DEBUG") == "1"
    command = typer.main.get_command(app)
    try:
        code = command.main(prog_name="saliency", standalone_mode=False)
        if code == EXIT_INTERRUPTED:  # Typer turns Ctrl-C inside a command into Exit(130)
            err.print("saliency: interrupted", markup=False)
    except typer.Exit as e:
        code = e.exit_code
    except (KeyboardInterrupt, typer.Abort):
        err.print("saliency: interrupted", markup=False)
        code = EXIT_INTERRUPTED
    except SaliencyError as e:
        if debug:
            raise
        err.print(f"saliency: error: {e}", markup=False)
        code = e.exit_code
    except Exception as e:  # noqa: BLE001 - the one place that turns crashes into a line and an exit code
        if hasattr(e, "format_message") and hasattr(e, "exit_code"):  # click's (or Typer's vendored) usage errors
            err.print(f"saliency: error: {e.format_message()}", markup=False)
            code = e.exit_code
        else:
            if debug:
                raise
            first = (str(e).strip().splitlines() or [""])[0]
            err.print(f"saliency: error: {type(e).__name__}: {first} (SALIENCY_DEBUG=1 for the traceback)",
                      markup=False)
            code = EXIT_FATAL
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
