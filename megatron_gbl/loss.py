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


def tokens_per_device(tokens_per_expert_E: torch.Tensor, num_devices: int) -> torch.Tensor:
    """Σ_{i in d} x_i for each of D groups of E/D consecutive experts: [..., E] -> [..., D].

    Megatron-Core places experts contiguously: expert-parallel rank d holds experts
    d*E/D .. (d+1)*E/D - 1 (MoELayer.local_expert_indices), so with D the expert-parallel size
    group d is what device d computes. D must divide E.
    """
    return tokens_per_expert_E.unflatten(-1, (num_devices, -1)).sum(dim=-1)


def device_balancing_weights(
    tokens_per_expert_E: torch.Tensor,
    num_tokens_for_f: torch.Tensor,
    num_tokens_for_p: torch.Tensor,
    topk: int,
    num_devices: int,
    coeff: float,
    *,
    tokens_nonzero: bool = False,
) -> torch.Tensor:
    """w_i = coeff * D * F_d(i) / T_p, so that coeff * L_dev = Σ_i w_i * s_i, with

        L_dev = D * Σ_d F_d * P_d                              (1 when balanced)
        F_d   = Σ_{i in d} c_i / (K * T_f)    fraction of the T_f*K expert choices in group d
        P_d   = Σ_{i in d} s_i / T_p          summed mean router probability of group d

    over D groups of E/D consecutive experts, d(i) the group of expert i. This is DeepSeek-V2's
    device-level balance loss (arXiv 2405.04434, Sec. 2.2.3: Σ_d f'_d P'_d with
    f'_d = D * F_d). It is eq. 2 with the groups as the experts, so the group weights are
    `load_balancing_weights` of the group counts, and each expert takes its group's weight.

    Args:
        tokens_per_expert_E: c_i (int64, or float64 holding integers), shape [..., E].
        num_tokens_for_f, num_tokens_for_p, topk, coeff, tokens_nonzero: as in
            `load_balancing_weights`.
        num_devices: D, dividing E.
    Returns:
        float64 [..., E]: w_i, equal within each group.
    """
    num_experts = tokens_per_expert_E.shape[-1]
    weights_D = load_balancing_weights(tokens_per_device(tokens_per_expert_E, num_devices),
                                       num_tokens_for_f, num_tokens_for_p, topk, num_devices,
                                       coeff, tokens_nonzero=tokens_nonzero)
    return weights_D.repeat_interleave(num_experts // num_devices, dim=-1)
