"""Per-rank bodies of tests/test_parallel_layouts.py: a GPT-MoE trained in a parallel layout
(tensor parallel with sequence parallelism, context, expert, pipeline with 1F1B or the
interleaved schedule, and their combinations) through Megatron's own gradient path: the
schedules' loss scaling, DistributedDataParallel with the all-reduce overlapped with the
backward, finalize_model_grads. No gradient is averaged by hand.

Every parameter is set from its global name (layer and expert by their global index, tensor-
parallel shards cut from one full tensor), so every layout holds the same model. What comes back
per MoE layer on this rank: the router's input of every micro-batch and its weight gradient, for
the single-process reference on the concatenated global batch (tests/reference.py); and the
ranks of this rank's token group, for the device-level loss's reference.
"""

from __future__ import annotations

import functools
import zlib

import torch
import torch.distributed as dist

import megatron_gbl
from megatron_gbl import compat
from megatron_gbl_lab import harness

VOCAB = 64


def runs(rank: int, world_size: int, calls: list) -> list:
    """[(name of a worker of this module, its spec)] run one after the other in one set of
    processes (process start-up dominates the test time)."""
    return [globals()[name](rank, world_size, spec) for name, spec in calls]


def layout_steps(rank: int, world_size: int, spec: dict) -> dict:
    """One model in one layout, one training step per entry of spec["steps"].

    spec: layout (initialize_model_parallel sizes: tp, pp, vpp, cp, ep, etp), config
    (TransformerConfig overrides), steps (list of (scope, enable kwargs), scope None = the
    plugin off), microbatches, seq, bsz, loss ("mean": Megatron's (loss, info); "tokens":
    (loss sum, token count, info), averaged by the schedule; "per_token": the same with
    calculate_per_token_loss, divided by the global token count in finalize_model_grads),
    lm_loss (False: the language-model loss x 0, so only the load-balancing loss has a
    gradient), grad_scale (the loss scaler's factor), isolate_routers (the experts' output
    weights 0: no layer's output then depends on its routing probabilities, so a router's
    gradient is its own layer's LBL gradient, all a reference of one layer computes),
    all_grads (also return every parameter's gradient by global name), domains (each
    data-parallel replica's tokens from its own 1 / DP of the vocabulary: domain-pure
    micro-batches), metrics (return megatron_gbl.step_metrics after each step). With quantile
    balancing (Megatron-Core 0.19+) each MoE layer also returns its bias after the step and, per
    training call, its fp32 logits [T, E] and routing map.
    """
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    layout = spec["layout"]
    harness.init_model_parallel(
        tensor_model_parallel_size=layout.get("tp", 1),
        pipeline_model_parallel_size=layout.get("pp", 1),
        virtual_pipeline_model_parallel_size=layout.get("vpp"),
        context_parallel_size=layout.get("cp", 1),
        expert_model_parallel_size=layout.get("ep", 1),
        expert_tensor_parallel_size=layout.get("etp"))
    config = harness.moe_config(
        calculate_per_token_loss=spec.get("loss") == "per_token", **spec.get("config", {}))
    chunks = [harness.build_gpt_moe(config, VOCAB, spec["seq"], vp_stage=stage)
              for stage in (range(layout["vpp"]) if layout.get("vpp") else [None])]
    for chunk in chunks:
        _set_from_global_names(chunk, spec.get("isolate_routers", False))
    inputs = _record_router_inputs(chunks)
    quantile_balancing = config.moe_router_load_balancing_type == "quantile_balancing"
    calls = _record_quantile_calls(chunks) if quantile_balancing else {}
    grad_scale = spec.get("grad_scale", 1.0)
    model = harness.wrap_megatron_ddp(chunks, grad_scale=grad_scale)
    names = {param: name for chunk in chunks for name, param in _global_names(chunk).items()}

    compat.clear_tracker()
    # The ranks whose tokens one expert dispatch exchanges (expert-tensor x expert-parallel).
    token_group = dist.get_process_group_ranks(
        parallel_state.get_expert_tensor_and_model_parallel_group())
    data = _global_batch(spec, parallel_state)
    results = []
    for step, (scope, settings) in enumerate(spec["steps"]):
        megatron_gbl.disable()
        if scope is not None:
            megatron_gbl.enable(scope, model=model, **settings)
        for chunk in model:
            chunk.zero_grad_buffer()
        for recorded in [*inputs.values(), *calls.values()]:
            recorded.clear()
        get_forward_backward_func()(
            forward_step_func=functools.partial(_forward_step, spec),
            # One iterator per model chunk, each over all the micro-batches (as Megatron-LM).
            data_iterator=[iter(data[step]) for _ in model] if len(model) > 1
            else iter(data[step]),
            model=model if len(model) > 1 else model[0],
            num_microbatches=spec["microbatches"],
            seq_length=spec["seq"] // parallel_state.get_context_parallel_world_size(),
            micro_batch_size=spec["bsz"], forward_only=False)
        routers = {compat.layer_index(router): router for router in _routers(chunks)}
        result = {"token_group": token_group,
                  "replica": parallel_state.get_data_parallel_rank(), "routers": {
            layer: {"grad": router.weight.main_grad.detach().double() / grad_scale,
                    "weight": router.weight.detach().clone(),
                    "inputs": list(inputs[layer]),
                    "expert_bias": None if router.expert_bias is None
                    else router.expert_bias.detach().clone(),
                    **({"qb_beta": compat.qb_bias(router).detach().clone(),
                        "calls": list(calls[layer])} if quantile_balancing else {})}
            for layer, router in routers.items()}}
        if spec.get("metrics") and scope is not None:
            result["metrics"] = megatron_gbl.step_metrics(model)
        if spec.get("all_grads"):
            result["grads"] = {names[param]: param.main_grad.detach().clone() / grad_scale
                               for chunk in chunks for param in chunk.parameters()}
        results.append(result)
    megatron_gbl.disable()
    harness.destroy_model_parallel()
    return results


