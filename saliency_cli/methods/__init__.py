"""The method registry. `METHODS[name]` looks a method up; the first access imports every module of this package
(each registers its methods with `@register`), so importing `saliency_cli.methods.settings` alone stays free of
torch. Adding a method = one file here, its settings rows, one test file."""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

_LOADED = False


def load_all() -> None:
    """Import every method module once (they register themselves)."""
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    for module in pkgutil.iter_modules(__path__):
        if module.name not in ("base", "settings"):
            importlib.import_module(f"{__name__}.{module.name}")


def registered_names() -> list[str]:
    """The names of every method, read from the `@register("name", ...)` decorators of this package's files
    without importing them (so the command line can check `--method` before torch is imported)."""
    import ast
    import sys
    from pathlib import Path

    base = sys.modules.get(f"{__name__}.base")
    names = list(base.METHODS) if base is not None else []  # also methods registered from elsewhere
    for path in sorted(Path(__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef):
                for deco in node.decorator_list:
                    if (isinstance(deco, ast.Call) and getattr(deco.func, "id", None) == "register" and deco.args
                            and isinstance(deco.args[0], ast.Constant)):
                        names.append(str(deco.args[0].value))
    return list(dict.fromkeys(names))


def __getattr__(name: str) -> Any:
    if name in ("METHODS", "Method", "MethodContext", "Attribution", "InputRange", "register"):
        from saliency_cli.methods import base

        if name == "METHODS":
            load_all()
        return getattr(base, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["METHODS", "Attribution", "InputRange", "Method", "MethodContext", "load_all", "register",
           "registered_names"]
