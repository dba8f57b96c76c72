"""Opt-in, idempotent, reversible patching of Megatron-Core's TopKRouter and schedules.

Patched, each with its original kept in `_ORIGINALS`:
- `TopKRouter.routing`: upstream routing, then the scoped LBL attached to the returned probs;
- the TopKRouter method that computes upstream's own LBL (see compat.upstream_lbl_switch):
  switched off so the loss is never counted twice;
- the three `forward_backward_*` schedules: start a step (reset the buffers) before running.
  `get_forward_backward_func()` looks them up at call time, so it returns the wrapped ones.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import weakref
from typing import Iterable, Optional, Union

import torch
from megatron.core.pipeline_parallel import schedules
from megatron.core.transformer.moe.router import TopKRouter

from megatron_gbl import comm, compat, metrics
from megatron_gbl.config import Settings, check_sync_group_size, router_lbl
from megatron_gbl.lbl import BalanceBSZ, RouterState, apply_scoped_lbl

logger = logging.getLogger("megatron_gbl")

_STATE_ATTR = "_megatron_gbl"
_ORIGINALS: dict[tuple[object, str], object] = {}
_SETTINGS: Optional[Settings] = None
_ROUTERS: "weakref.WeakSet[TopKRouter]" = weakref.WeakSet()
_SYNC_BLOCK_GROUPS: dict[int, object] = {}  # sync_group_size -> this rank's block group

Model = Union[torch.nn.Module, Iterable[torch.nn.Module]]


def enable(scope: str, *, sync_group_size: Optional[int] = None, micro_coeff: float = 0.0,
           blocking_sync: bool = False, model: Optional[Model] = None):
    """Make every Megatron-Core TopKRouter compute its load-balancing loss at `scope`.

    Works before or after the model is built, with the model's own moe_aux_loss_coeff.
    Passing `model` checks it now (MoE layers present, LBL configured) instead of at the
    first training step. With `sync_group_size`, call it on every rank after
    `initialize_model_parallel` (building the balance blocks is a collective).
    `micro_coeff` adds that weight of micro-batch LBL beside a dp/global one (paper Tab. 5).
    The count all-reduce overlaps the forward pass unless `blocking_sync` (see Settings).
    Calling it again replaces the settings; the patches are installed once.
    """
    global _SETTINGS
    settings = Settings(scope, sync_group_size, micro_coeff, blocking_sync)
    was_enabled = is_enabled()
    try:
        if settings.sync_group_size is not None and compat.model_parallel_ready():
            _sync_block_group(settings.sync_group_size, build=True)
        if model is not None:
            _routers_of(model)
    except Exception:
        if not was_enabled:
            disable()  # a rejected enable leaves upstream untouched
        raise
    _SETTINGS = settings
    _install()
    logger.info("megatron_gbl: load-balancing loss scope=%s sync_group_size=%s micro_coeff=%s",
                settings.scope, settings.sync_group_size, settings.micro_coeff)


def disable() -> None:
    """Restore every patched Megatron symbol and drop all plugin state: upstream exactly."""
    global _SETTINGS
    for (owner, name), original in _ORIGINALS.items():
        setattr(owner, name, original)
    _ORIGINALS.clear()
    for router in list(_ROUTERS):
        delattr(router, _STATE_ATTR)
    _ROUTERS.clear()
    _SYNC_BLOCK_GROUPS.clear()
    _SETTINGS = None


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


def start_step(model: Model, num_microbatches: Optional[int] = None) -> None:
    """Begin an optimizer step: empty every router's buffer (paper Alg. 1 line 8).

    Megatron-Core's schedules call this themselves once the plugin is enabled; custom training
    loops call it before each step's first micro-batch, on every rank. `num_microbatches`
    lets the buffer reject a micro-batch that would be counted twice.
    """
    if _SETTINGS is None:
        raise RuntimeError("megatron_gbl.start_step: call megatron_gbl.enable(scope) first")
    if _SETTINGS.sync_group_size is not None:
        _sync_block_group(_SETTINGS.sync_group_size, build=True)
    for router in _routers_of(model):
        router._megatron_gbl.start_step(num_microbatches)


def routers(model: Optional[Model] = None) -> list[TopKRouter]:
    """The TopKRouters of `model`, or every router the plugin has seen in training."""
    if model is not None:
        return _routers_of(model)
    return sorted(_ROUTERS, key=lambda router: router.layer_number)


def step_metrics(model: Optional[Model] = None) -> Optional[metrics.StepMetrics]:
    """Micro- and global-batch LBL, load violation and Balance BSZ of the last training step.

    No gradient; one collective over TP x CP and one over TP x DP x CP for all layers, so call
    it on every rank after the step (Megatron-LM's logging does, via megatron_gbl.launch).
    """
    return metrics.step_metrics(routers(model))


def balance_bsz(model: Model) -> dict[int, BalanceBSZ]:
    """Per layer number: the tokens and sequences f_i was computed over at the last call."""
    return {
        router.layer_number: router._megatron_gbl.balance_bsz
        for router in _routers_of(model)
        if router._megatron_gbl.balance_bsz is not None
    }


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
        lbl_type, coeff = router_lbl(router.config)
        state = RouterState(lbl_type, coeff)
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
    probs, routing_map = original(self, logits, *args, **kwargs)
    # Same guard as upstream: no LBL in eval or in the no-grad first pass of recompute.
    if _SETTINGS is not None and self.training and torch.is_grad_enabled():
        probs = apply_scoped_lbl(
            self, _state(self), _SETTINGS, _sync_group(self, _SETTINGS), logits, probs,
            compat.padding_mask_from_call(args, kwargs),
        )
    return probs, routing_map


def _schedule(original, *args, **kwargs):
    if _SETTINGS is not None and not kwargs.get("forward_only", False):
        start_step(kwargs["model"], kwargs.get("num_microbatches"))
    return original(*args, **kwargs)


def _install() -> None:
    switch_name, switch = compat.upstream_lbl_switch()
    replace(TopKRouter, "routing", lambda original: functools.wraps(original)(
        lambda self, logits, *a, **k: _routing(original, self, logits, *a, **k)))
    replace(TopKRouter, switch_name, lambda original: switch)
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
    _ORIGINALS[(owner, name)] = original
    setattr(owner, name, replacement)