def cp_scale_read_off(rank: int, world_size: int, spec: dict):
    """`layout_steps` on an install without source (inspect.getsource fails), deciding anew
    whether the schedules put the CP size in the aux-loss scale; with spec["scale_factor"],
    under schedules whose scale is off by that factor (a rewrite the plugin does not know).
    Returns layout_steps' results, or {"error": message} when the step raised."""
    import inspect

    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    def no_source(obj):
        raise OSError("could not get source code")

    set_loss_scale = MoEAuxLossAutoScaler.__dict__["set_loss_scale"]
    factor = spec.get("scale_factor")
    getsource, inspect.getsource = inspect.getsource, no_source
    if factor is not None:
        MoEAuxLossAutoScaler.set_loss_scale = staticmethod(
            lambda scale: set_loss_scale.__func__(scale * factor))
    compat._SCHEDULES_SCALE_BY_CP = None
    try:
        return layout_steps(rank, world_size, spec)
    except RuntimeError as error:
        megatron_gbl.disable()
        harness.destroy_model_parallel()
        return {"error": str(error)}
    finally:
        inspect.getsource = getsource
        MoEAuxLossAutoScaler.set_loss_scale = set_loss_scale
        compat._SCHEDULES_SCALE_BY_CP = None


def _forward_step(spec, data_iterator, model):
    tokens, positions = next(data_iterator)
    output = model(tokens, positions.unsqueeze(0).expand_as(tokens), None, labels=tokens)
    return output, functools.partial(_loss, spec)


def _loss(spec, output_tensor):
    """The language-model loss as Megatron-LM's pretrain_gpt returns it (see layout_steps)."""
    from megatron.core import parallel_state

    scale = 1.0 if spec.get("lm_loss", True) else 0.0
    loss_sum = output_tensor.float().sum() * scale
    num_tokens = torch.tensor(output_tensor.numel(), dtype=torch.int)
    if spec.get("loss", "mean") != "mean":
        return loss_sum, num_tokens, {}
    # The mean over the whole sequence: the sum and count of every context-parallel shard
    # (the schedule multiplies by the CP size, and DDP averages over DP x CP).
    total = torch.stack([loss_sum.detach(), num_tokens.float()])
    dist.all_reduce(total, group=parallel_state.get_context_parallel_group())
    return loss_sum / total[1], {}


def _global_batch(spec, parallel_state) -> list:
    """Per step, this rank's micro-batches: (tokens [B, S/CP], positions [S/CP]) of its
    data-parallel replica, cut to its context-parallel positions (the same on its tensor- and
    pipeline-parallel peers)."""
    cp_size = parallel_state.get_context_parallel_world_size()
    positions = harness.context_parallel_positions(
        spec["seq"], cp_size, parallel_state.get_context_parallel_rank())
    dp_size = parallel_state.get_data_parallel_world_size()
    dp_rank = parallel_state.get_data_parallel_rank()
    # Domain-pure: replica r draws from its own 1 / DP of the vocabulary.
    span = VOCAB // dp_size if spec.get("domains") else VOCAB
    steps = []
    for step in range(len(spec["steps"])):
        gen = torch.Generator().manual_seed(step)
        tokens = [[torch.randint(0, span, (spec["bsz"], spec["seq"]), generator=gen)
                   + (replica * span if spec.get("domains") else 0)
                   for replica in range(dp_size)] for _ in range(spec["microbatches"])]
        steps.append([(replicas[dp_rank][:, positions], positions) for replicas in tokens])
    return steps


def _record_quantile_calls(chunks) -> dict:
    """layer number -> (fp32 logits [T, E], routing map [T, E]) of each training call of its
    router's quantile_balancing, upstream's or the plugin's (looked up at call time)."""
    calls = {}
    for router in _routers(chunks):
        recorded = calls.setdefault(compat.layer_index(router), [])

        def quantile_balancing(logits, router=router, recorded=recorded):
            probs, routing_map = type(router).quantile_balancing(router, logits)
            if router.training and torch.is_grad_enabled():
                recorded.append((logits.detach().float().clone(), routing_map.clone()))
            return probs, routing_map

        router.quantile_balancing = quantile_balancing
    return calls


