"""The README is part of the contract: its commands are what CI runs, its options exist."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _shell_blocks() -> list[str]:
    return re.findall(r"```sh\n(.*?)```", README, flags=re.S)


def test_ci_runs_the_readme_test_command() -> None:
    """.ci/run ends with exactly the README's second set-up command."""
    test_command = _shell_blocks()[1].strip()
    assert "pytest" in test_command
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").strip().splitlines()
    assert ci[-1] == test_command


def test_readme_first_command_explains_the_sample_images_with_the_default_model() -> None:
    """The first set-up command installs and runs `saliency explain sample_images/`."""
    first = _shell_blocks()[0].strip()
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
