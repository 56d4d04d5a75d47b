"""Library exceptions. The CLI maps each class to an exit code in one place (cli.py)."""


class SaliencyError(Exception):
    """Base class: a problem the user can fix, reported as one line."""

    exit_code = 1


class UsageError(SaliencyError):
    """A bad option or value (exit 2)."""

    exit_code = 2


class ModelError(SaliencyError):
    """The model cannot be loaded or does not fit the inputs (exit 1)."""

    exit_code = 1


class OutputError(SaliencyError):
    """The output folder cannot be written (exit 1)."""

    exit_code = 1


class ImageError(SaliencyError):
    """One input image cannot be used; recorded in the manifest, the run goes on."""
