"""The optimizer-step boundary: what is in force, each router's state, the public step API.

Megatron-Core's schedules mark steps themselves once the plugin is enabled (patch.py wraps
them); a custom training loop marks them with `step` (or `start_step` / `finish_step`). A step
starts with every router's buffer empty (paper Alg. 1 line 8) and finishes by checking the
router logits, logging the LBL and applying the expert-bias updates.
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from typing import Callable, Iterable, Optional, Sequence, Union

import torch
import torch.distributed as dist
from megatron.core.transformer.moe.router import TopKRouter

from megatron_gbl import bias, comm, compat, metrics, quantile
from megatron_gbl.config import Settings, check_sync_group_size, device_groups, router_balancing
from megatron_gbl.lbl import BalanceBSZ, RouterState, bias_groups

logger = logging.getLogger("megatron_gbl")

_STATE_ATTR = "_megatron_gbl"
_SETTINGS: Optional[Settings] = None  # as enabled, with the scope switch
_PHASE: Optional[Settings] = None  # in force for the current step
_ITERATION = 0  # of the current step, 0-based
_NEXT_ITERATION = 0
_FINISHED: list = []  # the routers of the last finished step, until the optimizer's decision
_ITERATION_SOURCE: Optional[Callable[[], Optional[int]]] = None  # the trainer's own counter
_ROUTERS: "weakref.WeakSet[TopKRouter]" = weakref.WeakSet()
# Model chunk -> its TopKRouters, in module order.
_CHUNK_ROUTERS: "weakref.WeakKeyDictionary[torch.nn.Module, list[TopKRouter]]" = \
    weakref.WeakKeyDictionary()
# sync_group_size -> (TP x DP x CP groups of the ranks the blocks were cut from, this rank's
# block group)
_SYNC_BLOCK_GROUPS: dict[int, tuple[list, object]] = {}

Model = Union[torch.nn.Module, Iterable[torch.nn.Module]]


def activate(settings: Settings) -> None:
    """Put `settings` in force from the next step on (patch.enable)."""
    global _SETTINGS, _PHASE
    _SETTINGS = settings
    _PHASE = settings.at(_NEXT_ITERATION)


def deactivate() -> None:
    """Forget the settings, every router's state and the balance-block groups (patch.disable)."""
    global _SETTINGS, _PHASE, _ITERATION, _NEXT_ITERATION, _ITERATION_SOURCE, _FINISHED
    for router in list(_ROUTERS):
        delattr(router, _STATE_ATTR)
    _ROUTERS.clear()
    _CHUNK_ROUTERS.clear()
    for _, block_group in _SYNC_BLOCK_GROUPS.values():
        comm.destroy_group(block_group)
    _SYNC_BLOCK_GROUPS.clear()
    _SETTINGS = _PHASE = _ITERATION_SOURCE = None
    _ITERATION = _NEXT_ITERATION = 0
    _FINISHED = []


def settings() -> Optional[Settings]:
    """The settings as enabled (scope switch included), None when the plugin is off."""
    return _SETTINGS


def phase() -> Optional[Settings]:
    """The settings in force for the current step, None when the plugin is off."""
    return _PHASE


def set_iteration(iteration: int, source: Optional[Callable[[], Optional[int]]] = None) -> None:
    """The 0-based index of the next training step (for the scope switch), e.g. after resuming
    a run; `source`, if given, is asked first at every step (Megatron-LM's curr_iteration)."""
    global _NEXT_ITERATION, _ITERATION_SOURCE
    _NEXT_ITERATION, _ITERATION_SOURCE = iteration, source


