"""Stand-in for Megatron-LM's megatron.training, with its hook points at the same names."""

from megatron.training.global_vars import get_args  # noqa: F401
from megatron.training.training import pretrain  # noqa: F401
