"""saliency: noise-smoothing attribution maps for image classifiers, from the command line and from Python.

    import saliency_cli
    maps = saliency_cli.attribute(model, x, method="smoothgrad", samples=50)   # (B, C, H, W), on x's device

    maps = saliency_cli.attribute(hf_model, x, data_config=saliency_cli.data_config_from(processor))

Importing the package imports nothing else (no torch): `attribute` and `data_config_from` (saliency_cli.api)
are looked up on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"
__all__ = ["__version__", "attribute", "data_config_from"]


def __getattr__(name: str) -> Any:
    """`saliency_cli.attribute` and `saliency_cli.data_config_from`, imported on first use (they bring torch).
    importlib, not an import statement: the package root sits below every layer and must not import them when it
    is imported."""
    if name in ("attribute", "data_config_from"):
        return getattr(importlib.import_module("saliency_cli.api"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
