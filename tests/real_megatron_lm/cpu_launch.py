"""`python -m megatron_gbl.launch` for a real Megatron-LM tree on CPU with gloo (not run in CI).

    torchrun --standalone --nproc-per-node 2 tests/real_megatron_lm/cpu_launch.py \\
        <Megatron-LM>/pretrain_gpt.py <args> --distributed-backend gloo --moe-lbl-scope=global

Installs the harness's CPU shims plus two for megatron.training, then runs the launcher.
"""

import functools
import importlib
import os
import sys

from megatron_gbl import launch
from megatron_gbl_lab import harness


def install_megatron_training_shims(script: str) -> None:
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    initialize = importlib.import_module("megatron.training.initialize")
    training = importlib.import_module("megatron.training.training")
    # pretrain() asserts "Megatron requires CUDA" unless initialize_megatron(allow_no_cuda=True).
    training.initialize_megatron = functools.partial(training.initialize_megatron,
                                                     allow_no_cuda=True)
    # Runs `make` for the dataset helpers (the wheel ships them built) and builds CUDA kernels.
    initialize._compile_dependencies = lambda: None


if __name__ == "__main__":
    harness.install_cuda_runtime_shims()
    install_megatron_training_shims(sys.argv[1])
    launch.main()
