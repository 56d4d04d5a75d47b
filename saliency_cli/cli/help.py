"""Help that fits a terminal of 80 columns: options grouped in their `rich_help_panel`, one table per panel with
two columns (the option's names and value placeholder, never cut; its help, wrapped at word boundaries), flags
without a value placeholder.

Typer's own layout gives five narrow columns (long name, short name, negative name, type, help) and cuts words at
80 columns; the commands of this app use these classes instead (`cls=` of app.command and typer.Typer).
"""

from __future__ import annotations

from typing import Any

from rich import box
from rich.console import Console
from rich.console import Group as Stack
from rich.padding import Padding
from rich.panel import Panel
from rich.table import Table
from rich.text import Text
from typer.core import TyperCommand, TyperGroup

# Panels in this order, then any other in the order its first option comes
PANEL_ORDER = ("Arguments", "Model", "Method", "Noise and samples", "Method settings", "Outputs", "Run", "Options")
NAME_WIDTH = 26  # the names column is at most this wide; longer names take a line of their own


def _flags_without_placeholder(params: list[Any]) -> list[Any]:
    """Flags show no `<bool>`: their metavar is the empty string."""
    for p in params:
        if getattr(p, "is_flag", False) and getattr(p, "metavar", None) is None:
            p.metavar = ""
    return params


def placeholder(param: Any, ctx: Any) -> str:
    """The value placeholder of an option (`N`, `PATH`, ...): its metavar, else from its type (`<int>` -> INT)."""
    if getattr(param, "is_flag", False):
        return ""
    if param.metavar is not None:
        return str(param.metavar)
    shown = str(param.display_type_rich(ctx) or "").strip("<>").removeprefix("list[").rstrip("]")
    return {"str": "TEXT", "int": "N", "float": "X", "path": "PATH"}.get(shown, shown.upper())


def names(param: Any, ctx: Any) -> str:
    """`-n, --samples N`, `--fast/--no-fast`, `INPUTS...`."""
    if getattr(param, "param_type_name", "") == "argument":
        return str(param.metavar or param.name.upper()) + ("..." if param.nargs != 1 else "")
    opts = sorted(param.opts, key=lambda s: (s.startswith("--"), s))
    text = ", ".join(opts)
    if param.secondary_opts:
        text += "/" + "/".join(param.secondary_opts)
    value = placeholder(param, ctx)
    return f"{text} {value}" if value else text


def _default(param: Any, ctx: Any) -> str:
    if getattr(param, "param_type_name", "") == "argument":
        return " [required]" if param.required else ""
    if getattr(param, "is_flag", False) and not param.secondary_opts:
        return ""
    if not (param.show_default or ctx.show_default) or param.default is None:
        return ""
    value = param.default
    if getattr(param, "is_flag", False):
        flag = (param.opts if value else param.secondary_opts)[0]
        return f" [default: {flag}]"
    value = getattr(value, "value", value)
    return f" [default: {value}]"


def _panel(title: str, params: list[Any], ctx: Any, width: int) -> Panel:
    table = Table(show_header=False, box=None, padding=(0, 1), pad_edge=False, expand=True)
    table.add_column(no_wrap=True, width=width)
    table.add_column(overflow="fold", ratio=1)
    for p in params:
        label = names(p, ctx)
        help_text = Text(" ".join(str(getattr(p, "help", "") or "").split()))
        help_text.append(_default(p, ctx), style="dim")
        if len(label) > width:  # a long name on its own line, its help below
            table.add_row(Text(label, style="bold cyan"), "")
            table.add_row("", help_text)
        else:
            table.add_row(Text(label, style="bold cyan"), help_text)
    return Panel(table, title=title, title_align="left", border_style="dim", box=box.ROUNDED)


def format_help(command: Any, ctx: Any) -> None:
    """The command's usage, description, and one panel per help panel of its parameters; commands of a group."""
    console = Console(highlight=False)
    parts: list[Any] = [Padding(Text(command.get_usage(ctx), style="bold"), (0, 1, 1, 1))]
    description = (command.help or "").partition("\f")[0].strip()
    for paragraph in description.split("\n\n"):
        parts.append(Padding(Text(" ".join(paragraph.split())), (0, 1, 1, 1)))
    panels: dict[str, list[Any]] = {}
    params = [p for p in _flags_without_placeholder(command.get_params(ctx)) if not getattr(p, "hidden", False)]
    for p in params:
        default = "Arguments" if getattr(p, "param_type_name", "") == "argument" else "Options"
        panels.setdefault(getattr(p, "rich_help_panel", None) or default, []).append(p)
    width = min(NAME_WIDTH, max((len(names(p, ctx)) for p in params), default=8))
    order = {title: i for i, title in enumerate(PANEL_ORDER)}
    for title, members in sorted(panels.items(), key=lambda kv: order.get(kv[0], len(order))):
        parts.append(_panel(title, members, ctx, width))
    if isinstance(command, TyperGroup):
        table = Table(show_header=False, box=None, padding=(0, 1), pad_edge=False, expand=True)
        table.add_column(no_wrap=True, style="bold cyan")
        table.add_column(overflow="fold", ratio=1)
        for name in command.list_commands(ctx):
            sub = command.get_command(ctx, name)
            if sub is not None and not sub.hidden:
                table.add_row(name, " ".join((sub.help or "").partition("\n\n")[0].split()))
        parts.append(Panel(table, title="Commands", title_align="left", border_style="dim", box=box.ROUNDED))
    console.print(Stack(*parts))


class Command(TyperCommand):
    """A command whose help is `format_help`'s."""

    def format_help(self, ctx: Any, formatter: Any) -> None:
        format_help(self, ctx)


class Group(TyperGroup):
    """The app's group, with the same help layout."""

    def format_help(self, ctx: Any, formatter: Any) -> None:
        format_help(self, ctx)
