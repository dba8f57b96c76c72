"""The package's two parts: the plugin (megatron_gbl) a training job imports, and the lab
(megatron_gbl_lab) beside it; a lean install; a command line that answers before torch loads."""

import ast
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PLUGIN = sorted((ROOT / "megatron_gbl").glob("*.py"))
LAB_ONLY = {"megatron_gbl_lab", "matplotlib", "tqdm"}
# What the plugin may import besides the standard library: what a Megatron training job has
# anyway (wandb only when the job logs to W&B, inside the function that writes to it).
PLUGIN_DEPENDENCIES = {"torch", "megatron", "megatron_gbl", "wandb"}


def imported_modules(path: Path) -> set[str]:
    """Top-level names of every module `path` imports, at module level or inside functions."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "import_module":
            if node.args and isinstance(node.args[0], ast.Constant):
                names.add(node.args[0].value.split(".")[0])
    return names


@pytest.mark.parametrize("path", PLUGIN, ids=lambda path: path.name)
def test_plugin_module_imports_nothing_of_the_lab(path):
    imports = imported_modules(path)
    assert not imports & LAB_ONLY, f"{path.name} imports {imports & LAB_ONLY}"
    third_party = imports - set(sys.stdlib_module_names) - PLUGIN_DEPENDENCIES
    assert not third_party, f"{path.name} imports {third_party}, not a plugin dependency"


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)


def test_plugin_imports_and_measures_routing_without_the_lab():
    # Every plugin module, with the lab and its dependencies unimportable, as if not installed
    # (a None entry in sys.modules makes `import` fail and find_spec answer "not found").
    blocked = ", ".join(repr(name) for name in sorted(LAB_ONLY))
    result = run_python(f"""
import importlib, sys
sys.modules.update(dict.fromkeys(({blocked}), None))
for path in {[path.stem for path in PLUGIN]!r}:
    importlib.import_module("megatron_gbl." + path)
from megatron_gbl.analysis import RoutingCollector, mutual_information
import megatron_gbl
megatron_gbl.enable, megatron_gbl.step_metrics
print("ok", sorted(name for name, module in sys.modules.items()
                   if module is not None and name.split(".")[0] in ({blocked})))
""")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "ok []"


def test_install_brings_megatron_core_alone():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = [requirement.split(";")[0].split(">")[0].split("<")[0].split("=")[0].strip()
                    for requirement in project["dependencies"]]
    assert set(requirements) == {"megatron-core"}
    assert set(project["optional-dependencies"]["demo"]) == {"matplotlib", "tqdm"}
    assert "megatron-gbl[demo]" in project["optional-dependencies"]["test"]
    assert project["scripts"]["megatron-gbl"] == "megatron_gbl_lab.cli:main"


CLI_CALLS = {
    "help": ["--help"],
    "demo help": ["demo", "--help"],
    "analyze help": ["analyze", "--help"],
    "unknown scope": ["demo", "--scopes", "micro,best"],
    "bad int": ["demo", "--steps", "x"],
    "too few ranks": ["demo", "--ranks", "2"],
    "missing data": ["demo", "--train-data", "no.jsonl", "--valid-data", "no.jsonl"],
    "missing model": ["analyze", "--model", "nowhere", "--data", "no.jsonl"],
    "compare help": ["compare", "--help"],
    "missing results": ["compare", "nowhere.json", "--against", "global"],
}


@pytest.mark.parametrize("case", list(CLI_CALLS))
def test_cli_answers_before_torch_is_imported(case):
    result = run_python(f"""
import sys
from megatron_gbl_lab import cli
try:
    cli.main({CLI_CALLS[case]!r})
except SystemExit as exit_:
    print("exit", exit_.code, file=sys.stderr)
print("heavy:", sorted(name for name in ("torch", "megatron") if name in sys.modules))
""")
    assert result.stdout.strip().endswith("heavy: []"), result.stdout
    if "help" in case:
        assert "usage: megatron-gbl" in result.stdout and "exit 0" in result.stderr
    else:
        # One line naming the flag, no usage block above it, no third-party warnings.
        lines = result.stderr.strip().splitlines()
        assert lines[-1] == "exit 2", result.stderr
        assert len(lines) == 2 and lines[0].startswith("megatron-gbl "), result.stderr
        assert "--" in lines[0], lines[0]


def test_console_script_is_installed():
    script = Path(sys.executable).parent / "megatron-gbl"
    if not script.exists():
        pytest.skip("megatron-gbl is not installed in this environment (PYTHONPATH run)")
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True,
                            env={**os.environ, "PYTHONWARNINGS": "default"}, timeout=60)
    assert result.returncode == 0 and result.stdout.startswith("usage: megatron-gbl")
    assert result.stderr == ""


@pytest.mark.parametrize("missing, command", [("tqdm", "demo"), ("matplotlib", "demo"),
                                              ("matplotlib", "analyze")])
def test_lab_command_without_the_extra_says_how_to_install_it(missing, command):
    # A plain `pip install megatron-gbl` has the console script but not the lab's extra: one
    # line naming the fix, exit 2, no traceback, before any rank starts.
    argv = ["demo"] if command == "demo" else ["analyze", "--model", "m", "--data", "d.jsonl"]
    result = run_python(f"""
import sys
sys.modules[{missing!r}] = None  # as if not installed
from megatron_gbl_lab import cli
try:
    cli.main({argv!r})
except SystemExit as exit_:
    print("exit", exit_.code, file=sys.stderr)
""")
    lines = result.stderr.strip().splitlines()
    assert lines == [f"megatron-gbl {command}: error: {missing} not installed (the lab's extra): "
                     'pip install "megatron-gbl[demo]"', "exit 2"], result.stderr
