"""The scoped load-balancing loss of one router call: count, sync, buffer, compute, attach.

Per rank r and micro-batch k of a step (paper eq. 6 with Algorithm 1):

    L_rk = coeff * N_E * Σ_i f_i * P_i^r
    f_i  = Σ_{j<=k} C_ij / (K * Σ_{j<=k} T_j)      C, T: counts and valid tokens summed over
                                                   the balance group (global: j<=k; dp: j=k)
    P_i^r = Σ_{x in rank r, valid} p(x, i) / (T_k / R)

with R the number of data-parallel replicas in the balance group. T_k / R is the mean valid-token
count per replica, so after Megatron's data-parallel gradient averaging Σ_r ∇L_rk / R equals
∇(coeff * LBL) of the whole balance group's micro-batch k with buffered f, padding or not.
For scope "micro" the group is TP x CP, R = 1 and this is exactly Megatron's aux_loss.
With `micro_coeff` > 0 (dp/global), micro_coeff * LBL of the micro-batch over TP x CP is added
(paper Tab. 5, "LBL_global + LBL_micro").

No barrier in the forward pass: L is linear in the probability sums s_i, L = Σ_i w_i s_i with
w = ∂L/∂s known once the counts are (loss.load_balancing_weights). The count all-reduce is
issued asynchronously in the forward and waited for in this layer's backward, where w is first
needed; the logged value Σ_i w_i s_i is recorded there too.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from megatron_gbl import compat
from megatron_gbl.buffer import StepBuffer
from megatron_gbl.config import Settings
from megatron_gbl.comm import PendingSum
from megatron_gbl.loss import load_balancing_weights


@dataclass(frozen=True)
class BalanceBSZ:
    """How many tokens and sequences f_i was computed over in a router's last training call."""

    tokens: int
    sequences: int


@dataclass
class RouterState:
    """What the plugin keeps on one TopKRouter (as `router._megatron_gbl`)."""

    lbl_type: str
    coeff: float
    buffer: StepBuffer = field(default_factory=StepBuffer)
    balance_tokens: Optional[Callable[[], torch.Tensor]] = None  # waits for the synced counts
    balance_sequences: int = 0
    # Local, unreduced statistics of each micro-batch of the step, for metrics.step_metrics.
    microbatch_stats: list = field(default_factory=list)

    def start_step(self, expected_microbatches: Optional[int] = None) -> None:
        self.buffer.reset(expected_microbatches)
        self.microbatch_stats.clear()

    @property
    def balance_bsz(self) -> Optional[BalanceBSZ]:
        if self.balance_tokens is None:
            return None
        return BalanceBSZ(int(self.balance_tokens()), self.balance_sequences)


