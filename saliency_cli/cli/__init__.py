"""The command line: Typer and Rich only, no torch at import time. `main()` is the `saliency` entry point."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from typing import Any

__all__ = ["build_app", "main"]


def main(argv: list[str] | None = None) -> None:
    """The `saliency` entry point. Ctrl-C is handled from here on, before Typer and Rich are imported: an
    interrupt while they load exits 130 with one line, like one at any later moment."""
    import signal

    from saliency_cli.errors import ExitCode, Terminated, on_signal

    signal.signal(signal.SIGINT, on_signal)
    try:
        from saliency_cli.cli.app import main as run

        run(argv)  # exits with the command's code; an interrupt inside it is reported there
    except KeyboardInterrupt as e:  # one that came while Typer and Rich were imported
        terminated = isinstance(e, Terminated)
        print("saliency: terminated" if terminated else "saliency: interrupted", file=sys.stderr)
        sys.exit(int(ExitCode.TERMINATED if terminated else ExitCode.INTERRUPTED))


def __getattr__(name: str) -> Any:
    if name == "build_app":
        from saliency_cli.cli.app import build_app

        return build_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
