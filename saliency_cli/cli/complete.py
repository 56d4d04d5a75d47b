"""Shell completion of option values (`saliency --install-completion`: bash, zsh, fish; Typer's mechanism).

Each completer takes the word typed so far and returns the candidates. None imports torch: method, metric and
sanity-check names are read from the `register("name", ...)` decorators of their packages' files, colormaps
from matplotlib (imported only when a colormap is completed). A comma list completes its last item.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

from saliency_cli.methods.settings import SETTINGS

DEVICES = ("auto", "cpu", "cuda", "cuda:0", "cuda:1", "mps")
PACKAGE = Path(__file__).resolve().parents[1]


def registered(package: str, decorators: tuple[str, ...]) -> list[str]:
    """The first arguments of `@register("name", ...)`-style decorators in the files of `saliency_cli.package`."""
    import ast

    names = []
    for path in sorted((PACKAGE / package).glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (isinstance(node, ast.Call) and getattr(node.func, "id", None) in decorators and node.args
                    and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
                names.append(node.args[0].value)
    return list(dict.fromkeys(names))


def metric_names() -> list[str]:
    return registered("metrics", ("register",))


def sanity_names() -> list[str]:
    return registered("metrics", ("register_check",))


def method_names() -> list[str]:
    from saliency_cli.methods import registered_names

    return registered_names()


def colormap_names() -> list[str]:
    import matplotlib

    return sorted(matplotlib.colormaps)


def matching(incomplete: str, names: Iterable[str], comma_list: bool = False) -> list[str]:
    """The names that start with `incomplete`; in a comma list, with the items before the last one kept and
    the names already listed left out."""
    head, last = "", incomplete
    if comma_list and "," in incomplete:
        head, _, last = incomplete.rpartition(",")
        head += ","
    taken = set(head.split(","))
    return [head + n for n in names if n.startswith(last) and n not in taken]


def completer(names: Callable[[], Iterable[str]], comma_list: bool = False) -> Callable[[str], list[str]]:
    """A Typer `autocompletion` callback over the names `names()` returns (called only when completing)."""

    def complete(incomplete: str) -> list[str]:
        return matching(incomplete, names(), comma_list)

    return complete


def choices(values: Iterable[str]) -> Callable[[str], list[str]]:
    fixed = list(values)
    return completer(lambda: fixed)


def setting_completer(name: str) -> Callable[[str], list[str]] | None:
    """Completion of a settings-table option: its choices, or `auto` where allowed."""
    row = SETTINGS[name]
    values = list(row.choices) + (["auto"] if row.auto else [])
    return choices(values) if values else None
