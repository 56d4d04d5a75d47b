"""Option values shared by the commands, parsed without Typer so the library and every command agree."""

from __future__ import annotations

from saliency_cli.errors import UsageError


def parse_batch_size(text: str) -> int | None:
    """`auto` -> None (the device's default with OOM back-off), else a whole number."""
    if text == "auto":
        return None
    try:
        return int(text)
    except ValueError:
        raise UsageError(f"--batch-size {text!r}: expected a whole number or auto") from None
