"""Option types shared by the commands, defined once (`Annotated[...]`) with their help panel, placeholder and
completion, and the parsers of option text. Closed choices arrive as text and are checked here or by the pipeline,
naming the closest value on a typo. The method hyper-parameter options of `explain` are generated from the
settings table (methods/settings.py) by `setting_option`. No torch here."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Annotated, Any

import typer

from saliency_cli.cli import complete
from saliency_cli.errors import UsageError, unknown
from saliency_cli.methods.settings import Setting
from saliency_cli.pipeline.plan import PRECISIONS, REDUCTIONS, SCORES  # noqa: F401 - the choices of explain

# The panels of `--help` (cli/help.py draws one table per panel)
MODEL, METHOD, NOISE, OUTPUTS, RUN = "Model", "Method", "Noise and samples", "Outputs", "Run"
INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "lanczos", "box", "hamming")


def closed(value: str | None, option: str, allowed: tuple[str, ...]) -> str | None:
    """`value` if it is one of `allowed` (None stays None), else a usage error naming the closest."""
    if value is not None and value not in allowed:
        raise unknown(option, "value", value, allowed)
    return value


def setting_option(row: Setting) -> inspect.Parameter:
    """The `explain` option of one settings-table row: its flags, placeholder, help (choices listed), panel and
    completion; the value arrives as text (None: not given) and is parsed and checked by the row."""
    names = [row.flag] + ([row.short] if row.short else [])
    option = typer.Option(*names, help=row.help_text, show_default=False, metavar=row.metavar,
                          rich_help_panel=row.panel, autocompletion=complete.setting_completer(row.name))
    return inspect.Parameter(row.name, inspect.Parameter.KEYWORD_ONLY, default=None,
                             annotation=Annotated[str | None, option])


Model = Annotated[str, typer.Option("--model", "-m", metavar="NAME", rich_help_panel=MODEL,
                                    help="'default' (the bundled EfficientNet-Lite0), a timm name, torchvision:NAME, "
                                    "local-dir:PATH, hf-hub:NAME, a Hugging Face transformers folder or "
                                    "transformers:ORG/NAME (cache), or a TorchScript/.pt2 file")]
Checkpoint = Annotated[str | None, typer.Option(metavar="FILE", rich_help_panel=MODEL,
                                                help="Local weights (.safetensors, or a .pth/.pt state dict or "
                                                "training checkpoint, read without unpickling code)")]
Device = Annotated[str, typer.Option(metavar="NAME", rich_help_panel=RUN, help="auto (cuda, mps, cpu), cpu, cuda, "
                                     "cuda:N or mps", autocompletion=complete.choices(complete.DEVICES))]
BatchSize = Annotated[str, typer.Option(metavar="N|auto", rich_help_panel=RUN, help="Most inputs per "
                                        "forward/backward, or auto (backs off on out-of-memory)")]
InputSize = Annotated[str | None, typer.Option(metavar="H,W", rich_help_panel=MODEL,
                                               help="Model input size (TorchScript/exported models)")]
Mean = Annotated[str | None, typer.Option(metavar="X,X,X", rich_help_panel=MODEL,
                                          help="Normalisation mean per channel")]
Std = Annotated[str | None, typer.Option(metavar="X,X,X", rich_help_panel=MODEL,
                                         help="Normalisation std per channel")]
CropPct = Annotated[float | None, typer.Option(metavar="X", rich_help_panel=MODEL,
                                               help="Resize to size/crop_pct, then center-crop")]
Interpolation = Annotated[str | None, typer.Option(metavar="NAME", rich_help_panel=MODEL,
                                                   help="Resize interpolation: " + ", ".join(INTERPOLATIONS),
                                                   autocompletion=complete.choices(INTERPOLATIONS))]
Labels = Annotated[str | None, typer.Option(metavar="FILE", rich_help_panel=MODEL,
                                            help="Class names: a text file (one per line) or a JSON list")]
JsonOut = Annotated[bool, typer.Option("--json", rich_help_panel=OUTPUTS, help="Machine-readable output on stdout")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", rich_help_panel=OUTPUTS, help="No progress bar")]
ShardOption = Annotated[str | None, typer.Option("--shard", metavar="I/N", rich_help_panel=RUN,
                                                 help="This process's share of the inputs (default: from torchrun "
                                                 "or Slurm, else everything)")]
OutDir = Annotated[str, typer.Option("--out", "-o", metavar="DIR", rich_help_panel=OUTPUTS, help="Output folder")]


def out_path(text: str | None, option: str = "-o/--out") -> Path | None:
    """An output folder given on the command line (None stays None); empty text is a usage error (Path("") would
    be the current folder)."""
    if text is None:
        return None
    if not text.strip():
        raise UsageError(f"{option}: give a folder (empty text is not one)")
    return Path(text)
# Model options: how to build the architecture a checkpoint needs (models.load_model's `options`).
NumClasses = Annotated[int | None, typer.Option(metavar="N", rich_help_panel=MODEL, show_default=False,
                                                help="Classes of the model's head, e.g. 10 for a checkpoint "
                                                "trained on 10 classes (timm, torchvision)")]
InChans = Annotated[int | None, typer.Option(metavar="N", rich_help_panel=MODEL, show_default=False,
                                             help="Input channels of the timm model: 1 for a grayscale model "
                                             "(images are then converted to gray)")]
ImgSize = Annotated[int | None, typer.Option(metavar="N", rich_help_panel=MODEL, show_default=False,
                                             help="Input side of the timm model (models of a fixed size, such as "
                                             "ViTs); also the input size")]
ModelKwargs = Annotated[str | None, typer.Option("--model-kwargs", metavar="JSON", rich_help_panel=MODEL,
                                                 help="JSON object of further arguments to timm.create_model or "
                                                 "the torchvision builder, e.g. '{\"drop_rate\": 0}'",
                                                 show_default=False)]
Weights = Annotated[str | None, typer.Option(metavar="NAME", rich_help_panel=MODEL, show_default=False,
                                             help="torchvision weights (e.g. IMAGENET1K_V2) whose preprocessing "
                                             "and class names to use, with -m torchvision:NAME")]


def parse_floats(text: str | None, option: str) -> list[float] | None:
    """`1,2.5,3` -> [1.0, 2.5, 3.0]; None stays None."""
    if text is None:
        return None
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"{option} {text!r}: expected numbers separated by commas") from None


def parse_batch_size(text: str) -> int | None:
    """`auto` -> None (the device's default with OOM back-off), else a whole number >= 1."""
    if text == "auto":
        return None
    try:
        value = int(text)
    except ValueError:
        raise UsageError(f"--batch-size {text!r}: expected a whole number or auto") from None
    if value < 1:
        raise UsageError("--batch-size must be at least 1 (or auto)")
    return value


def data_overrides(input_size: str | None, mean: str | None, std: str | None, crop_pct: float | None,
                   interpolation: str | None) -> dict[str, Any]:
    """The preprocessing options as data-config overrides (None: not given)."""
    size = parse_floats(input_size, "--input-size")
    if size is not None and (len(size) not in (1, 2) or any(s < 1 or s != int(s) for s in size)):
        raise UsageError(f"--input-size {input_size!r}: expected S or H,W in whole pixels")
    if crop_pct is not None and not 0 < crop_pct <= 1:
        raise UsageError("--crop-pct must be in (0, 1]")
    closed(interpolation, "--interpolation", INTERPOLATIONS)
    values = {"--mean": parse_floats(mean, "--mean"), "--std": parse_floats(std, "--std")}
    for option, vals in values.items():
        if vals is not None and (not vals or any(v != v or v in (float("inf"), float("-inf")) for v in vals)):
            raise UsageError(f"{option}: expected finite numbers separated by commas")
    return {
        "input_size": None if size is None else (3, int(size[0]), int(size[-1])),
        "mean": values["--mean"], "std": values["--std"], "crop_pct": crop_pct, "interpolation": interpolation,
    }


def model_options(num_classes: int | None, in_chans: int | None, img_size: int | None, model_kwargs: str | None,
                  weights: str | None) -> dict[str, Any]:
    """The model options as `load_model`'s `options` (only those given), checked here so that a bad value is a
    usage error before torch is imported: positive whole numbers, a JSON object for --model-kwargs."""
    options: dict[str, Any] = {}
    for name, value in (("num_classes", num_classes), ("in_chans", in_chans), ("img_size", img_size)):
        if value is None:
            continue
        if value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1")
        options[name] = value
    if model_kwargs is not None:
        import json

        try:
            kwargs = json.loads(model_kwargs)
        except json.JSONDecodeError as e:
            raise UsageError(f"--model-kwargs {model_kwargs!r}: not valid JSON ({e.msg} at character {e.pos})"
                             ) from None
        if not isinstance(kwargs, dict):
            raise UsageError(f"--model-kwargs {model_kwargs!r}: expected a JSON object, e.g. '{{\"drop_rate\": 0}}'")
        if kwargs:
            options["model_kwargs"] = kwargs
    if weights is not None:
        if not weights.strip():
            raise UsageError("--weights: give a weights name such as IMAGENET1K_V1")
        options["weights"] = weights.strip()
    return options



ImagesDir = Annotated[Path | None, typer.Option("--images", metavar="DIR",
                                                help="Where the run's images are now, when the run folder or the "
                                                "images moved: DIR/KEY (DIR replaces the inputs' common root); an "
                                                "image is used only if its sha256 matches")]
