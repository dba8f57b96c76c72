"""Run a Megatron-LM entry script with the --moe-lbl-* flags, without editing Megatron-LM.

    torchrun --nproc-per-node 8 -m megatron_gbl.launch /path/to/Megatron-LM/pretrain_gpt.py \\
        <the usual Megatron-LM arguments> --moe-lbl-scope=global

The script runs as `__main__` exactly as `python pretrain_gpt.py ...` would, with its own
directory first on sys.path (where a Megatron-LM checkout keeps `megatron/training`; megatron-core
wheels ship it too from 0.17 on).
"""

from __future__ import annotations

import os
import runpy
import sys
from typing import Optional

USAGE = (
    "usage: python -m megatron_gbl.launch ENTRY_SCRIPT [MEGATRON-LM ARGS ...] "
    "[--moe-lbl-scope {micro,seq,dp,global}] [--moe-lbl-sync-group-size N] "
    "[--moe-lbl-micro-coeff C] [--moe-lbl-blocking-sync] [--moe-lbl-histogram-interval N]\n"
    "ENTRY_SCRIPT is Megatron-LM's pretrain_gpt.py (or any script that trains through "
    "megatron.training)."
)


def main(argv: Optional[list[str]] = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return
    script, *script_args = argv
    if not os.path.isfile(script):
        raise SystemExit(
            f"megatron_gbl.launch: entry script {script!r} not found; pass the path of "
            "Megatron-LM's pretrain_gpt.py as the first argument\n" + USAGE)
    if "--yaml-cfg" in script_args and any(arg.startswith("--moe-lbl-") for arg in script_args):
        raise SystemExit(
            "megatron_gbl.launch: --yaml-cfg replaces Megatron-LM's command-line arguments and "
            "their validation (0.18+), so the --moe-lbl-* flags would be ignored; give the run's "
            "arguments on the command line instead of --yaml-cfg\n" + USAGE)
    script_dir = os.path.dirname(os.path.abspath(script))
    sys.path.insert(0, script_dir)
    try:
        from megatron_gbl import megatron_lm

        megatron_lm.install()
    except ModuleNotFoundError as error:
        if not (error.name or "").startswith("megatron.training"):
            raise SystemExit(
                f"megatron_gbl.launch: Megatron-LM's training code (megatron.training) imports "
                f"{error.name}, which is not installed: install Megatron-LM's requirements (for "
                "yaml: pip install pyyaml)") from error
        raise SystemExit(
            f"megatron_gbl.launch: cannot import {error.name} (Megatron-LM's training code, part "
            f"of megatron-core wheels only from 0.17 on). Keep {os.path.basename(script)} inside "
            "a Megatron-LM checkout, or put the checkout on PYTHONPATH") from error
    sys.argv = [script, *script_args]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
