"""Level-1 check of megatron_gbl.megatron_lm against a REAL Megatron-LM tree (not run in CI).

    cd <Megatron-LM tree> && python /path/to/check_args.py

Imports the tree's real megatron.training (arguments, initialize, training), checks the hook
points the launcher wraps, then runs the real parse_args + validate_args (as
initialize_megatron calls it) on a tiny MoE argument list with --moe-lbl-* flags, at
WORLD_SIZE=4. Prints one PASS/FAIL line per check; exits 1 if any failed.
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import inspect
import io
import os
import sys
import warnings

import megatron_gbl
from megatron_gbl import megatron_lm, patch

BASE = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
        "--seq-length", "128", "--max-position-embeddings", "128", "--micro-batch-size", "1",
        "--global-batch-size", "8", "--tokenizer-type", "NullTokenizer", "--vocab-size", "128",
        "--mock-data", "--train-iters", "2", "--lr", "1e-4", "--transformer-impl", "local"]
MOE = ["--num-experts", "8", "--moe-router-topk", "2", "--moe-aux-loss-coeff", "1e-2"]
GLOBAL = ["--moe-lbl-scope=global"]
# name: (argv, expected) with expected "enabled", "disabled", "parser" (argparse exits) or a
# fragment the plugin's ValueError must contain; "a|b": either.
CASES = {
    "global": (MOE + GLOBAL, "enabled"),
    "global N=2 micro-coeff": (MOE + GLOBAL + ["--moe-lbl-sync-group-size", "2",
                                               "--moe-lbl-micro-coeff", "1e-4"], "enabled"),
    "no --moe-lbl-scope": (MOE, "disabled"),
    "N=3 at DP 4": (MOE + GLOBAL + ["--moe-lbl-sync-group-size", "3"],
                    "--moe-lbl-sync-group-size"),
    "sinkhorn": (MOE + GLOBAL + ["--moe-router-load-balancing-type", "sinkhorn"],
                 "--moe-router-load-balancing-type"),
    "none": (MOE + GLOBAL + ["--moe-router-load-balancing-type", "none"],
             "--moe-router-load-balancing-type"),
    "coeff 0": (MOE + GLOBAL + ["--moe-aux-loss-coeff", "0"], "--moe-aux-loss-coeff"),
    "no --num-experts": (GLOBAL, "--num-experts"),
    "micro-coeff without scope": (MOE + ["--moe-lbl-micro-coeff", "1e-4"], "--moe-lbl-scope"),
    "histogram interval -1": (MOE + GLOBAL + ["--moe-lbl-histogram-interval", "-1"],
                              "--moe-lbl-histogram-interval"),
    "scope batch": (MOE + ["--moe-lbl-scope", "batch"], "parser"),
    # A choice of Megatron's parser up to 0.13 only.
    "alltoall_seq": (MOE + GLOBAL + ["--moe-token-dispatcher-type", "alltoall_seq"],
                     "parser|--moe-token-dispatcher-type"),
}
results: list[tuple[bool, str, str]] = []


def report(ok: bool, name: str, detail: str) -> None:
    results.append((ok, name, detail))
    print(f"{'PASS' if ok else 'FAIL'}  {name}: {detail}", flush=True)


def call_sites(module, function: str, callee: str) -> list[tuple[int, set, list]]:
    """(line, keyword names, enclosing `if` tests) of each call to `callee` inside `function`."""
    tree = ast.parse(inspect.getsource(module))
    sites = []

    def walk(node, conditions):
        for child in ast.iter_child_nodes(node):
            inner = conditions
            if isinstance(node, ast.If) and child is not node.test:
                branch = "" if child in node.body else "not "
                inner = conditions + [branch + ast.unparse(node.test)]
            if isinstance(child, ast.Call) and isinstance(child.func, ast.Name) \
                    and child.func.id == callee:
                sites.append((child.lineno, {k.arg for k in child.keywords}, inner))
            walk(child, inner)

    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name == function:
            walk(node, [])
    return sites


def check_hooks(arguments, initialize, training) -> None:
    for owner, name in ((arguments, "_add_moe_args"), (initialize, "validate_args"),
                        (training, "track_moe_metrics")):
        report(hasattr(owner, name), f"hook {owner.__name__}.{name}", "exists"
               if hasattr(owner, name) else "MISSING")
    sites = call_sites(initialize, "initialize_megatron", "validate_args")
    report(bool(sites), "initialize_megatron calls validate_args by module global",
           f"lines {[s[0] for s in sites]}")
    needed = {"loss_scale", "iteration", "writer", "wandb_writer", "track_names"}
    params = set(inspect.signature(training.track_moe_metrics).parameters)
    report(needed <= params, "track_moe_metrics signature", f"missing {needed - params}"
           if needed - params else f"has {sorted(needed)}")
    sites = call_sites(training, "training_log", "track_moe_metrics")
    ok = len(sites) == 1 and needed <= sites[0][1] and sites[0][2] == [
        "args.num_experts is not None"]
    report(ok, "training_log calls track_moe_metrics on every rank",
           "; ".join(f"line {line}, keywords {sorted(kw & needed)}, only if {cond}"
                     for line, kw, cond in sites) or "no call")
    sites = call_sites(training, "train", "training_log")
    report(len(sites) == 1 and not sites[0][2], "train calls training_log every iteration",
           "; ".join(f"line {line}, conditions {cond}" for line, _, cond in sites) or "no call")


def run_case(arguments, initialize, training, name: str, argv: list, expected: str) -> None:
    patch.disable()  # also undoes install(): every case starts from upstream
    megatron_lm.install()
    sys.argv = ["pretrain_gpt.py", *BASE, *argv]
    quiet = io.StringIO()  # Megatron prints its whole argument table
    try:
        with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
            args = arguments.parse_args()
    except SystemExit as exit_:
        report("parser" in expected.split("|"), f"case {name}", f"parser exit {exit_.code}: "
               f"{quiet.getvalue().strip().splitlines()[-1][:160]}")
        return
    try:
        with contextlib.redirect_stdout(quiet):
            initialize.validate_args(args, {})
    except ValueError as error:
        message = str(error)
        ok = message.startswith("megatron_gbl:") and any(
            fragment in message for fragment in expected.split("|"))
        report(ok and not megatron_gbl.is_enabled(), f"case {name}",
               f"plugin ValueError: {message[:160]}")
        return
    except Exception as error:  # noqa: BLE001 - Megatron's own validation rejected it first
        report(False, f"case {name}", f"Megatron {type(error).__name__}: {str(error)[:160]}")
        return
    flags = {k: v for k, v in vars(args).items() if k.startswith("moe_lbl_")}
    state = "enabled" if megatron_gbl.is_enabled() else "disabled"
    hooked = hasattr(training.track_moe_metrics, "__wrapped__")
    report(state == expected and hooked == (state == "enabled"), f"case {name}",
           f"validate_args passed, plugin {state}, track_moe_metrics wrapped={hooked}, "
           f"dp={args.data_parallel_size}, {flags}")


def main() -> int:
    sys.path.insert(0, os.getcwd())  # the Megatron-LM tree, as `python pretrain_gpt.py` has it
    os.environ.update(WORLD_SIZE="4", RANK="0", LOCAL_RANK="0")
    warnings.filterwarnings("ignore")
    try:
        modules = [importlib.import_module(f"megatron.training.{name}")
                   for name in ("arguments", "initialize", "training")]
    except Exception as error:  # noqa: BLE001 - report exactly what cannot be imported
        report(False, "import megatron.training", f"{type(error).__name__}: {error}")
        return 1
    arguments, initialize, training = modules
    from megatron.core import package_info

    report(True, "import megatron.training.{arguments,initialize,training}",
           f"{os.path.dirname(arguments.__file__)} with megatron-core {package_info.__version__}"
           f" from {os.path.dirname(package_info.__file__)}")
    check_hooks(arguments, initialize, training)
    for name, (argv, expected) in CASES.items():
        run_case(arguments, initialize, training, name, argv, expected)
    failed = sum(not ok for ok, _, _ in results)
    print(f"{len(results) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
