"""The part of Megatron-LM's arguments.py the launcher relies on.

Like Megatron-LM, parse_args builds its parser by calling `_add_moe_args` through this
module's globals, and validate_args derives data_parallel_size and collapses one-element lists.
"""

import argparse
import os


def parse_args():
    parser = argparse.ArgumentParser(description="Megatron-LM-shaped arguments")
    parser = _add_training_args(parser)
    parser = _add_moe_args(parser)
    return parser.parse_args()


def _add_training_args(parser):
    group = parser.add_argument_group(title="training")
    group.add_argument("--num-layers", type=int, default=2)
    group.add_argument("--hidden-size", type=int, default=32)
    group.add_argument("--seq-length", type=int, default=8)
    group.add_argument("--micro-batch-size", type=int, default=2)
    group.add_argument("--global-batch-size", type=int, default=None)
    group.add_argument("--train-iters", type=int, default=2)
    group.add_argument("--tensor-model-parallel-size", type=int, default=1)
    group.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    group.add_argument("--tensorboard-dir", default=None)
    group.add_argument("--seed", type=int, default=1234)
    return parser


def _add_moe_args(parser):
    group = parser.add_argument_group(title="moe")
    group.add_argument("--num-experts", type=int, default=None)
    group.add_argument("--moe-router-topk", type=int, default=2)
    group.add_argument("--moe-router-load-balancing-type", nargs="+", default="aux_loss",
                       choices=["aux_loss", "seq_aux_loss", "global_aux_loss", "sinkhorn", "none"])
    group.add_argument("--moe-aux-loss-coeff", type=float, nargs="+", default=0.0)
    group.add_argument("--moe-token-dispatcher-type", default="allgather")
    group.add_argument("--moe-router-score-function", default="softmax",
                       choices=["softmax", "sigmoid"])
    group.add_argument("--moe-router-enable-expert-bias", action="store_true")
    group.add_argument("--moe-router-bias-update-rate", type=float, default=1e-3)
    return parser


def validate_args(args, defaults={}):
    args.world_size = int(os.getenv("WORLD_SIZE", "1"))
    model_parallel = args.tensor_model_parallel_size * args.pipeline_model_parallel_size
    args.data_parallel_size = args.world_size // model_parallel
    if args.global_batch_size is None:
        args.global_batch_size = args.micro_batch_size * args.data_parallel_size
    for name in ("moe_router_load_balancing_type", "moe_aux_loss_coeff"):
        value = getattr(args, name)
        if isinstance(value, list) and len(value) == 1:
            setattr(args, name, value[0])
    return args
