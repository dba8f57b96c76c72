"""Opt-in, idempotent, reversible patching of Megatron-Core's TopKRouter and schedules.

Patched, each with its original kept in `_ORIGINALS`:
- `TopKRouter.routing`: upstream routing, then the scoped LBL attached to the returned probs
  and the expert load counted for the expert-bias update;
- the TopKRouter method that computes upstream's own LBL (see compat.upstream_lbl_switch) and
  finalize_model_grads' expert-bias update: switched off so nothing is counted twice;
- 0.12-0.13 only: `TopKRouter._load_from_state_dict`, so a loaded expert bias stays fp32;
- the three `forward_backward_*` schedules: start a step (reset the buffers) before running,
  finish it (apply the expert-bias updates) after. `get_forward_backward_func()` looks them up
  at call time, so it returns the wrapped ones.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import weakref
from typing import Callable, Iterable, Optional, Union

import torch
from megatron.core.pipeline_parallel import schedules
from megatron.core.transformer.moe.router import TopKRouter

from megatron_gbl import bias, comm, compat, metrics
from megatron_gbl.config import Settings, check_sync_group_size, router_balancing
from megatron_gbl.lbl import (
    BalanceBSZ, RouterState, apply_scoped_lbl, bias_groups, record_expert_load,
)

logger = logging.getLogger("megatron_gbl")

_STATE_ATTR = "_megatron_gbl"
_ORIGINALS: dict[tuple[object, str], tuple[object, bool]] = {}  # -> (original, owned by owner)
_SETTINGS: Optional[Settings] = None  # as enabled, with the scope switch
_PHASE: Optional[Settings] = None  # in force for the current step
_ITERATION = 0  # of the current step, 0-based
_NEXT_ITERATION = 0
_ITERATION_SOURCE: Optional[Callable[[], Optional[int]]] = None  # the trainer's own counter
_ROUTERS: "weakref.WeakSet[TopKRouter]" = weakref.WeakSet()
_SYNC_BLOCK_GROUPS: dict[int, object] = {}  # sync_group_size -> this rank's block group

Model = Union[torch.nn.Module, Iterable[torch.nn.Module]]

_NO_STEP_BOUNDARY = (
    "megatron_gbl: a training forward of MoE layer {layer} ran outside an optimizer step: the "
    "plugin buffers counts, checks logits, logs and updates the expert bias per step. Train "
    "through megatron.core.pipeline_parallel.get_forward_backward_func() (steps are marked "
    "automatically), or wrap each step of a custom loop in `with megatron_gbl.step(model):` "
    "(or call megatron_gbl.start_step(model) before and megatron_gbl.finish_step(model) after it)"
)


def enable(scope: str, *, sync_group_size: Optional[int] = None, micro_coeff: float = 0.0,
           blocking_sync: bool = False, switch_scope: Optional[str] = None,
           switch_iteration: Optional[int] = None, shuffle_seed: int = 0,
           model: Optional[Model] = None):
    """Make every Megatron-Core TopKRouter balance at `scope` (see `Settings`).

    Works before or after the model is built, with the model's own moe_aux_loss_coeff and, for
    auxiliary-loss-free balancing, its moe_router_bias_update_rate. Passing `model` checks it
    now (MoE layers present, balancing configured) instead of at the first training step. With
    `sync_group_size`, call it on every rank after `initialize_model_parallel` (building the
    balance blocks is a collective). `micro_coeff` adds that weight of micro-batch LBL beside a
    dp/global one (paper Tab. 5); `switch_scope` takes over from iteration `switch_iteration`
    (Tab. 3). The count all-reduce overlaps the forward pass unless `blocking_sync`. Calling it
    again replaces the settings; the patches are installed once.
    """
    global _SETTINGS, _PHASE
    settings = Settings(scope, sync_group_size, micro_coeff, blocking_sync, switch_scope,
                        switch_iteration, shuffle_seed)
    was_enabled = is_enabled()
    try:
        if settings.sync_group_size is not None and compat.model_parallel_ready():
            _sync_block_group(settings.sync_group_size, build=True)
        if model is not None:
            for router in _routers_of(model):
                router_balancing(router.config, settings)
    except Exception:
        if not was_enabled:
            disable()  # a rejected enable leaves upstream untouched
        raise
    _SETTINGS = settings
    _PHASE = settings.at(_NEXT_ITERATION)
    _install()
    logger.info("megatron_gbl: load-balancing scope=%s sync_group_size=%s micro_coeff=%s "
                "switch=%s@%s", settings.scope, settings.sync_group_size, settings.micro_coeff,
                settings.switch_scope, settings.switch_iteration)


def disable() -> None:
    """Restore every patched Megatron symbol and drop all plugin state: upstream exactly."""
    global _SETTINGS, _PHASE, _ITERATION, _NEXT_ITERATION, _ITERATION_SOURCE
    for (owner, name), (original, owned) in _ORIGINALS.items():
        if owned:
            setattr(owner, name, original)
        else:
            delattr(owner, name)  # it was inherited: inherit it again
    _ORIGINALS.clear()
    for router in list(_ROUTERS):
        delattr(router, _STATE_ATTR)
    _ROUTERS.clear()
    _SYNC_BLOCK_GROUPS.clear()
    _SETTINGS = _PHASE = _ITERATION_SOURCE = None
    _ITERATION = _NEXT_ITERATION = 0


@contextlib.contextmanager
def enabled(scope: str, **kwargs):
    """`with megatron_gbl.enabled("global"): ...` enables, then disables however it exits."""
    enable(scope, **kwargs)
    try:
        yield
    finally:
        disable()


def is_enabled() -> bool:
    return _SETTINGS is not None


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
    if _SETTINGS.sync_group_size is not None:
        _sync_block_group(_SETTINGS.sync_group_size, build=True)
    routers = _routers_of(model)
    if any(router._megatron_gbl.in_step and router._megatron_gbl.bias is not None
           and router._megatron_gbl.bias.recorded for router in routers):
        raise RuntimeError(
            "megatron_gbl: the previous step counted expert load for the expert-bias update but "
            "was never finished: call megatron_gbl.finish_step(model) after a step's last "
            "backward (or discard_step(model) after a failed one), or use `with "
            "megatron_gbl.step(model):`"
        )
    for router in routers:
        router._megatron_gbl.start_step(num_microbatches)
        compat.reset_upstream_expert_load(router)


def finish_step(model: Model) -> None:
    """End an optimizer step after its last backward: log the LBL, apply the expert-bias updates.

    Megatron-Core's schedules call this themselves; custom loops call it on every rank (a
    collective with expert bias at global scope), before the optimizer step, or use `step`.
    """
    _require_enabled("finish_step")
    in_step = [router for router in _routers_of(model) if router._megatron_gbl.in_step]
    try:
        _check_logits_finite(in_step)
    except FloatingPointError:
        discard_step(model)
        raise
    metrics.log_lbl(in_step)
    routers = [router for router in in_step if router._megatron_gbl.bias is not None]
    for router in routers:
        router._megatron_gbl.bias.apply_pending(router.expert_bias)
    if routers and _PHASE.scope == "global":
        bias.step_update([router.expert_bias for router in routers],
                         [router._megatron_gbl.bias for router in routers],
                         *bias_groups(routers[0], _PHASE, _sync_group(routers[0], _PHASE)))
    for router in in_step:
        router._megatron_gbl.close_step()


def discard_step(model: Model) -> None:
    """End a step that failed: nothing it counted reaches the next step or the expert bias."""
    _require_enabled("discard_step")
    for router in _routers_of(model):
        router._megatron_gbl.close_step()


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
    return sorted(_ROUTERS, key=lambda router: router.layer_number)


def step_metrics(model: Optional[Model] = None) -> Optional[metrics.StepMetrics]:
    """Micro- and global-batch LBL, load violation, expert bias and Balance BSZ of the last
    training step.

    No gradient; one collective over TP x CP and one over TP x DP x CP for all layers, so call
    it on every rank after the step (Megatron-LM's logging does, via megatron_gbl.launch).
    """
    return metrics.step_metrics(routers(model))


def balance_bsz(model: Model) -> dict[int, BalanceBSZ]:
    """Per layer number: the tokens and sequences f_i (or the expert load) was computed over at
    the last call."""
    sizes = {router.layer_number: router._megatron_gbl.balance_bsz
             for router in _routers_of(model)}
    return {layer: size for layer, size in sizes.items() if size is not None}


def _check_logits_finite(routers: list[TopKRouter]) -> None:
    logit_sums = [total for router in routers for total in router._megatron_gbl.logit_sums]
    # One sum of every layer's logit sums: NaN or inf if any is (the step's one host sync).
    if not logit_sums or bool(torch.isfinite(torch.stack(logit_sums).sum())):
        return
    # Only after a failure: which layers (none if finite sums merely overflowed the total).
    layers = [router.layer_number for router in routers
              if not router._megatron_gbl.logits_finite()]
    if layers:
        raise FloatingPointError(
            f"megatron_gbl: router logits with NaN or inf in MoE layer(s) {layers} at training "
            f"iteration {_ITERATION} (0-based; Megatron-LM logs it as iteration "
            f"{_ITERATION + 1}). The router's input already held them: check this step's data, "
            "the learning rate and the loss scale (fp16), or set --check-for-nan-in-loss-and-grad; "
            "the step is discarded, the expert bias is not updated."
        )


def _require_enabled(name: str) -> None:
    if _SETTINGS is None:
        raise RuntimeError(f"megatron_gbl.{name}: call megatron_gbl.enable(scope) first")


def _routers_of(model: Model) -> list[TopKRouter]:
    chunks = [model] if isinstance(model, torch.nn.Module) else list(model)
    routers = [m for chunk in chunks for m in chunk.modules() if isinstance(m, TopKRouter)]
    if not routers:
        raise ValueError(
            "megatron_gbl is enabled but the model has no MoE layer (no TopKRouter): set "
            "num_moe_experts in the TransformerConfig, or call megatron_gbl.disable()"
        )
    for router in routers:
        _state(router)
    return routers


def _state(router: TopKRouter) -> RouterState:
    state = getattr(router, _STATE_ATTR, None)
    if state is None:
        state = RouterState(router_balancing(router.config, _SETTINGS))
        setattr(router, _STATE_ATTR, state)
        _ROUTERS.add(router)
    return state


def _sync_block_group(sync_group_size: int, build: bool = False):
    if sync_group_size not in _SYNC_BLOCK_GROUPS:
        if not build:
            raise RuntimeError(
                f"megatron_gbl: sync_group_size={sync_group_size} needs its balance-block groups: "
                "call megatron_gbl.enable(...) after initialize_model_parallel, or "
                "megatron_gbl.start_step(model) on every rank before the first step"
            )
        dp_rank, dp_size = compat.data_parallel_rank_and_size()
        check_sync_group_size(sync_group_size, dp_size)
        tp_dp_cp = compat.default_tp_dp_cp_group()
        _SYNC_BLOCK_GROUPS[sync_group_size] = comm.build_sync_block_group(
            tp_dp_cp, dp_rank, sync_group_size
        )
    return _SYNC_BLOCK_GROUPS[sync_group_size]


def _sync_group(router: TopKRouter, settings: Settings):
    if not settings.uses_dp_sync:
        return None
    if settings.sync_group_size is None:
        return compat.tp_dp_cp_group(router)
    return _sync_block_group(settings.sync_group_size)


def _routing(original, self, logits, *args, **kwargs):
    phase = _PHASE
    # Same guard as upstream: nothing is counted in eval or in the no-grad first pass of
    # recompute. That pass still takes the last micro-batch's bias update, to route as its
    # replay will.
    if phase is None or not self.training:
        return original(self, logits, *args, **kwargs)
    state = _state(self)
    counting = torch.is_grad_enabled()
    if counting:
        if not state.in_step:
            raise RuntimeError(_NO_STEP_BOUNDARY.format(layer=self.layer_number))
        state.count_call()
        state.note_logits(logits)
    if state.bias is not None:
        state.bias.apply_pending(self.expert_bias)
    if not counting:
        return original(self, logits, *args, **kwargs)
    # Upstream views the logits as [T, E] itself. Handing it a view of the LBL's own [T, E]
    # view makes both gradients meet on one tensor, where autograd adds them in place; two
    # sibling views of the logits would cost an out-of-place [T, E] add per call.
    logits_TE = logits.view(-1, logits.shape[-1])
    probs, routing_map = original(self, logits_TE.view(logits.shape), *args, **kwargs)
    padding_mask = compat.padding_mask_from_call(args, kwargs)
    sync_group = _sync_group(self, phase)
    bsz = logits.shape[1]
    if state.balancing.lbl_type is not None:
        probs = apply_scoped_lbl(self, state, phase, sync_group, logits_TE, bsz, probs,
                                 padding_mask)
    if state.bias is not None and not compat.expert_bias_frozen(self):
        record_expert_load(self, state, phase, sync_group, routing_map, padding_mask, bsz)
    return probs, routing_map


def _schedule(original, *args, **kwargs):
    if _SETTINGS is None or kwargs.get("forward_only", False):
        return original(*args, **kwargs)
    with step(kwargs["model"], kwargs.get("num_microbatches")):
        return original(*args, **kwargs)


def _install() -> None:
    switch_name, switch = compat.upstream_lbl_switch()
    replace(TopKRouter, "routing", lambda original: functools.wraps(original)(
        lambda self, logits, *a, **k: _routing(original, self, logits, *a, **k)))
    replace(TopKRouter, switch_name, lambda original: switch)
    owner, name, bias_switch = compat.upstream_bias_update_switch()
    replace(owner, name, lambda original: bias_switch)
    fp32_on_load = compat.fp32_bias_on_load()
    if fp32_on_load is not None:
        replace(TopKRouter, *fp32_on_load)
    for name in compat.SCHEDULE_FUNCTIONS:
        replace(schedules, name, lambda original: functools.wraps(original)(
            lambda *a, **k: _schedule(original, *a, **k)))


def replace(owner, name: str, make_replacement) -> None:
    """Set owner.name = make_replacement(original) once; disable() puts the original back."""
    if (owner, name) in _ORIGINALS:
        return
    original = getattr(owner, name)
    replacement = make_replacement(original)
    replacement.__wrapped__ = original
    owned = name in getattr(owner, "__dict__", {})
    _ORIGINALS[(owner, name)] = (original, owned)
    setattr(owner, name, replacement)
