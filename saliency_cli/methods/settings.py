"""The settings table: one row per method hyper-parameter, the single source of its type, check, choices and help.

The command line builds one `explain` option per row (`--weight-noise`, `-n/--samples`, ...), the pipeline
validates every value a user gives against its row before anything is loaded, and `saliency methods` lists the
rows each method uses. A method's *default* value lives with the method (`register(defaults=...)`); the row
says what values are allowed. Adding a method with a new option = its file + one row here (`add_setting`).

This module imports no torch, so `saliency --help` stays fast.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from saliency_cli.errors import UsageError, unknown

QUADRATURES = ("gausslegendre", "riemann-left", "riemann-right", "riemann-middle", "trapezoid")
BASELINES = ("black", "mean", "blur", "uniform")
OBJECTIVES = ("noise", "aupc")
GGIG_REDUCTIONS = ("max", "trapezoid")
# The base attributions a smoother (smoothgrad, smoothgrad-sq, vargrad, noisegrad, fusiongrad, adaptgrad) can
# average over its noise (`--base`); each is also a method, whose own settings (e.g. --steps) then apply.
BASES = ("gradient", "input-x-gradient", "integrated-gradients", "ggig")
NOISE_UNITS = ("relative", "absolute")
# Settings that only matter when a sample count is `auto` (`-n auto`, `--models auto`); left out of a job otherwise.
CONVERGENCE_SETTINGS = ("converge", "max_samples")


def at_least(low: float) -> Callable[[Any], str | None]:
    return lambda v: None if v >= low else f"must be at least {low:g}"


def between(low: float, high: float) -> Callable[[Any], str | None]:
    return lambda v: None if low < v < high else f"must be between {low:g} and {high:g}"


def in_range(low: float, high: float) -> Callable[[Any], str | None]:
    return lambda v: None if low <= v <= high else f"must be between {low:g} and {high:g}"


def positive(v: Any) -> str | None:
    return None if v > 0 else "must be positive"


def non_negative(v: Any) -> str | None:
    return None if v >= 0 else "must be zero or positive"


@dataclass(frozen=True)
class Setting:
    """One hyper-parameter: `name` is the method function's keyword (`weight_noise`), the option is `--weight-noise`.

    kind: int, float or str (a closed choice when `choices` is given), or "levels" (a comma list of numbers: a
    noise sweep). auto: the word `auto` is also accepted (resolved by the method or the pipeline). check(value)
    returns what is wrong with a number, or None. short: an extra short flag such as `-n`.
    """

    name: str
    help: str
    kind: Any
    choices: tuple[str, ...] = ()
    check: Callable[[Any], str | None] | None = None
    auto: bool = False
    short: str | None = None
    panel: str = "Method settings"  # the group of `explain --help` the option is shown in

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def metavar(self) -> str:
        """The value placeholder of the option: NAME (a choice), N (whole), X (number), X,X... (levels), |auto."""
        word = "NAME" if self.choices else {int: "N", float: "X", "levels": "X,X..."}.get(self.kind, "TEXT")
        return word + ("|auto" if self.auto else "")

    @property
    def help_text(self) -> str:
        """The help with the choices listed (`NAME` stands for one of them) and `or auto` where allowed."""
        text = self.help
        if self.choices and not all(c in text for c in self.choices):  # unless the help names them already
            text += ": " + ", ".join(self.choices)
        if self.auto and "auto" not in text:
            text += " (or auto)"
        return text

    def parse(self, text: str) -> Any:
        """Command-line text to a value (`auto`, a number, a choice, or a list of levels); UsageError if bad."""
        text = text.strip()
        if self.auto and text == "auto":
            return ["auto"] if self.kind == "levels" else "auto"
        if self.kind == "levels":
            try:
                values = [float(v) for v in text.split(",") if v.strip()]
            except ValueError:
                raise UsageError(f"{self.flag} {text!r}: expected numbers separated by commas") from None
            if not values:
                raise UsageError(f"{self.flag}: give at least one level")
            return values
        if self.kind in (int, float):
            try:
                return self.kind(text)
            except ValueError:
                word = "a whole number" if self.kind is int else "a number"
                raise UsageError(f"{self.flag} {text!r}: expected {word}" + (" or auto" if self.auto else "")) from None
        return text

    def validate(self, value: Any) -> None:
        """Raise UsageError naming the option when `value` is not allowed."""
        if self.auto and (value == "auto" or (self.kind == "levels" and value == ["auto"])):
            return
        if self.choices:
            if value not in self.choices:
                raise unknown(self.flag, "value", str(value), self.choices)
            return
        values = value if self.kind == "levels" else [value]
        for v in values:
            if isinstance(v, str) or isinstance(v, bool):
                raise UsageError(f"{self.flag} {v!r}: expected a number" + (" or auto" if self.auto else ""))
            if isinstance(v, float) and not math.isfinite(v):
                raise UsageError(f"{self.flag} {v}: must be a finite number")
            problem = self.check(v) if self.check is not None else None
            if problem:
                raise UsageError(f"{self.flag} {v:g}: {problem}")

    def describe(self) -> dict[str, Any]:
        """The row as JSON-ready data (for `saliency methods --json`)."""
        kind = self.kind if isinstance(self.kind, str) else self.kind.__name__
        return {"option": self.flag, "type": "choice" if self.choices else kind, "choices": list(self.choices),
                "auto": self.auto, "help": self.help}


SETTINGS: dict[str, Setting] = {}


def add_setting(row: Setting) -> Setting:
    """Add a row to the table (a method file with a new hyper-parameter calls this once)."""
    if row.name in SETTINGS and SETTINGS[row.name] != row:
        raise ValueError(f"setting {row.name!r} is already in the table with another definition")
    SETTINGS[row.name] = row
    return row


NOISE_PANEL = "Noise and samples"
for _row in (
    Setting("noise", "Noise level, relative to each image's range (sigma = noise * (max - min)), or with "
            "--noise-unit absolute the std in model-input units; a comma list sweeps (a map per level); "
            "smoothtaylor: auto (adaptive noising)", "levels", check=in_range(0, 10), auto=True, panel=NOISE_PANEL),
    Setting("noise_unit", "Unit of --noise: relative (to each image's range, the SmoothGrad paper's) or absolute "
            "(model-input units, as Captum's stdevs)", str, choices=NOISE_UNITS, panel=NOISE_PANEL),
    Setting("samples", "Noise samples per image, or auto (until two halves of the samples agree to --converge, "
            "at most --max-samples)", int, check=in_range(1, 1_000_000), auto=True, short="-n", panel=NOISE_PANEL),
    Setting("converge", "-n/--models auto: stop when the split-half correlation reaches this", float,
            check=between(0, 1), panel=NOISE_PANEL),
    Setting("max_samples", "-n/--models auto: the most samples (or noisy models) per image", int,
            check=in_range(2, 1_000_000), panel=NOISE_PANEL),
    Setting("base", "Smoothers: the attribution averaged over the noise (its own settings apply)", str,
            choices=BASES, panel="Method"),
    Setting("steps", "Path points (integrated-gradients, ggig)", int, check=at_least(1)),
    Setting("baseline", "Reference input of path and mask methods", str, choices=BASELINES),
    Setting("quadrature", "Integrated-gradients quadrature rule", str, choices=QUADRATURES),
    Setting("weight_noise", "NoiseGrad/FusionGrad multiplicative weight noise, or auto (calibrated on each image: "
            "the largest at which 10 noisy models all keep its top-1 class)", float, check=non_negative, auto=True),
    Setting("models", "NoiseGrad/FusionGrad noisy models, or auto (rounds of models until the split-half "
            "correlation reaches --converge)", int, check=at_least(1), auto=True),
    Setting("confidence", "AdaptGrad: probability that a noisy sample stays in the valid input range", float,
            check=between(0, 1)),
    Setting("iterations", "GGIG ascent steps; mask forward passes", int, check=at_least(1)),
    Setting("step_size", "GGIG ascent step size", float, check=positive),
    Setting("ggig_reduce", "GGIG: reduce over path points", str, choices=GGIG_REDUCTIONS),
    Setting("objective", "SmoothTaylor --noise auto: minimise noise (AUTVC) or aupc", str, choices=OBJECTIVES),
    Setting("grid", "mask: cells per side", int, check=at_least(2)),
    Setting("chains", "mask: independent chains run as one batch", int, check=at_least(1)),
    Setting("keep", "mask: initial on-fraction of cells", float, check=between(0, 1)),
):
    add_setting(_row)
