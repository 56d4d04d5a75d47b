"""saliency: noise-smoothing attribution maps for image classifiers, from the command line and from Python.

    import saliency_cli
    maps = saliency_cli.attribute(model, x, method="smoothgrad", samples=50)   # (B, C, H, W), on x's device

Importing the package imports nothing else (no torch): `attribute` (saliency_cli.api.attribute) is looked up
on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"
__all__ = ["__version__", "attribute"]


def __getattr__(name: str) -> Any:
    """`saliency_cli.attribute`, imported on first use (it brings torch). importlib, not an import statement:
    the package root sits below every layer and must not import them when it is imported."""
    if name == "attribute":
        return importlib.import_module("saliency_cli.api").attribute
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
