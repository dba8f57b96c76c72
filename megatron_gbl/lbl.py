"""One router call's balancing: the scoped load-balancing loss, and the expert load.

Per rank r and micro-batch k of a step (paper eq. 6 with Algorithm 1):

    L_rk = coeff * N_E * Σ_i f_i * P_i^r
    f_i  = Σ_{j<=k} C_ij / (K * Σ_{j<=k} T_j)      C, T: counts and valid tokens summed over
                                                   the balance group (global: j<=k; dp: j=k)
    P_i^r = Σ_{x in rank r, valid} p(x, i) / (T_k / R)

with R the number of data-parallel replicas in the balance group. T_k / R is the mean valid-token
count per replica, so after Megatron's data-parallel gradient averaging Σ_r ∇L_rk / R equals
∇(coeff * LBL) of the whole balance group's micro-batch k with buffered f, padding or not.
For scope "micro" the group is TP x CP, R = 1 and this is exactly Megatron's aux_loss.
Scope "shuffle" (paper Tab. 2) is "micro" with C counted on T_k tokens drawn without
replacement from the micro-batch of every replica: micro's token count, global's distribution.
With `micro_coeff` > 0 (dp/global), micro_coeff * LBL of the micro-batch over TP x CP is added
(paper Tab. 5, "LBL_global + LBL_micro").
With `device_coeff` > 0, at every scope, device_coeff * L_dev is added: DeepSeek-V2's
device-level LBL over groups of consecutive experts, with the counts of one all-to-all (the
micro-batch over the layer's token group; `_device_weights`).

No barrier in the forward pass: L is linear in the probability sums s_i, L = Σ_i w_i s_i with
w = ∂L/∂s known once the counts are (loss.load_balancing_weights). The count all-reduce is
issued asynchronously in the forward and waited for in this layer's backward, where w is first
needed. There w and s are kept, and the logged value Σ_i w_i s_i is computed once per step
for all micro-batches (metrics.log_lbl).

The expert load of auxiliary-loss-free balancing (bias.py) is counted on the routing map the
router dispatched (biased top-k), not on the plain top-k the LBL uses.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from megatron_gbl import comm, compat
from megatron_gbl.bias import ExpertBiasUpdater
from megatron_gbl.buffer import StepBuffer
from megatron_gbl.comm import PendingGather, PendingSum
from megatron_gbl.config import Balancing, Settings
from megatron_gbl.loss import device_balancing_weights, load_balancing_weights


@dataclass(frozen=True)
class BalanceBSZ:
    """How many tokens and sequences f_i was computed over in a router's last training call."""

    tokens: int
    sequences: int


