"""Option types shared by the commands, defined once (`Annotated[...]`), closed choices as str Enums, and the
parsers of option text. The method hyper-parameter options of `explain` are generated from the settings table
(methods/settings.py) in cli/explain.py. No torch here."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from saliency_cli.errors import UsageError


class Precision(str, Enum):
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


class Score(str, Enum):
    logit = "logit"
    prob = "prob"
    logprob = "logprob"


class Reduction(str, Enum):
    sum = "sum"
    abs_sum = "abs-sum"
    max_abs = "max-abs"
    none = "none"
    mean_abs_sum = "mean-abs-sum"  # noisegrad/fusiongrad: mean of each noisy model's sum_c |A_c| (the reference's)


def choice_enum(name: str, choices: tuple[str, ...]) -> type[Enum]:
    """A str Enum of `choices` (for a settings row with closed choices)."""
    return Enum(name, {c: c for c in choices}, type=str)  # type: ignore[return-value]


Model = Annotated[str, typer.Option("--model", "-m", help="'default' (bundled EfficientNet-Lite0), a timm name, "
                                    "torchvision:NAME, local-dir:PATH, hf-hub:NAME, a Hugging Face transformers "
                                    "folder or transformers:ORG/NAME (cache), or a TorchScript/.pt2 file")]
Checkpoint = Annotated[str | None, typer.Option(help="Local weights (.safetensors, or a .pth/.pt state dict or "
                                                "training checkpoint, loaded without unpickling code)")]
Device = Annotated[str, typer.Option(help="auto (cuda, mps, cpu), cpu, cuda, cuda:N or mps")]
BatchSize = Annotated[str, typer.Option(help="Most inputs per forward/backward, or auto (backs off on "
                                        "out-of-memory)")]
InputSize = Annotated[str | None, typer.Option(help="Model input size, H,W or S (TorchScript/exported models)")]
Mean = Annotated[str | None, typer.Option(help="Normalisation mean per channel, comma list")]
Std = Annotated[str | None, typer.Option(help="Normalisation std per channel, comma list")]
CropPct = Annotated[float | None, typer.Option(help="Resize to size/crop_pct, then center-crop")]
Interpolation = Annotated[str | None, typer.Option(help="Resize interpolation (bilinear, bicubic, nearest, "
                                                   "lanczos, box, hamming)")]
Labels = Annotated[str | None, typer.Option(help="Class names: text file (one per line) or JSON list")]
JsonOut = Annotated[bool, typer.Option("--json", help="Machine-readable output on stdout")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar")]
ShardOption = Annotated[str | None, typer.Option("--shard", help="I/N: this process's share of the inputs "
                                                 "(default: from torchrun or Slurm, else everything)")]
OutDir = Annotated[Path, typer.Option("--out", "-o", help="Output folder")]
# Model options: how to build the architecture a checkpoint needs (models.load_model's `options`).
NumClasses = Annotated[int | None, typer.Option(help="Classes of the model's head, e.g. 10 for a checkpoint "
                                                "trained on 10 classes (timm, torchvision)", show_default=False)]
InChans = Annotated[int | None, typer.Option(help="Input channels the timm model is built for: 1 for a grayscale "
                                             "model (images are then converted to gray)", show_default=False)]
ImgSize = Annotated[int | None, typer.Option(help="Input side the timm model is built for (models with a fixed "
                                             "size, such as ViTs); also the input size", show_default=False)]
ModelKwargs = Annotated[str | None, typer.Option("--model-kwargs", metavar="JSON",
                                                 help="JSON object of further arguments to timm.create_model or "
                                                 "the torchvision builder, e.g. '{\"drop_rate\": 0}'",
                                                 show_default=False)]
Weights = Annotated[str | None, typer.Option(help="torchvision weights (e.g. IMAGENET1K_V2) whose preprocessing "
                                             "and class names to use, with -m torchvision:NAME", show_default=False)]

INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "lanczos", "box", "hamming")


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
    if interpolation is not None and interpolation not in INTERPOLATIONS:
        raise UsageError(f"--interpolation {interpolation!r}: expected one of {', '.join(INTERPOLATIONS)}")
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

ImagesDir = Annotated[Path | None, typer.Option("--images", help="Where the run's images are now, when the run "
                                                "folder or the images moved: DIR/KEY (DIR replaces the inputs' "
                                                "common root); an image is used only if its sha256 matches")]
