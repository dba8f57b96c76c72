"""initialize_megatron: parse, validate (names imported as Megatron-LM does), set up groups."""

import torch

from megatron.training import global_vars
from megatron.training.arguments import parse_args, validate_args


def initialize_megatron():
    args = parse_args()
    validate_args(args, {})
    global_vars.ARGS = args
    from megatron_gbl_lab import harness

    harness.install_cpu_shims()
    torch.distributed.init_process_group("gloo")
    harness.init_model_parallel(args.tensor_model_parallel_size,
                                args.pipeline_model_parallel_size)
    return args
