"""The house rules, checked on the source: imports only go down, no cycles, the CLI alone speaks Typer/Rich, the
oracle alone calls autograd or writes parameters, and the command line answers without importing torch."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "saliency_cli"
# Layers from the top: a module may import its own package and anything in a lower layer.
LAYERS = [{"__main__"}, {"cli"}, {"api"}, {"pipeline"}, {"runfolder"}, {"methods", "metrics"},
          {"oracle", "models", "render"}, {"data", "reduce", "writers"}, {"processors"}, {"numerics"}, {"errors"}]
LOWEST = {"__init__"}  # the package's own version module
# Inside saliency_cli.models, from the top: the entry point, the sources, then what they share.
MODEL_LAYERS = [{"__init__"}, {"loader"}, {"in_memory"}, {"default", "timm_source", "programs"},
                {"torchvision_source", "transformers_source"}, {"labels", "fitting"},
                {"checkpoints", "outputs", "data_config"}, {"provenance", "loaded"}, {"messages"}]


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(path: Path, known: set[str]) -> set[str]:
    """Every saliency_cli module imported anywhere in the file (function-level imports too). `from pkg import x`
    counts as importing pkg.x when that is a module, else pkg."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("saliency_cli"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("saliency_cli"):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in known else node.module)
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: {m for m in imports_of(path, known) if m != name} for name, path in mods.items()}


def top(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def layer(name: str) -> int:
    part = top(name)
    if part in LOWEST:
        return len(LAYERS)
    return next(i for i, group in enumerate(LAYERS) if part in group)


def test_every_module_is_in_a_layer():
    """A new top-level module must be placed in the layer table above (and so in docs/ARCHITECTURE.md's layout)."""
    for name in modules():
        layer(name)


def test_imports_only_go_down():
    """cli -> api -> pipeline -> methods, metrics -> oracle, models, data, ... -> errors; methods and metrics never
    import each other; the package root imports nothing."""
    bad = []
    for name, deps in graph().items():
        for dep in deps:
            same_package = top(dep) == top(name)
            if same_package and top(name) in ("methods", "metrics") or dep == "saliency_cli":
                continue
            if not same_package and layer(dep) <= layer(name) and top(dep) not in LOWEST:
                bad.append(f"{name} -> {dep}")
    assert not bad, bad


def test_models_modules_import_only_down():
    """Each module of the models package is in MODEL_LAYERS and imports only modules of lower layers there; the
    package itself is imported by none of them."""
    def model_layer(name: str) -> int:
        part = name.split(".")[2] if name.count(".") >= 2 else "__init__"
        return next(i for i, group in enumerate(MODEL_LAYERS) if part in group)

    bad = []
    for name, deps in graph().items():
        if top(name) != "models":
            continue
        for dep in deps:
            if top(dep) == "models" and model_layer(dep) <= model_layer(name):
                bad.append(f"{name} -> {dep}")
    assert not bad, bad


def test_no_import_cycles():
    """No cycle in the import graph, counting imports inside functions (Tarjan's strongly connected components)."""
    g = graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in g.get(v, ()):
            if w not in g:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(component)

    for v in g:
        if v not in index:
            visit(v)
    assert not cycles, cycles


# JSON parsed outside the run folder's owner: other files than run-folder files, each with its reason
OTHER_JSON = {
    "saliency_cli.models": "model config, labels and checkpoint metadata files (the package's modules)",
    "saliency_cli.metrics.localisation": "--boxes files",
    "saliency_cli.cli.options": "the --model-kwargs value",
    "saliency_cli.writers": "jsonable(): its own json.dumps read back",
}
RUN_FOLDER_FILES = ("manifest", ".jsonl", "run.json", "run.shard", "evaluation.json", "comparison.json")


def _docstrings(tree: ast.AST) -> set[int]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                found.add(id(first.value))
    return found


def test_only_the_runfolder_reads_manifests_and_run_records():
    """No module outside saliency_cli/runfolder/ parses JSON (json.load/json.loads) but for the files listed in
    OTHER_JSON, and none names a run-folder file (manifest*.jsonl, run.json, run.shard-*, evaluation.json,
    comparison.json) as a file name in code (docstrings and messages aside): every reader goes through runfolder."""
    bad = []
    for name, path in modules().items():
        if top(name) == "runfolder":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        docs = _docstrings(tree)
        formatted = {id(v) for node in ast.walk(tree) if isinstance(node, ast.JoinedStr) for v in node.values}
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and node.attr in ("load", "loads")
                    and isinstance(node.value, ast.Name) and node.value.id == "json"
                    and not any(name == k or name.startswith(k + ".") for k in OTHER_JSON)):
                bad.append(f"{name}:{node.lineno} json.{node.attr}")
            if (isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs
                    and id(node) not in formatted and not any(c.isspace() for c in node.value)
                    and any(f in node.value for f in RUN_FOLDER_FILES)):
                bad.append(f"{name}:{node.lineno} {node.value!r}")
    assert not bad, bad


