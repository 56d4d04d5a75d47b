"""The README is part of the contract: its commands are what CI runs, its options exist."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _shell_blocks() -> list[str]:
    return re.findall(r"```sh\n(.*?)```", README, flags=re.S)


def _setup_commands() -> tuple[str, str]:
    """The README's two set-up commands: the first two shell blocks, both in its "Set-up" section."""
    section = README.split("## Set-up: two commands")[1].split("\n## ")[0]
    first, second = (block.strip() for block in _shell_blocks()[:2])
    assert first in section and second in section
    return first, second


def test_ci_runs_the_readme_setup_commands() -> None:
    """.ci/run starts from a fresh virtualenv and ends with exactly the README's two set-up commands; the test
    command is the test script, which ends by running pytest with the script's arguments."""
    first, test_command = _setup_commands()
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").strip().splitlines()
    assert ci[-2] == first and ci[-1] == test_command
    assert "rm -rf .venv" in "\n".join(ci[:-2]) and "set -euo pipefail" in ci
    script = re.fullmatch(r"bash (\S+)", test_command)
    assert script, test_command
    lines = (ROOT / script.group(1)).read_text(encoding="utf-8").strip().splitlines()
    assert lines[-1] == 'exec python -m pytest -q "$@"'
    assert 'pip install -q -e ".[test]"' in "\n".join(lines)


def test_readme_first_command_explains_the_sample_images_with_the_default_model() -> None:
    """The first set-up command installs and runs `saliency explain sample_images/`."""
    first, _ = _setup_commands()
    assert "pip install -e ." in first and "saliency explain sample_images/" in first


def test_every_option_in_the_readme_table_exists() -> None:
    """Each `--option` of the options table appears in `saliency explain --help`."""
    table = README.split("## Options of `saliency explain`")[1].split("\n## ")[0]
    options = set(re.findall(r"`(--[a-z][a-z0-9-]*)", table)) | set(re.findall(r"/(--[a-z][a-z0-9-]*)", table))
    help_text = subprocess.run(
        [sys.executable, "-m", "saliency_cli", "explain", "--help"],
        capture_output=True, text=True, env={"COLUMNS": "300", "TERM": "dumb", "PATH": ""}, check=True,
    ).stdout
    missing = sorted(o for o in options if o not in help_text)
    assert len(options) > 20 and not missing, missing
