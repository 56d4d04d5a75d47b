"""The command line at 80 columns (pipes, CI logs): help and tables show every option, name and number in full,
nothing cut ("…") or broken mid-word, no line wider than 80; `explain --help` under 150 lines. Completion of
values through Typer's shell protocol."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest
import typer
from rich.console import Console

from saliency_cli.cli import build_app
from saliency_cli.methods import registered_names
from saliency_cli.methods.settings import SETTINGS


def saliency(*args: str, columns: int = 80, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if k not in ("TERMINAL_WIDTH", "COLUMNS", "LINES")}
    environ.update(COLUMNS=str(columns), **(env or {}))
    return subprocess.run([sys.executable, "-m", "saliency_cli", *args], capture_output=True, text=True,
                          timeout=120, env=environ)


def check_fits(text: str, width: int = 80) -> list[str]:
    lines = text.splitlines()
    assert lines, "no output"
    too_long = [line for line in lines if len(line) > width]
    assert not too_long, too_long
    assert "…" not in text
    return lines


def words(text: str) -> set[str]:
    """Every whitespace-separated token, with the box drawing and punctuation around it stripped."""
    return {clean(w) for w in text.split()}


def clean(word: str) -> str:
    return word.strip("│╭╮╰╯─,;:()[]'`\"")


def command(name: str) -> typer.core.TyperCommand:
    return typer.main.get_command(build_app()).commands[name]  # type: ignore[attr-defined]


def test_explain_help_fits_80_columns_in_panels_with_every_option_in_full():
    proc = saliency("explain", "--help")
    assert proc.returncode == 0, proc.stderr
    lines = check_fits(proc.stdout)
    assert len(lines) < 150, len(lines)
    tokens = words(proc.stdout)
    options = [opt for p in command("explain").params for opt in (*p.opts, *p.secondary_opts)
               if opt.startswith("-")]
    assert len(options) > 50
    missing = [opt for opt in options if opt not in tokens and not any(t.startswith(opt + "/") or
                                                                      t.endswith("/" + opt) for t in tokens)]
    assert not missing, missing
    for row in SETTINGS.values():  # every choice of every closed setting is a whole word
        for choice in row.choices:
            assert choice in tokens, (row.flag, choice)
    for choice in ("mean-abs-sum", "max-abs", "logprob", "bf16"):
        assert choice in tokens, choice
    assert "<bool>" not in proc.stdout and "<str>" not in proc.stdout
    for panel in ("Model", "Method", "Noise and samples", "Method settings", "Outputs", "Run"):
        assert re.search(rf"╭─ {panel} ─", proc.stdout), panel
    # flags take no value: `--json true` is not how they read
    assert re.search(r"│ --json  +Machine", proc.stdout) and "--fast/--no-fast" in proc.stdout


@pytest.mark.parametrize("args", [["--help"], ["evaluate", "--help"], ["compare", "--help"], ["report", "--help"],
                                  ["info", "--help"], ["methods", "--help"], ["merge", "--help"],
                                  ["check", "--help"]])
def test_every_help_fits_80_columns(args):
    proc = saliency(*args)
    assert proc.returncode == 0, proc.stderr
    check_fits(proc.stdout)
    assert "<bool>" not in proc.stdout
    cmd = typer.main.get_command(build_app())
    params = cmd.params if args == ["--help"] else cmd.commands[args[0]].params  # type: ignore[attr-defined]
    tokens = words(proc.stdout)
    for p in params:
        for opt in p.opts:
            if opt.startswith("-"):
                assert opt in tokens or any(t.startswith(opt + "/") for t in tokens), opt


def test_saliency_alone_prints_help_without_an_error_line():
    proc = saliency()
    assert proc.returncode in (0, 2)
    assert "explain" in proc.stdout and "error" not in proc.stderr


def test_methods_and_metrics_listings_show_every_name_in_full_at_80_columns():
    proc = saliency("methods")
    assert proc.returncode == 0, proc.stderr
    check_fits(proc.stdout)
    tokens = words(proc.stdout)
    assert all(name in tokens for name in registered_names()), registered_names()
    from saliency_cli.api import list_methods

    for row in list_methods():
        assert str(row["cost"]) in tokens and clean(row["paper"].split()[-1]) in tokens, row["name"]
    proc = saliency("evaluate", "--list-metrics")
    assert proc.returncode == 0, proc.stderr
    check_fits(proc.stdout)
    from saliency_cli.cli.complete import metric_names, sanity_names

    assert all(name in words(proc.stdout) for name in metric_names() + sanity_names())


def printed(monkeypatch, module, function, *args, width=80) -> str:
    buffer = io.StringIO()
    monkeypatch.setattr(module, "err", Console(file=buffer, width=width, highlight=False))
    function(*args)
    return buffer.getvalue()


@pytest.mark.parametrize("width", [80, 200])
def test_evaluate_table_shows_every_metric_method_and_number_in_full(monkeypatch, width):
    from saliency_cli.cli import evaluate

    labels = ["baseline-run/smoothgrad+integrated-gradients.noise0.15", "candidate/fusiongrad", "c/vargrad"]
    metrics = ["deletion", "insertion", "sparseness", "energy-signed"]
    summary = {label: {m: {"mean": 0.1234 + i, "ci95": 0.0567 + j, "n": 6} for j, m in enumerate(metrics)}
               for i, label in enumerate(labels)}
    ev = SimpleNamespace(summary=summary, metrics=metrics, sanity={}, higher_is_better=lambda n: n != "deletion")
    text = printed(monkeypatch, evaluate, evaluate._print_table, ev, width=width)
    check_fits(text, width)
    tokens = words(text)
    assert all(label in tokens for label in labels) and all(m in tokens for m in metrics)
    for i in range(3):
        for j in range(4):
            assert f"{0.1234 + i:.3f}" in tokens and f"{0.0567 + j:.3f}" in tokens


def test_compare_table_shows_every_image_and_number_in_full(monkeypatch):
    from saliency_cli.cli import compare

    pairs = [SimpleNamespace(key=f"holiday/photos/2024/very_long_file_name_number_{i}.jpeg",
                             method="smoothgrad+integrated-gradients", spearman=0.5 + i / 100, iou=None)
             for i in range(3)]
    cmp = SimpleNamespace(run_a=SimpleNamespace(name="before", folder="before"),
                          run_b=SimpleNamespace(name="after", folder="after"), options={"top": 0.1}, pairs=pairs,
                          summary={"smoothgrad+integrated-gradients": {"spearman": {"mean": 0.51},
                                                                        "iou": {"mean": None}}},
                          only_a=[], only_b=[], differences={"sentences": ["the runs used different models"]})
    text = printed(monkeypatch, compare, compare._print_table, cmp)
    check_fits(text)
    tokens = words(text)
    assert all(p.key in tokens for p in pairs) and "smoothgrad+integrated-gradients" in tokens
    assert {"0.500", "0.510", "0.520", "undefined"} <= tokens
    assert "note: the runs used different models" in text


# -- completion (Typer's protocol, as the scripts of --show-completion call it) ------------------------------
def complete(words_typed: str, instruction: str = "complete_bash") -> list[str]:
    cword = len(words_typed.split()) - (0 if words_typed.endswith(" ") else 1)
    proc = saliency(env={"_SALIENCY_COMPLETE": instruction, "COMP_WORDS": words_typed, "COMP_CWORD": str(cword),
                         "_TYPER_COMPLETE_ARGS": words_typed})
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split()


@pytest.mark.parametrize("instruction", ["complete_bash", "bash_complete"])
def test_completion_of_methods_in_a_comma_list(instruction):
    assert complete("saliency explain x.png --method smoothg", instruction) == ["smoothgrad", "smoothgrad-sq"]
    got = complete("saliency explain x.png --method gradient,integ", instruction)
    assert got == ["gradient,integrated-gradients"]


def test_completion_of_metrics_sanity_checks_colormaps_devices_and_choices():
    assert complete("saliency evaluate run --metrics deletion,ins") == ["deletion,insertion"]
    assert complete("saliency evaluate run --sanity rand") == ["randomization"]
    import matplotlib

    assert complete("saliency explain x.png --colormap vir") == sorted(c for c in matplotlib.colormaps
                                                                       if c.startswith("vir"))
    assert complete("saliency explain x.png --device cu") == ["cuda", "cuda:0", "cuda:1"]
    assert complete("saliency explain x.png --quadrature riemann-") == ["riemann-left", "riemann-right",
                                                                         "riemann-middle"]
    assert "--method" in complete("saliency explain x.png --meth")


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_a_completion_script_for_each_shell(shell):
    proc = saliency(env={"_SALIENCY_COMPLETE": f"source_{shell}"})
    assert proc.returncode == 0, proc.stderr
    assert f"_SALIENCY_COMPLETE=complete_{shell}" in proc.stdout
    proc = saliency("--show-completion")  # the shell this runs under
    assert proc.returncode == 0 and "_SALIENCY_COMPLETE" in proc.stdout, proc.stderr


def test_zsh_and_fish_completion_complete_the_last_method_of_a_list():
    typed = "saliency explain x.png --method gradient,smoothgrad-"
    assert complete(typed, "complete_zsh") == ["_arguments", "'*:", ":((\"gradient,smoothgrad-sq\"))'"]
    proc = saliency(env={"_SALIENCY_COMPLETE": "complete_fish", "_TYPER_COMPLETE_ARGS": typed,
                         "_TYPER_COMPLETE_FISH_ACTION": "get-args"})
    assert proc.stdout.split() == ["gradient,smoothgrad-sq"], proc.stderr
