"""The only module that knows how Megatron-Core versions differ (0.12.x, 0.14.x, 0.16.x).

Everything is decided by feature detection, never by version strings:

| feature                                  | 0.12-0.13                          | 0.14                       | 0.15-0.16                      |
|------------------------------------------|------------------------------------|----------------------------|--------------------------------|
| where upstream's LBL is switched off     | `TopKRouter.apply_load_balancing_loss` | `TopKRouter.is_aux_loss_enabled` | same as 0.14           |
| aux scores                               | `router.compute_routing_scores_for_aux_loss(logits)` | `moe_utils.compute_routing_scores_for_aux_loss(logits, topk, fn, fused)` | same |
| router process groups                    | `parallel_state`                   | `router.tp_cp_group`       | + `router.tp_dp_cp_group`      |
| `routing(logits, padding_mask)`          | no mask                            | no mask                    | mask from 0.16 (True = padding)|
| aux-loss tracker                         | `parallel_state`, one name for all LBLs | `moe_utils`, a name per type | same as 0.14               |

0.17-0.19 (Python >= 3.12, not installable here) keep these entry points; the differences that
matter to this module are written down in README.md ("Megatron-Core versions").
"""

from __future__ import annotations

import importlib
from typing import Optional

import torch
from megatron.core import parallel_state
from megatron.core.transformer.moe import moe_utils
from megatron.core.transformer.moe.router import TopKRouter

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
    hence the layer. Without a layer: parallel_state's group, the default on every version.
    """
    group = getattr(getattr(moe_layer, "token_dispatcher", None), "tp_ep_group", None)
    if group is None:
        group = parallel_state.get_expert_tensor_and_model_parallel_group()
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


def aux_losses_tracker() -> dict:
    """Megatron's per-layer aux-loss tracker dict (moe_utils from 0.13, parallel_state before)."""
    owner = moe_utils if hasattr(moe_utils, "get_moe_layer_wise_logging_tracker") else parallel_state
    return owner.get_moe_layer_wise_logging_tracker()


def log_to_tracker(router, name: str, value: torch.Tensor, reduce_group=None,
                   avg_group=None) -> None:
    """Add a router's per-layer value to Megatron's aux-loss tracker under `name`.

    Megatron's tracker reduction sums it over the pipeline stages and `reduce_group`, then
    averages it over `avg_group`; on top, 0.14-0.15 always and 0.16 after a `reduce_group`
    average over data parallel (0.12-0.13 never do). Reports show the mean over MoE layers.
    """
    moe_utils.save_to_aux_losses_tracker(
        name, value.detach(), router.layer_number, tracker_num_layers(router.config),
        reduce_group=reduce_group, avg_group=avg_group,
    )


def pipeline_group():
    return parallel_state.get_pipeline_model_parallel_group()


def tracker_num_layers(config) -> int:
    """Length of the tracker's per-layer vectors: decoder layers plus MTP layers."""
    return config.num_layers + (getattr(config, "mtp_num_layers", None) or 0)


def aux_loss_backward_scale(router, num_local_tokens):
    """The factor Megatron's MoEAuxLossAutoScaler gives an aux loss's gradient; None for 1.

    That is the main loss's scale (1 / micro-batches, and the loss scaler's factor); in
    per-token-loss mode Megatron divides every gradient by the global token count, and scaling
    by the local count (an int or int64 []) restores the per-micro-batch mean (as upstream does).
    """
    scale = moe_utils.MoEAuxLossAutoScaler.main_loss_backward_scale
    if router.config.calculate_per_token_loss:
        scale = num_local_tokens if scale is None else scale * num_local_tokens
    return scale


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
