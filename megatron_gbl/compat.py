"""The only module that knows how Megatron-Core versions differ (0.12.x to 0.19.x).

Everything is decided by feature detection, never by version strings:

- upstream's LBL is switched off through `TopKRouter.apply_load_balancing_loss` (0.12-0.13) or
  `TopKRouter.is_aux_loss_enabled` (0.14+);
- aux scores: `router.compute_routing_scores_for_aux_loss(logits)` (0.12-0.13), then
  `moe_utils.compute_routing_scores_for_aux_loss(logits, topk, score_function, fused)`;
- router process groups: `parallel_state` (0.12-0.13), `router.tp_cp_group` (0.14+),
  `router.tp_dp_cp_group` (0.15+);
- `routing(logits, padding_mask)` takes a padding mask (True = padding) from 0.16;
- aux-loss tracker: a dict (in `parallel_state` in 0.12), one name for every LBL type until
  0.13, a name per type from 0.14; from 0.18 `moe_logging.get_moe_metrics_tracker().record`;
- per-token-loss aux-loss scale: upstream multiplies by this rank's tokens, and by the TP x CP
  size too from 0.19 (a fix); the plugin applies the fixed scale on every version;
- mean-loss aux-loss scale: the schedules multiply it by the CP size from 0.16 (a fix, read
  off the scale they set); the plugin applies the fixed scale on every version;
- MTP routers: 0.12-0.15 build every MTP layer's TransformerLayer with the default layer
  number 1, unmarked (steps.py refuses such a model: layer numbers collide); 0.16 numbers them
  after the decoder layers; 0.17+ mark them `is_mtp_layer` and number them from 1 again, and
  `mtp_use_repeated_layer` runs one MTP layer at every prediction depth;
- quantile balancing (`TopKRouter.quantile_balancing`, `qb_beta`, finalize_model_grads'
  `_update_router_qb_beta`) exists from 0.19 only.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
from typing import Optional, Sequence

import torch
from megatron.core import parallel_state
from megatron.core.transformer.moe import moe_utils
from megatron.core.transformer.moe.router import TopKRouter

try:  # 0.18+: one tracker object (moe_logging); the dict functions of moe_utils remain as shims
    from megatron.core.transformer.moe import moe_logging
except ImportError:
    moe_logging = None

LBL_TYPES = ("aux_loss", "seq_aux_loss", "global_aux_loss")

SCHEDULE_FUNCTIONS = (
    "forward_backward_no_pipelining",
    "forward_backward_pipelining_without_interleaving",
    "forward_backward_pipelining_with_interleaving",
)


def megatron_core_release() -> str:
    """The installed megatron-core's version, for messages (its __version__ can carry the local
    git commit of the working directory)."""
    from megatron.core import package_info

    return f"{package_info.MAJOR}.{package_info.MINOR}.{package_info.PATCH}"


def tracker_name(lbl_type: str) -> str:
    """The aux-loss-tracker name Megatron-LM's training_log reduces and reports for a type.

    0.12-0.13 log every LBL type as "load_balancing_loss"; 0.14 gave each type its own name.
    """
    if not hasattr(TopKRouter, "_apply_seq_aux_loss"):
        return "load_balancing_loss"
    return {"aux_loss": "load_balancing_loss", "seq_aux_loss": "seq_load_balancing_loss",
            "global_aux_loss": "global_load_balancing_loss"}[lbl_type]


def upstream_lbl_switch() -> tuple[str, object]:
    """(TopKRouter attribute, replacement) that turns upstream's own LBL computation off."""
    if hasattr(TopKRouter, "is_aux_loss_enabled"):  # 0.14+
        return "is_aux_loss_enabled", lambda self: False
    if hasattr(TopKRouter, "apply_load_balancing_loss"):  # 0.12-0.13
        return "apply_load_balancing_loss", lambda self, activation, *a, **k: activation
    raise ImportError(
        "megatron_gbl: megatron.core.transformer.moe.router.TopKRouter has neither "
        "is_aux_loss_enabled (0.14+) nor apply_load_balancing_loss (0.12-0.13); "
        "this Megatron-Core version is not supported"
    )


