"""Independent single-process references: plain torch, no Megatron, no megatron_gbl code.

The whole data-parallel batch is in one process. For micro-batch k of a step, the global-batch
LBL with the buffer of Algorithm 1 is

    LBL_k = N_E * Σ_i f_i^(k) * Pbar_i^(k)
    f_i^(k)    = (# choices of expert i in micro-batches 0..k, all ranks) / (K * valid tokens in them)
    Pbar_i^(k) = mean over all valid tokens of micro-batch k, all ranks, of softmax(x W^T)_i

and a step's loss is coeff * mean_k LBL_k (Megatron averages micro-batch losses).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch


def _route(x_NH: torch.Tensor, weight_EH: torch.Tensor, topk: int):
    probs_NE = torch.softmax(x_NH.double() @ weight_EH.double().t(), dim=-1)
    chosen_NE = torch.zeros_like(probs_NE).scatter(1, probs_NE.topk(topk, dim=-1).indices, 1.0)
    return probs_NE, chosen_NE


def _valid_tokens(hidden_SBH: torch.Tensor, padding_SB: Optional[torch.Tensor]) -> torch.Tensor:
    tokens = hidden_SBH.reshape(-1, hidden_SBH.shape[-1])
    return tokens if padding_SB is None else tokens[~padding_SB.reshape(-1)]


def global_batch_lbl(
    weight_EH: torch.Tensor,
    hidden: Sequence[Sequence[torch.Tensor]],
    padding: Optional[Sequence[Sequence[Optional[torch.Tensor]]]],
    topk: int,
    coeff: float,
    buffered: bool,
) -> tuple[torch.Tensor, list[float]]:
    """Step loss and per-micro-batch LBL values; hidden[k][r] is rank r's micro-batch k [S, B, H].

    buffered=False gives the "dp" scope (f of micro-batch k alone, all ranks).
    """
    counts_E = torch.zeros(weight_EH.shape[0], dtype=torch.float64)
    num_tokens = 0
    losses = []
    for k, ranks in enumerate(hidden):
        x_NH = torch.cat([
            _valid_tokens(h, None if padding is None else padding[k][r]) for r, h in enumerate(ranks)
        ])
        probs_NE, chosen_NE = _route(x_NH, weight_EH, topk)
        if buffered:
            counts_E = counts_E + chosen_NE.sum(0)
            num_tokens += x_NH.shape[0]
        else:
            counts_E, num_tokens = chosen_NE.sum(0), x_NH.shape[0]
        if not x_NH.shape[0]:  # a micro-batch of padding only: no P, no loss
            losses.append(weight_EH.sum() * 0)
            continue
        f_E = counts_E / (topk * num_tokens)
        losses.append(weight_EH.shape[0] * (f_E * probs_NE.mean(0)).sum())
    values = [float(v.detach()) for v in losses]
    return coeff * torch.stack(losses).mean(), values


def micro_batch_lbl(weight_EH, hidden_SBH, topk: int, coeff: float) -> torch.Tensor:
    """Switch-Transformer LBL of one micro-batch on one rank (Megatron's aux_loss)."""
    probs_NE, chosen_NE = _route(_valid_tokens(hidden_SBH, None), weight_EH, topk)
    f_E = chosen_NE.sum(0) / (topk * probs_NE.shape[0])
    return coeff * weight_EH.shape[0] * (f_E * probs_NE.mean(0)).sum()


def sequence_lbl(weight_EH, hidden_SBH, topk: int, coeff: float) -> torch.Tensor:
    """Mean over sequences of each sequence's LBL (Megatron's seq_aux_loss)."""
    per_sequence = [
        micro_batch_lbl(weight_EH, hidden_SBH[:, b : b + 1], topk, coeff)
        for b in range(hidden_SBH.shape[1])
    ]
    return torch.stack(per_sequence).mean()


def batch_statistics(weight_EH, hidden: Sequence[torch.Tensor], topk: int):
    """LBL value, load violation and expert counts of one token set (all of `hidden` pooled).

    load violation = max_i c_i / mean_i c_i - 1.
    """
    x_NH = torch.cat([_valid_tokens(h, None) for h in hidden])
    probs_NE, chosen_NE = _route(x_NH, weight_EH, topk)
    counts_E = chosen_NE.sum(0)
    f_E = counts_E / (topk * x_NH.shape[0])
    lbl = weight_EH.shape[0] * (f_E * probs_NE.mean(0)).sum()
    return float(lbl), float(counts_E.max() / counts_E.mean() - 1), counts_E


def grad_of(loss_fn, weight_EH: torch.Tensor) -> torch.Tensor:
    weight = weight_EH.detach().double().requires_grad_()
    loss_fn(weight).backward()
    return weight.grad


def biased_routing(weight_EH, x_NH, bias_E, topk: int):
    """Sigmoid gating with expert bias (Wang et al. 2024): top-k of sigmoid(x W^T) + b picks the
    experts; the gate weights are the unbiased scores of those experts, normalised to sum 1.

    Returns (routing map bool [N, E], gate weights float64 [N, E]).
    """
    scores_NE = torch.sigmoid(x_NH.double() @ weight_EH.double().t())
    chosen_NK = (scores_NE + bias_E.double()).topk(topk, dim=-1).indices
    map_NE = torch.zeros_like(scores_NE, dtype=torch.bool).scatter(1, chosen_NK, True)
    picked_NK = scores_NE.gather(1, chosen_NK)
    gates_NE = torch.zeros_like(scores_NE).scatter(1, chosen_NK,
                                                   picked_NK / picked_NK.sum(-1, keepdim=True))
    return map_NE, gates_NE


def aux_free_run(weight_EH, hidden_steps, topk: int, rate: float, scope: str,
                 blocks: Optional[Sequence[Sequence[int]]] = None):
    """Auxiliary-loss-free balancing at `scope`: (fp32 bias after every step, bias every
    micro-batch was routed with [step][k]).

    hidden_steps[s][k][r]: rank r's micro-batch k of step s, [S, B, H]. The update, after every
    micro-batch (micro, dp) or step (global):  b += u * mean over groups g of
    sign(mean_j c_gj - c_gi), with g one rank (micro), or each block of ranks (dp, global;
    default: all ranks).
    """
    bias_E = torch.zeros(weight_EH.shape[0], dtype=torch.float32)
    world = range(len(hidden_steps[0][0]))
    groups = [[r] for r in world] if scope == "micro" else (blocks or [list(world)])

    def update(counts_RE):
        signs = [torch.sign(c.mean() - c) for c in
                 (sum(counts_RE[r] for r in group) for group in groups)]
        return (rate * torch.stack(signs).mean(0)).float()

    after_steps, routed_with = [], []
    for step in hidden_steps:
        step_counts = [0] * len(world)
        routed_with.append([])
        for ranks in step:
            routed_with[-1].append(bias_E.clone())
            counts = [biased_routing(weight_EH, h.reshape(-1, h.shape[-1]), bias_E, topk)[0]
                      .double().sum(0) for h in ranks]
            if scope == "global":
                step_counts = [s + c for s, c in zip(step_counts, counts)]
            else:
                bias_E = bias_E + update(counts)
        if scope == "global":
            bias_E = bias_E + update(step_counts)
        after_steps.append(bias_E.clone())
    return after_steps, routed_with


def _expert_devices(num_experts: int, num_devices: int) -> torch.Tensor:
    """Device of every expert: D blocks of E/D consecutive experts."""
    return torch.arange(num_experts) // (num_experts // num_devices)


def device_balance_loss(weight_EH, hidden, padding, token_groups, topk: int, coeff: float,
                        num_devices: int) -> torch.Tensor:
    """coeff * mean over micro-batches k and token groups g of DeepSeek-V2's device-level loss

        L_gk = D * Σ_d F_d * P_d
        F_d  = (# top-k choices of device d's experts among g's valid tokens of micro-batch k)
               / (K * number of those tokens)
        P_d  = Σ_{i on device d} mean over those tokens of softmax(x W^T)_i

    hidden[k][r], padding[k][r] ([S, B] bool, True = padding, or padding None) as in
    global_batch_lbl; token_groups: lists of ranks whose tokens one all-to-all exchanges.
    """
    devices_E = _expert_devices(weight_EH.shape[0], num_devices)
    losses = []
    for k, ranks in enumerate(hidden):
        for group in token_groups:
            x_NH = torch.cat([_valid_tokens(ranks[r], None if padding is None else padding[k][r])
                              for r in group])
            probs_NE, chosen_NE = _route(x_NH, weight_EH, topk)
            counts_D = torch.zeros(num_devices, dtype=torch.float64).index_add(
                0, devices_E, chosen_NE.sum(0))
            probs_D = torch.zeros(num_devices, dtype=torch.float64).index_add(
                0, devices_E, probs_NE.mean(0))
            losses.append(num_devices * (counts_D / (topk * x_NH.shape[0]) * probs_D).sum())
    return coeff * torch.stack(losses).mean()


def device_load_violation(weight_EH, hidden, token_groups, topk: int,
                          num_devices: int) -> dict[int, float]:
    """Per rank: mean over micro-batches of max_d load_d / mean_d load_d - 1, load_d the top-k
    choices of device d's experts among the tokens of the rank's token group (hidden[k][r])."""
    devices_E = _expert_devices(weight_EH.shape[0], num_devices)
    per_rank = {}
    for group in token_groups:
        violations = []
        for ranks in hidden:
            x_NH = torch.cat([_valid_tokens(ranks[r], None) for r in group])
            load_D = torch.zeros(num_devices, dtype=torch.float64).index_add(
                0, devices_E, _route(x_NH, weight_EH, topk)[1].sum(0))
            violations.append(float(load_D.max() / load_D.mean() - 1))
        per_rank.update(dict.fromkeys(group, sum(violations) / len(violations)))
    return per_rank


def quantile_dual_step(scores_NE: torch.Tensor, beta_E: torch.Tensor, topk: int):
    """One dual step of quantile balancing on N tokens, by sorting (no top-k, no Megatron):
    (routing map bool [N, E], q [E]) in the scores' dtype.

        alpha_t = (K+1)-th largest_e (s_te - beta_e)        the token's dual
        q_e     = (C+1)-th largest_t (s_te - alpha_t),       C = N K / E
    """
    num_tokens, num_experts = scores_NE.shape
    assert num_tokens * topk % num_experts == 0
    shifted_NE = scores_NE - beta_E
    order_NE = shifted_NE.sort(dim=1, descending=True)
    map_NE = torch.zeros_like(scores_NE, dtype=torch.bool).scatter(
        1, order_NE.indices[:, :topk], True)
    alpha_N1 = order_NE.values[:, topk:topk + 1]
    capacity = num_tokens * topk // num_experts
    return map_NE, (scores_NE - alpha_N1).sort(dim=0, descending=True).values[capacity]


def quantile_bias(beta_E: torch.Tensor, token_sets, topk: int, ema: float = 0.0):
    """The bias after one step of quantile balancing: ema * beta + (1 - ema) * the mean over
    `token_sets` (lists of score tensors [n, E], each set one token set of the dual step) of
    q, minus its mean over experts. float64 [E]."""
    quantiles = [quantile_dual_step(torch.cat(scores).double(), beta_E.double(), topk)[1]
                 for scores in token_sets]
    new_E = ema * beta_E.double() + (1 - ema) * torch.stack(quantiles).mean(0)
    return new_E - new_E.mean()
