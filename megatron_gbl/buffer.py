"""The gradient-accumulation buffer of paper Algorithm 1, for one router."""

from __future__ import annotations

import torch

from megatron_gbl.comm import PendingSum


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
        self.synced_counts: list[PendingSum] = []  # micro-batch j: [c_j (E), t_j], int64
        self._prefix_sums: list[torch.Tensor] = []  # k: Σ_{j<=k} [c_j, t_j], filled on demand

    @property
    def num_microbatches(self) -> int:
        return len(self.synced_counts)

    def reset(self) -> None:
        """Start a new optimizer step (Alg. 1 line 8)."""
        self.synced_counts = []
        self._prefix_sums = []

    def add(self, synced_counts: PendingSum) -> int:
        """Add micro-batch k's counts [c_k, t_k] (possibly still being summed); return k."""
        self.synced_counts.append(synced_counts)
        return self.num_microbatches - 1

    def prefix(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(Σ_{j<=k} c_j, Σ_{j<=k} t_j) (Alg. 1 lines 4-5), waiting for the sums it needs."""
        while len(self._prefix_sums) <= k:
            counts = self.synced_counts[len(self._prefix_sums)].wait()
            self._prefix_sums.append(
                counts if not self._prefix_sums else self._prefix_sums[-1] + counts)
        return self._prefix_sums[k][:-1], self._prefix_sums[k][-1]
