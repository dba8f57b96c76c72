"""Opt-in, idempotent, reversible patching of Megatron-Core's TopKRouter and schedules.

Patched, each with its original kept in `_ORIGINALS`:
- `TopKRouter.routing`: upstream routing, then the scoped LBL attached to the returned probs
  and the expert load counted for the expert-bias update;
- the TopKRouter method that computes upstream's own LBL (see compat.upstream_lbl_switch) and
  finalize_model_grads' expert-bias update: switched off so nothing is counted twice;
- 0.19+: `TopKRouter.quantile_balancing` (quantile.route: the histograms of the scope) and
  finalize_model_grads' quantile-balancing update, switched off (the plugin's runs at the
  step's end);
- 0.12-0.13 only: `TopKRouter._load_from_state_dict`, so a loaded expert bias stays fp32;
- the three `forward_backward_*` schedules: start a step (reset the buffers) before running,
  finish it (apply the expert-bias updates) after. `get_forward_backward_func()` looks them up
  at call time, so it returns the wrapped ones;
- `MixedPrecisionOptimizer.prepare_grads`: when the grad scaler skips a step, its expert-bias
  updates are undone.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from typing import Optional

import torch
from megatron.core.pipeline_parallel import schedules
from megatron.core.transformer.moe.router import TopKRouter

from megatron_gbl import compat, quantile, steps
from megatron_gbl.config import Settings, router_balancing
from megatron_gbl.lbl import apply_scoped_lbl, record_expert_load

logger = logging.getLogger("megatron_gbl")

_ORIGINALS: dict[tuple[object, str], tuple[object, bool]] = {}  # -> (original, owned by owner)

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
           device_coeff: float = 0.0, device_groups: Optional[int] = None,
           model: Optional[steps.Model] = None):
    """Make every Megatron-Core TopKRouter balance at `scope` (see `Settings`).

    Works before or after the model is built, with the model's own moe_aux_loss_coeff and, for
    auxiliary-loss-free balancing, its moe_router_bias_update_rate. Passing `model` checks it
    now (MoE layers present, balancing configured) instead of at the first training step. With
    `sync_group_size`, call it on every rank after `initialize_model_parallel` (building the
    balance blocks is a collective; they are cut from the TP x DP x CP group of `model`'s
    routers, or of Megatron's parallel_state, with its timeout, and destroyed by `disable`). `micro_coeff` adds that weight of micro-batch LBL beside a
    dp/global one (paper Tab. 5); `switch_scope` takes over from iteration `switch_iteration`
    (Tab. 3). `device_coeff` adds that weight of device-level LBL at any scope (DeepSeek-V2's,
    over `device_groups` groups of consecutive experts, default one per expert-parallel rank;
    counts of one all-to-all: the micro-batch over TP x EP). The count all-reduces overlap the
    forward pass unless `blocking_sync`. Calling it again replaces the settings; the patches are
    installed once.
    """
    settings = Settings(scope, sync_group_size, micro_coeff, blocking_sync, switch_scope,
                        switch_iteration, shuffle_seed, device_coeff=device_coeff,
                        device_groups=device_groups)
    was_enabled = is_enabled()
    try:
        routers = steps.routers(model) if model is not None else []
        for router in routers:
            router_balancing(router.config, settings)
        if settings.sync_group_size is not None and compat.model_parallel_ready():
            steps.build_sync_block_group(settings.sync_group_size, routers)
    except Exception:
        if not was_enabled:
            disable()  # a rejected enable leaves upstream untouched
        raise
    steps.activate(settings)
    _install()
    logger.info("megatron_gbl: load-balancing scope=%s sync_group_size=%s micro_coeff=%s "
                "switch=%s@%s device_coeff=%s device_groups=%s", settings.scope,
                settings.sync_group_size, settings.micro_coeff, settings.switch_scope,
                settings.switch_iteration, settings.device_coeff, settings.device_groups)


def disable() -> None:
    """Restore every patched Megatron-Core symbol and drop all plugin state: upstream exactly.

    The Megatron-LM integration's hooks (flags, validation, logging) stay: they do nothing
    while the plugin is off, and a later enable() logs again (megatron_lm.uninstall removes
    them)."""
    restore(_ORIGINALS)
    steps.deactivate()


@contextlib.contextmanager
def enabled(scope: str, **kwargs):
    """`with megatron_gbl.enabled("global"): ...` enables, then disables however it exits."""
    enable(scope, **kwargs)
    try:
        yield
    finally:
        disable()


def is_enabled() -> bool:
    return steps.settings() is not None


def _routing(original, self, logits, *args, **kwargs):
    phase = steps.phase()
    # Same guard as upstream: nothing is counted in eval or in the no-grad first pass of
    # recompute. That pass still takes the last micro-batch's bias update, to route as its
    # replay will.
    if phase is None or not self.training:
        return original(self, logits, *args, **kwargs)
    state = steps.router_state(self)
    counting = torch.is_grad_enabled()
    if counting:
        if not state.in_step:
            raise RuntimeError(_NO_STEP_BOUNDARY.format(layer=compat.layer_index(self)))
        state.count_call()
        state.note_logits(logits)
        if state.balancing.quantile_ema is not None:
            quantile.note_call(self, state, phase, steps.sync_group(self, phase), logits,
                               compat.padding_mask_from_call(args, kwargs))
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
    sync_group = steps.sync_group(self, phase)
    bsz = logits.shape[1]
    if state.balancing.lbl_type is not None:
        probs = apply_scoped_lbl(self, state, phase, sync_group, logits_TE, bsz, probs,
                                 padding_mask)
    if state.bias is not None:
        record_expert_load(self, state, phase, sync_group, routing_map, padding_mask, bsz,
                           frozen=compat.expert_bias_frozen(self))
    return probs, routing_map


def _quantile_balancing(original, self, logits):
    phase = steps.phase()
    if phase is None or not self.training:  # eval: upstream's own, with the step's bias
        return original(self, logits)
    return quantile.route(original, self, logits, phase.scope, steps.router_state(self))


def _schedule(original, *args, **kwargs):
    if steps.settings() is None or kwargs.get("forward_only", False):
        return original(*args, **kwargs)
    with steps.step(kwargs["model"], kwargs.get("num_microbatches")):
        return original(*args, **kwargs)


def _install() -> None:
    switch_name, switch = compat.upstream_lbl_switch()
    replace(TopKRouter, "routing", lambda original: functools.wraps(original)(
        lambda self, logits, *a, **k: _routing(original, self, logits, *a, **k)))
    replace(TopKRouter, switch_name, lambda original: switch)
    owner, name, bias_switch = compat.upstream_bias_update_switch()
    replace(owner, name, lambda original: bias_switch)
    if compat.has_quantile_balancing():
        replace(TopKRouter, "quantile_balancing", lambda original: functools.wraps(original)(
            lambda self, logits: _quantile_balancing(original, self, logits)))
        owner, name, qb_switch = compat.upstream_qb_update_switch()
        replace(owner, name, lambda original: qb_switch)
    fp32_on_load = compat.fp32_bias_on_load()
    if fp32_on_load is not None:
        replace(TopKRouter, *fp32_on_load)
    for name in compat.SCHEDULE_FUNCTIONS:
        replace(schedules, name, lambda original: functools.wraps(original)(
            lambda *a, **k: _schedule(original, *a, **k)))
    owner, name = compat.optimizer_skip_hook()
    replace(owner, name, lambda original: functools.wraps(original)(
        lambda self, *a, **k: _prepare_grads(original, self, *a, **k)))


def _prepare_grads(original, optimizer, *args, **kwargs):
    found_inf = original(optimizer, *args, **kwargs)
    if found_inf and steps.settings() is not None:
        steps.undo_skipped_step()  # the optimizer skips the step: so does the expert bias
    return found_inf


def replace(owner, name: str, make_replacement, originals: Optional[dict] = None) -> None:
    """Set owner.name = make_replacement(original) once, keeping the original in `originals`
    (default: the plugin's own, which disable() puts back; see `restore`)."""
    originals = _ORIGINALS if originals is None else originals
    if (owner, name) in originals:
        return
    original = getattr(owner, name)
    replacement = make_replacement(original)
    replacement.__wrapped__ = original
    owned = name in getattr(owner, "__dict__", {})
    originals[(owner, name)] = (original, owned)
    setattr(owner, name, replacement)


def restore(originals: dict) -> None:
    """Put back every original `replace` kept in `originals`, newest first."""
    for (owner, name), (original, owned) in reversed(originals.items()):
        if owned:
            setattr(owner, name, original)
        else:
            delattr(owner, name)  # it was inherited: inherit it again
    originals.clear()
