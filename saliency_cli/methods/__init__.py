"""The method registry. Importing this package imports every module in it, and each module registers its
methods with `@register`; `REGISTRY[name]` looks one up. Adding a method = one file here, one test file."""

import importlib
import pkgutil

from saliency_cli.methods.base import REGISTRY, Attribution, Context, Method

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["REGISTRY", "Attribution", "Context", "Method"]
