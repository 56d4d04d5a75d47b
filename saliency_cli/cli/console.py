"""The one stderr console and the one progress bar of every command. People's messages go to stderr; data
(JSON records, tables asked for with --json) goes to stdout."""

from __future__ import annotations

from typing import Any

from rich.console import Console

err = Console(stderr=True, highlight=False, soft_wrap=True)
out = Console(highlight=False, soft_wrap=True)


def listing(rows: list[dict[str, Any]], json_out: bool, title: str, columns: list[str],
            cells: Any) -> None:
    """A registry listing (`saliency methods`, `evaluate --list-metrics`): the rows as JSON on stdout, or a table
    of `columns` whose cells are `cells(row)` (a list of strings per row)."""
    if json_out:
        import json

        print(json.dumps(rows, indent=2, default=str))
        return
    table(out, title, columns, [cells(r) for r in rows])


def table(console: Console, title: str, header: list[str], rows: list[list[str]],
          right: tuple[int, ...] = ()) -> None:
    """A table whose every name and number is shown in full: a rich table wrapped at word boundaries when the
    longest word of each column fits the console's width, else stacked (each row's first cell as a heading, then
    `column: value` lines). Columns whose index is in `right` are right-aligned in the table form."""
    from rich.padding import Padding
    from rich.table import Table
    from rich.text import Text

    def longest_word(texts: list[str]) -> int:
        return max((len(w) for t in texts for w in str(t).split()), default=1)

    widths = [longest_word([h] + [r[i] for r in rows]) for i, h in enumerate(header)]
    if sum(widths) + 3 * len(header) + 1 <= console.width:
        grid = Table(title=title)
        for i, (col, width) in enumerate(zip(header, widths, strict=True)):
            grid.add_column(col, min_width=width, overflow="fold", justify="right" if i in right else "left")
        for row in rows:
            grid.add_row(*(Text(str(c)) for c in row))
        console.print(grid)
        return
    console.print(Text(title, style="bold"))
    for row in rows:
        console.print(Text(str(row[0]), style="bold cyan"))
        lines = Table.grid(padding=(0, 1))
        lines.add_column(no_wrap=True)
        lines.add_column(overflow="fold")
        for col, cell in zip(header[1:], row[1:], strict=True):
            lines.add_row(Text(f"{col}:", style="dim"), Text(str(cell)))
        console.print(Padding(lines, (0, 0, 0, 2)))


def warn(message: str) -> None:
    """One warning line on stderr."""
    err.print(f"saliency: warning: {message}", markup=False)


class Progress:
    """A rich progress bar on stderr (`verb` N/total, items per second, time left), or nothing when disabled
    (--quiet, --json, or stderr is not a terminal)."""

    def __init__(self, verb: str, enabled: bool, unit: str = "images") -> None:
        self.verb = verb
        self.unit = unit
        self.enabled = enabled and err.is_terminal
        self.bar: Any = None

    def start(self, total: int) -> None:
        if not self.enabled or self.bar is not None:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
        from rich.progress import Progress as RichProgress

        self.bar = RichProgress(TextColumn(self.verb), BarColumn(), MofNCompleteColumn(), TextColumn(self.unit),
                                TextColumn("{task.fields[rate]}"), TimeRemainingColumn(), console=err)
        self.task = self.bar.add_task(self.verb, total=total, rate="")
        self.bar.start()

    def update(self, done: int, total: int | None = None) -> None:
        """`done` items finished (of `total`, which starts the bar if needed)."""
        if total is not None:
            self.start(total)
        if self.bar is None:
            return
        elapsed = self.bar.tasks[0].elapsed or 0.0
        rate = f"{done / elapsed:.2f} {self.unit}/s" if elapsed > 0 else ""
        self.bar.update(self.task, completed=done, rate=rate)

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None