@dataclass
class RouterState:
    """What the plugin keeps on one TopKRouter (as `router._megatron_gbl`)."""

    balancing: Balancing
    # > 1 for the one MTP layer `mtp_use_repeated_layer` runs at every prediction depth: each
    # call of a micro-batch is a depth, balanced with its own buffer, its loss weighted
    # 1 / calls_per_microbatch like upstream's (compat.calls_per_microbatch).
    calls_per_microbatch: int = 1
    depth_buffers: list = field(init=False)  # [StepBuffer] per call of a micro-batch
    bias: Optional[ExpertBiasUpdater] = None
    in_step: bool = False  # started, not yet finished or discarded
    expected_microbatches: Optional[int] = None
    calls: int = 0  # training calls of this step
    balance_tokens: Optional[Callable[[], torch.Tensor]] = None  # waits for the synced counts
    # f's tokens are balance_tokens() / this: B for "seq" (each sequence its own f), else 1;
    # divided where read, not per call.
    balance_tokens_divisor: int = 1
    balance_sequences: int = 0
    # Local, unreduced statistics of each micro-batch of the step, for metrics.step_metrics:
    # with an LBL, its counts [c, T] (int64) and probability sums s (float); with expert bias,
    # the dispatched load [c, T] (int64). Converted once per step, not per call.
    microbatch_stats: list = field(default_factory=list)
    load_counts: list = field(default_factory=list)
    lbl_terms: list = field(default_factory=list)  # (w float64, s) per backward: metrics.log_lbl
    # (w float64 [E], s [E], device_coeff) per backward of the device-level LBL: metrics.log_lbl
    device_terms: list = field(default_factory=list)
    # The layer's all-to-all token group and D, the device groups (steps.start_step sets them).
    token_group: object = None
    device_groups: int = 1
    logit_sums: list = field(default_factory=list)  # fp32 []: NaN or inf if a logit was
    shuffle_generator: Optional[torch.Generator] = None
    # Whether this step's calls are activation-recompute replays: they run in the backward,
    # where autograd replays a repeated MTP layer's depths in reverse order.
    replayed: bool = False
    qb: Optional[object] = None  # quantile balancing: this step's quantile.StepHistograms

    def __post_init__(self):
        self.depth_buffers = [StepBuffer() for _ in range(self.calls_per_microbatch)]
        if self.balancing.bias_update_rate is not None:
            self.bias = ExpertBiasUpdater(self.balancing.bias_update_rate)

    @property
    def buffer(self) -> StepBuffer:
        """The buffer of the last call's depth (the only one, but for a repeated MTP layer).

        Its calls come in the same depth order in every micro-batch (forward order, or reversed
        by a recompute replay in backward), so call k * R + j is always depth slot j.
        """
        return self.depth_buffers[(self.calls - 1) % self.calls_per_microbatch]

    @property
    def loss_share(self) -> float:
        """The weight of one call's loss: 1 / (calls per micro-batch)."""
        return 1.0 / self.calls_per_microbatch

    def start_step(self, expected_microbatches: Optional[int] = None,
                   bias_snapshot: Optional[torch.Tensor] = None) -> None:
        """`bias_snapshot`: a copy of the expert bias as the step starts (bias.snapshot)."""
        for buffer in self.depth_buffers:
            buffer.reset()
        self.microbatch_stats.clear()
        self.load_counts.clear()
        self.lbl_terms.clear()
        self.device_terms.clear()
        if self.bias is not None:
            self.bias.start_step(bias_snapshot)
        self.in_step = True
        self.expected_microbatches = expected_microbatches
        self.calls = 0
        self.logit_sums.clear()
        self.qb = None

    def close_step(self) -> None:
        """The step finished or was discarded: no training call until the next start_step."""
        self.in_step = False
        if self.bias is not None:
            self.bias.close_step()

    def discard_step(self, expert_bias: Optional[torch.Tensor] = None) -> None:
        """Undo the step (failed, or skipped): the expert-bias updates it made, its counts and
        statistics."""
        if self.bias is not None and expert_bias is not None:
            self.bias.restore_step_start(expert_bias)
        self.start_step()
        self.close_step()

    def note_logits(self, logits: torch.Tensor) -> None:
        """Keep the sum of this call's logits on the device: it is NaN or inf when one of them
        was (or when finite logits beyond 1e34 overflow it, broken too). Checked once per step
        (`logits_finite`), so no host sync per call, and one reduction."""
        self.logit_sums.append(logits.sum(dtype=torch.float32))

    def logits_finite(self) -> bool:
        """Every logit of this step was finite (a host sync)."""
        return not self.logit_sums or bool(torch.isfinite(torch.stack(self.logit_sums)).all())

    def count_call(self) -> None:
        """One more training call (micro-batch, or depth of a repeated MTP layer) of this step.
        One too many is not refused here but agreed on by every rank at the step's end
        (`miscounted`, steps.finish_step), so no rank stops alone mid-step."""
        if self.calls == 0 and self.calls_per_microbatch > 1:
            self.replayed = torch._C._current_graph_task_id() >= 0  # inside a backward
        self.calls += 1

    def miscounted(self) -> bool:
        """The router ran in this step, but not once per micro-batch (when their number is
        known). A router that did not run at all is no fault: a layer may sit a step out."""
        return self.expected_microbatches is not None and self.calls > 0 \
            and self.calls != self.expected_microbatches * self.calls_per_microbatch

    def set_balance(self, tokens: Callable[[], torch.Tensor], sequences: int,
                    tokens_divisor: int = 1) -> None:
        """The last call's f was over tokens() / tokens_divisor tokens and `sequences`
        sequences (`balance_bsz`); `tokens` waits for the synced counts when called."""
        self.balance_tokens = tokens
        self.balance_sequences = sequences
        self.balance_tokens_divisor = tokens_divisor

    @property
    def balance_bsz(self) -> Optional[BalanceBSZ]:
        tokens = None if self.balance_tokens is None else self.balance_tokens()
        return None if tokens is None else BalanceBSZ(
            int(tokens / self.balance_tokens_divisor), self.balance_sequences)


