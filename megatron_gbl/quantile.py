"""Quantile balancing (QB) at a scope: the per-expert bias solved on the balance group's tokens.

Megatron-Core 0.19's `quantile_balancing` routes with a per-expert bias beta [E] and takes one
step of dual coordinate descent on it per micro-batch (moe_utils.qb_dual_update, the routing
LP's duals; Kimi K3's report):

    alpha_t = (K+1)-th largest_e (s_te - beta_e)          token t's dual       (QB-1)
    q_e     = (C+1)-th largest_t (s_te - alpha_t)         expert e's dual,     (QB-2)
              C = N K / E, over the N tokens of the token set (N K divisible by E)
    beta'   = ema * beta + (1 - ema) * mean_g q^(g)       once per step        (QB-3)
    beta'  -= mean_e beta'_e                               re-centred

s: fp32 router logits [T, E], K: moe_router_topk; a token goes to the top-K of s - beta, with
the previous step's beta. Upstream's q^(g) are the micro-batches' (each gathered over TP x CP),
averaged over the step's micro-batches and over DP x CP (finalize_model_grads.
_update_router_qb_beta): an average of micro-batch quantiles, not the global batch's quantile,
the same distinction as the micro- and global-batch LBL of Qiu et al. 2025 (arXiv 2501.11873).

The scope sets the token set of (QB-2) and the average of (QB-3):

    micro   upstream's path, bitwise: micro-batch over TP x CP, averaged over micro-batches and
            DP x CP (the plugin only moves the update to the step's end, `finish_step`)
    dp      micro-batch k over the balance group (TP x DP x CP, or a block of N replicas),
            averaged over the step's micro-batches (and over the blocks)
    global  the whole step over the balance group: one dual step on the global batch
            (averaged over the blocks of global:N)

No collective in the forward and no per-token state across micro-batches: alpha_t depends only
on token t and the step's fixed beta, so v_te = s_te - alpha_t is final at the forward. Each
call adds v's per-expert histogram (int64: exact at any count) to the step's, and the step's
end sums the histograms of every layer in one all-reduce and reads q from them
(`histogram_quantile`): O(E x B) per layer for global, O(M x E x B) for dp (M calls).

The window of layer l is [min_e beta_e - 1, max_e beta_e + 1] (Megatron-LM dev's global-batch
estimate, PR #6637, uses the same window and 1000 bins): at balance q_e is near beta_e (v_te >
beta_e exactly when t picks e), so q lies inside unless the load is badly off. B = 1000 bins of
width w = (hi - lo) / B, plus an overflow bin on each side counting the values beyond the
window (clamped, never dropped: a count from the top stays exact). A q inside the window is
read to within one bin: |q_estimate - q| < w, and the re-centred bias to within 2 w. A q in an
overflow bin is clamped to the window's edge (a step of at most 1 beyond the bias's range) and
counted (`qb_clamped_quantiles`); the values beyond the window are counted too
(`qb_clamped_values`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from megatron_gbl import comm, compat
from megatron_gbl.lbl import bias_groups, count_choices

BINS = 1000
WINDOW_MARGIN = 1.0

QB_BIAS_STD = "qb_bias_std"
CLAMPED_VALUES = "qb_clamped_values"
CLAMPED_QUANTILES = "qb_clamped_quantiles"
METRICS = (QB_BIAS_STD, CLAMPED_VALUES, CLAMPED_QUANTILES)


# ---------------------------------------------------------------- the math, pure functions


def dual_route(scores_TE: torch.Tensor, beta_E: torch.Tensor,
               topk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(top-K experts [T, K], alpha [T, 1]) of one dual step (QB-1): the K largest s - beta pick
    the experts, the (K+1)-th is the token's dual. As moe_utils.qb_dual_update's first half."""
    top = (scores_TE - beta_E).topk(topk + 1, dim=1)
    return top.indices[:, :-1], top.values[:, -1:]


def histogram_window(beta_XE: torch.Tensor,
                     margin: float = WINDOW_MARGIN) -> tuple[torch.Tensor, torch.Tensor]:
    """(lo, hi) [..., 1] = (min_e beta_e - margin, max_e beta_e + margin) of each bias."""
    return (beta_XE.amin(dim=-1, keepdim=True) - margin,
            beta_XE.amax(dim=-1, keepdim=True) + margin)


