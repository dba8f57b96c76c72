"""Per-step balance statistics for logging: computed without gradient, reduced once per step.

Every router keeps, per micro-batch of the step, the local LBL statistics c_1..c_E, s_1..s_E, T
(RouterState.microbatch_stats; with an LBL) and the dispatched load [c_1..c_E, T] (with expert
bias).
`step_metrics` packs them for all layers of this pipeline stage and reduces them at once, one
all-reduce per set of ranks (sums over groups that hold the same ranks share one):

- the per-micro-batch stats [L, M, X] over TP x CP: each micro-batch as Megatron's aux_loss
  sees it;
- their sums over the step [L, X] over TP x DP x CP: the global batch;
- the per-micro-batch load in D groups of consecutive experts [L, M, D] over the token group of
  the layers' all-to-all (TP x EP; none at D = 1): what one all-to-all carries.

    LBL(c, s, T)   = N_E * Σ_i c_i / (K T) * s_i / T        (paper eq. 2, value without coeff)
    load violation = max_i c_i / mean_i c_i - 1             (MaxVio of Wang et al. 2024)
    device load violation = max_d C_d / mean_d C_d - 1      C_d = Σ_{i in group d} c_i over
                                                            the micro-batch's token group

The load is the dispatched (biased) top-k when expert bias or quantile balancing is on, else
the LBL's counts; quantile balancing adds its bias's spread and its histograms' clamp counts
(quantile.step_values). Micro-batch values are averaged over the step's micro-batches here and over
data-parallel ranks by Megatron's tracker; global values are the same on every rank.
The device load violation is computed with or without the device-level LBL, from D groups
(device_groups, default the expert-parallel size): the slowest device of an all-to-all over
the mean one. At D = 1 (no expert parallelism) it is 0: there is no all-to-all to wait on.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from megatron_gbl import comm, compat, quantile
from megatron_gbl.loss import load_balancing_loss, tokens_per_device

MICRO_LBL = "micro_batch_lbl"
GLOBAL_LBL = "global_batch_lbl"
MICRO_LOAD_VIOLATION = "micro_batch_load_violation"
GLOBAL_LOAD_VIOLATION = "global_batch_load_violation"
MICRO_DEVICE_LOAD_VIOLATION = "micro_batch_device_load_violation"
# The device-level LBL's value (the loss that has a gradient), logged by `log_lbl` like the LBL.
DEVICE_LBL = "device_load_balancing_loss"
BALANCE_BSZ = "balance_bsz_tokens"
EXPERT_BIAS_STD = "expert_bias_std"


def names(has_lbl: bool, has_expert_bias: bool, has_quantile: bool = False) -> tuple[str, ...]:
    """The metric names `step_metrics` gives for a router configuration."""
    return ((MICRO_LBL, GLOBAL_LBL) if has_lbl else ()) + (
        MICRO_LOAD_VIOLATION, GLOBAL_LOAD_VIOLATION, MICRO_DEVICE_LOAD_VIOLATION, BALANCE_BSZ) + (
        (EXPERT_BIAS_STD,) if has_expert_bias else ()) + (quantile.METRICS if has_quantile else ())


@dataclass(frozen=True)
class StepMetrics:
    """One training step's statistics for the routers of this pipeline stage, one row per MoE
    layer and per prediction depth of a repeated MTP layer (`rows`).

    layer_numbers: the tracker slot of each row (compat.layer_index; MTP layers after the
        decoder's, a repeated MTP layer's depths one after the other, as separate MTP layers
        would be).
    values: name (see `names`) -> float64 [L], in the order of `layer_numbers`.
    global_tokens_per_expert: int64 [L, E], expert load over the whole global batch.
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
    num_experts = (stats_X.shape[-1] - 1) // 2
    counts_E, probs_sum_E = stats_X[..., :num_experts], stats_X[..., num_experts:-1]
    num_tokens_1 = stats_X[..., -1:]
    return load_balancing_loss(probs_sum_E, counts_E, num_tokens_1, num_tokens_1, topk,
                               num_experts, coeff=1.0)


def rows(routers: Sequence) -> list[tuple[int, object]]:
    """(tracker slot, router) of every statistics row of `routers`: one per router, and one per
    prediction depth of a repeated MTP layer (its calls of a micro-batch), in depth order."""
    return [(compat.layer_index(router) + depth, router)
            for router in routers for depth in range(router._megatron_gbl.calls_per_microbatch)]