def lbl_types_and_coeffs(config) -> list[tuple[str, float]]:
    """moe_router_load_balancing_type / moe_aux_loss_coeff as a list of (type, coeff) pairs.

    Megatron accepts a str and a float (all versions) or equal-length lists (0.14+).
    """
    types = config.moe_router_load_balancing_type
    coeffs = config.moe_aux_loss_coeff
    types = [types] if isinstance(types, str) else list(types)
    coeffs = [coeffs] * len(types) if isinstance(coeffs, (int, float)) else list(coeffs)
    return list(zip(types, (float(c) for c in coeffs)))


def expert_bias_update_rate(config) -> Optional[float]:
    """moe_router_bias_update_rate when expert bias (aux-loss-free balancing) is on, else None."""
    if not getattr(config, "moe_router_enable_expert_bias", False):
        return None
    return float(config.moe_router_bias_update_rate)


def pipeline_size(config) -> int:
    return getattr(config, "pipeline_model_parallel_size", None) or 1


def expert_parallel_size(config) -> int:
    """expert_model_parallel_size of a TransformerConfig or of Megatron-LM's args (1 if unset)."""
    return getattr(config, "expert_model_parallel_size", None) or 1


def token_group(moe_layer):
    """The ranks whose tokens one dispatch of `moe_layer` (an MoELayer, or None) exchanges.

    Each rank's micro-batch tokens (its S/TP x B slice under sequence parallelism, its CP
    chunk, its data shard) go to the devices of their experts within the expert-tensor x
    expert-parallel group, `token_dispatcher.tp_ep_group`, for every dispatcher of 0.12-0.19
    (megatron/core/transformer/moe/token_dispatcher.py):
    - allgather (MoEAllGatherTokenDispatcher.token_dispatch): all-gathers routing map, probs
      and tokens over tp_ep; each rank keeps the columns of its local experts;
    - alltoall (MoEAlltoAllTokenDispatcher.preprocess / token_dispatch): all-gathers the
      per-expert counts over tp_ep, sends tokens by all-to-all over the expert-parallel group,
      then all-gathers them over the expert-tensor group: the tokens of tp_ep again;
    - flex (MoEFlexTokenDispatcher, DeepEP / HybridEP / 0.19's NCCL EP backends): one fused
      dispatch over tp_ep, the routing map expanded to [tokens, EP x ETP, local experts].
    The group is `tp_ep` of the layer's process-group collection from 0.13 (attribute set in
    MoETokenDispatcher.__init__; `model_comm_pgs` in 0.13-0.14, `pg_collection` from 0.15),
    and a property returning parallel_state's group in 0.12; a router has no reference to it,
    hence the layer. A router outside an MoELayer (None) has no dispatcher: parallel_state's
    group, the default every release's dispatcher takes.
    """
    if moe_layer is None:
        return parallel_state.get_expert_tensor_and_model_parallel_group()
    group = getattr(getattr(moe_layer, "token_dispatcher", None), "tp_ep_group", None)
    if group is None:
        raise RuntimeError(
            f"megatron_gbl: the token dispatcher of this {type(moe_layer).__name__} has no "
            "'tp_ep_group', which every Megatron-Core release from 0.12 on gives it (installed: "
            f"{megatron_core_release()}): renamed or removed, so the plugin cannot tell which "
            "ranks one all-to-all exchanges; this release is not supported yet")
    return group


def recomputes_router(config) -> bool:
    """Whether activation recompute replays routers: whole layers, or the MoE layer
    (`recompute_modules` with "moe" from 0.14, `moe_layer_recompute` before)."""
    granularity = getattr(config, "recompute_granularity", None)
    modules = getattr(config, "recompute_modules", None) or []
    return granularity == "full" or (granularity == "selective" and "moe" in modules) \
        or bool(getattr(config, "moe_layer_recompute", False))