def start_step(model: Model, num_microbatches: Optional[int] = None,
               iteration: Optional[int] = None) -> None:
    """Begin an optimizer step: empty every router's buffer (paper Alg. 1 line 8).

    Megatron-Core's schedules call this themselves once the plugin is enabled; custom training
    loops call it before each step's first micro-batch, on every rank (or use `step`).
    `num_microbatches` lets the routers reject a micro-batch that would be counted twice;
    `iteration` (default: one more than the last step) decides the scope switch.
    """
    global _PHASE, _ITERATION, _NEXT_ITERATION
    _require_enabled("start_step")
    if iteration is None and _ITERATION_SOURCE is not None:
        iteration = _ITERATION_SOURCE()
    if iteration is None:
        iteration = _NEXT_ITERATION
    phase = _SETTINGS.at(iteration)
    if phase.scope != _PHASE.scope:
        logger.info("megatron_gbl: iteration %d: load-balancing scope %s -> %s", iteration,
                    _PHASE.scope, phase.scope)
    _PHASE, _ITERATION, _NEXT_ITERATION = phase, iteration, iteration + 1
    routers = _routers_of(model)
    if _SETTINGS.sync_group_size is not None:
        build_sync_block_group(_SETTINGS.sync_group_size, routers)
    if any(router._megatron_gbl.in_step and router._megatron_gbl.bias is not None
           and router._megatron_gbl.bias.recorded for router in routers):
        raise RuntimeError(
            "megatron_gbl: the previous step counted expert load for the expert-bias update but "
            "was never finished: call megatron_gbl.finish_step(model) after a step's last "
            "backward (or discard_step(model) after a failed one), or use `with "
            "megatron_gbl.step(model):`"
        )
    # All layers' biases copied at once, to undo the step's updates if it is discarded.
    biased = [router for router in routers if router._megatron_gbl.bias is not None]
    snapshots = dict(zip(biased, bias.snapshot([router.expert_bias for router in biased]))) \
        if biased else {}
    for router in routers:
        router._megatron_gbl.start_step(num_microbatches, snapshots.get(router))
    compat.reset_upstream_expert_load(routers)
    _note_devices(model, routers, phase)


def finish_step(model: Model) -> None:
    """End an optimizer step after its last backward: check it, log the LBL, apply the
    expert-bias updates.

    Megatron-Core's schedules call this themselves; custom loops call it on every rank, before
    the optimizer step, or use `step`. A collective over all ranks (pipeline stages without MoE
    layers included): the step's faults are agreed on (`_step_faults`), so a fault on one rank
    stops every rank with the same error instead of leaving its peers waiting in the next
    collective; with expert bias at global scope the step's counts ride in the same all-reduce
    where their balance group holds the same ranks. A step the optimizer then skips (fp16
    overflow) has its expert-bias updates undone (`undo_skipped_step`).
    """
    global _FINISHED
    _require_enabled("finish_step")
    routers = _routers_of(model)
    in_step = [router for router in routers if router._megatron_gbl.in_step]
    biased = [router for router in in_step if router._megatron_gbl.bias is not None]
    bias.apply_pending_updates([router.expert_bias for router in biased],
                               [router._megatron_gbl.bias for router in biased])
    sums = [(_step_faults(in_step), comm.world_group())]
    if biased and _PHASE.scope == "global":
        step_counts = bias.step_counts([router._megatron_gbl.bias for router in biased])
        balance_group, average_group = bias_groups(biased[0], _PHASE,
                                                   sync_group(biased[0], _PHASE))
        if step_counts is not None:
            sums.append((step_counts, balance_group))
    faults_F, *counts = comm.all_reduce_sums(sums, "the step's fault check")
    faults = faults_F.tolist()  # the step's one host sync
    if any(faults):
        error = _fault_error(faults, in_step)  # names what this rank saw, before it is dropped
        discard_step(model)
        raise error
    if counts:
        bias.apply_step_update([router.expert_bias for router in biased],
                               [router._megatron_gbl.bias for router in biased], counts[0],
                               average_group)
    if in_step and in_step[0]._megatron_gbl.balancing.quantile_ema is not None:
        quantile.step_update(in_step, _PHASE, sync_group(in_step[0], _PHASE))
    metrics.log_lbl(in_step)
    for router in in_step:
        router._megatron_gbl.close_step()
    _FINISHED = in_step


def undo_skipped_step() -> None:
    """The optimizer skipped the step finish_step ended (Megatron's grad scaler found inf or
    NaN in its gradients, compat.optimizer_skip_hook): put every expert bias (and quantile
    balancing's bias) back where it was before that step, as the optimizer leaves the weights.
    Its statistics stay logged, as upstream's losses of a skipped step are."""
    global _FINISHED
    for router in _FINISHED:
        if router._megatron_gbl.bias is not None:
            router._megatron_gbl.bias.restore_step_start(router.expert_bias)
        if router._megatron_gbl.qb is not None:
            quantile.undo_step(router)
    _FINISHED = []


def discard_step(model: Model) -> None:
    """End a step that failed or is skipped: nothing it counted reaches the next step, the
    step's metrics or the expert bias (updates it made per micro-batch are undone)."""
    _require_enabled("discard_step")
    for router in _routers_of(model):
        router._megatron_gbl.discard_step(getattr(router, "expert_bias", None))