def step_metrics(routers: Sequence) -> Optional[StepMetrics]:
    """Reduce and compute this step's statistics; None when no router trained this step.

    A collective: every rank of the pipeline stage calls it after the same step. Every router
    of a model balances the same way (steps.check_model_routers), so the first one's LBL and
    expert bias say what every row holds.
    """
    routers = [router for router in routers if router._megatron_gbl.calls]
    if not routers:
        return None
    first = routers[0]._megatron_gbl
    has_lbl, has_bias = first.balancing.lbl_type is not None, first.bias is not None
    has_quantile = first.balancing.quantile_ema is not None
    has_load = has_bias or has_quantile  # the dispatched load is counted
    statistics_rows = rows(routers)
    # float64 holds the integer counts exactly: one tensor, at most three sums for everything,
    # one collective each (fewer where groups hold the same ranks).
    stats_LMX = _microbatch_stats(routers, has_lbl, has_load)
    num_experts = routers[0].config.num_moe_experts
    # The load: the trailing dispatched [c, T] (expert bias, quantile balancing), else the LBL
    # stats' leading c.
    load_start = stats_LMX.shape[-1] - num_experts - 1 if has_load else 0
    device_load_LMD = tokens_per_device(stats_LMX[..., load_start:load_start + num_experts],
                                        first.device_groups)
    global_LX, micro_LMX, device_load_LMD = comm.all_reduce_sums([
        (stats_LMX.sum(dim=1), compat.tp_dp_cp_group(routers[0])),
        (stats_LMX, compat.tp_cp_group(routers[0])),
        # One device group: the violation is 0 whatever the sums.
        (device_load_LMD, first.token_group if first.device_groups > 1 else None),
    ], "the step metrics' sums")
    values = {}
    if has_lbl:
        lbl_width = 2 * num_experts + 1
        values[MICRO_LBL] = lbl_value(micro_LMX[..., :lbl_width], routers[0].topk).mean(dim=1)
        values[GLOBAL_LBL] = lbl_value(global_LX[..., :lbl_width], routers[0].topk)
    micro_load, global_load = (stats[..., load_start:load_start + num_experts]
                               for stats in (micro_LMX, global_LX))
    values[MICRO_LOAD_VIOLATION] = load_violation(micro_load).mean(dim=1)
    values[GLOBAL_LOAD_VIOLATION] = load_violation(global_load)
    # Each micro-batch's load over its token group in D device groups: what one all-to-all
    # carries; mean over the step's micro-batches.
    values[MICRO_DEVICE_LOAD_VIOLATION] = load_violation(device_load_LMD).mean(dim=1)
    # Stacked where the counts live: no host round trip per layer, and a device tensor for
    # Megatron's tracker all-reduce on NCCL.
    # A repeated MTP layer's depths see the same tokens: its rows share the router's values.
    values[BALANCE_BSZ] = torch.stack([router._megatron_gbl.balance_tokens()
                                       for _, router in statistics_rows]).double()
    divisors = [router._megatron_gbl.balance_tokens_divisor for _, router in statistics_rows]
    if set(divisors) != {1}:  # "seq": f over each sequence's tokens
        values[BALANCE_BSZ] /= torch.tensor(divisors, dtype=torch.float64,
                                            device=values[BALANCE_BSZ].device) \
            if len(set(divisors)) > 1 else divisors[0]
    if has_bias:
        values[EXPERT_BIAS_STD] = torch.stack([router.expert_bias.detach()
                                               for _, router in statistics_rows]).double().std(-1)
    if has_quantile:
        values.update(quantile.step_values([router for _, router in statistics_rows]))
    return StepMetrics(
        layer_numbers=[layer for layer, _ in statistics_rows],
        values=values,
        global_tokens_per_expert=global_load.round().long(),
    )


def log_lbl(routers: Sequence) -> None:
    """Add this step's LBL of every router to Megatron's aux-loss tracker, once per step.

    Upstream adds loss / coeff per call; the plugin adds Σ_k w_k · s_k / coeff over the step's
    micro-batches k (= Σ_k L_k / coeff, the same sum; the calls of a repeated MTP layer carry
    their 1 / depths share of it, as upstream's do), from the weights and probability sums its
    backward kept: no logging kernels per call, and the same few per step for any number of
    layers (every router's terms stacked, one write into the tracker). Megatron's tracker
    reduction sums it over TP x CP (as upstream's aux_loss) and averages it over data parallel
    on every version (0.12-0.13 trackers log one rank's value for upstream's own losses).
    """
    trained = [router for router in routers if router._megatron_gbl.lbl_terms]
    if not trained:
        return
    first = trained[0]
    _log_terms(trained, compat.tracker_name(first._megatron_gbl.balancing.lbl_type),
               lambda state: [(weights, probs_sum, state.balancing.coeff)
                              for weights, probs_sum in state.lbl_terms])
    # Σ_k w_k · s_k / device_coeff, reduced the same way: the mean over token groups of the
    # device-level LBL (lbl._device_weights).
    _log_terms([router for router in trained if router._megatron_gbl.device_terms], DEVICE_LBL,
               lambda state: state.device_terms)