def upstream_bias_update_switch() -> tuple[object, str, object]:
    """(owner, name, replacement) that turns Megatron's own once-per-step expert-bias update off.

    finalize_model_grads calls it through its module globals on every version (0.12-0.19).
    """
    # The module, not the function of the same name that megatron.core.distributed exports.
    finalize_model_grads = importlib.import_module(
        "megatron.core.distributed.finalize_model_grads")
    if not hasattr(finalize_model_grads, "_update_router_expert_bias"):
        raise ImportError(
            "megatron_gbl: megatron.core.distributed.finalize_model_grads has no "
            "_update_router_expert_bias; this Megatron-Core version is not supported"
        )
    return finalize_model_grads, "_update_router_expert_bias", lambda *args, **kwargs: None


def fp32_bias_on_load():
    """(name, make_replacement) keeping `expert_bias` fp32 when a state dict is loaded into a
    bf16/fp16 model, for 0.12-0.13 (0.14+ do it themselves); None where upstream does."""
    if "_load_from_state_dict" in TopKRouter.__dict__:
        return None

    def make_replacement(original):
        def _load_from_state_dict(self, *args, **kwargs):
            self._maintain_float32_expert_bias()  # before the copy rounds the loaded bias
            return original(self, *args, **kwargs)

        return _load_from_state_dict

    return "_load_from_state_dict", make_replacement


def reset_upstream_expert_load(routers) -> None:
    """Zero upstream's own expert-load accumulators, which the plugin does not use (0.12-0.14
    would otherwise never zero them while upstream's update is off), and 0.19's quantile
    accumulators, which the plugin empties after every call (quantile.StepHistograms): of all
    `routers` in one fused kernel."""
    accumulators = [accumulator for router in routers
                    for name in ("local_tokens_per_expert", "qb_beta_accum", "qb_beta_count")
                    if (accumulator := getattr(router, name, None)) is not None]
    if accumulators:
        torch._foreach_zero_(accumulators)


def expert_bias_frozen(router) -> bool:
    """0.19's `frozen_expert_bias`: upstream never updates such a bias, nor does the plugin."""
    return bool(_router_attribute(router, "frozen_expert_bias", False))


def padding_mask_from_call(args: tuple, kwargs: dict) -> Optional[torch.Tensor]:
    """The padding mask passed to `TopKRouter.routing` (0.16+), True = padding, else None."""
    if "padding_mask" in kwargs:
        return kwargs["padding_mask"]
    return args[0] if args else None


# The first release whose TopKRouter sets each optional attribute the plugin reads in its
# __init__ (checked in the wheels 0.12.3-0.19.2). Before it, the plugin falls back to the
# default `_router_attribute` is given; from it on, a router without the attribute means it
# was renamed or removed, and the plugin stops instead of falling back.
ROUTER_ATTRIBUTE_SINCE = {
    "tp_cp_group": (0, 13),      # else parallel_state's tensor x context parallel group
    "tp_dp_cp_group": (0, 15),   # else parallel_state's tensor x data x context group
    "is_mtp_layer": (0, 17),     # else False (MTP layers are numbered after the decoder's)
    "frozen_expert_bias": (0, 19),  # else False (no frozen bias)
}


def release() -> tuple[int, int]:
    """(major, minor) of the installed megatron-core."""
    from megatron.core import package_info

    return package_info.MAJOR, package_info.MINOR


_ROUTER_ATTRIBUTE_REQUIRED = {name: release() >= since
                              for name, since in ROUTER_ATTRIBUTE_SINCE.items()}


