"""Check configs/*.args against a real Megatron-LM tree's parse_args and validate_args (CPU).

    cd <Megatron-LM tree> && python /path/to/megatron-gbl/scripts/check_configs.py CONFIG...

Not run in CI (it needs a Megatron-LM tree and megatron.training's dependencies; the venvs of
scripts/check_megatron_lm.sh have them). Each config gets the arguments the launch scripts add
(--mock-data, --expert-model-parallel-size 8, --moe-lbl-scope global) through the launcher's
parser hook, at WORLD_SIZE=64. Prints one PASS/FAIL line per config; exits 1 if any failed.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import warnings


def read_config(path: str) -> list[str]:
    """Like scripts/lib/megatron_gbl_common.sh: '#' starts a comment, words split on spaces."""
    with open(path) as file:
        return [word for line in file for word in line.split("#", 1)[0].split()]


def main(paths: list[str]) -> int:
    sys.path.insert(0, os.getcwd())  # the Megatron-LM tree, as `python pretrain_gpt.py` has it
    os.environ.update(WORLD_SIZE="64", RANK="0", LOCAL_RANK="0")
    warnings.filterwarnings("ignore")
    import torch
    from megatron.core import package_info
    from megatron.training import arguments, initialize

    import megatron_gbl
    from megatron_gbl import megatron_lm, patch

    # validate_args asks the GPU's compute capability for --moe-grouped-gemm: answer as an H100.
    torch.cuda.get_device_capability = lambda *args, **kwargs: (9, 0)
    failed = 0
    for path in paths:
        patch.disable()
        megatron_lm.install()
        sys.argv = ["pretrain_gpt.py", *read_config(path), "--mock-data",
                    "--expert-model-parallel-size", "8", "--moe-lbl-scope", "global"]
        name = f"{os.path.basename(path)} at megatron-core {package_info.__version__}"
        quiet = io.StringIO()  # Megatron prints its whole argument table
        try:
            with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
                args = arguments.parse_args()
                initialize.validate_args(args, {})
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
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help"):
        print(__doc__)
        sys.exit(0 if len(sys.argv) > 1 else 2)
    sys.exit(main(sys.argv[1:]))
