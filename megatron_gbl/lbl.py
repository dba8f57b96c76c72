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
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from megatron_gbl import comm, compat
from megatron_gbl.buffer import StepBuffer
from megatron_gbl.config import Settings
from megatron_gbl.loss import load_balancing_loss


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
    balance_tokens: Optional[torch.Tensor] = None
    balance_sequences: int = 0

    @property
    def balance_bsz(self) -> Optional[BalanceBSZ]:
        if self.balance_tokens is None:
            return None
        return BalanceBSZ(int(self.balance_tokens), self.balance_sequences)


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
    scores_TE, routing_map_TE = compat.aux_scores_and_map(router, logits_SBE.reshape(-1, num_experts))
    if padding_mask_SB is None:
        num_local_tokens = torch.tensor(scores_TE.shape[0], device=scores_TE.device)
    else:
        valid_T1 = ~padding_mask_SB.reshape(-1, 1)
        scores_TE = scores_TE * valid_T1
        routing_map_TE = routing_map_TE & valid_T1
        num_local_tokens = valid_T1.sum(dtype=torch.int64)

    local_group = compat.tp_cp_group(router)
    if settings.scope == "seq":
        loss = _sequence_loss(router, state, scores_TE, routing_map_TE, num_local_tokens,
                              seq_length, bsz, local_group)
    else:
        group = local_group if settings.scope == "micro" else sync_group
        replicas = _size(group) // _size(local_group)
        tokens_per_expert_E, num_tokens = _synced_counts(routing_map_TE, num_local_tokens, group)
        num_tokens_for_f = num_tokens
        microbatches = 1
        if settings.scope == "global":
            tokens_per_expert_E, num_tokens_for_f = state.buffer.add(tokens_per_expert_E, num_tokens)
            microbatches = state.buffer.num_microbatches
        loss = load_balancing_loss(
            scores_TE.sum(dim=0), tokens_per_expert_E, num_tokens_for_f, num_tokens / replicas,
            router.topk, num_experts, state.coeff,
        )
        state.balance_tokens = num_tokens_for_f
        state.balance_sequences = bsz * replicas * microbatches

    return compat.attach_and_log(
        router, probs, loss, state.coeff, compat.tracker_name(state.lbl_type), local_group,
        num_local_tokens,
    )


def _sequence_loss(router, state, scores_TE, routing_map_TE, num_local_tokens, seq_length, bsz,
                   local_group) -> torch.Tensor:
    """Mean over the B sequences of each sequence's LBL (Megatron's seq_aux_loss).

    Tokens are ordered [S, B], so viewing [S, B*E] puts sequence b's experts at b*E..b*E+E-1
    and one LBL over that B*E axis is the sum of the B per-sequence LBLs. Like upstream, every
    sequence is normalised by the mean valid-token count per sequence over TP x CP.
    """
    num_experts = scores_TE.shape[-1]
    tokens_per_expert_BE, num_tokens = _synced_counts(
        routing_map_TE.reshape(seq_length, bsz * num_experts), num_local_tokens, local_group)
    tokens_per_seq = num_tokens / bsz
    state.balance_tokens = tokens_per_seq
    state.balance_sequences = 1
    loss = load_balancing_loss(
        scores_TE.reshape(seq_length, bsz * num_experts).sum(dim=0), tokens_per_expert_BE,
        tokens_per_seq, tokens_per_seq, router.topk, num_experts, state.coeff,
    )
    return loss / bsz


def _synced_counts(routing_map_TE, num_local_tokens, group):
    """Per-expert choice counts and valid tokens summed over `group`, in one int64 collective.

    int64 keeps the sum exact on every backend and at any scale (no float count ever exists).
    """
    synced = comm.all_reduce_sum(
        torch.cat([routing_map_TE.sum(dim=0, dtype=torch.int64), num_local_tokens.view(1)]), group)
    return synced[:-1], synced[-1]


def _size(group) -> int:
    return 1 if group is None else torch.distributed.get_world_size(group)
