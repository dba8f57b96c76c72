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
- per-token-loss aux-loss scale: this rank's tokens, times the TP x CP size from 0.19;
- MTP routers: 0.12-0.15 build every MTP layer's TransformerLayer with the default layer
  number 1, unmarked (steps.py refuses such a model: layer numbers collide); 0.16 numbers them
  after the decoder layers; 0.17+ mark them `is_mtp_layer` and number them from 1 again, and
  `mtp_use_repeated_layer` runs one MTP layer at every prediction depth.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from typing import Optional

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


def reset_upstream_expert_load(router) -> None:
    """Zero upstream's own expert-load accumulator, which the plugin does not use (0.12-0.14
    would otherwise never zero it while upstream's update is off)."""
    if getattr(router, "local_tokens_per_expert", None) is not None:
        router.local_tokens_per_expert.zero_()


def expert_bias_frozen(router) -> bool:
    """0.19's `frozen_expert_bias`: upstream never updates such a bias, nor does the plugin."""
    return bool(getattr(router, "frozen_expert_bias", False))


def padding_mask_from_call(args: tuple, kwargs: dict) -> Optional[torch.Tensor]:
    """The padding mask passed to `TopKRouter.routing` (0.16+), True = padding, else None."""
    if "padding_mask" in kwargs:
        return kwargs["padding_mask"]
    return args[0] if args else None


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
    group = getattr(router, "tp_cp_group", None)
    return group if group is not None else parallel_state.get_tensor_and_context_parallel_group()


def tp_dp_cp_group(router):
    """Tensor x data x context parallel group of this router's pipeline stage."""
    group = getattr(router, "tp_dp_cp_group", None)
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


def log_to_tracker(router, name: str, value: torch.Tensor, *, avg_group,
                   reduce_group=None) -> None:
    """Add a router's per-layer value to Megatron's aux-loss tracker under `name`.

    What Megatron-LM then reports is the value summed over the pipeline stages and over
    `reduce_group`, then averaged over `avg_group`, and nothing else (reports show the mean over
    MoE layers). The data-parallel average Megatron adds on its own is turned off where it can be:
    0.18+ with `needs_dp_avg=False`, 0.16-0.17 with `reduce_group_has_dp=True` (their average
    follows a `reduce_group` sum); 0.12-0.13 add none. 0.14-0.15 always average over DP x CP
    last: a no-op, because `avg_group` must contain every data-parallel and context-parallel
    rank of the stage, so after its average they all hold the same value.
    """
    layer, num_layers = layer_index(router), tracker_num_layers(router.config)
    if moe_logging is not None:
        moe_logging.get_moe_metrics_tracker().record(
            name, value.detach(), layer, num_layers, reduce_group=reduce_group,
            avg_group=avg_group, needs_dp_avg=False)
        return
    moe_utils.save_to_aux_losses_tracker(name, value.detach(), layer, num_layers,
                                         reduce_group=reduce_group, avg_group=avg_group,
                                         **_no_dp_average())


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
    if getattr(router, "is_mtp_layer", False):
        return router.layer_number + router.config.num_layers
    return router.layer_number


def calls_per_microbatch(router) -> int:
    """Training calls of a router per micro-batch: `mtp_num_layers` for the one MTP layer that
    `mtp_use_repeated_layer` (0.17+) runs at every prediction depth, else 1. Upstream divides
    that layer's aux loss by the same number, so a step counts it once."""
    config = router.config
    if getattr(router, "is_mtp_layer", False) and getattr(config, "mtp_use_repeated_layer", False):
        return config.mtp_num_layers
    return 1


def pipeline_group():
    return parallel_state.get_pipeline_model_parallel_group()


def tracker_num_layers(config) -> int:
    """Length of the tracker's per-layer vectors: decoder layers plus MTP layers."""
    return config.num_layers + (getattr(config, "mtp_num_layers", None) or 0)


def aux_loss_backward_scale(router, num_local_tokens):
    """The factor Megatron's MoEAuxLossAutoScaler gives an aux loss's gradient; None for 1.

    That is the main loss's scale (1 / micro-batches, and the loss scaler's factor). In
    per-token-loss mode Megatron divides every gradient by the global token count instead, and
    upstream multiplies the aux loss back by this rank's valid tokens (an int or int64 []):
    by the TP x CP size too from 0.19 (Megatron-LM PR 5047), where the count the main loss is
    normalised by holds every token of the TP x CP group.
    """
    scale = moe_utils.MoEAuxLossAutoScaler.main_loss_backward_scale
    if router.config.calculate_per_token_loss:
        group_size = torch.distributed.get_world_size(tp_cp_group(router))
        if group_size > 1 and _per_token_scale_spans_tp_cp():
            num_local_tokens = num_local_tokens * group_size
        scale = num_local_tokens if scale is None else scale * num_local_tokens
    return scale


@functools.cache
def _per_token_scale_spans_tp_cp() -> bool:
    """Whether upstream's per-token-loss aux-loss scale includes the TP x CP size (0.19+).

    No name or signature changed with it, so read upstream's own attach function; TP x CP > 1
    with per-token loss is the only case that asks.
    """
    attach = getattr(TopKRouter, "attach_and_log_load_balancing_loss", None)  # 0.14+
    if attach is None:
        return False
    try:
        source = inspect.getsource(attach)
    except OSError as error:
        raise RuntimeError(
            "megatron_gbl: calculate_per_token_loss (--calculate-per-token-loss) with tensor or "
            "context parallelism needs to know how this Megatron-Core scales its aux losses, "
            "which it reads from TopKRouter's source, and that source is not installed; "
            "install megatron-core with its .py files"
        ) from error
    return "tp_cp_group.size()" in source
