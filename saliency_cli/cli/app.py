"""The `saliency` app and the one boundary where outcomes become exit codes.

Commands live one per module (cli/explain.py, cli/methods.py, cli/info.py, cli/evaluate.py); each parses its
options, calls one function of `saliency_cli.api`, and reports. Nothing here imports torch: `saliency --help`
and every usage error answer at once.
"""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer

from saliency_cli.errors import ExitCode, SaliencyError

# Before torch is imported: OpenMP threads that spin while waiting starve each other as soon as anything else
# runs on the machine (a forward pass of the bundled model took 4x longer on 2 shared cores); sleeping waiters
# cost little when the machine is quiet. A value the user set wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _version(value: bool) -> None:
    if value:
        from saliency_cli import __version__

        typer.echo(f"saliency {__version__}")
        raise typer.Exit(ExitCode.OK)


def build_app() -> typer.Typer:
    """A fresh app with every command (the explain options are generated from the settings table as it is now)."""
    from saliency_cli.cli import check, compare, evaluate, explain, info, merge, methods, report
    from saliency_cli.cli.help import Command, Group

    app = typer.Typer(cls=Group, no_args_is_help=True, pretty_exceptions_enable=False,
                      help="Attribution maps (SmoothGrad and its successors) for image classifiers.")

    @app.callback()
    def root(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                   help="Print the version and exit")] = False) -> None:
        """Attribution maps (SmoothGrad and its successors) for image classifiers."""

    app.command("explain", cls=Command)(explain.build_command())
    app.command("methods", cls=Command)(methods.list_methods)
    app.command("info", cls=Command)(info.info)
    app.command("evaluate", cls=Command)(evaluate.evaluate)
    app.command("report", cls=Command)(report.report)
    app.command("compare", cls=Command)(compare.compare)
    app.command("merge", cls=Command)(merge.merge)
    app.command("check", cls=Command)(check.build_command())
    return app


def _report(e: BaseException, debug: bool) -> int:
    """One line on stderr for an exception, and its exit code."""
    from saliency_cli.cli.console import err

    if isinstance(e, SaliencyError):
        if debug:
            raise e
        err.print(f"saliency: error: {e}", markup=False)
        return int(e.exit_code)
    if type(e).__name__ == "NoArgsIsHelpError":  # `saliency` alone: the help is printed already
        return int(ExitCode.OK)
    if hasattr(e, "format_message") and hasattr(e, "exit_code"):  # click's usage errors
        err.print(f"saliency: error: {e.format_message()}", markup=False)
        return int(e.exit_code)
    if debug:
        raise e
    from saliency_cli.errors import first_line

    err.print(f"saliency: error: {first_line(e)} (SALIENCY_DEBUG=1 for the traceback)", markup=False)
    return int(ExitCode.FATAL)


COMPLETE_VAR = "_SALIENCY_COMPLETE"


def _completion_instruction() -> None:
    """Typer's completion scripts send `complete_bash` (instruction_shell); Click's order `bash_complete` (as
    Click's own scripts and docs have it) is accepted too."""
    shell, _, instruction = os.environ.get(COMPLETE_VAR, "").partition("_")
    if shell in ("bash", "zsh", "fish") and instruction in ("complete", "source"):
        os.environ[COMPLETE_VAR] = f"{instruction}_{shell}"


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the app and turn every outcome into one exit code. A SIGINT or SIGTERM at any moment
    exits 130 or 143, even one a library swallowed while being imported (errors.on_signal notes each)."""
    import signal
    import warnings

    from saliency_cli.errors import SIGNALS, Terminated, on_signal, raise_if_signalled

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)  # like Ctrl-C: whole files only, run.json finalised, exit 143
    from saliency_cli.cli.console import err

    debug = os.environ.get("SALIENCY_DEBUG") == "1"
    if not debug:  # library warnings (Pillow, torch, numpy) are not for the user; SALIENCY_DEBUG=1 shows them
        warnings.simplefilter("ignore")
    _completion_instruction()
    try:
        command = typer.main.get_command(build_app())
        raise_if_signalled()
        code = command.main(args=argv, prog_name="saliency", standalone_mode=False)
    except typer.Exit as e:
        code = e.exit_code
    except (KeyboardInterrupt, typer.Abort) as e:  # click wraps a KeyboardInterrupt in Abort
        terminated = isinstance(e, Terminated) or isinstance(e.__cause__, Terminated)
        code = ExitCode.TERMINATED if terminated else ExitCode.INTERRUPTED
    except Exception as e:  # noqa: BLE001 - the one place that turns crashes into a line and an exit code
        code = _report(e, debug)
    code = int(code) if isinstance(code, int) else 0
    if SIGNALS or code == ExitCode.INTERRUPTED:  # Typer turns any interrupt inside a command into 130
        code = ExitCode.TERMINATED if signal.SIGTERM in SIGNALS else ExitCode.INTERRUPTED
        err.print("saliency: terminated" if code == ExitCode.TERMINATED else "saliency: interrupted", markup=False)
    SIGNALS.clear()  # reported: a later main() in this process (tests, notebooks) starts afresh
    sys.exit(code)