def _calls(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            names.add(node.attr)
        elif isinstance(node, ast.Name):
            names.add(node.id)
    return names


def test_only_the_cli_imports_typer_or_rich():
    for name, path in modules().items():
        if top(name) == "cli":
            continue
        text = path.read_text(encoding="utf-8")
        assert "import typer" not in text and "from typer" not in text, name
        assert "import rich" not in text and "from rich" not in text, name


def test_only_the_oracle_calls_autograd_or_writes_parameters():
    """`autograd`, `.backward(` and in-place writes of parameters (`copy_`/`normal_` on them) live in oracle.py."""
    for name, path in modules().items():
        if name == "saliency_cli.oracle":
            continue
        text = path.read_text(encoding="utf-8")
        assert "autograd" not in text and ".backward(" not in text, name
        assert "parameters()" not in text or ".copy_(" not in text, name


def run_without_torch(*args: str) -> subprocess.CompletedProcess[str]:
    """`saliency ARGS` in a fresh interpreter where `import torch` fails."""
    code = ("import sys; sys.modules['torch'] = None; sys.argv[0] = 'saliency'; "
            "from saliency_cli.cli import main; main()")
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=60,
                          env={"COLUMNS": "200", "PATH": ""})


@pytest.mark.parametrize("args", [["--help"], ["explain", "--help"], ["evaluate", "--help"], ["--version"]])
def test_help_and_version_need_no_torch(args):
    proc = run_without_torch(*args)
    assert proc.returncode == 0, proc.stderr
    assert "saliency" in proc.stdout


@pytest.mark.parametrize("args, words", [
    (["explain", "x.jpg", "--method", "nosuch"], ["nosuch", "saliency methods"]),
    (["explain", "x.jpg", "-n", "0"], ["--samples", "between 1 and"]),
    (["explain", "x.jpg", "--quadrature", "simpson"], ["--quadrature", "simpson"]),
    (["explain", "x.jpg", "--weight-noise", "lots"], ["--weight-noise", "auto"]),
    (["explain", "x.jpg", "--noise", "nan"], ["--noise", "finite"]),
    (["explain", "x.jpg", "--batch-size", "0"], ["--batch-size"]),
    (["explain", "x.jpg", "--target", "topk:x"], ["topk"]),
    (["explain", "x.jpg", "--precision", "fp64"], ["--precision"]),
    (["explain", "x.jpg", "--method", "smoothgard"], ["did you mean 'smoothgrad'", "saliency methods"]),
    (["explain", "x.jpg", "--reduce", "mean-abs-su"], ["--reduce", "'mean-abs-sum'"]),
    (["explain", "x.jpg", "-o", ""], ["-o/--out"]),
    (["explain", "x.jpg"], ["input x.jpg does not exist"]),
])
def test_usage_errors_need_no_torch(args, words):
    """Each is one line, exit 2, and is found before torch would be imported (the import would fail here)."""
    proc = run_without_torch(*args)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("saliency: error: "), proc.stderr
    for word in words:
        assert word in lines[0]


def test_registered_names_are_read_without_importing_the_methods():
    """The torch-free name index equals the registry."""
    from saliency_cli.methods import METHODS, registered_names

    assert sorted(registered_names()) == sorted(METHODS)


def test_no_function_is_longer_than_about_80_lines():
    long = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > 85:
                    long.append(f"{name}.{node.name}: {length}")
    assert not long, long


# -- a new method with a new option is one method file plus one settings row --------------------------------
def test_a_toy_method_with_a_new_option_is_in_help_validation_and_listing(tmp_path, capsys):
    """Registering a method and adding one settings row is all it takes: the option appears in `explain --help`,
    its check rejects a bad value with a one-line usage error, and `methods --json` lists the method with it."""
    from typer.testing import CliRunner

    from saliency_cli.cli import build_app
    from saliency_cli.methods import METHODS
    from saliency_cli.methods.base import Attribution, register
    from saliency_cli.methods.settings import SETTINGS, Setting, add_setting, at_least

    add_setting(Setting("wobble", "toy: how much to wobble", int, check=at_least(3)))
    try:
        @register("toy-wobble", summary="A toy", paper="none", defaults={"wobble": 5}, stochastic=False,
                  cost=lambda h: 1)
        def toy(oracle, x, target, *, generators, ctx, wobble):  # noqa: ANN001, ANN202
            g, _ = oracle.gradients(x, target)
            return Attribution(g * wobble)

        runner = CliRunner()
        app = build_app()
        help_text = runner.invoke(app, ["explain", "--help"], env={"COLUMNS": "250"}).output
        assert "--wobble" in help_text and "how much to wobble" in help_text
        listing = json.loads(runner.invoke(app, ["methods", "--json"]).output)
        toy_row = next(r for r in listing if r["name"] == "toy-wobble")
        assert toy_row["defaults"] == {"wobble": 5} and toy_row["settings"]["wobble"]["option"] == "--wobble"
        from saliency_cli.cli.app import main

        with pytest.raises(SystemExit) as exit_info:
            main(["explain", str(tmp_path), "--method", "toy-wobble", "--wobble", "2"])
        assert exit_info.value.code == 2
        assert "--wobble 2: must be at least 3" in capsys.readouterr().err
    finally:
        METHODS.pop("toy-wobble", None)
        SETTINGS.pop("wobble", None)
