"""The command line: Typer and Rich only, no torch at import time. `main()` is the `saliency` entry point."""

from saliency_cli.cli.app import build_app, main

__all__ = ["build_app", "main"]
