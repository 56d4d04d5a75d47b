"""One-line messages: text without ANSI escapes, clipped at a word boundary; an exception's first line."""

from __future__ import annotations

import re

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def _clip(text: str, limit: int = 160) -> str:
    """`text` on one line without ANSI escapes, cut at a word boundary to at most `limit` characters."""
    text = " ".join(_ANSI.sub("", text).split())
    if len(text) <= limit:
        return text
    return text[: limit - 3].rsplit(" ", 1)[0].rstrip(",;:") + "..."


def _reason(e: BaseException, limit: int = 160) -> str:
    """The first non-empty line of an exception's message, clean and clipped, or its type name."""
    lines = [line for line in (_clip(s, 10_000) for s in str(e).splitlines()) if line]
    return _clip(lines[0], limit) if lines else type(e).__name__