def apply_scoped_lbl(
    router,
    state: RouterState,
    settings: Settings,
    sync_group,
    logits_TE: torch.Tensor,
    bsz: int,
    probs: torch.Tensor,
    padding_mask_SB: Optional[torch.Tensor],
) -> torch.Tensor:
    """Attach this router call's LBL at `settings.scope` to `probs`; return the new `probs`.

    Args:
        logits_TE: router logits [S*B, E], tokens ordered [S, B] as `TopKRouter.routing`
            receives them; B = `bsz` sequences.
        probs: routing probabilities [S*B, E] that upstream routing returned.
        padding_mask_SB: bool [S, B], True = padding (Megatron's convention), or None.
        sync_group: the balance group for scopes dp/global.
    """
    num_experts = logits_TE.shape[-1]
    seq_length = logits_TE.shape[0] // bsz
    scores_TE, routing_map_TE = compat.aux_scores_and_map(router, logits_TE)
    valid_T1, num_local_tokens = _valid_tokens(padding_mask_SB, scores_TE)
    if valid_T1 is not None:
        scores_TE = scores_TE * valid_T1
        routing_map_TE = routing_map_TE & valid_T1

    # Without padding this rank's own tokens are among every token count it takes part in.
    tokens_nonzero = valid_T1 is None and num_local_tokens > 0

    probs_sum_E = scores_TE.sum(dim=0)
    local_counts = count_choices(routing_map_TE, num_local_tokens)  # one pass over the [T, E] map
    kept_probs_sum = probs_sum_E.detach()  # for the step's statistics and its logged LBL
    state.microbatch_stats.append((local_counts, kept_probs_sum))
    local_group = compat.tp_cp_group(router)

    micro_weights = None
    if settings.micro_coeff:
        micro_weights = _micro_weights(router, state, settings, local_counts, local_group,
                                       num_experts, tokens_nonzero)

    if settings.scope == "seq":
        probs_sum, weights = _sequence_weights(router, state, settings, scores_TE, routing_map_TE,
                                               num_local_tokens, seq_length, bsz, local_group,
                                               tokens_nonzero)
        kept_probs_sum = probs_sum.detach()
    else:
        probs_sum = probs_sum_E
        group = sync_group if settings.uses_dp_sync else local_group
        shuffled = None
        if settings.scope == "shuffle":
            shuffled = _shuffled_counts(router, state, settings, routing_map_TE, valid_T1)
        weights = _batch_weights(router, state, settings, _to_sum(local_counts, group), group,
                                 replicas=_size(group) // _size(local_group), bsz=bsz,
                                 tokens_nonzero=tokens_nonzero, shuffled=shuffled)

    device_weights = None
    if settings.device_coeff:
        device_weights = _device_weights(router, state, settings, local_counts,
                                         probs_sum_E.detach(), tokens_nonzero)

    def backward_weights() -> torch.Tensor:
        weights_X = weights()
        # Kept for the logged LBL; micro_coeff's term is logged as micro_batch_lbl instead.
        state.lbl_terms.append((weights_X, kept_probs_sum))
        if micro_weights is not None:
            weights_X = weights_X + micro_weights()
        if device_weights is not None:
            # Viewed [B, E] for "seq" (B*E sums): an expert's weight for every sequence's copy.
            weights_X = (weights_X.view(-1, num_experts) + device_weights()).view(-1)
        scale = compat.aux_loss_backward_scale(router, num_local_tokens,
                                               state.expected_microbatches)
        if scale is None:
            return weights_X.to(probs_sum.dtype)
        # Scaled straight into the probabilities' dtype: one kernel for the product and the cast.
        return torch.mul(weights_X, scale, out=torch.empty_like(probs_sum))

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


