"""Check configs/*.args against a real Megatron-LM's parse_args and validate_args (CPU).

    cd <Megatron-LM tree> && python /path/to/megatron-gbl/scripts/check_configs.py \\
        [--world-size 64] [--ep 8] CONFIG...

The Megatron-LM is the tree in the current directory, else the megatron.training that
megatron-core wheels ship from 0.17 on (0.17-0.18 import pyyaml besides). Not run in CI (it
needs megatron.training's dependencies; the venvs of scripts/check_megatron_lm.sh have them).
Each config gets the arguments the launch scripts add (--mock-data,
--expert-model-parallel-size EP, --moe-lbl-scope global) through the launcher's parser hook, at
WORLD_SIZE (64 GPUs and EP 8 by default, as for the paper configs; configs/tiny_moe.args is for
--world-size 1 --ep 1). Prints one PASS/FAIL line per config; exits 1 if any failed.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import warnings


def read_config(path: str) -> list[str]:
    """Like scripts/lib/megatron_gbl_common.sh: '#' starts a comment, words split on spaces."""
    with open(path) as file:
        return [word for line in file for word in line.split("#", 1)[0].split()]


def main(paths: list[str], world_size: int, expert_parallel: int) -> int:
    sys.path.insert(0, os.getcwd())  # the Megatron-LM tree, as `python pretrain_gpt.py` has it
    os.environ.update(WORLD_SIZE=str(world_size), RANK="0", LOCAL_RANK="0")
    warnings.filterwarnings("ignore")
    import torch
    from megatron.core import package_info
    from megatron.training import arguments

    import megatron_gbl
    from megatron_gbl import megatron_lm, patch

    # validate_args asks the GPU's compute capability for --moe-grouped-gemm: answer as an H100.
    torch.cuda.get_device_capability = lambda *args, **kwargs: (9, 0)
    failed = 0
    for path in paths:
        patch.disable()
        megatron_lm.install()
        sys.argv = ["pretrain_gpt.py", *read_config(path), "--mock-data",
                    "--expert-model-parallel-size", str(expert_parallel),
                    "--moe-lbl-scope", "global"]
        name = (f"{os.path.basename(path)} at megatron-core {package_info.__version__}, "
                f"{world_size} GPUs, EP {expert_parallel}")
        quiet = io.StringIO()  # Megatron prints its whole argument table
        try:
            with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
                args = arguments.parse_args()
                # Defined in arguments.py on every release: initialize_megatron called it up to
                # 0.17, parse_and_validate_args from 0.18 (which would also set the globals).
                arguments.validate_args(args, {})
        except SystemExit:
            print(f"FAIL  {name}: parse_args: {quiet.getvalue().strip().splitlines()[-1]}")
            failed += 1
            continue
        except Exception as error:  # noqa: BLE001 - report what Megatron rejected
            print(f"FAIL  {name}: validate_args: {type(error).__name__}: {error}")
            failed += 1
            continue
        print(f"PASS  {name}: experts {args.num_experts}, top-{args.moe_router_topk}, shared "
              f"{args.moe_shared_expert_intermediate_size}, seq {args.seq_length}, global batch "
              f"{args.global_batch_size}, DP {args.data_parallel_size}, plugin enabled "
              f"{megatron_gbl.is_enabled()}")
    return 1 if failed else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("configs", nargs="+", metavar="CONFIG")
    parser.add_argument("--world-size", type=int, default=64)
    parser.add_argument("--ep", type=int, default=8, help="--expert-model-parallel-size")
    options = parser.parse_args()
    sys.exit(main(options.configs, options.world_size, options.ep))
