"""Auxiliary-loss-free balancing (Wang et al. 2024, arXiv 2408.15664) with a balance scope.

Megatron-Core's router adds a per-expert bias b (fp32) to the scores for top-k selection only;
the gate weights stay the unbiased scores. After each update period the plugin nudges it:

    b_i += u * mean_g sign(mean_j c_gj - c_gi)          (Wang et al. Alg. 1, eq. 3-4)

c_g: expert choices (the dispatched routing map, valid tokens only) of balance group g, u:
moe_router_bias_update_rate. The scope sets the period and the groups:

    micro   every micro-batch; g = one data-parallel replica's micro-batch (counts over TP x CP)
    dp      every micro-batch; g = the micro-batch of a balance block (or of all replicas)
    global  once per step; g = the step's global batch: Megatron-Core's own update
            (finalize_model_grads._update_router_expert_bias), counts all-reduced over TP x DP x CP

Averaging the sign over the groups keeps b identical on every replica, as eq. 3 of Qiu et al.
averages the micro-batch LBL over parallel groups; with one group it is the plain sign.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from megatron_gbl import comm


def load_error_sign(tokens_per_expert_XE: torch.Tensor) -> torch.Tensor:
    """sign(mean_j c_j - c_i) over the last axis: +1 underloaded, -1 overloaded; float64 [..., E].

    Counts are int64 (or float64 holding integers): the mean is exact, so an expert exactly at
    the mean gets 0, as in Megatron's get_updated_expert_bias.
    """
    counts_XE = tokens_per_expert_XE.double()
    return torch.sign(counts_XE.mean(dim=-1, keepdim=True) - counts_XE)


def bias_update(sign_sum_XE: torch.Tensor, num_groups: int, rate: float) -> torch.Tensor:
    """u * mean_g sign_g from the sum of the groups' signs: float64 [..., E]."""
    return sign_sum_XE * (rate / num_groups)


class ExpertBiasUpdater:
    """The expert-bias update of one router at the scope in force.

    micro/dp: `record` issues the micro-batch's count sum over the balance group; the update
    is applied by `apply_pending`, before the router's next routing (the next micro-batch) or at
    the end of the step, so the sum overlaps the rest of the micro-batch.
    global: `record` adds the micro-batch's local counts to the step's; `apply_step_update` of
    all routers of the stage runs once per step.
    """

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.step_counts: Optional[torch.Tensor] = None  # int64 [E+1], local, global scope
        self._pending = None  # (PendingSum of [c (E), T], average group), micro/dp scope
        self.balance_tokens: Optional[torch.Tensor] = None  # tokens of the last update's counts
        self._step_start: Optional[torch.Tensor] = None  # the bias before this step's updates

    def start_step(self, bias_snapshot: Optional[torch.Tensor] = None) -> None:
        """Start a step; `bias_snapshot`, a copy of the bias (`snapshot`), undoes the step's
        updates if it is discarded."""
        self.step_counts = None
        self._pending = None
        self._step_start = bias_snapshot

    def restore_step_start(self, expert_bias: torch.Tensor) -> None:
        """Undo the updates of this step (micro/dp scopes update after each micro-batch)."""
        if self._step_start is not None:
            with torch.no_grad():
                expert_bias.copy_(self._step_start)

    def close_step(self) -> None:
        """End the step without applying anything more (finished, or discarded after a fault)."""
        self.step_counts = None
        self._pending = None

    @property
    def recorded(self) -> bool:
        return self.step_counts is not None or self._pending is not None

    def record(self, local_counts: torch.Tensor, scope: str, balance_group, average_group,
               blocking: bool, what) -> None:
        """Take this micro-batch's local counts [c (E), T] (int64) at `scope`; `what` names the
        count sum in errors."""
        if scope == "global":
            self.step_counts = local_counts if self.step_counts is None \
                else self.step_counts + local_counts
            return
        self._pending = (comm.PendingSum(local_counts.clone(), balance_group, blocking, what),
                         average_group)

    def apply_pending(self, expert_bias: torch.Tensor) -> None:
        """Apply the last micro-batch's update (micro/dp), if one is waiting."""
        if self._pending is not None:
            apply_pending_updates([expert_bias], [self])

    def take_pending(self):
        """(the last micro-batch's synced counts [c (E), T], its average group), or None; the
        update is no longer pending then."""
        pending, self._pending = self._pending, None
        return None if pending is None else (pending[0].wait(), pending[1])