def _micro_weights(router, state: RouterState, settings: Settings, local_counts, local_group,
                   num_experts: int, tokens_nonzero: bool):
    """w of the added micro-batch LBL: issue the count sum over TP x CP, return w's thunk.

    micro_coeff * LBL (eq. 2) with f_i and P_i over this micro-batch's tokens of the TP x CP
    group (`local_group`): Megatron's own aux_loss, weighted beside the dp/global term.
    """
    counts = PendingSum(_to_sum(local_counts, local_group), local_group, settings.blocking_sync,
                        _what("micro-batch expert-count sum", router))
    coeff = settings.micro_coeff * state.loss_share

    def weights():
        counts_E1 = counts.wait()
        num_tokens = counts_E1[-1]
        return load_balancing_weights(counts_E1[:-1], num_tokens, num_tokens, router.topk,
                                      num_experts, coeff, tokens_nonzero=tokens_nonzero)

    return weights


def _device_weights(router, state: RouterState, settings: Settings, local_counts,
                    probs_sum_E: torch.Tensor, tokens_nonzero: bool):
    """w of the device-level LBL: issue the count sum over the token group, return w's thunk.

    For micro-batch k and the token group G of the layer's all-to-all (compat.token_group:
    expert-tensor x expert-parallel ranks for every Megatron dispatcher), with D groups of
    consecutive experts (loss.device_balancing_weights):

        L_G = device_coeff * D * Σ_d F_d * P_d,   F_d = C_d / (K * T_G),   P_d = S_d / T_G

    C_d, S_d: choices of and probability sums over group d's experts, T_G: valid tokens, all
    over G's micro-batch k only (one all-to-all's load; never buffered). L_G is linear in the
    expert sums S_i = Σ_{r in G} s_i^r: L_G = Σ_i w_i S_i with w_i = device_coeff * D *
    F_d(i) / T_G. Rank r attaches Σ_i R_G w_i s_i^r, R_G = |G| / |TP x CP|.

    Why R_G: as for the other terms (micro: R = 1 is Megatron's aux_loss), Megatron's gradient
    reduction (sum over TP of sequence-parallel gradients, average over DP x CP, with the
    aux-loss scale of compat.aux_loss_backward_scale) applies |TP x CP| / N * Σ_r g_r over the
    N ranks of the pipeline stage: the mean over TP x CP groups of what their ranks add up to.
    With g_r = R_G ∇(Σ_i w_i s_i^r), Σ_r g_r = R_G Σ_G ∇L_G, so the router gets
    |TP x CP| / N * |G| / |TP x CP| * Σ_G ∇L_G = mean over the N / |G| token groups of ∇L_G:
    each micro-batch's device loss over its token group, averaged like the micro-batch LBL.
    R_G is fractional when G is smaller than TP x CP (expert-tensor size below TP); the sums
    above do not need it whole. The logged value (metrics.log_lbl) is, by the same sums, the
    mean of L_G / device_coeff.
    """
    token_group = state.token_group
    synced = PendingSum(_to_sum(local_counts, token_group), token_group, settings.blocking_sync,
                        _what("device-count sum", router))
    replicas = _size(token_group) / _size(compat.tp_cp_group(router))
    num_devices, coeff = state.device_groups, settings.device_coeff

    def weights():
        counts = synced.wait()
        # A repeated MTP layer's calls share one micro-batch's weight, as its LBL's do.
        weights_E = device_balancing_weights(counts[:-1], counts[-1], counts[-1], router.topk,
                                             num_devices, coeff * state.loss_share * replicas,
                                             tokens_nonzero=tokens_nonzero)
        state.device_terms.append((weights_E, probs_sum_E, coeff))
        return weights_E

    return weights


def _batch_weights(router, state, settings, counts, group, replicas: int, bsz: int,
                   tokens_nonzero: bool, shuffled: Optional[Callable] = None):
    """w for scopes micro/dp/global/shuffle: issue the count sum over `group`, return w's thunk.

    `shuffled(num_tokens)`, for "shuffle", gives the counts of that many drawn tokens.
    """
    num_experts = counts.shape[0] - 1
    synced = PendingSum(counts, group, settings.blocking_sync,
                        _what("expert-count sum", router))
    if settings.scope == "global":
        k = state.buffer.add(synced)
        counts_for_f = functools.partial(state.buffer.prefix, k)
        microbatches = k + 1
    else:
        @functools.cache  # one draw per call, however often it is asked for
        def counts_for_f():
            counts = synced.wait()
            if shuffled is not None:
                return shuffled(counts[-1]), counts[-1]
            return counts[:-1], counts[-1]

        microbatches = 1
    state.set_balance(lambda: counts_for_f()[1], bsz * replicas * microbatches)

    def weights():
        tokens_per_expert_E, num_tokens_for_f = counts_for_f()
        # Only the buffer's f spans more tokens than this micro-batch's T_k.
        num_tokens_for_p = synced.wait()[-1] if settings.scope == "global" else num_tokens_for_f
        # P is a mean over T_k / R tokens per replica: T_k tokens and R x the coefficient.
        return load_balancing_weights(tokens_per_expert_E, num_tokens_for_f, num_tokens_for_p,
                                      router.topk, num_experts,
                                      state.balancing.coeff * state.loss_share * replicas,
                                      tokens_nonzero=tokens_nonzero)

    return weights


