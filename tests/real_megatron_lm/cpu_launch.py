"""`python -m megatron_gbl.launch` on CPU with gloo, for a Megatron-LM tree or the
megatron.training of an installed megatron-core wheel (0.17 on; tests/test_megatron_lm.py runs
the latter through it).

    torchrun --standalone --nproc-per-node 2 tests/real_megatron_lm/cpu_launch.py \\
        <Megatron-LM>/pretrain_gpt.py <args> --distributed-backend gloo --moe-lbl-scope=global

Silences the third-party notices the lab knows (megatron_gbl_lab.quiet), installs the lab's CPU
shims for Megatron-LM's training loop, then runs the launcher.
"""

import os
import sys

import megatron_gbl_lab.quiet  # noqa: F401 - before torch and Megatron-Core are imported
from megatron_gbl import launch
from megatron_gbl_lab import harness

if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(sys.argv[1])))  # as the launcher does
    harness.install_megatron_lm_shims()
    launch.main()
