"""Library exceptions and exit codes. The CLI maps each exception to its exit code in one place (cli/app.py)."""

from __future__ import annotations

from collections.abc import Iterable
from enum import IntEnum


class ExitCode(IntEnum):
    """The process exit codes of every command (README: Exit codes)."""

    OK = 0
    FATAL = 1  # the model cannot be loaded, the output folder is not writable
    USAGE = 2  # a bad option or value, a missing input
    PARTIAL = 3  # finished, but some inputs failed (each failure is recorded)
    GATE = 4  # a --fail-under / --fail-over gate failed
    INTERRUPTED = 130  # Ctrl-C
    STDOUT_CLOSED = 141  # the reader of --json output went away (128 + SIGPIPE)
    TERMINATED = 143  # SIGTERM (128 + 15), handled like Ctrl-C


class SaliencyError(Exception):
    """Base class: a problem the user can fix, reported as one line."""

    exit_code = ExitCode.FATAL


class UsageError(SaliencyError):
    """A bad option or value (exit 2)."""

    exit_code = ExitCode.USAGE


class ModelError(SaliencyError):
    """The model cannot be loaded or does not fit the inputs (exit 1)."""

    exit_code = ExitCode.FATAL


class OutputError(SaliencyError):
    """The output folder cannot be written (exit 1)."""

    exit_code = ExitCode.FATAL


class StdoutClosed(SaliencyError):
    """The reader of stdout closed it (e.g. `| head`): the run stopped cleanly, every record is in the manifest."""

    exit_code = ExitCode.STDOUT_CLOSED


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C would be so the same clean-up runs (whole files only, run.json finalised)."""


class ImageError(SaliencyError):
    """One input image cannot be used; recorded in the manifest, the run goes on."""


SIGNALS: list[int] = []  # SIGINT / SIGTERM this process received (the command line's handlers note them here)


def on_signal(signum: int, frame: object = None) -> None:
    """The command line's SIGINT and SIGTERM handler: note the signal, then raise as Python would (SIGTERM as
    `Terminated`). A library that swallows the exception (a bare `except` around an import) cannot lose the
    signal: `raise_if_signalled` raises it again at the next safe point, and the exit code says it."""
    import signal

    SIGNALS.append(signum)
    raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def raise_if_signalled() -> None:
    """At a safe point of a long run: raise the interrupt of a signal received earlier and swallowed."""
    if SIGNALS:
        import signal

        raise Terminated() if signal.SIGTERM in SIGNALS else KeyboardInterrupt()


def first_line(e: BaseException, limit: int = 200) -> str:
    """`TypeName: first line of the message` (cut to `limit` characters): how a failure is recorded."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:limit]}" if text else type(e).__name__


def counted(n: int, noun: str) -> str:
    """`1 map`, `3 maps`: a count with its noun, plural (an added `s`) unless the count is one."""
    return f"{n} {noun}{'s' * (n != 1)}"


def did_you_mean(value: str, names: Iterable[str]) -> str:
    """`; did you mean 'x'?` naming the closest of `names` to `value` (difflib), or "" when none is close."""
    import difflib

    names = [str(n) for n in names]
    close = difflib.get_close_matches(value, names, n=3, cutoff=0.6)
    if not close:
        lowered = {n.lower(): n for n in names}
        close = [lowered[c] for c in difflib.get_close_matches(value.lower(), list(lowered), n=3, cutoff=0.6)]
    return "; did you mean " + " or ".join(repr(c) for c in close) + "?" if close else ""


def unknown(option: str, what: str, value: str, names: Iterable[str], see: str | None = None) -> UsageError:
    """`--method: unknown method 'smoothgard'; did you mean 'smoothgrad'? (see saliency methods)`; without a
    `see`, the names themselves are listed when there are few."""
    names = list(names)
    text = f"{option}: unknown {what} {value!r}{did_you_mean(value, names)}"
    if see:
        text += f" ({see})"
    elif len(names) <= 12:
        text += f" (one of {', '.join(names)})"
    return UsageError(text)