@contextlib.contextmanager
def step(model: Model, num_microbatches: Optional[int] = None,
         iteration: Optional[int] = None):
    """`with megatron_gbl.step(model, num_microbatches):` around one optimizer step's forward
    and backward passes in a custom loop: start_step, then finish_step, or discard_step if the
    step raises."""
    start_step(model, num_microbatches, iteration)
    try:
        yield
    except BaseException:
        discard_step(model)
        raise
    finish_step(model)


def routers(model: Optional[Model] = None) -> list[TopKRouter]:
    """The TopKRouters of `model`, or every router the plugin has seen in training."""
    if model is not None:
        return _routers_of(model)
    return sorted(_ROUTERS, key=compat.layer_index)


def step_metrics(model: Optional[Model] = None) -> Optional[metrics.StepMetrics]:
    """Micro- and global-batch LBL, load violation, expert bias and Balance BSZ of the last
    training step.

    No gradient; for all layers at once, one collective over TP x CP, one over TP x DP x CP and,
    with more than one device group, one over the all-to-all's token group (metrics.py), so
    call it on every rank after the step (Megatron-LM's logging does, via megatron_gbl.launch).
    """
    return metrics.step_metrics(routers(model))


def balance_bsz(model: Model) -> dict[int, BalanceBSZ]:
    """Per layer number (MTP layers after the decoder's, as in Megatron's logs): the tokens and
    sequences f_i (or the expert load) was computed over at the last call."""
    sizes = {compat.layer_index(router): router._megatron_gbl.balance_bsz
             for router in _routers_of(model)}
    return {layer: size for layer, size in sizes.items() if size is not None}


# The faults finish_step agrees on: a count of ranks per fault, summed over all ranks.
_NON_FINITE, _NOT_ROUTED, _MISCOUNTED = range(3)


def _step_faults(in_step: list[TopKRouter]) -> torch.Tensor:
    """int64 [3]: whether this rank saw, in this step, router logits with NaN or inf (not a
    fault with fp16: Megatron's grad scaler skips such a step, and the plugin follows the
    optimizer, `undo_skipped_step`); a router that trained without a call of
    TopKRouter.routing; a router that ran, but not once per micro-batch."""
    logit_sums = [total for router in in_step for total in router._megatron_gbl.logit_sums]
    faults_F = torch.zeros(3, dtype=torch.int64, device=comm.collective_device())
    if logit_sums and not compat.grad_scaler_skips_non_finite(in_step[0].config):
        # One sum of every layer's logit sums: NaN or inf if any is.
        faults_F[_NON_FINITE] = torch.isfinite(torch.stack(logit_sums).sum()).logical_not()
    if any(_routing_bypassed(router) for router in in_step):
        faults_F[_NOT_ROUTED] = 1
    if any(router._megatron_gbl.miscounted() for router in in_step):
        faults_F[_MISCOUNTED] = 1
    return faults_F


def _fault_error(faults: list[int], in_step: list[TopKRouter]) -> Exception:
    """The error every rank raises for the agreed faults (counts of ranks), the same first
    sentence on every rank, then what this rank saw."""
    if faults[_NON_FINITE]:
        return FloatingPointError(
            f"megatron_gbl: router logits with NaN or inf at training iteration {_ITERATION} "
            f"(0-based; Megatron-LM logs it as iteration {_ITERATION + 1}) on "
            f"{faults[_NON_FINITE]} rank(s); on this rank in MoE layer(s) "
            f"{_non_finite_layers(in_step) or 'none'}. The router's input already held them: "
            "check this step's data and the learning rate, or set "
            "--check-for-nan-in-loss-and-grad; every rank stops, the step is discarded, the "
            "expert bias is not updated.")
    if faults[_NOT_ROUTED]:
        unrouted = ", ".join(f"MoE layer {compat.layer_index(router)} ({type(router).__name__})"
                             for router in in_step if _routing_bypassed(router))
        return RuntimeError(
            f"megatron_gbl: on {faults[_NOT_ROUTED]} rank(s) an MoE layer trained without a "
            f"call of TopKRouter.routing (on this rank: {unrouted or 'none'}): a "
            "TopKRouter subclass that overrides routing without calling it gets no "
            "load-balancing loss at all, since the plugin computes the scoped one there and "
            "switches upstream's off for every TopKRouter. Call super().routing(...) in the "
            "override, or call megatron_gbl.disable()")
    miscounted = ", ".join(
        f"MoE layer {compat.layer_index(router)} ran {router._megatron_gbl.calls}"
        for router in in_step if router._megatron_gbl.miscounted())
    expected = next((router._megatron_gbl.expected_microbatches for router in in_step), None)
    return RuntimeError(
        f"megatron_gbl: on {faults[_MISCOUNTED]} rank(s) a router's training calls differ from "
        f"the step's {expected} micro-batch(es) (num_microbatches given to the schedule or to "
        f"megatron_gbl.step / start_step; on this rank: {miscounted or 'none'}), so "
        "micro-batches were counted twice or not at all. Pass the number of micro-batches the "
        "step runs; non-reentrant activation checkpointing re-runs the router with gradients "
        "on: use Megatron's recompute (--recompute-granularity / --recompute-modules), which "
        "replays it once")


