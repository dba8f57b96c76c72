"""Run a Megatron-LM entry script with the --moe-lbl-* flags, without editing Megatron-LM.

    torchrun --nproc-per-node 8 -m megatron_gbl.launch /path/to/Megatron-LM/pretrain_gpt.py \\
        <the usual Megatron-LM arguments> --moe-lbl-scope=global

The script runs as `__main__` exactly as `python pretrain_gpt.py ...` would, with its own
directory first on sys.path (where a Megatron-LM checkout keeps `megatron/training`; megatron-core
wheels ship it too from 0.17 on). A bad --moe-lbl-* flag ends the run before training with one
line from rank 0 and exit status 2: the flags alone are checked before the script starts, their
combination with Megatron's arguments right after Megatron's `validate_args`.
"""

from __future__ import annotations

import argparse
import os
import runpy
import sys
import traceback
from typing import NoReturn, Optional

USAGE = (
    "usage: python -m megatron_gbl.launch ENTRY_SCRIPT [MEGATRON-LM ARGS ...] "
    "[--moe-lbl-scope {micro,seq,dp,global}] [--moe-lbl-sync-group-size N] "
    "[--moe-lbl-micro-coeff C] [--moe-lbl-blocking-sync] [--moe-lbl-histogram-interval N]\n"
    "ENTRY_SCRIPT is Megatron-LM's pretrain_gpt.py (or any script that trains through "
    "megatron.training)."
)


class FlagParser(argparse.ArgumentParser):
    """The --moe-lbl-* flags alone (this launcher's and megatron_gbl.bridge's); a bad one is a
    ValueError, reported like every other (`stop_before_training`)."""

    def error(self, message: str) -> NoReturn:
        raise ValueError(f"megatron_gbl: {message}")


def stop_before_training(message) -> NoReturn:
    """End the run before training: rank 0 prints the one-line message and exits with status 2,
    every other rank exits quietly with status 0. torchrun stops all workers as soon as one
    fails, so a failing rank other than 0 could end rank 0 before it printed anything."""
    import torch

    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() \
        else int(os.environ.get("RANK", "0"))
    if rank == 0:
        print(message, file=sys.stderr, flush=True)
    raise SystemExit(2 if rank == 0 else 0)


def parse_flags(parser: argparse.ArgumentParser, arguments: list[str]):
    """(the --moe-lbl-* flags `parser` knows, parsed from `arguments`; their Settings, None
    without --moe-lbl-scope; the other arguments). A bad flag ends the run
    (`stop_before_training`)."""
    from megatron_gbl import megatron_lm

    try:
        flags, others = parser.parse_known_args(arguments)
        return flags, megatron_lm.settings_from_args(flags), others
    except ValueError as error:
        stop_before_training(error)


def _raised_by(error: BaseException, function) -> bool:
    """Whether `error` was raised inside `function` (a frame of its code in the traceback)."""
    return any(frame.f_code is function.__code__
               for frame, _ in traceback.walk_tb(error.__traceback__))


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
    parse_flags(megatron_lm.add_arguments(FlagParser(add_help=False, allow_abbrev=False)),
                script_args)
    sys.argv = [script, *script_args]
    try:
        runpy.run_path(script, run_name="__main__")
    except ValueError as error:
        # The plugin's check of the flags against Megatron's validated arguments: its one-line
        # message, without the traceback through Megatron's code. Other errors keep theirs.
        if not _raised_by(error, megatron_lm.configure):
            raise
        stop_before_training(error)


if __name__ == "__main__":
    main()