def _routers(chunks) -> list:
    return [router for chunk in chunks for router in harness.routers_of(chunk)]


def _record_router_inputs(chunks) -> dict:
    """layer number -> the inputs [S, B, H] of the router's training calls, in call order."""
    inputs = {}
    for router in _routers(chunks):
        recorded = inputs.setdefault(compat.layer_index(router), [])
        router.register_forward_pre_hook(
            lambda module, args, recorded=recorded:
            recorded.append(args[0].detach().clone()) if torch.is_grad_enabled() else None)
    return inputs


def _global_names(chunk) -> dict:
    """Parameter name -> the name in the whole model: layers by global index (stages and
    chunks number theirs from 0), experts by global index (expert-parallel ranks number their
    local experts from 0)."""
    from megatron.core import parallel_state

    num_local_experts = (chunk.config.num_moe_experts or 0) \
        // parallel_state.get_expert_model_parallel_world_size()
    ep_rank = parallel_state.get_expert_model_parallel_rank()
    names = {}
    for name, param in chunk.named_parameters():
        parts = name.split(".")
        if parts[:2] == ["decoder", "layers"]:
            parts[2] = str(chunk.decoder.layers[int(parts[2])].layer_number - 1)
        if "local_experts" in parts:
            index = parts.index("local_experts") + 1
            parts[index] = str(ep_rank * num_local_experts + int(parts[index]))
        names[".".join(parts)] = param
    return names


def _set_from_global_names(chunk, isolate_routers: bool) -> None:
    """Every weight from a generator seeded by its global name; a tensor-parallel shard is its
    rank's slice of the full tensor (norms start at 1 and 0, as usual)."""
    from megatron.core import parallel_state

    with torch.no_grad():
        for name, param in _global_names(chunk).items():
            if param.dim() == 1:
                param.fill_(1.0 if name.endswith("weight") else 0.0)
                continue
            shape = list(param.shape)
            sharded = getattr(param, "tensor_model_parallel", False)
            if sharded:
                expert = not getattr(param, "allreduce", True)
                size = (parallel_state.get_expert_tensor_parallel_world_size() if expert
                        else parallel_state.get_tensor_model_parallel_world_size())
                rank = (parallel_state.get_expert_tensor_parallel_rank() if expert
                        else parallel_state.get_tensor_model_parallel_rank())
                shape[param.partition_dim] *= size
            generator = torch.Generator().manual_seed(zlib.crc32(name.encode()))
            full = torch.randn(shape, generator=generator) * 0.02
            if sharded:
                full = full.chunk(size, dim=param.partition_dim)[rank]
            if isolate_routers and "experts" in name and "linear_fc2" in name:
                full = torch.zeros_like(full)
            param.copy_(full)


def dense_model_error(rank: int, world_size: int, spec: dict) -> str:
    """The error enable(model=...) gives on every pipeline stage of a model without MoE layers."""
    harness.init_model_parallel(pipeline_model_parallel_size=spec["pp"])
    config = harness.moe_config(num_moe_experts=None, moe_ffn_hidden_size=None,
                                moe_router_load_balancing_type="none")
    model = harness.build_gpt_moe(config, VOCAB, 8)
    try:
        megatron_gbl.enable("global", model=model)
    except ValueError as error:
        return str(error)
    finally:
        megatron_gbl.disable()
        harness.destroy_model_parallel()
    return "no error"


def batched_p2p_pairing(rank: int, world_size: int, spec: dict) -> dict:
    """Megatron-Core's batched p2p (`batch_p2p_comm`, its default) between two pipeline ranks,
    each the other's previous and next rank, as in the interleaved schedule at PP 2: rank r
    sends 10 r + 1 to its previous rank (a gradient) and 10 r + 2 to its next (an activation)
    in one batch, and reports what arrived as 'from previous' and 'from next'."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import p2p_communication

    harness.init_model_parallel(pipeline_model_parallel_size=2)
    group = parallel_state.get_pipeline_model_parallel_group()
    peer = dist.get_global_rank(group, 1 - dist.get_rank(group))
    received = {"from_previous": torch.zeros(4), "from_next": torch.zeros(4)}
    requests = p2p_communication._batched_p2p_ops(
        tensor_send_prev=torch.full((4,), 10.0 * rank + 1),
        tensor_recv_prev=received["from_previous"],
        tensor_send_next=torch.full((4,), 10.0 * rank + 2),
        tensor_recv_next=received["from_next"],
        group=group, prev_pipeline_rank=peer, next_pipeline_rank=peer)
    for request in requests:
        request.wait()
    harness.destroy_model_parallel()
    return {name: float(value[0]) for name, value in received.items()}