def _log_terms(routers: Sequence, name: str, terms_of) -> None:
    """Σ w · s / coeff of each router's terms [(w float64 [X], s [X], coeff)] into its tracker
    slot under `name`: the terms of all routers stacked, so a fixed number of kernels."""
    if not routers:
        return
    terms = [(compat.layer_index(router), term) for router in routers
             for term in terms_of(router._megatron_gbl)]
    weights_NX = torch.stack([weights for _, (weights, _, _) in terms])
    probs_sums_NX = torch.stack([probs_sum for _, (_, probs_sum, _) in terms])
    # float64 weights times the probability sums' dtype: the product is float64.
    products_N = (weights_NX * probs_sums_NX).sum(dim=-1)
    coeffs = [coeff for _, (_, _, coeff) in terms]
    if len(set(coeffs)) == 1:
        values_N = products_N / coeffs[0]
    else:  # layers with coefficients of their own (a model built from several configs)
        values_N = products_N / torch.tensor(coeffs, dtype=torch.float64,
                                             device=products_N.device)
    router = routers[0]
    compat.log_to_tracker(name, values_N, [layer for layer, _ in terms], router.config,
                          reduce_group=compat.tp_cp_group(router),
                          avg_group=compat.tp_dp_cp_group(router))


def _microbatch_stats(routers: Sequence, has_lbl: bool, has_load: bool) -> torch.Tensor:
    """[rows, M, X] float64: per statistics row (`rows`) and micro-batch, the LBL stats
    [c, s, T] and/or the dispatched load [c, T], of all routers in a few kernels whatever their
    number. A router's calls come micro-batch by micro-batch, each with its R depths in slot
    order (reversed: lbl.RouterState.replayed)."""
    states = [router._megatron_gbl for router in routers]
    parts = []
    if has_lbl:
        counts_NX = torch.stack([counts for state in states
                                 for counts, _ in state.microbatch_stats])
        probs_sums_NE = torch.stack([probs_sum for state in states
                                     for _, probs_sum in state.microbatch_stats])
        parts += [counts_NX[:, :-1], probs_sums_NE, counts_NX[:, -1:]]
    if has_load:
        parts.append(torch.stack([counts for state in states for counts in state.load_counts]))
    width = sum(part.shape[-1] for part in parts)
    stats_NX = torch.cat(parts, dim=-1, out=parts[0].new_empty(
        parts[0].shape[0], width, dtype=torch.float64))
    microbatches = {state.calls // state.calls_per_microbatch for state in states}
    if len(microbatches) > 1:
        calls = ", ".join(f"MoE layer {compat.layer_index(router)}: {state.calls}"
                          for router, state in zip(routers, states))
        raise RuntimeError(
            "megatron_gbl: the MoE layers of this step ran different numbers of micro-batches "
            f"({calls} calls); every layer runs every micro-batch of a step")
    (microbatches,) = microbatches
    order = _row_order(tuple((state.calls_per_microbatch, state.replayed) for state in states),
                       microbatches, stats_NX.device)
    stats_NX = stats_NX if order is None else stats_NX.index_select(0, order)
    return stats_NX.view(-1, microbatches, width)


@functools.lru_cache(maxsize=64)
def _row_order(layouts: tuple[tuple[int, bool], ...], microbatches: int,
               device: torch.device) -> Optional[torch.Tensor]:
    """Where row-major [rows, M] finds each call in the calls of all routers, stacked router by
    router: None when that is their order already (one call per micro-batch everywhere), else an
    index made (and copied to the device) once per layout. `layouts`: (R, replayed) per router;
    call k * R + j of a router is depth slot j of micro-batch k, and a replay runs the depths
    in reverse."""
    if all(depths == 1 for depths, _ in layouts):
        return None
    order, offset = [], 0
    for depths, replayed in layouts:
        for depth in range(depths):
            slot = depths - 1 - depth if replayed else depth
            order += [offset + k * depths + slot for k in range(microbatches)]
        offset += depths * microbatches
    return torch.tensor(order, dtype=torch.int64, device=device)