def snapshot(expert_biases: Sequence[torch.Tensor]) -> torch.Tensor:
    """A copy of every bias, [L, E] in one kernel: rows for `ExpertBiasUpdater.start_step`."""
    return torch.stack([expert_bias.detach() for expert_bias in expert_biases])


def apply_pending_updates(expert_biases: Sequence[torch.Tensor],
                          updaters: Sequence[ExpertBiasUpdater]) -> None:
    """micro/dp: apply every waiting micro-batch update at once (at the step's end: all
    layers' counts stacked, one sign average, one fused add)."""
    taken = [(bias, updater, pending) for bias, updater in zip(expert_biases, updaters)
             if (pending := updater.take_pending()) is not None]
    if not taken:
        return
    counts = [counts for _, _, (counts, _) in taken]
    # One layer (a router's next call): a view, not a copy.
    counts_LX = counts[0].unsqueeze(0) if len(counts) == 1 else torch.stack(counts)
    _apply_updates([bias for bias, _, _ in taken], [updater for _, updater, _ in taken],
                   counts_LX, taken[0][2][1])


def step_counts(updaters: Sequence[ExpertBiasUpdater]) -> Optional[torch.Tensor]:
    """Global scope: the step's local counts of every counting router of the stage, stacked
    [L, E+1] (int64) for one all-reduce over the balance group; None when none counted (frozen
    biases). `apply_step_update` takes the sum."""
    counted = [updater.step_counts for updater in updaters if updater.step_counts is not None]
    return torch.stack(counted) if counted else None


def apply_step_update(expert_biases: Sequence[torch.Tensor],
                      updaters: Sequence[ExpertBiasUpdater], counts_LX: torch.Tensor,
                      average_group) -> None:
    """Global scope: one update of every counting router of the stage from the step's counts
    [L, E+1] summed over the balance group (`step_counts`); one all-reduce of the signs over
    `average_group` when the balance group is a block of it."""
    counted = [(bias, updater) for bias, updater in zip(expert_biases, updaters)
               if updater.step_counts is not None]
    _apply_updates([bias for bias, _ in counted], [updater for _, updater in counted], counts_LX,
                   average_group)


def _apply_updates(expert_biases: Sequence[torch.Tensor], updaters: Sequence[ExpertBiasUpdater],
                   counts_LX: torch.Tensor, average_group) -> None:
    """b_l += u_l * mean_g sign_g of every layer l from its counts [L, E+1] summed over the
    balance group: the same kernels and at most one all-reduce for any number of layers."""
    sign_sum_LE, num_groups = _average_signs(load_error_sign(counts_LX[:, :-1]), average_group)
    rates = [updater.rate for updater in updaters]
    if len(set(rates)) == 1:
        update_LE = bias_update(sign_sum_LE, num_groups, rates[0])
    else:  # layers with update rates of their own (a model built from several configs)
        rates_L1 = torch.tensor(rates, dtype=torch.float64, device=sign_sum_LE.device)
        update_LE = bias_update(sign_sum_LE * rates_L1.unsqueeze(1), num_groups, 1.0)
    with torch.no_grad():
        torch._foreach_add_(list(expert_biases),
                            list(update_LE.to(expert_biases[0].dtype).unbind()))
    for updater, counts_X in zip(updaters, counts_LX):
        updater.balance_tokens = counts_X[-1]


def _average_signs(sign_XE: torch.Tensor, average_group) -> tuple[torch.Tensor, int]:
    """(Σ_g sign_g, number of groups): every rank of a group holds the same sign, so the sum
    over the ranks of `average_group` (None: one group) counts each group that many times."""
    if average_group is None:
        return sign_XE, 1
    ranks = torch.distributed.get_world_size(average_group)
    return comm.all_reduce_sum(sign_XE, average_group, "the expert-bias sign average"), ranks
