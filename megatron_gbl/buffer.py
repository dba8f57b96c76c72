"""The gradient-accumulation buffer of paper Algorithm 1, for one router."""

from __future__ import annotations

from typing import Optional

import torch


class StepBuffer:
    """Synced expert counts of the current optimizer step's micro-batches so far.

    Keyed by micro-batch index k: the k-th training call of the router in a step is micro-batch
    k, and f for it uses the counts of micro-batches 0..k (Alg. 1 lines 4-5), normalised by the
    valid tokens of those same micro-batches. Megatron runs backward recomputes in forward
    order and its no-grad first pass of activation recompute never reaches the buffer, so the
    index is the same with recompute on or off and under every pipeline schedule.

    Counts are int64: exact at any scale, and untouched by Float16Module (it casts float
    tensors of registered buffers; these are neither).
    """

    def __init__(self) -> None:
        self.tokens_per_expert: Optional[torch.Tensor] = None  # int64 [E], Σ_{j<=k} c_j
        self.num_tokens: Optional[torch.Tensor] = None  # int64 [], Σ_{j<=k} t_j
        self.num_microbatches = 0  # k + 1 after micro-batch k
        self.expected_microbatches: Optional[int] = None
        self.started = False

    def reset(self, expected_microbatches: Optional[int] = None) -> None:
        """Start a new optimizer step (Alg. 1 line 8)."""
        self.tokens_per_expert = None
        self.num_tokens = None
        self.num_microbatches = 0
        self.expected_microbatches = expected_microbatches
        self.started = True

    def add(
        self, tokens_per_expert_E: torch.Tensor, num_tokens: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Add micro-batch k's synced counts; return the prefix sums over micro-batches 0..k."""
        if not self.started:
            raise RuntimeError(
                "megatron_gbl: scope='global' needs the optimizer-step boundary: train through "
                "megatron.core.pipeline_parallel.get_forward_backward_func() (reset is automatic) "
                "or call megatron_gbl.start_step(model) before each step of a custom loop"
            )
        if self.expected_microbatches is not None and \
                self.num_microbatches >= self.expected_microbatches:
            raise RuntimeError(
                f"megatron_gbl: a router ran {self.num_microbatches + 1} training forwards in a "
                f"step of {self.expected_microbatches} micro-batches, so a micro-batch would be "
                "counted twice. Non-reentrant activation checkpointing re-runs the router with "
                "gradients on; use Megatron's recompute (--recompute-granularity / "
                "--recompute-modules), which replays it once"
            )
        if self.tokens_per_expert is None:
            self.tokens_per_expert = tokens_per_expert_E.clone()
            self.num_tokens = num_tokens.clone()
        else:
            self.tokens_per_expert += tokens_per_expert_E
            self.num_tokens += num_tokens
        self.num_microbatches += 1
        return self.tokens_per_expert, self.num_tokens