def add_histograms(counts_EB: torch.Tensor, values_TE: torch.Tensor, lo: torch.Tensor,
                   hi: torch.Tensor) -> torch.Tensor:
    """Add every column e of `values_TE` to the histogram `counts_EB[e]` in place and return it.

    counts_EB: int64 [E, B + 2]: bin 0 counts the values below lo, bins 1..B split [lo, hi) into
    B bins of width (hi - lo) / B, bin B + 1 counts the values at or above hi. lo, hi: [] or [1]
    of the values' dtype. NaN lands in bin 0 (the step that holds it is discarded anyway: its
    logits were not finite). No host sync: index_add_, not bincount.
    """
    num_experts, width = counts_EB.shape
    bins = width - 2
    index_TE = ((values_TE - lo) * (bins / (hi - lo))).floor_().clamp_(-1, bins)
    index_TE = index_TE.nan_to_num_(-1.0).long() + 1
    index_TE += torch.arange(num_experts, device=index_TE.device) * width
    ones = torch.ones((), dtype=counts_EB.dtype, device=counts_EB.device)
    counts_EB.view(-1).index_add_(0, index_TE.view(-1), ones.expand(index_TE.numel()))
    return counts_EB


def histogram_quantile(counts_XEB: torch.Tensor, rank_X: torch.Tensor, lo_X: torch.Tensor,
                       hi_X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The rank-th largest value (1-based) of each histogram, and whether it was clamped.

    Args:
        counts_XEB: int64 [..., E, B + 2] histograms as `add_histograms` makes them, each of
            the same total N.
        rank_X: int64 [...], the rank to read (C + 1 of QB-2), at most N.
        lo_X, hi_X: [..., 1] the window.
    Returns:
        (float64 [..., E], bool [..., E]). The rank-th largest is the (N + 1 - rank)-th
        smallest; it lies in the bin j where the count from the bottom first reaches that
        (a binary search of the cumulative counts). With c_below values below j and n_j in
        it, the estimate is lower(j) + (N + 1 - rank - c_below - 1/2) / n_j * w, inside bin j,
        so within w of the exact value when that lies in the window. In an overflow bin it is
        the window's edge and flagged True.
    """
    bins = counts_XEB.shape[-1] - 2
    lo, hi = lo_X.double().unsqueeze(-1), hi_X.double().unsqueeze(-1)  # [..., 1, 1]
    cumulative = counts_XEB.cumsum(-1)  # [..., E, B + 2]: count in bins 0..j
    from_bottom = cumulative[..., -1:] + 1 - rank_X[..., None, None]  # [..., E, 1]
    bin_index = torch.searchsorted(cumulative, from_bottom).clamp_(max=bins + 1)
    in_bin = counts_XEB.gather(-1, bin_index)
    below = cumulative.gather(-1, bin_index) - in_bin
    within = ((from_bottom - below).double() - 0.5) / in_bin.clamp(min=1).double()
    width = (hi - lo) / bins
    bin_index = bin_index.double()  # 0: below lo, B + 1: at or above hi
    estimate = lo + (bin_index - 1 + within) * width
    clamped = (bin_index == 0) | (bin_index == bins + 1)
    estimate = torch.where(bin_index == 0, lo, torch.where(bin_index == bins + 1, hi, estimate))
    return estimate.squeeze(-1), clamped.squeeze(-1)


def quantile_rank(num_tokens: torch.Tensor, topk: int, num_experts: int) -> torch.Tensor:
    """C + 1 = N K / E + 1 (QB-2) for N tokens [...]: int64 [...]."""
    return num_tokens * topk // num_experts + 1


def updated_bias(beta_LE: torch.Tensor, quantile_LE: torch.Tensor, ema: float) -> torch.Tensor:
    """(QB-3) with upstream's operations in upstream's order (bitwise at micro): fp32 [L, E]."""
    new_beta_LE = ema * beta_LE + (1.0 - ema) * quantile_LE
    return new_beta_LE - new_beta_LE.mean(dim=-1, keepdim=True)


# ---------------------------------------------------------------- one router's step


@dataclass
class StepHistograms:
    """What one router counted for quantile balancing in the current step (`RouterState.qb`).

    micro: upstream's own accumulation of this step's micro-batch quantiles, moved here after
    every call (its buffers are zeroed by finalize_model_grads before the step's end).
    dp/global: the window, fixed for the step, and the histograms of v = s - alpha, one per
    call (dp) or one for the step (global); int64 [E, B + 2].
    """

    scope: str
    upstream_sum: Optional[torch.Tensor] = None  # fp32 [E]
    upstream_count: Optional[torch.Tensor] = None  # int64 []
    window: Optional[tuple[torch.Tensor, torch.Tensor]] = None  # (lo, hi) fp32 [1]
    histograms: list = field(default_factory=list)
    bias_before: Optional[torch.Tensor] = None  # the bias the step's update replaced
    # After the step's update: per-layer metrics (metrics.step_metrics reads them).
    clamped_values: Optional[torch.Tensor] = None  # int64 []
    clamped_quantiles: Optional[torch.Tensor] = None  # int64 []

    def add(self, values_TE: torch.Tensor, beta_E: torch.Tensor) -> None:
        """Count this call's v = s - alpha [T, E]."""
        if self.window is None:  # beta is fixed until the step's end: so is the window
            self.window = histogram_window(beta_E.detach().float())
        if self.scope == "dp" or not self.histograms:
            self.histograms.append(torch.zeros(values_TE.shape[1], BINS + 2, dtype=torch.int64,
                                               device=values_TE.device))
        add_histograms(self.histograms[-1], values_TE, *self.window)

    def take_upstream(self, router) -> None:
        """Move the quantile upstream's quantile_balancing just added into this step's sum.

        0 + x = x in floating point, so the sum is upstream's own, bit for bit."""
        accum_E, count = compat.qb_upstream_accumulators(router)
        if self.upstream_sum is None:
            self.upstream_sum, self.upstream_count = torch.zeros_like(accum_E), \
                torch.zeros_like(count)
        self.upstream_sum.add_(accum_E)
        self.upstream_count.add_(count)
        accum_E.zero_()
        count.zero_()


def route(original, router, logits_TE: torch.Tensor, scope: str,
          state) -> tuple[torch.Tensor, torch.Tensor]:
    """TopKRouter.quantile_balancing for a training call at `scope`.

    micro: upstream's own (it gathers the logits over TP x CP for its quantile), its quantile
    moved to the step's sum. dp/global: the same routing without the gather (the top-K of
    s - beta is per token) and, when gradients are on, this call's histogram of v (the no-grad
    first pass of activation recompute routes without counting, as upstream's). A counted
    call's dispatched load is kept for the step metrics.
    """
    counting = torch.is_grad_enabled()
    if scope == "micro":
        probs, routing_map = original(router, logits_TE)
        if counting:
            state.qb.take_upstream(router)
    else:
        with torch.no_grad():
            scores_TE = logits_TE.detach().float()
            beta_E = compat.qb_bias(router)
            indices_TK, alpha_T1 = dual_route(scores_TE, beta_E, router.topk)
            if counting:
                state.qb.add(scores_TE - alpha_T1, beta_E)
        probs, routing_map = compat.qb_routing(router, logits_TE, indices_TK)
    if counting:
        state.load_counts.append(count_choices(routing_map, routing_map.shape[0]))
    return probs, routing_map


def note_call(router, state, settings, sync_group, logits_SBE: torch.Tensor,
              padding_mask) -> None:
    """Check a training call before upstream's routing sees it, start the step's histograms and
    set the Balance BSZ (tokens of the quantile's token set: no padding, so from the shapes).

    Raises ValueError for what quantile balancing cannot take: a padding mask, or a micro-batch
    whose N K is not a multiple of E (N: its tokens over TP x CP, as upstream gathers them).
    """
    if padding_mask is not None:
        raise ValueError(
            f"megatron_gbl: MoE layer {compat.layer_index(router)} got a padding_mask, which "
            "quantile balancing (moe_router_load_balancing_type='quantile_balancing') does not "
            "take in Megatron-Core: call the model's forward without padding_mask (pack or drop "
            "padded sequences), or use another moe_router_load_balancing_type")
    tp_cp = _size(compat.tp_cp_group(router))
    num_tokens = logits_SBE.shape[0] * logits_SBE.shape[1] * tp_cp
    num_experts = logits_SBE.shape[-1]
    if num_tokens * router.topk % num_experts:
        raise ValueError(
            f"megatron_gbl: quantile balancing gives each of the {num_experts} experts N K / E "
            f"tokens, but a micro-batch holds N = {num_tokens} tokens (over TP x CP) and "
            f"N K = {num_tokens * router.topk} (K = moe_router_topk / --moe-router-topk) is not "
            f"a multiple of E = {num_experts} (num_moe_experts / --num-experts); change "
            "--micro-batch-size or --seq-length so that it is")
    if state.qb is None:
        state.qb = StepHistograms(settings.scope)
    balance_group = compat.tp_cp_group(router) if settings.scope == "micro" else sync_group
    replicas = _size(balance_group) // tp_cp
    microbatches = state.calls if settings.scope == "global" else 1
    tokens, device = num_tokens * replicas * microbatches, logits_SBE.device
    # Made when read (once per step), where the step's other metrics are: no copy per call.
    state.set_balance(lambda: torch.tensor(tokens, device=device),
                      logits_SBE.shape[1] * replicas * microbatches)


# ---------------------------------------------------------------- the step's update


def step_update(routers: Sequence, settings, sync_group) -> None:
    """(QB-2, QB-3) for every router of this pipeline stage that trained this step, once.

    micro: upstream's update from its accumulated micro-batch quantiles (ReduceOp.AVG over
    DP x CP, as finalize_model_grads). dp/global: one all-reduce of every layer's histograms
    over the balance group, the quantiles read from the sums, averaged over micro-batches (dp)
    and over the blocks (:N, a sum over TP x DP x CP), then the same EMA and re-centring.
    A collective over the stage's groups: every rank of the stage calls it.
    """
    routers = [router for router in routers
               if router.training and router._megatron_gbl.qb is not None]
    if not routers:
        return
    if settings.scope == "micro":
        quantile_LE = torch.stack([
            state.upstream_sum / state.upstream_count.clamp(min=1).to(state.upstream_sum.dtype)
            for state in (router._megatron_gbl.qb for router in routers)])
        comm.all_reduce_average(quantile_LE, compat.dp_cp_group(),
                                "the quantile-balancing bias average")
    else:
        quantile_LE = _histogram_quantiles(routers, *bias_groups(routers[0], settings,
                                                                 sync_group)).float()
    beta_list = [compat.qb_bias(router) for router in routers]
    beta_LE = torch.stack(beta_list)
    new_beta_LE = updated_bias(beta_LE, quantile_LE,
                               routers[0]._megatron_gbl.balancing.quantile_ema)
    with torch.no_grad():
        for router, beta_E, old_beta_E, new_beta_E in zip(routers, beta_list, beta_LE,
                                                          new_beta_LE):
            router._megatron_gbl.qb.bias_before = old_beta_E
            beta_E.copy_(new_beta_E)


def undo_step(router) -> None:
    """Put back the bias this step's update replaced: the optimizer skipped the step (fp16's
    grad scaler found inf or NaN, steps.undo_skipped_step), and so does the bias. Upstream
    updates it in every step."""
    histograms = router._megatron_gbl.qb
    if histograms.bias_before is not None:
        with torch.no_grad():
            compat.qb_bias(router).copy_(histograms.bias_before)
        histograms.bias_before = None


def _histogram_quantiles(routers: Sequence, balance_group, average_group) -> torch.Tensor:
    """float64 [L, E]: each router's q from its histograms summed over `balance_group`, the mean
    over its calls (dp: one histogram per micro-batch), averaged over `average_group` (None: one
    group). Sets each router's clamp counts for the step metrics."""
    states = [router._megatron_gbl.qb for router in routers]
    summed = comm.all_reduce_sums([(torch.stack(state.histograms), balance_group)
                                   for state in states], "the quantile-balancing histogram sum")
    quantiles = []
    for router, state, counts_MEB in zip(routers, states, summed):
        lo, hi = state.window
        num_tokens_M = counts_MEB[:, 0].sum(-1)
        rank_M = quantile_rank(num_tokens_M, router.topk, counts_MEB.shape[1])
        quantile_ME, clamped_ME = histogram_quantile(
            counts_MEB, rank_M, lo.expand(len(rank_M), 1), hi.expand(len(rank_M), 1))
        state.clamped_values = counts_MEB[..., 0].sum() + counts_MEB[..., -1].sum()
        state.clamped_quantiles = clamped_ME.sum()
        quantiles.append(quantile_ME.mean(dim=0))
    quantile_LE = torch.stack(quantiles)
    if average_group is None:
        return quantile_LE
    ranks = dist.get_world_size(average_group)
    return comm.all_reduce_sum(quantile_LE, average_group, "the quantile-balancing block "
                               "average") / ranks


def step_values(routers: Sequence) -> dict[str, torch.Tensor]:
    """The step metrics of quantile balancing, float64 [L]: the bias's spread (std over experts)
    and the clamp counts of the step's histograms (0 at micro: upstream's exact quantiles)."""
    biases = [compat.qb_bias(router).detach() for router in routers]
    states = [router._megatron_gbl.qb for router in routers]

    def counted(name: str) -> torch.Tensor:
        return torch.stack([
            torch.zeros((), dtype=torch.float64, device=beta_E.device)
            if state is None or getattr(state, name) is None else getattr(state, name).double()
            for beta_E, state in zip(biases, states)])

    return {QB_BIAS_STD: torch.stack([beta_E.double().std() for beta_E in biases]),
            CLAMPED_VALUES: counted("clamped_values"),
            CLAMPED_QUANTILES: counted("clamped_quantiles")}


def _size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)