def _router_attribute(router, name: str, default):
    """`router.<name>` as the releases that have it set it in `__init__`; `default` on the
    releases before (ROUTER_ATTRIBUTE_SINCE); an error on a release that should have it.

    Read from the instance dict because the routers of the releases without it take this path
    in every call, and there getattr's default costs an AttributeError raised in
    nn.Module.__getattr__ (benchmarks/RESULTS.md, "Host work re-counted on the newest code").
    Only for plain attributes: parameters and buffers live elsewhere.
    """
    value = vars(router).get(name, _MISSING)
    if value is not _MISSING:
        return value
    if _ROUTER_ATTRIBUTE_REQUIRED[name]:
        since = ".".join(map(str, ROUTER_ATTRIBUTE_SINCE[name]))
        raise RuntimeError(
            f"megatron_gbl: this {type(router).__name__} has no attribute {name!r}, which "
            f"Megatron-Core's TopKRouter sets from {since} on (installed: "
            f"{megatron_core_release()}): renamed or removed in this release, so the plugin "
            "cannot tell which process group or setting it stands for; this release is not "
            "supported yet")
    return default


_MISSING = object()


def aux_scores_and_map(
    router, logits_TE: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Router scores and top-k map the LBL is computed on (unbiased, undropped: as 0.14+)."""
    if hasattr(moe_utils, "compute_routing_scores_for_aux_loss"):  # 0.14+
        routing_map_TE, scores_TE = moe_utils.compute_routing_scores_for_aux_loss(
            logits_TE,
            router.topk,
            router.score_function,
            fused=getattr(router.config, "moe_router_fusion", False),
        )
        return scores_TE, routing_map_TE.bool()
    scores_TE = router.compute_routing_scores_for_aux_loss(logits_TE)  # 0.12-0.13
    if isinstance(scores_TE, tuple):  # 0.13 returns (scores, plain top-k map)
        scores_TE, routing_map_TE = scores_TE
        return scores_TE, routing_map_TE.bool()
    top_indices_TK = torch.topk(scores_TE, k=router.topk, dim=1).indices
    routing_map_TE = torch.zeros_like(scores_TE, dtype=torch.bool).scatter(1, top_indices_TK, True)
    return scores_TE, routing_map_TE


def tp_cp_group(router):
    """Tensor x context parallel group of this router (the micro-batch balance group)."""
    group = _router_attribute(router, "tp_cp_group", None)
    return group if group is not None else default_tp_cp_group()


def tp_dp_cp_group(router):
    """Tensor x data x context parallel group of this router's pipeline stage."""
    group = _router_attribute(router, "tp_dp_cp_group", None)
    return group if group is not None else default_tp_dp_cp_group()


def default_tp_dp_cp_group():
    return parallel_state.get_tensor_and_data_parallel_group(with_context_parallel=True)


def data_parallel_rank_and_size() -> tuple[int, int]:
    return (
        parallel_state.get_data_parallel_rank(with_context_parallel=False),
        parallel_state.get_data_parallel_world_size(with_context_parallel=False),
    )


def model_parallel_ready() -> bool:
    return torch.distributed.is_initialized() and parallel_state.model_parallel_is_initialized()


def log_to_tracker(name: str, values_N: torch.Tensor, layers: Sequence[int], config, *,
                   avg_group, reduce_group=None) -> None:
    """Add values [N] to Megatron's aux-loss tracker under `name`, value n into the slot of
    layer `layers[n]` (1-based, `layer_index`; a layer may repeat: its values add up), for all
    rows with one write (one kernel, whatever the number of layers).

    What Megatron-LM then reports is the value summed over the pipeline stages and over
    `reduce_group`, then averaged over `avg_group`, and nothing else (reports show the mean over
    MoE layers). The data-parallel average Megatron adds on its own is turned off where it can be:
    0.18+ with `needs_dp_avg=False`, 0.16-0.17 with `reduce_group_has_dp=True` (their average
    follows a `reduce_group` sum); 0.12-0.13 add none. 0.14-0.15 always average over DP x CP
    last: a no-op, because `avg_group` must contain every data-parallel and context-parallel
    rank of the stage, so after its average they all hold the same value.
    """
    values_N = values_N.detach()
    num_layers = tracker_num_layers(config)
    # Megatron's own call adds the first value: it makes the entry (sized, on the values'
    # device) and sets its groups. One index_add adds the rest.
    if moe_logging is not None:
        moe_logging.get_moe_metrics_tracker().record(
            name, values_N[0], layers[0], num_layers, reduce_group=reduce_group,
            avg_group=avg_group, needs_dp_avg=False)
    else:
        moe_utils.save_to_aux_losses_tracker(name, values_N[0], layers[0], num_layers,
                                             reduce_group=reduce_group, avg_group=avg_group,
                                             **_no_dp_average())
    if len(layers) > 1:
        slots = _tracker_slots(name)
        slots.index_add_(0, _slot_index(tuple(layers[1:]), slots.device),
                         values_N[1:].to(slots.dtype))


def _tracker_slots(name: str) -> torch.Tensor:
    """The tracker's per-layer values of `name` [decoder layers + MTP layers], in place."""
    if moe_logging is not None:
        return moe_logging.get_moe_metrics_tracker().metrics[name].values
    return _tracker_dict()[name]["values"]


@functools.lru_cache(maxsize=64)
def _slot_index(layers: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """The tracker slots of `layers` as an index tensor on `device`, made (copied to the
    device) once per layout, not per step."""
    return torch.tensor([layer - 1 for layer in layers], dtype=torch.int64, device=device)


@functools.cache
def _no_dp_average() -> dict:
    """The keyword that skips 0.16-0.17's data-parallel average after the reduce_group sum."""
    parameters = inspect.signature(moe_utils.save_to_aux_losses_tracker).parameters
    return {"reduce_group_has_dp": True} if "reduce_group_has_dp" in parameters else {}


def tracker_values() -> dict[str, torch.Tensor]:
    """What Megatron's aux-loss tracker holds on this rank, before its reduction: name -> a copy
    of the per-layer values [decoder layers + MTP layers] (slot `layer_index(router) - 1`)."""
    if moe_logging is not None:
        return {name: entry.values.clone()
                for name, entry in moe_logging.get_moe_metrics_tracker().metrics.items()}
    return {name: entry["values"].clone() for name, entry in _tracker_dict().items()}


def clear_tracker() -> None:
    """Drop every entry of Megatron's aux-loss tracker, names included."""
    if moe_logging is not None:
        moe_logging.destroy_moe_metrics_tracker()  # the next record() starts a new one
    else:
        _tracker_dict().clear()


def _tracker_dict() -> dict:
    """0.12-0.17's tracker: a dict (moe_utils from 0.13, parallel_state before)."""
    owner = moe_utils if hasattr(moe_utils, "get_moe_layer_wise_logging_tracker") \
        else parallel_state
    return owner.get_moe_layer_wise_logging_tracker()


def layer_index(router) -> int:
    """The router's 1-based slot in the tracker's per-layer vectors (its key in the plugin's).

    Upstream's own: 0.17+ give the routers of multi-token-prediction layers `is_mtp_layer` and
    number them from 1 again, and record them after the decoder layers (`layer_number +
    num_layers`, router.attach_and_log_load_balancing_loss); 0.16 numbers them after the decoder
    layers already; 0.12-0.15 give them all number 1 (steps.py refuses such a model).
    """
    if _router_attribute(router, "is_mtp_layer", False):
        return router.layer_number + router.config.num_layers
    return router.layer_number


def calls_per_microbatch(router) -> int:
    """Training calls of a router per micro-batch: `mtp_num_layers` for the one MTP layer that
    `mtp_use_repeated_layer` (0.17+) runs at every prediction depth, else 1. Upstream divides
    that layer's aux loss by the same number, so a step counts it once."""
    config = router.config
    if _router_attribute(router, "is_mtp_layer", False) \
            and getattr(config, "mtp_use_repeated_layer", False):
        return config.mtp_num_layers
    return 1


def pipeline_group():
    return parallel_state.get_pipeline_model_parallel_group()


def tracker_num_layers(config) -> int:
    """Length of the tracker's per-layer vectors: decoder layers plus MTP layers."""
    return config.num_layers + (getattr(config, "mtp_num_layers", None) or 0)


def aux_loss_backward_scale(router, num_local_tokens, num_microbatches: Optional[int]):
    """The factor an aux loss's gradient needs so that it is the gradient of the mean over the
    step's micro-batches after Megatron's gradient reduction; None for 1.

    That is the main loss's scale (1 / micro-batches, and the loss scaler's factor), times the CP
    size: Megatron's DDP averages gradients over DP x CP, where every CP rank holds part of the
    same micro-batch. The schedule has set that on MoEAuxLossAutoScaler since 0.16; before, it
    left the CP size out and upstream's aux losses were CP times too weak at CP > 1
    (`_schedules_scale_by_cp` reads which from the scale the schedule set).

    In per-token-loss mode Megatron divides every gradient by the global token count instead,
    which holds every token of the TP x CP group once; multiplying the aux loss back by this
    rank's valid tokens (an int or int64 []) times the TP x CP size restores the per-micro-batch
    mean. That is upstream's scale from 0.19 (Megatron-LM PR 5047); before, upstream left the
    TP x CP size out, so its aux losses were TP x CP times too weak with per-token loss (issue
    1652). The plugin applies the correct scale on every version (docs/scopes.md, "Per-token
    loss").
    """
    scale = moe_utils.MoEAuxLossAutoScaler.main_loss_backward_scale
    if router.config.calculate_per_token_loss:
        num_tokens = num_local_tokens * torch.distributed.get_world_size(tp_cp_group(router))
        return num_tokens if scale is None else scale * num_tokens
    cp_size = parallel_state.get_context_parallel_world_size()
    if cp_size == 1 or _schedules_scale_by_cp(scale, router.config, num_microbatches, cp_size):
        return scale
    return cp_size if scale is None else scale * cp_size


_SCHEDULES_SCALE_BY_CP: Optional[bool] = None  # read off the first scale at CP > 1


def _schedules_scale_by_cp(scale, config, num_microbatches: Optional[int], cp_size: int) -> bool:
    """Whether Megatron's schedules put the CP size into the mean-loss aux-loss scale, decided
    from what they did: the scale they set on MoEAuxLossAutoScaler for this micro-batch is
    loss_scale * cp / M from 0.16 (`forward_step_calc_loss`) and loss_scale / M before, with
    loss_scale what they take from the grad scaler (`_main_loss_scale`). Once per process, at
    the first backward at CP > 1 (a host sync). Raises when the scale says neither."""
    global _SCHEDULES_SCALE_BY_CP
    if _SCHEDULES_SCALE_BY_CP is not None:
        return _SCHEDULES_SCALE_BY_CP
    if scale is None or num_microbatches is None:
        raise RuntimeError(
            f"megatron_gbl: at context-parallel size {cp_size} the LBL's gradient scale follows "
            "the loss scale Megatron's schedules set for each micro-batch "
            "(MoEAuxLossAutoScaler), but " + ("none was set" if scale is None else
                                              "the step's number of micro-batches is unknown")
            + ": train through megatron.core.pipeline_parallel.get_forward_backward_func(), or "
            "pass num_microbatches to megatron_gbl.step / start_step and set "
            "MoEAuxLossAutoScaler.set_loss_scale(loss_scale / num_microbatches) as they do")
    ratio = float(scale) * num_microbatches / _main_loss_scale(config)
    for scales_by_cp, expected in ((True, cp_size), (False, 1)):
        if abs(ratio - expected) <= 1e-6 * expected:
            _SCHEDULES_SCALE_BY_CP = scales_by_cp
            return scales_by_cp
    raise RuntimeError(
        f"megatron_gbl: Megatron's schedules (megatron-core {megatron_core_release()}) set an "
        f"aux-loss scale of {float(scale):.6g} for {num_microbatches} micro-batches at "
        f"context-parallel size {cp_size}: {ratio:.6g} times loss_scale / micro-batches, "
        f"neither 1 (releases before 0.16) nor the CP size (0.16 on), so the plugin cannot tell "
        "whether to add the CP factor; this release is not supported at CP > 1")


def _main_loss_scale(config) -> float:
    """The loss scaler's factor the schedules put in the aux-loss scale: 0.19's
    moe_grad_scale_func, else grad_scale_func of a unit loss, else 1."""
    if getattr(config, "moe_grad_scale_func", None) is not None:
        return float(config.moe_grad_scale_func())
    if config.grad_scale_func is not None:
        return float(config.grad_scale_func(torch.ones(1)))
    return 1.0


# Per-layer CUDA-graph capture modules that leave every MoE router out of the graphs, by
# implementation. Transformer Engine's graphs (TransformerLayer._te_cuda_graph_capture, 0.12-0.19)
# capture what the modules name: "attn" only attention, "mlp" only dense MLPs, "mamba" only Mamba
# layers. Megatron's local graphs wrap a whole TransformerLayer call whenever the layer gets a
# graph manager, which "attn" gives it too (TransformerLayer.create_mcore_cudagraph_manager,
# 0.16-0.19; before 0.16 every scope graphs whole layers, or the whole iteration).
_ROUTER_FREE_CUDA_GRAPH_MODULES = {
    "transformer_engine": {"attn", "mlp", "mamba"},
    "local": {"mamba"},
}


def router_cuda_graphs(config) -> Optional[tuple[str, list[str]]]:
    """(implementation, capture modules) when CUDA graphs capture MoE routers in training, else
    None. No modules means whole layers. Works on a TransformerConfig and on Megatron-LM's args.

    The implementation is cuda_graph_impl (0.15+: "none", "local", "transformer_engine", and
    "full_iteration" from 0.18), else enable_cuda_graph ("local") or external_cuda_graph
    ("transformer_engine") of 0.12-0.14. The modules are cuda_graph_modules (0.18+) or
    cuda_graph_scope (a str before 0.16, a list of CudaGraphScope after; "full" is whole layers
    and "full_iteration" a graph of the whole iteration, the 0.18 implementation).
    """
    impl = getattr(config, "cuda_graph_impl", None) or "none"
    if impl == "none" and getattr(config, "enable_cuda_graph", False):
        impl = "local"
    if impl == "none" and getattr(config, "external_cuda_graph", False):
        impl = "transformer_engine"
    if impl == "none":
        return None
    modules = getattr(config, "cuda_graph_modules", None)
    if modules is None:
        modules = getattr(config, "cuda_graph_scope", None)
    names = _cuda_graph_module_names(modules)
    router_free = _ROUTER_FREE_CUDA_GRAPH_MODULES.get(impl, set())
    if names and set(names) <= router_free:
        return None
    return impl, names


def _cuda_graph_module_names(modules) -> list[str]:
    if modules is None:
        return []
    if isinstance(modules, str):
        modules = modules.split(",")
    elif not isinstance(modules, (list, tuple)):
        modules = [modules]
    names = [getattr(module, "name", module) for module in modules]  # enum members or str
    names = [str(name) for name in names if name]
    return [] if names == ["full"] else names


def default_tp_cp_group():
    return parallel_state.get_tensor_and_context_parallel_group()


def optimizer_skip_hook() -> tuple[object, str]:
    """(owner, name) of the call whose result is Megatron's optimizer's decision to skip a
    step: MixedPrecisionOptimizer.prepare_grads returns whether its grad scaler found inf or NaN
    in the gradients, agreed over the model-parallel group (0.12-0.19; the only optimizers that
    skip, ChainedOptimizer asks each of its own, the distributed optimizer inherits it)."""
    from megatron.core.optimizer.optimizer import MixedPrecisionOptimizer

    return MixedPrecisionOptimizer, "prepare_grads"


def grad_scaler_skips_non_finite(config) -> bool:
    """Whether Megatron skips, rather than stops at, a step whose gradients hold inf or NaN.

    Its optimizer skips such a step when it has a grad scaler (get_megatron_optimizer,
    0.12-0.19): with fp16 always (a dynamic one, or a constant one for loss_scale). A
    TransformerConfig knows fp16 only, so that is the test. Megatron-LM agrees: with fp16 and
    dynamic loss scaling its validate_args turns --check-for-nan-in-loss-and-grad off ("NaNs in
    grads / loss are signal to the loss scaler"); with a constant --loss-scale that check stops
    the run at the NaN loss, before the step ends.
    """
    return bool(getattr(config, "fp16", False))




def has_quantile_balancing() -> bool:
    """Whether this Megatron-Core has the quantile balancing the plugin rescopes: 0.19's
    TopKRouter.quantile_balancing and finalize_model_grads' _update_router_qb_beta (also on
    Megatron-LM main, 2026-08)."""
    finalize_model_grads = importlib.import_module(
        "megatron.core.distributed.finalize_model_grads")
    return hasattr(TopKRouter, "quantile_balancing") \
        and hasattr(finalize_model_grads, "_update_router_qb_beta")


def has_own_global_quantile_balancing() -> bool:
    """Whether this Megatron-Core estimates quantile balancing's bias on the global batch itself
    (moe_router_quantile_balancing_estimation_scope: Megatron-LM PR #6637, on dev after
    2026-08-21), in place of the hooks of `has_quantile_balancing`."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    return "moe_router_quantile_balancing_estimation_scope" in {
        field.name for field in dataclasses.fields(TransformerConfig)}


def upstream_qb_update_switch() -> tuple[object, str, object]:
    """(owner, name, replacement) that turns off 0.19's once-per-step quantile-balancing update
    (finalize_model_grads calls it through its module globals), while the plugin owns it."""
    finalize_model_grads = importlib.import_module(
        "megatron.core.distributed.finalize_model_grads")
    return finalize_model_grads, "_update_router_qb_beta", lambda *args, **kwargs: None


def qb_bias(router) -> torch.Tensor:
    """0.19's quantile-balancing bias `qb_beta` (fp32 [E], a persistent buffer)."""
    return router.qb_beta


def qb_upstream_accumulators(router) -> tuple[torch.Tensor, torch.Tensor]:
    """0.19's per-step sum of micro-batch quantiles and their count (qb_beta_accum fp32 [E],
    qb_beta_count int64 [])."""
    return router.qb_beta_accum, router.qb_beta_count


def qb_routing(router, logits_TE: torch.Tensor,
               indices_TK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(probs, routing map) [T, E] of experts picked by quantile balancing: the probabilities
    of the router's score function, as 0.19's quantile_balancing computes them."""
    config = router.config
    return moe_utils.topk_routing_with_score_function(
        logits_TE, router.topk, use_pre_softmax=config.moe_router_pre_softmax,
        scaling_factor=config.moe_router_topk_scaling_factor,
        score_function=router.score_function, fused=config.moe_router_fusion,
        precomputed_indices=indices_TK)


def quantile_balancing_ema(config) -> float:
    """moe_router_quantile_balancing_ema of a TransformerConfig or Megatron-LM's args (0.19's
    default 0.0 where unset)."""
    return float(getattr(config, "moe_router_quantile_balancing_ema", None) or 0.0)


def dp_cp_group():
    """Data x context parallel group: the one 0.19's quantile-balancing update averages over
    (finalize_model_grads without a pg_collection)."""
    return parallel_state.get_data_parallel_group(with_context_parallel=True)