def _routing_bypassed(router: TopKRouter) -> bool:
    """Whether `router` overrides TopKRouter.routing and its override never called it this step
    (a layer that did not run at all in a step is no fault)."""
    return router._megatron_gbl.calls == 0 and type(router).routing is not TopKRouter.routing


def _non_finite_layers(routers: list[TopKRouter]) -> list[int]:
    return [compat.layer_index(router) for router in routers
            if not router._megatron_gbl.logits_finite()]


def _note_devices(model: Model, routers: list[TopKRouter], settings: Settings) -> None:
    """Give each router its device groups D and (once) its layer's all-to-all token group, for
    the device-level LBL and micro_batch_device_load_violation."""
    if any(router._megatron_gbl.token_group is None for router in routers):
        chunks = [model] if isinstance(model, torch.nn.Module) else list(model)
        layers = {id(module.router): module for chunk in chunks for module in chunk.modules()
                  if isinstance(getattr(module, "router", None), TopKRouter)}
        for router in routers:
            router._megatron_gbl.token_group = compat.token_group(layers.get(id(router)))
    for router in routers:
        router._megatron_gbl.device_groups = device_groups(router.config, settings)


def _require_enabled(name: str) -> None:
    if _SETTINGS is None:
        raise RuntimeError(f"megatron_gbl.{name}: call megatron_gbl.enable(scope) first")


def _routers_of(model: Model) -> list[TopKRouter]:
    """The TopKRouters of this rank's model chunks; none is fine on a pipeline stage of an MoE
    model (dense first layers, uneven stages, hybrid stacks), an error for a whole model."""
    chunks = [model] if isinstance(model, torch.nn.Module) else list(model)
    routers = []
    for chunk in chunks:
        if chunk not in _CHUNK_ROUTERS:  # a module walk once per chunk, not per step
            _CHUNK_ROUTERS[chunk] = [m for m in chunk.modules() if isinstance(m, TopKRouter)]
        routers += _CHUNK_ROUTERS[chunk]
    if not routers and not _stage_of_moe_model(chunks):
        raise ValueError(
            "megatron_gbl is enabled but the model has no MoE layer (no TopKRouter): set "
            "num_moe_experts in the TransformerConfig, or call megatron_gbl.disable()"
        )
    _check_distinct_layers(routers)
    for router in routers:
        router_state(router)
    _check_same_balancing(routers)
    return routers


def _stage_of_moe_model(chunks: list) -> bool:
    """Whether `chunks` are one pipeline stage of a model that has MoE layers: the config, which
    every stage shares, has experts and splits the model over pipeline stages. Without
    pipelining the chunks are the whole model, so having no router is conclusive there."""
    configs = [getattr(chunk, "config", None) for chunk in chunks]
    return any(config is not None and compat.pipeline_size(config) > 1
               and getattr(config, "num_moe_experts", None) for config in configs)


def _check_distinct_layers(routers: list[TopKRouter]) -> None:
    """Refuse a model whose MoE layers share a layer number: their logs, Balance BSZ and
    histograms are kept per layer number and would mix."""
    by_layer: dict[int, TopKRouter] = {}
    for router in routers:
        layer = compat.layer_index(router)
        if by_layer.setdefault(layer, router) is not router:
            raise ValueError(
                f"megatron_gbl: two MoE layers of this model both have layer number {layer}, so "
                "their load-balancing statistics and logs would mix. Megatron-Core numbers the "
                "MoE layers of multi-token-prediction layers from 1 again without marking them "
                "as MTP layers in 0.12-0.15 and in a HybridModel: for MoE in MTP layers "
                "(--mtp-num-layers) use a GPTModel on Megatron-Core >= 0.16, or leave 'E' out of "
                "the MTP part of --hybrid-layer-pattern (after '/'), or drop --moe-lbl-scope"
            )


