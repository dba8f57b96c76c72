"""The load-balancing loss as pure functions: no process groups, no Megatron imports.

Shapes use torchtitan-style suffixes: T tokens, E experts (or any trailing "expert" axis, such
as the B*E axis of the per-sequence loss), K top-k.

Paper: Qiu et al. 2025, "Demons in the Detail" (arXiv 2501.11873), eq. 2-6 and Algorithm 1.
"""

from __future__ import annotations

import torch


def load_balancing_loss(
    probs_sum_E: torch.Tensor,
    tokens_per_expert_E: torch.Tensor,
    num_tokens_for_f: torch.Tensor,
    num_tokens_for_p: torch.Tensor,
    topk: int,
    num_experts: int,
    coeff: float,
) -> torch.Tensor:
    """coeff * LBL with LBL = N_E * Σ_i f_i * P_i (paper eq. 2; per-rank form of eq. 6).

        f_i = c_i / (K * T_f)      fraction of the T_f*K expert choices that went to expert i
        P_i = s_i / T_p            mean router probability of expert i

    f and P may come from different token sets: eq. 6 pairs the global f (counts summed over
    the balance group and the step's micro-batches so far) with the local P of this rank.

    Args:
        probs_sum_E: s_i = Σ_x p(x, i) over this rank's valid tokens, float, shape [..., E].
        tokens_per_expert_E, num_tokens_for_f, num_tokens_for_p, topk, num_experts, coeff:
            as in `load_balancing_weights`.
    Returns:
        Loss of shape [...] (a scalar for [E] inputs) in probs_sum_E's dtype. An empty token set
        contributes 0, not NaN.
    """
    weights_E = load_balancing_weights(tokens_per_expert_E, num_tokens_for_f, num_tokens_for_p,
                                       topk, num_experts, coeff)
    return (weights_E.to(probs_sum_E.dtype) * probs_sum_E).sum(dim=-1)


def load_balancing_weights(
    tokens_per_expert_E: torch.Tensor,
    num_tokens_for_f: torch.Tensor,
    num_tokens_for_p: torch.Tensor,
    topk: int,
    num_experts: int,
    coeff: float,
    *,
    tokens_nonzero: bool = False,
) -> torch.Tensor:
    """w_i = coeff * N_E * f_i / T_p, so that coeff * LBL = Σ_i w_i * s_i (eq. 2).

    The loss is linear in the probability sums s, and w is its gradient: once the counts c
    are known, forward value and backward need nothing else.

    Args:
        tokens_per_expert_E: c_i, counts f is taken over (int64, or float64 holding integers),
            shape [..., E].
        num_tokens_for_f: T_f, the number of tokens c was counted over: a tensor of shape []
            or [..., 1] (one per leading index).
        num_tokens_for_p: T_p, the number of tokens P is a mean over, shaped like T_f.
            Both token counts are integers (int64, or float64 holding integers); a mean over
            T / R tokens is T tokens with coeff * R, as w is linear in 1 / T_p.
        topk: K, expert choices per token.
        num_experts: N_E (the trailing axis may be longer, e.g. B*E for the per-sequence loss).
        coeff: the loss weight (Megatron's moe_aux_loss_coeff).
        tokens_nonzero: the caller knows T_f >= 1 and T_p >= 1 (a rank without padding counts
            its own tokens into both), so the guard for empty token sets below is not needed.
    Returns:
        float64 [..., E]; 0 where T_f is 0, and at most coeff * N_E / K where T_p is 0 (there s
        is 0 too: the loss is 0, and the gradient stays finite in fp16).
    """
    # float64 keeps counts and token products above 2^24 exact until the caller's final cast.
    # One [] (or [..., 1]) denominator, then one division of the counts: this runs once per
    # router call, where every kernel launch counts on a GPU. No tokens means no choices either:
    # dividing by 1 instead of 0 gives 0, not NaN.
    if tokens_nonzero:
        num_tokens = num_tokens_for_f * num_tokens_for_p
    else:
        num_tokens = num_tokens_for_f.clamp(min=1) * num_tokens_for_p.clamp(min=1)
    return tokens_per_expert_E / (num_tokens.double() * (topk / (num_experts * coeff)))
