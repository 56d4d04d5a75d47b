"""The data config (input size, interpolation, mean, std, crop_pct, crop mode): checked, normalised and merged with
the user's overrides."""

from __future__ import annotations

from typing import Any

from saliency_cli.errors import UsageError


def _size3(size: Any) -> tuple[int, ...]:
    """An input size as (C, H, W) from an int, (H, W) or (C, H, W); 3 channels unless given."""
    if isinstance(size, int):
        return (3, size, size)
    return tuple(int(s) for s in (size if len(size) == 3 else (3, *size)))


def _normalise_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """The six data-config keys with checked values: one mean and std per channel (a single value is
    repeated), positive std, a supported crop mode. Other keys are dropped."""
    out: dict[str, Any] = {
        "input_size": _size3(cfg["input_size"]),
        "interpolation": str(cfg.get("interpolation") or "bilinear"),
        "mean": tuple(float(v) for v in cfg["mean"]),
        "std": tuple(float(v) for v in cfg["std"]),
        "crop_pct": float(cfg.get("crop_pct") or 0.875),
        "crop_mode": str(cfg.get("crop_mode") or "center"),
    }
    c = out["input_size"][0]
    if len(out["mean"]) == 1:
        out["mean"] = out["mean"] * c
    if len(out["std"]) == 1:
        out["std"] = out["std"] * c
    if len(out["mean"]) != c or len(out["std"]) != c:
        raise UsageError(f"mean and std need {c} values, one per input channel")
    if any(s <= 0 for s in out["std"]):
        raise UsageError("std values must be positive")
    if out["crop_mode"] == "processor" and isinstance(cfg.get("processor"), dict):
        out["processor"] = cfg["processor"]  # a Hugging Face image processor's record (processors.py)
    elif out["crop_mode"] not in ("center", "squash"):
        raise UsageError(f"crop mode {out['crop_mode']!r} is not supported (center or squash)")
    return out


def _merge_config(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """A model's own data config with the user's overrides, normalised. An input size given by the user keeps the
    model's channel count (the command line's --input-size gives only H and W, e.g. for a grayscale model)."""
    merged = {**base, **overrides}
    if "input_size" in overrides and "input_size" in base:
        merged["input_size"] = (_size3(base["input_size"])[0], *_size3(overrides["input_size"])[1:])
    return _normalise_config(merged)
