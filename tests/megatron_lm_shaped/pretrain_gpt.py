"""A Megatron-LM-shaped entry script for the launcher tests (CI has no Megatron-LM checkout).

Same shape as Megatron-LM's pretrain_gpt.py (core_r0.12-0.16): a `__main__` block that hands
providers to `megatron.training.pretrain`, which parses and validates the arguments through
`megatron.training.initialize`, builds the model and trains through Megatron-Core's schedules,
logging MoE metrics through `track_moe_metrics` every iteration.
"""

from megatron.training import pretrain

if __name__ == "__main__":
    pretrain()