def _sequence_weights(router, state, settings, scores_TE, routing_map_TE, num_local_tokens,
                      seq_length, bsz, local_group, tokens_nonzero: bool):
    """(s, w thunk) for the mean over the B sequences of each sequence's LBL (seq_aux_loss).

    Tokens are ordered [S, B], so viewing [S, B*E] puts sequence b's experts at b*E..b*E+E-1
    and one LBL over that B*E axis is the sum of the B per-sequence LBLs. Like upstream, every
    sequence is normalised by the mean valid-token count per sequence over TP x CP.
    """
    num_experts = scores_TE.shape[-1]
    synced = PendingSum(
        count_choices(routing_map_TE.reshape(seq_length, bsz * num_experts), num_local_tokens),
        local_group, settings.blocking_sync, _what("per-sequence expert-count sum", router))
    state.set_balance(lambda: synced.wait()[-1], 1, tokens_divisor=bsz)

    def weights():
        # Each sequence's f and P over T / B tokens, and the mean over the B sequences:
        # coeff / B / (T / B)^2 = coeff * B / T^2, so T tokens and B x the coefficient.
        counts = synced.wait()
        num_tokens = counts[-1]
        return load_balancing_weights(counts[:-1], num_tokens, num_tokens, router.topk,
                                      num_experts, state.balancing.coeff * state.loss_share * bsz,
                                      tokens_nonzero=tokens_nonzero)

    return scores_TE.reshape(seq_length, bsz * num_experts).sum(dim=0), weights


def _shuffled_counts(router, state, settings, routing_map_TE, valid_T1):
    """Issue the gather of every replica's expert choices; return `draw(num_tokens)`.

    The sample of a replica is the same on its TP x CP ranks (seeded by data-parallel rank and
    layer) and differs between replicas, as each parallel group of eq. 3 draws its own.
    """
    choices_TK = torch.topk(routing_map_TE.to(torch.int32), router.topk, dim=1).indices
    if valid_T1 is not None:
        choices_TK = torch.where(valid_T1, choices_TK, -1)
    # int32: the smallest integer type every backend gathers.
    gathered = PendingGather(choices_TK.to(torch.int32), compat.tp_dp_cp_group(router),
                             settings.blocking_sync, _what("expert-choice gather", router))
    if state.shuffle_generator is None:
        dp_rank, _ = compat.data_parallel_rank_and_size()
        state.shuffle_generator = torch.Generator(device=routing_map_TE.device).manual_seed(
            (settings.shuffle_seed << 32) + (dp_rank << 16) + compat.layer_index(router))
    generator = state.shuffle_generator
    num_experts = routing_map_TE.shape[-1]
    return lambda num_tokens: draw_shuffled_counts(gathered.wait(), num_tokens, num_experts,
                                                   generator)[0]


