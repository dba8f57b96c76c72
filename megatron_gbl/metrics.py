"""Per-step balance statistics for logging: computed without gradient, reduced once per step.

Every router keeps the local [c_1..c_E, s_1..s_E, T] of each micro-batch of the step
(lbl.microbatch_stats). `step_metrics` reduces them for all layers of this pipeline stage at once:

- one all-reduce over TP x CP of the per-micro-batch stats [L, M, 2E+1]: each micro-batch as
  Megatron's aux_loss sees it;
- one all-reduce over TP x DP x CP of their sums over the step [L, 2E+1]: the global batch.

    LBL(c, s, T)   = N_E * Σ_i c_i / (K T) * s_i / T        (paper eq. 2, value without coeff)
    load violation = max_i c_i / mean_i c_i - 1             (MaxVio of Wang et al. 2024)

Micro-batch values are averaged over the step's micro-batches here and over data-parallel ranks
by Megatron's tracker; global values are the same on every rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from megatron_gbl import comm, compat
from megatron_gbl.loss import load_balancing_loss

MICRO_LBL = "micro_batch_lbl"
GLOBAL_LBL = "global_batch_lbl"
MICRO_LOAD_VIOLATION = "micro_batch_load_violation"
GLOBAL_LOAD_VIOLATION = "global_batch_load_violation"
BALANCE_BSZ = "balance_bsz_tokens"
NAMES = (MICRO_LBL, GLOBAL_LBL, MICRO_LOAD_VIOLATION, GLOBAL_LOAD_VIOLATION, BALANCE_BSZ)


@dataclass(frozen=True)
class StepMetrics:
    """One training step's statistics for the routers of this pipeline stage.

    values: name (one of NAMES) -> float64 [L], in the order of `layer_numbers`.
    global_tokens_per_expert: int64 [L, E], expert choices over the whole global batch.
    """

    layer_numbers: list[int]
    values: dict[str, torch.Tensor]
    global_tokens_per_expert: torch.Tensor


def load_violation(tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
    """max_i c_i / mean_i c_i - 1 over the last axis: [..., E] -> [...]; 0 when nothing routed."""
    mean = tokens_per_expert_E.double().mean(dim=-1)
    peak = tokens_per_expert_E.double().amax(dim=-1)
    return torch.where(mean > 0, peak / torch.where(mean > 0, mean, 1.0) - 1, 0.0)


def lbl_value(stats_X: torch.Tensor, topk: int) -> torch.Tensor:
    """LBL of [..., 2E+1] stats [c, s, T], f and P both over the same T: [...] (eq. 2)."""
    counts_E, probs_sum_E, num_tokens_1 = _split(stats_X)
    return load_balancing_loss(probs_sum_E, counts_E, num_tokens_1, num_tokens_1, topk,
                               counts_E.shape[-1], coeff=1.0)


def step_metrics(routers: Sequence) -> Optional[StepMetrics]:
    """Reduce and compute this step's statistics; None when no router trained this step.

    A collective: every rank of the pipeline stage calls it after the same step.
    """
    routers = [router for router in routers if router._megatron_gbl.microbatch_stats]
    if not routers:
        return None
    stats_LMX = torch.stack([torch.stack(router._megatron_gbl.microbatch_stats)
                             for router in routers])
    global_LX = comm.all_reduce_sum(stats_LMX.sum(dim=1), compat.tp_dp_cp_group(routers[0]))
    micro_LMX = comm.all_reduce_sum(stats_LMX, compat.tp_cp_group(routers[0]))
    topk = routers[0].topk
    values = {
        MICRO_LBL: lbl_value(micro_LMX, topk).mean(dim=1),
        GLOBAL_LBL: lbl_value(global_LX, topk),
        MICRO_LOAD_VIOLATION: load_violation(_split(micro_LMX)[0]).mean(dim=1),
        GLOBAL_LOAD_VIOLATION: load_violation(_split(global_LX)[0]),
        # Stacked where the counts live: no host round trip per layer, and a device tensor for
        # Megatron's tracker all-reduce on NCCL.
        BALANCE_BSZ: torch.stack([router._megatron_gbl.balance_tokens().double()
                                  for router in routers]),
    }
    return StepMetrics(
        layer_numbers=[router.layer_number for router in routers],
        values=values,
        global_tokens_per_expert=_split(global_LX)[0].round().long(),
    )


def _split(stats_X: torch.Tensor):
    num_experts = (stats_X.shape[-1] - 1) // 2
    return stats_X[..., :num_experts], stats_X[..., num_experts:-1], stats_X[..., -1:]