def _check_same_balancing(routers: list[TopKRouter]) -> None:
    """Refuse a model whose MoE layers balance in different ways: a step's statistics are
    reduced for all layers at once (metrics.step_metrics), with one shape and one set of names."""
    kinds = {}
    for router in routers:
        state = router._megatron_gbl
        kind = (state.balancing.lbl_type is not None, state.bias is not None,
                router.config.num_moe_experts)
        kinds.setdefault(kind, compat.layer_index(router))
    if len(kinds) > 1:
        described = "; ".join(
            f"MoE layer {layer}: {'an' if lbl else 'no'} LBL, {'' if bias else 'no '}expert-bias "
            f"update, {experts} experts" for (lbl, bias, experts), layer in kinds.items())
        raise ValueError(
            f"megatron_gbl: the MoE layers of this model balance in different ways ({described}); "
            "the plugin reduces every layer's statistics together, so give every MoE layer the "
            "same moe_router_load_balancing_type / moe_aux_loss_coeff, "
            "moe_router_enable_expert_bias / moe_router_bias_update_rate and num_moe_experts, "
            "or call megatron_gbl.disable()"
        )


def router_state(router: TopKRouter) -> RouterState:
    state = getattr(router, _STATE_ATTR, None)
    if state is None:
        state = RouterState(router_balancing(router.config, _SETTINGS),
                            calls_per_microbatch=compat.calls_per_microbatch(router))
        setattr(router, _STATE_ATTR, state)
        _ROUTERS.add(router)
    return state


def build_sync_block_group(sync_group_size: int, routers: Sequence[TopKRouter] = ()) -> None:
    """Build this rank's balance block of `sync_group_size` once, cut from the TP x DP x CP
    group of `routers` (Megatron's parallel_state group without one) with that group's timeout
    and NCCL options. A collective over the whole world: every rank calls it."""
    if sync_group_size in _SYNC_BLOCK_GROUPS:
        return
    if routers:
        tp_dp_cp, tp_cp = compat.tp_dp_cp_group(routers[0]), compat.tp_cp_group(routers[0])
    else:
        tp_dp_cp, tp_cp = compat.default_tp_dp_cp_group(), compat.default_tp_cp_group()
    check_sync_group_size(sync_group_size,
                          dist.get_world_size(tp_dp_cp) // dist.get_world_size(tp_cp))
    _SYNC_BLOCK_GROUPS[sync_group_size] = (
        [tp_dp_cp], comm.build_sync_block_group(tp_dp_cp, tp_cp, sync_group_size))


def sync_group(router: TopKRouter, settings: Settings):
    if not settings.uses_dp_sync:
        return None
    tp_dp_cp = compat.tp_dp_cp_group(router)
    if settings.sync_group_size is None:
        return tp_dp_cp
    if settings.sync_group_size not in _SYNC_BLOCK_GROUPS:
        raise RuntimeError(
            f"megatron_gbl: sync_group_size={settings.sync_group_size} needs its balance-block "
            "groups: call megatron_gbl.enable(...) after initialize_model_parallel, or "
            "megatron_gbl.start_step(model) on every rank before the first step"
        )
    sources, block_group = _SYNC_BLOCK_GROUPS[settings.sync_group_size]
    if not any(tp_dp_cp is source for source in sources):  # the first call with this group
        if dist.get_process_group_ranks(tp_dp_cp) != dist.get_process_group_ranks(sources[0]):
            raise RuntimeError(
                f"megatron_gbl: the balance blocks of sync_group_size={settings.sync_group_size} "
                f"were cut from another TP x DP x CP group than MoE layer {compat.layer_index(router)}'s "
                "(a model built with its own process groups): call megatron_gbl.disable(), then "
                "megatron_gbl.enable(..., model=model) on every rank to cut them from the "
                "model's groups"
            )
        sources.append(tp_dp_cp)  # the same ranks: the blocks fit it
    return block_group