def draw_shuffled_counts(choices_NK: torch.Tensor, sample_size: torch.Tensor, num_experts: int,
                         generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert counts of `sample_size` tokens drawn uniformly without replacement.

    Args:
        choices_NK: int [N, K], each token's K chosen experts; -1 rows are padding, never drawn.
        sample_size: int64 [], at most the number of valid rows.
    Returns:
        (counts int64 [E], drawn bool [N]). Every row gets a uniform random key (padding: +inf)
        and the `sample_size` smallest keys are drawn: no host sync, any sample size.
    """
    keys_N = torch.rand(choices_NK.shape[0], generator=generator, device=choices_NK.device)
    keys_N = torch.where(choices_NK[:, 0] >= 0, keys_N, torch.inf)
    order_N = torch.argsort(keys_N)
    key_rank_N = torch.empty_like(order_N)
    key_rank_N[order_N] = torch.arange(order_N.shape[0], device=order_N.device)
    drawn_N = key_rank_N < sample_size
    counts_E = torch.zeros(num_experts, dtype=torch.int64, device=choices_NK.device)
    counts_E.scatter_add_(0, choices_NK.clamp(min=0).long().reshape(-1),
                          drawn_N.long().unsqueeze(1).expand_as(choices_NK).reshape(-1))
    return counts_E, drawn_N


def record_expert_load(router, state: RouterState, settings: Settings, sync_group,
                       routing_map_TE: torch.Tensor, padding_mask_SB: Optional[torch.Tensor],
                       bsz: int, frozen: bool) -> None:
    """Count the dispatched routing map [T, E] of this call for the expert-bias update and the
    step's metrics. A `frozen` bias (0.19's frozen_expert_bias) is not updated: only its load
    is kept, for the metrics, and it balanced over no tokens."""
    valid_T1, num_local_tokens = _valid_tokens(padding_mask_SB, routing_map_TE)
    if valid_T1 is not None:
        routing_map_TE = routing_map_TE & valid_T1
    local_counts = count_choices(routing_map_TE, num_local_tokens)
    state.load_counts.append(local_counts)
    if frozen:
        if state.balancing.lbl_type is None:
            state.set_balance(lambda: local_counts.new_zeros(()), 0)
        return
    balance_group, average_group = bias_groups(router, settings, sync_group)
    state.bias.record(local_counts, settings.scope, balance_group, average_group,
                      settings.blocking_sync, _what("expert-load sum", router))
    if state.balancing.lbl_type is None:  # else the LBL's Balance BSZ, the same token set
        microbatches = len(state.load_counts) if settings.scope == "global" else 1
        replicas = _size(balance_group) // _size(compat.tp_cp_group(router))
        state.set_balance(lambda: state.bias.balance_tokens, bsz * replicas * microbatches)


def bias_groups(router, settings: Settings, sync_group):
    """(balance group, average group) of the expert-bias update (bias.py): counts are summed
    over the first, signs averaged over the second (None when the first is all of TP x DP x CP,
    so there is only one sign)."""
    balance_group = sync_group if settings.uses_dp_sync else compat.tp_cp_group(router)
    average_group = compat.tp_dp_cp_group(router)
    if _size(balance_group) == _size(average_group):
        average_group = None
    return balance_group, average_group


def count_choices(routing_map_TX, num_local_tokens) -> torch.Tensor:
    """[choices per column (X), valid tokens] as one int64 vector: one collective for both.

    int64 keeps the sum exact on every backend and at any scale (no float count ever exists).
    """
    counts = routing_map_TX.new_empty(routing_map_TX.shape[1] + 1, dtype=torch.int64)
    # Summed into place, not concatenated: a kernel fewer per router call.
    torch.sum(routing_map_TX, dim=0, dtype=torch.int64, out=counts[:-1])
    counts[-1] = num_local_tokens
    return counts


def _valid_tokens(padding_mask_SB: Optional[torch.Tensor], like_TE: torch.Tensor):
    """(valid bool [T, 1] or None without padding, number of valid tokens: an int without
    padding, so no host-to-device copy (a sync on CUDA), else int64 [] on the device)."""
    if padding_mask_SB is None:
        return None, like_TE.shape[0]
    valid_T1 = ~padding_mask_SB.reshape(-1, 1)
    return valid_T1, valid_T1.sum(dtype=torch.int64)


def _to_sum(local_counts: torch.Tensor, group) -> torch.Tensor:
    """What to sum in place over `group`: a copy where the sum writes (the step's statistics
    keep the local counts), the counts themselves where there is nothing to sum."""
    return local_counts.clone() if comm.spans_ranks(group) else local_counts


def _what(collective: str, router) -> Callable[[], str]:
    """The name of a router's collective for errors, formatted only if one happens (not in
    every router call). It holds the layer number, not the router: the plugin's state keeps no
    reference to the model."""
    layer = compat.layer_index(router)
    return lambda: f"the {collective} of MoE layer {layer}"


def _size(group) -> int:
    return 1 if group is None else torch.distributed.get_world_size(group)