def apply_scoped_lbl(
    router,
    state: RouterState,
    settings: Settings,
    sync_group,
    logits_SBE: torch.Tensor,
    probs: torch.Tensor,
    padding_mask_SB: Optional[torch.Tensor],
) -> torch.Tensor:
    """Attach this router call's LBL at `settings.scope` to `probs`; return the new `probs`.

    Args:
        logits_SBE: router logits [S, B, E] as `TopKRouter.routing` receives them.
        probs: routing probabilities [S*B, E] that upstream routing returned.
        padding_mask_SB: bool [S, B], True = padding (Megatron's convention), or None.
        sync_group: the balance group for scopes dp/global.
    """
    seq_length, bsz, num_experts = logits_SBE.shape
    scores_TE, routing_map_TE = compat.aux_scores_and_map(router,
                                                          logits_SBE.reshape(-1, num_experts))
    if padding_mask_SB is None:
        # torch.full, not torch.tensor: no host-to-device copy (a sync on CUDA) per call.
        num_local_tokens = torch.full((), scores_TE.shape[0], dtype=torch.int64,
                                      device=scores_TE.device)
    else:
        valid_T1 = ~padding_mask_SB.reshape(-1, 1)
        scores_TE = scores_TE * valid_T1
        routing_map_TE = routing_map_TE & valid_T1
        num_local_tokens = valid_T1.sum(dtype=torch.int64)

    probs_sum_E = scores_TE.sum(dim=0)
    local_counts = _count(routing_map_TE, num_local_tokens)  # one pass over the [T, E] map
    state.microbatch_stats.append(microbatch_stats(local_counts, probs_sum_E))
    local_group = compat.tp_cp_group(router)

    micro_weights = None
    if settings.micro_coeff:
        # A copy: the scoped sum below reduces local_counts in place.
        micro_counts = PendingSum(local_counts.clone(), local_group, settings.blocking_sync)

        def micro_weights():
            counts = micro_counts.wait()
            return load_balancing_weights(counts[:-1], counts[-1], counts[-1], router.topk,
                                          num_experts, settings.micro_coeff)

    if settings.scope == "seq":
        probs_sum, weights = _sequence_weights(router, state, settings, scores_TE, routing_map_TE,
                                               num_local_tokens, seq_length, bsz, local_group)
    else:
        probs_sum = probs_sum_E
        group = local_group if settings.scope == "micro" else sync_group
        weights = _batch_weights(router, state, settings, local_counts, group,
                                 replicas=_size(group) // _size(local_group), bsz=bsz)

    def backward_weights() -> torch.Tensor:
        weights_X = weights()
        # Logged like upstream (loss / coeff, summed over TP x CP), and averaged over data
        # parallel on every version (0.12-0.13 trackers log one rank's value otherwise). The
        # micro term's value is logged once per step as metrics' micro_batch_lbl.
        compat.log_to_tracker(router, compat.tracker_name(state.lbl_type),
                              (weights_X * probs_sum.detach().double()).sum() / state.coeff,
                              reduce_group=local_group,
                              avg_group=compat.tp_dp_cp_group(router))
        if micro_weights is not None:
            weights_X = weights_X + micro_weights()
        scale = compat.aux_loss_backward_scale(router, num_local_tokens)
        return (weights_X * scale).to(probs_sum.dtype)

    return _DeferredLBL.apply(probs, probs_sum, backward_weights)


class _DeferredLBL(torch.autograd.Function):
    """Identity on `probs` whose backward adds the LBL gradient w to the probability sums.

    Like Megatron's MoEAuxLossAutoScaler, the loss rides on the router output; unlike it, the
    loss's gradient (and so the count all-reduce's result) is only needed in backward.
    """

    @staticmethod
    def forward(ctx, probs, probs_sum, backward_weights):
        ctx.backward_weights = backward_weights
        return probs

    @staticmethod
    def backward(ctx, grad_probs):
        return grad_probs, ctx.backward_weights(), None


def _batch_weights(router, state, settings, counts, group, replicas: int, bsz: int):
    """w for scopes micro/dp/global: issue the count sum over `group`, return w's thunk."""
    num_experts = counts.shape[0] - 1
    synced = PendingSum(counts, group, settings.blocking_sync)
    if settings.scope == "global":
        k = state.buffer.add(synced)
        counts_for_f = functools.partial(state.buffer.prefix, k)
        microbatches = k + 1
    else:
        def counts_for_f():
            counts = synced.wait()
            return counts[:-1], counts[-1]

        microbatches = 1
    state.balance_tokens = lambda: counts_for_f()[1]
    state.balance_sequences = bsz * replicas * microbatches

    def weights():
        tokens_per_expert_E, num_tokens_for_f = counts_for_f()
        return load_balancing_weights(tokens_per_expert_E, num_tokens_for_f,
                                      synced.wait()[-1] / replicas, router.topk, num_experts,
                                      state.coeff)

    return weights


def _sequence_weights(router, state, settings, scores_TE, routing_map_TE, num_local_tokens,
                      seq_length, bsz, local_group):
    """(s, w thunk) for the mean over the B sequences of each sequence's LBL (seq_aux_loss).

    Tokens are ordered [S, B], so viewing [S, B*E] puts sequence b's experts at b*E..b*E+E-1
    and one LBL over that B*E axis is the sum of the B per-sequence LBLs. Like upstream, every
    sequence is normalised by the mean valid-token count per sequence over TP x CP.
    """
    num_experts = scores_TE.shape[-1]
    synced = PendingSum(
        _count(routing_map_TE.reshape(seq_length, bsz * num_experts), num_local_tokens),
        local_group, settings.blocking_sync)
    state.balance_tokens = lambda: synced.wait()[-1] / bsz
    state.balance_sequences = 1

    def weights():
        counts = synced.wait()
        tokens_per_seq = counts[-1] / bsz
        return load_balancing_weights(counts[:-1], tokens_per_seq, tokens_per_seq, router.topk,
                                      num_experts, state.coeff) / bsz

    return scores_TE.reshape(seq_length, bsz * num_experts).sum(dim=0), weights


def microbatch_stats(local_counts, probs_sum_E) -> torch.Tensor:
    """[c_1..c_E, s_1..s_E, T] of this rank's valid tokens, float64 [2E+1], no gradient.

    `local_counts` is `_count`'s [c_1..c_E, T]. float64 holds the integer counts exactly
    (below 2^53), so one tensor carries all three.
    """
    counts = local_counts.double()
    return torch.cat([counts[:-1], probs_sum_E.detach().double(), counts[-1:]])


def _count(routing_map_TX, num_local_tokens) -> torch.Tensor:
    """[choices per column (X), valid tokens] as one int64 vector: one collective for both.

    int64 keeps the sum exact on every backend and at any scale (no float count ever exists).
    """
    return torch.cat([routing_map_TX.sum(dim=0, dtype=torch.int64), num_local_tokens.view(1)])


def _size(group) -> int:
    return 1 if group is None else torch.distributed.get_world_size(group)
