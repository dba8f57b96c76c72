"""Per-rank bodies for the multi-process tests (spawned, so they live in an importable module).

Every worker runs real Megatron-Core modules on a real gloo group; the data of all ranks is
generated from one seed so the parent process can build the single-process reference.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import io
import math
import os
import time
import traceback

import torch
import torch.distributed as dist

import megatron_gbl
from megatron_gbl import compat, launch
from megatron_gbl_lab import harness

SEQ, MICRO_BSZ = 6, 2


def make_hidden(seed: int, microbatches: int, world_size: int, hidden_size: int, padded: bool):
    """hidden[k][r]: rank r's micro-batch k [S, B, H]; padding[k][r]: bool [S, B] or None.

    Padding varies per rank and micro-batch, so valid-token counts are unequal everywhere.
    """
    gen = torch.Generator().manual_seed(seed)
    hidden = [[torch.randn(SEQ, MICRO_BSZ, hidden_size, generator=gen) for _ in range(world_size)]
              for _ in range(microbatches)]
    if not padded:
        return hidden, None
    padding = [[torch.arange(SEQ).unsqueeze(1) >= SEQ - torch.randint(0, SEQ, (1, MICRO_BSZ), generator=gen)
                for _ in range(world_size)] for _ in range(microbatches)]
    return hidden, padding


DEAD_EXPERT = 7


def step_data(spec: dict, step: int, world_size: int, hidden_size: int):
    """(hidden[k][r], padding[k][r] or None) of a step of `router_steps`, for the reference too.

    spec keys beyond make_hidden's: hidden (explicit hidden[k][r], the same every step),
    all_padding (list of (k, r) whose micro-batch is all padding), dead_expert (inputs > 0, so
    that with the router row of DEAD_EXPERT set to -100 that expert never gets a token).
    """
    if "hidden" in spec:
        return spec["hidden"], None
    hidden, padding = make_hidden(spec["seed"] + step, spec["microbatches"], world_size,
                                  hidden_size, spec["padded"])
    for k, r in spec.get("all_padding", []):
        padding[k][r] = torch.ones_like(padding[k][r])
    if spec.get("dead_expert"):
        hidden = [[h.abs() + 0.1 for h in ranks] for ranks in hidden]
    return hidden, padding


def router_steps(rank: int, world_size: int, spec: dict) -> dict:
    """Train-mode router calls through one real TopKRouter, Megatron-style loss scaling.

    spec: scope (None = plugin off), lbl_type, coeff, microbatches, steps, padded, seed,
    sync_group_size, per_token_loss (Megatron's calculate_per_token_loss), device_coeff,
    device_groups, config (TransformerConfig overrides), tp (tensor-parallel size: each rank
    routes its own tokens, as under the sequence parallelism Megatron requires for MoE with TP).
    Returns the router gradient of the last step as Megatron's optimizer sees it
    (`_synced_router_grad`) plus what the plugin recorded.
    """
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    tp = spec.get("tp", 1)
    if not harness.model_parallel_initialized():
        harness.init_model_parallel(tensor_model_parallel_size=tp)
    enable_first = spec.get("enable_before_build", False)
    settings = dict(sync_group_size=spec.get("sync_group_size"),
                    micro_coeff=spec.get("micro_coeff", 0.0),
                    blocking_sync=spec.get("blocking_sync", False),
                    switch_scope=spec.get("switch_scope"),
                    switch_iteration=spec.get("switch_iteration"),
                    device_coeff=spec.get("device_coeff", 0.0),
                    device_groups=spec.get("device_groups"))
    if spec["scope"] is not None and enable_first:
        megatron_gbl.enable(spec["scope"], **settings)
    config = harness.moe_config(moe_router_load_balancing_type=spec["lbl_type"],
                                moe_aux_loss_coeff=spec["coeff"],
                                calculate_per_token_loss=spec.get("per_token_loss", False),
                                tensor_model_parallel_size=tp, **spec.get("config", {}))
    model = harness.build_gpt_moe(config)
    router = harness.routers_of(model)[0]
    if spec.get("dead_expert"):
        router.weight.data[DEAD_EXPERT] = -100.0
    if spec["scope"] is not None and not enable_first:
        megatron_gbl.enable(spec["scope"], **settings)
    compat.clear_tracker()
    draws = _record_shuffle_draws() if spec["scope"] == "shuffle" else []
    microbatches = spec["microbatches"]
    # What Megatron's schedules set: the main loss's 1 / micro-batches, or 1 in per-token-loss
    # mode, where finalize_model_grads divides by the token count instead.
    MoEAuxLossAutoScaler.set_loss_scale(
        torch.tensor(1.0 if config.calculate_per_token_loss else 1.0 / microbatches))
    seen = []
    for step in range(spec["steps"]):
        hidden, padding = step_data(spec, step, world_size, config.hidden_size)
        if spec["scope"] is None and spec["lbl_type"] == "global_aux_loss":
            router.reset_global_aux_loss_tracker()
        router.weight.grad = None
        num_tokens = 0
        with (megatron_gbl.step(model, microbatches) if spec["scope"] is not None
              else contextlib.nullcontext()):
            for k in range(microbatches):
                kwargs = {} if padding is None else {"padding_mask": padding[k][rank]}
                probs, _ = router(hidden[k][rank], **kwargs)
                num_tokens += probs.shape[0] if padding is None \
                    else int((~padding[k][rank]).sum())
                # Megatron's trick: a zero main loss keeps only the aux-loss gradient.
                (probs * 0).sum().backward()
                if spec["scope"] is not None:
                    seen.append({
                        "microbatches": router._megatron_gbl.buffer.num_microbatches,
                        "balance": megatron_gbl.balance_bsz(model).get(router.layer_number)})
    grad = _synced_router_grad(router.weight.grad, config.calculate_per_token_loss, num_tokens)
    step = megatron_gbl.step_metrics(model) if spec["scope"] is not None else None
    megatron_gbl.disable()
    logged = compat.tracker_values()
    return {"grad": grad, "weight": router.weight.detach().clone(), "seen": seen, "logged": logged,
            "metrics": None if step is None else step.values,
            "global_tokens_per_expert": None if step is None else step.global_tokens_per_expert,
            "draws": draws}


def _synced_router_grad(grad, per_token_loss: bool, num_tokens: int) -> torch.Tensor:
    """The router gradient Megatron's optimizer sees: summed over TP (a sequence-parallel weight,
    finalize_model_grads), then DDP's data-parallel average; in per-token-loss mode summed over
    data parallel and divided by the step's valid tokens of all ranks instead (`num_tokens` is
    this rank's: each rank holds its own tokens, TP ranks their shards)."""
    from megatron.core import parallel_state

    grad = grad.detach().clone()
    dist.all_reduce(grad, group=parallel_state.get_tensor_model_parallel_group())
    dp_group = parallel_state.get_data_parallel_group(with_context_parallel=True)
    if not per_token_loss:
        dist.all_reduce(grad, op=dist.ReduceOp.AVG, group=dp_group)
        return grad
    total_tokens = torch.tensor(float(num_tokens), dtype=torch.float64)
    dist.all_reduce(total_tokens)
    dist.all_reduce(grad, group=dp_group)
    return grad / total_tokens.to(grad.dtype)


def _record_shuffle_draws() -> list:
    """Spy on the plugin's shuffle draws for this run: [{sample_size, drawn [N], counts [E]}]."""
    from megatron_gbl import lbl

    draws = []
    draw = getattr(lbl.draw_shuffled_counts, "__wrapped__", lbl.draw_shuffled_counts)

    def recorded(choices_NK, sample_size, num_experts, generator):
        counts_E, drawn_N = draw(choices_NK, sample_size, num_experts, generator)
        draws.append({"sample_size": int(sample_size), "drawn": drawn_N.clone(),
                      "counts": counts_E.clone()})
        return counts_E, drawn_N

    recorded.__wrapped__ = draw
    lbl.draw_shuffled_counts = recorded
    return draws


def router_runs(rank: int, world_size: int, specs: list) -> list:
    """Several `router_steps` runs in one set of processes (process start-up dominates)."""
    return [router_steps(rank, world_size, spec) for spec in specs]


def make_tokens(seed: int, microbatches: int, world_size: int, seq: int, bsz: int, vocab: int):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randint(0, vocab, (bsz, seq), generator=gen) for _ in range(world_size)]
            for _ in range(microbatches)]


def model_steps(rank: int, world_size: int, spec: dict) -> dict:
    """Optimizer-step-shaped runs of a real GPT-MoE model through get_forward_backward_func().

    spec: scope (None = plugin off), config (TransformerConfig overrides), microbatches,
    step_seeds (one data seed per step), seq, bsz, lm_loss (False keeps only aux gradients),
    pp (pipeline stages; the 1F1B schedule when > 1).
    Returns the DP-averaged gradients of the last step and the routers' buffer state.
    """
    if not harness.model_parallel_initialized():
        harness.init_model_parallel(pipeline_model_parallel_size=spec.get("pp", 1))
    config = harness.moe_config(**spec.get("config", {}))
    model = harness.build_gpt_moe(config, vocab_size=64, max_sequence_length=spec["seq"])
    if spec["scope"] is not None:
        megatron_gbl.enable(spec["scope"], model=model)
    routers = harness.routers_of(model)
    for seed in spec["step_seeds"]:
        if spec["scope"] is None and config.moe_router_load_balancing_type == "global_aux_loss":
            for router in routers:
                router.reset_global_aux_loss_tracker()
        _train(model, None, [seed], spec)
    grads = {name: param.grad.detach().float().clone() for name, param in model.named_parameters()
             if param.grad is not None}
    buffers = []
    for router in routers:
        state = getattr(router, "_megatron_gbl", None)
        if state is not None:
            buffers.append(_plugin_counts(state))
        elif getattr(router, "global_tokens_per_expert", None) is not None:
            buffers.append({"microbatches": float(router.ga_steps),
                            "tokens_per_expert": router.global_tokens_per_expert.clone(),
                            "dtype": router.global_tokens_per_expert.dtype})
        elif getattr(router, "local_tokens_per_expert", None) is not None:
            buffers.append({"tokens_per_expert": router.local_tokens_per_expert.clone(),
                            "dtype": router.local_tokens_per_expert.dtype})
    megatron_gbl.disable()
    return {"grads": grads, "buffers": buffers}


def _plugin_counts(state) -> dict:
    """The step's LBL buffer (with an LBL) and the dispatched load (with expert bias)."""
    counts = {}
    if state.balancing.lbl_type is not None:
        buf = state.buffer
        tokens_per_expert, num_tokens = buf.prefix(buf.num_microbatches - 1)
        counts.update(microbatches=buf.num_microbatches,
                      tokens_per_expert=tokens_per_expert.clone(), num_tokens=int(num_tokens),
                      dtype=tokens_per_expert.dtype)
    if state.bias is not None:
        load = torch.stack(state.load_counts).sum(0)
        counts.update(load_tokens_per_expert=load[:-1].clone(), load_num_tokens=int(load[-1]))
        counts.setdefault("microbatches", len(state.load_counts))
        counts.setdefault("dtype", load.dtype)
    return counts


def model_runs(rank: int, world_size: int, specs: list) -> list:
    return [model_steps(rank, world_size, spec) for spec in specs]


def wait_for_peer_forward(flag_path: str) -> None:
    """Rank 1's side of the no-barrier tests: wait until rank 0 has finished its forward (it
    writes `flag_path`), which it can only do if its forward waits for no peer."""
    deadline = time.monotonic() + 15
    while not os.path.exists(flag_path):
        if time.monotonic() > deadline:
            raise TimeoutError("rank 0 did not finish its forward: it waited for rank 1")
        time.sleep(0.05)


def forward_before_peer(rank: int, world_size: int, flag_path: str, blocking_sync: bool) -> str:
    """Rank 0 runs a whole GPT-MoE forward before rank 1 starts its own, then both backward.

    Possible only if no router waits for the data-parallel count all-reduce in the forward.
    """
    harness.init_model_parallel()
    model = harness.build_gpt_moe(harness.moe_config())
    megatron_gbl.enable("global", blocking_sync=blocking_sync)
    megatron_gbl.start_step(model, num_microbatches=1)
    tokens = make_tokens(rank, 1, 1, 8, 2, 64)[0][0]
    position_ids = torch.arange(8).unsqueeze(0).expand(2, -1)
    if rank == 1:
        wait_for_peer_forward(flag_path)
    output = model(tokens, position_ids, None, labels=tokens)
    if rank == 0:
        open(flag_path, "w").close()
    output.float().mean().backward()
    return "done"


def bad_input_messages(rank: int, world_size: int) -> dict:
    """The errors a misconfigured run gets before its first step, by case."""
    harness.init_model_parallel()
    messages = {}

    def capture(case, fn):
        try:
            fn()
        except (ValueError, RuntimeError) as error:
            messages[case] = str(error)
        finally:
            megatron_gbl.disable()

    capture("sync_group_size=3 at DP=4",
            lambda: megatron_gbl.enable("global", sync_group_size=3))
    dense = harness.build_gpt_moe(harness.moe_config(num_moe_experts=None, moe_ffn_hidden_size=None,
                                                     moe_router_load_balancing_type="none"))
    capture("dense model", lambda: megatron_gbl.enable("global", model=dense))
    for case, overrides in {
        "sinkhorn": dict(moe_router_load_balancing_type="sinkhorn", moe_aux_loss_coeff=0.0),
        "none": dict(moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0),
        "coeff 0": dict(moe_aux_loss_coeff=0.0),
    }.items():
        model = harness.build_gpt_moe(harness.moe_config(**overrides))
        capture(case, lambda: megatron_gbl.enable("global", model=model))
    # Without a step boundary, even "micro" (no buffer) refuses to run rather than keep its
    # per-step statistics forever and never check or log them.
    model = harness.build_gpt_moe(harness.moe_config())
    router = harness.routers_of(model)[0]
    megatron_gbl.enable("micro")
    capture("no step boundary",
            lambda: router(torch.randn(4, 2, model.config.hidden_size))[0].sum().backward())
    megatron_gbl.enable("global")
    megatron_gbl.start_step(model, num_microbatches=1)
    for each in harness.routers_of(model):
        each(torch.randn(4, 2, model.config.hidden_size))
    router(torch.randn(4, 2, model.config.hidden_size))
    capture("counted twice", lambda: megatron_gbl.finish_step(model))
    # A TopKRouter subclass whose routing never calls TopKRouter.routing: no LBL at all.
    overriding = harness.build_gpt_moe(harness.moe_config())
    own = harness.routers_of(overriding)[1]
    own.__class__ = type("OwnRoutingRouter", (type(own),), {
        "routing": lambda self, logits, *args, **kwargs: torch.topk(logits.softmax(-1), 2)})
    megatron_gbl.enable("global")
    megatron_gbl.start_step(overriding, num_microbatches=1)
    for each in harness.routers_of(overriding):
        each(torch.randn(4, 2, overriding.config.hidden_size))
    capture("routing overridden without the base", lambda: megatron_gbl.finish_step(overriding))
    # As the MoE layers of a HybridModel's MTP layers are numbered (0.19): again from 1.
    twins = harness.build_gpt_moe(harness.moe_config())
    harness.routers_of(twins)[1].layer_number = 1
    capture("two MoE layers with one layer number",
            lambda: megatron_gbl.enable("global", model=twins))
    # Two chunks of one model (layers 1-2 and 3-4) whose MoE layers balance differently: an LBL
    # in one, expert bias alone in the other.
    later_chunk = harness.build_gpt_moe(harness.moe_config(**AUX_FREE))
    for each in harness.routers_of(later_chunk):
        each.layer_number += 2
    capture("MoE layers that balance differently",
            lambda: megatron_gbl.enable("global", model=[model, later_chunk]))
    aux_free = harness.build_gpt_moe(harness.moe_config(**AUX_FREE))
    megatron_gbl.enable("global")
    megatron_gbl.start_step(aux_free)
    harness.routers_of(aux_free)[0](torch.randn(4, 2, aux_free.config.hidden_size))
    capture("step never finished", lambda: megatron_gbl.start_step(aux_free))
    capture("before enable", lambda: megatron_gbl.start_step(model))
    return messages


def quantile_bad_input_messages(rank: int, world_size: int) -> dict:
    """The errors quantile balancing gets at its first training call (Megatron-Core 0.19+)."""
    harness.init_model_parallel()
    model = harness.build_gpt_moe(harness.moe_config(
        moe_router_load_balancing_type="quantile_balancing", moe_aux_loss_coeff=0.0))
    router = harness.routers_of(model)[0]
    messages = {}
    for case, (shape, padding_mask) in {  # [S, B] of the router input; 8 experts, top-2
            "a padding mask": ((4, 2), torch.zeros(4, 2, dtype=torch.bool)),
            "a micro-batch with N K not a multiple of E": ((3, 1), None)}.items():
        megatron_gbl.enable("global", model=model)
        megatron_gbl.start_step(model, num_microbatches=1)
        try:
            router(torch.randn(*shape, model.config.hidden_size), padding_mask)
        except ValueError as error:
            messages[case] = str(error)
        finally:
            megatron_gbl.disable()
    harness.destroy_model_parallel()
    return messages


def bias_router_steps(rank: int, world_size: int, spec: dict) -> dict:
    """Train-mode calls of one real sigmoid TopKRouter with expert bias (aux-loss-free).

    spec: scope (None = upstream's own once-per-step update through finalize_model_grads),
    microbatches, steps, seed, rate, sync_group_size, lbl_coeff (0: no LBL).
    Returns the expert bias after every step and, per call, the routing map and probs.
    """
    finalize = importlib.import_module("megatron.core.distributed.finalize_model_grads")
    if not harness.model_parallel_initialized():
        harness.init_model_parallel()
    config = harness.moe_config(
        moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
        moe_router_bias_update_rate=spec["rate"],
        moe_router_load_balancing_type="aux_loss" if spec.get("lbl_coeff") else "none",
        moe_aux_loss_coeff=spec.get("lbl_coeff", 0.0))
    model = harness.build_gpt_moe(config)
    router = harness.routers_of(model)[0]
    if spec.get("dead_expert"):
        router.weight.data[DEAD_EXPERT] = -100.0
    if spec["scope"] is not None:
        megatron_gbl.enable(spec["scope"], sync_group_size=spec.get("sync_group_size"),
                            model=model)
    biases, calls = [], []
    for step in range(spec["steps"]):
        hidden, _ = step_data(dict(spec, padded=False), step, world_size, config.hidden_size)
        with (megatron_gbl.step(model, spec["microbatches"]) if spec["scope"] is not None
              else contextlib.nullcontext()):
            for k in range(spec["microbatches"]):
                probs, routing_map = router(hidden[k][rank])
                (probs * 0).sum().backward()
                calls.append({"routing_map": routing_map.clone(), "probs": probs.detach().clone()})
        if spec["scope"] is None:
            finalize._update_router_expert_bias([model], config)
            router.local_tokens_per_expert.zero_()  # as finalize_model_grads does (0.15+)
        biases.append(router.expert_bias.detach().clone())
    step_values = megatron_gbl.step_metrics(model).values if spec["scope"] else None
    balance = megatron_gbl.balance_bsz(model).get(router.layer_number) if spec["scope"] else None
    megatron_gbl.disable()
    return {"biases": biases, "calls": calls, "weight": router.weight.detach().clone(),
            "metrics": step_values, "balance": balance}


def bias_router_runs(rank: int, world_size: int, specs: list) -> list:
    return [bias_router_steps(rank, world_size, spec) for spec in specs]


AUX_FREE = dict(moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
                moe_router_bias_update_rate=1e-2, moe_router_load_balancing_type="none",
                moe_aux_loss_coeff=0.0)


def _train(model, optimizer, step_seeds, spec, fail_call=None, die_at_call=None) -> None:
    """Optimizer steps through get_forward_backward_func, DP-averaged gradients, as DDP does.

    optimizer None: gradients only. spec["lm_loss"] False keeps only the aux gradients.
    fail_call / die_at_call: when the forward step of that micro-batch (0-based) starts, it
    raises / this process exits.
    """
    import os

    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    position_ids = torch.arange(spec["seq"]).unsqueeze(0).expand(spec["bsz"], -1)

    for seed in step_seeds:
        calls = []

        def forward_step(data_iterator, model):
            if len(calls) == die_at_call:
                os._exit(1)  # dies mid-step, no clean-up, like a crashed rank
            if len(calls) == fail_call:
                raise RuntimeError("injected failure")
            calls.append(None)
            tokens = next(data_iterator)
            output = model(tokens, position_ids, None, labels=tokens)
            # lm_loss False: a zero main loss, so only the aux gradients flow (Megatron's trick).
            scale = 1.0 if spec.get("lm_loss", True) else 0.0
            return output, lambda output_tensor: (output_tensor.float().mean() * scale, {})

        # Data by data-parallel rank: every pipeline stage of a replica reads the same batches.
        data = make_tokens(seed, spec["microbatches"], parallel_state.get_data_parallel_world_size(),
                           spec["seq"], spec["bsz"], 64)
        dp_rank = parallel_state.get_data_parallel_rank()
        model.zero_grad(set_to_none=True)
        get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter([d[dp_rank] for d in data]),
            model=model, num_microbatches=spec["microbatches"], seq_length=spec["seq"],
            micro_batch_size=spec["bsz"], forward_only=False)
        for param in model.parameters():
            if param.grad is not None:
                dist.all_reduce(param.grad, op=dist.ReduceOp.AVG,
                                group=parallel_state.get_data_parallel_group())
        if optimizer is not None:
            optimizer.step()


def balancing_bias(router):
    """The router's per-expert bias: the expert bias, or quantile balancing's (0.19+), or None."""
    if router.expert_bias is not None:
        return router.expert_bias
    return compat.qb_bias(router) if getattr(router, "qb_beta", None) is not None else None


def _fresh(spec: dict, init_seed: int = 0):
    """A GPT-MoE of spec["config"] with the plugin at spec["scope"] (and spec["settings"]), and
    its Adam optimizer."""
    model = harness.build_gpt_moe(harness.moe_config(**spec["config"]), vocab_size=64,
                                  max_sequence_length=spec["seq"], seed=init_seed)
    megatron_gbl.enable(spec["scope"], model=model, **spec.get("settings", {}))
    return model, torch.optim.Adam(model.parameters(), lr=1e-2)


def trained_state(rank: int, world_size: int, spec: dict) -> dict:
    """The state dict after spec["steps"] optimizer steps (see `_fresh`, `_train`)."""
    if not harness.model_parallel_initialized():
        harness.init_model_parallel()
    model, optimizer = _fresh(spec)
    _train(model, optimizer, range(spec["steps"]), spec)
    megatron_gbl.disable()
    return _tensors(model.state_dict())


def resume_run(rank: int, world_size: int, spec: dict) -> dict:
    """The same training run twice: uninterrupted, and saved after `first` steps then resumed
    in a freshly built model (other initial weights) with a fresh plugin, as after a restart.

    spec: scope, config overrides, steps, first, microbatches, seq, bsz, ckpt_dir.
    Returns both runs' final state dicts and what the resumed model held right after loading.
    """
    import os

    uninterrupted = trained_state(rank, world_size, spec)
    model, optimizer = _fresh(spec)
    _train(model, optimizer, range(spec["first"]), spec)
    path = os.path.join(spec["ckpt_dir"], f"rank{rank}.pt")
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, path)
    saved_bias = [balancing_bias(r).clone() for r in harness.routers_of(model)]
    megatron_gbl.disable()

    model, optimizer = _fresh(spec, init_seed=1)  # other weights: only the checkpoint matters
    checkpoint = torch.load(path, weights_only=False)
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    loaded_bias = [balancing_bias(r).clone() for r in harness.routers_of(model)]
    _train(model, optimizer, range(spec["first"], spec["steps"]), spec)
    resumed = _tensors(model.state_dict())
    megatron_gbl.disable()
    return {"uninterrupted": uninterrupted, "resumed": resumed, "saved_bias": saved_bias,
            "loaded_bias": loaded_bias}


def layout_grads(rank: int, world_size: int, spec: dict) -> dict:
    """One step of a 4-layer GPT-MoE at pipeline size spec["pp"] (1F1B when 2) with weights set
    from their global names, so every layout holds the same model: {global name: DP-averaged
    gradient} of this rank's stage (data-parallel rank 0 only)."""
    import zlib

    from megatron.core import parallel_state

    harness.init_model_parallel(pipeline_model_parallel_size=spec["pp"])
    model = harness.build_gpt_moe(harness.moe_config(num_layers=4, **spec.get("config", {})),
                                  vocab_size=64, max_sequence_length=spec["seq"])
    names = _global_names(model)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 1:  # norms: the usual identity start
                param.fill_(1.0 if name.endswith("weight") else 0.0)
            else:
                generator = torch.Generator().manual_seed(zlib.crc32(names[name].encode()))
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
    megatron_gbl.enable(spec["scope"], model=model)
    _train(model, None, [3], spec)
    megatron_gbl.disable()
    if parallel_state.get_data_parallel_rank() != 0:
        return {}
    return {names[name]: param.grad.clone() for name, param in model.named_parameters()
            if param.grad is not None}


def _global_names(model) -> dict:
    """Parameter name -> the same name with the layer's global index (pipeline stages number
    their layers from 0)."""
    names = {}
    for name, _ in model.named_parameters():
        parts = name.split(".")
        if parts[:2] == ["decoder", "layers"]:
            parts[2] = str(model.decoder.layers[int(parts[2])].layer_number - 1)
        names[name] = ".".join(parts)
    return names


def _tensors(state_dict: dict) -> dict:
    return {k: v.clone() for k, v in state_dict.items() if isinstance(v, torch.Tensor)}


def failing_step_run(rank: int, world_size: int, spec: dict) -> dict:
    """Step A raises at its micro-batch `fail_call`, step B runs; against B alone, same start.

    Returns the router gradients and expert biases after B, for both runs.
    """
    if not harness.model_parallel_initialized():
        harness.init_model_parallel()
    config = harness.moe_config(**spec["config"])
    runs = {}
    for label, steps in (("after_failed_step", [("A", spec["fail_call"]), ("B", None)]),
                         ("alone", [("B", None)])):
        model = harness.build_gpt_moe(config, vocab_size=64, max_sequence_length=spec["seq"])
        megatron_gbl.enable(spec["scope"], model=model)
        for name, fail_call in steps:
            try:
                _train(model, None, [{"A": 10, "B": 11}[name]], spec, fail_call=fail_call)
            except RuntimeError as error:
                assert "injected failure" in str(error), error
        routers = harness.routers_of(model)
        runs[label] = {"grads": [r.weight.grad.clone() for r in routers],
                       "biases": [r.expert_bias.clone() for r in routers]}
        megatron_gbl.disable()
    return runs


def nan_logits_run(rank: int, world_size: int, spec: dict) -> dict:
    """NaN router input in MoE layer 2 at step `nan_step`: the error the step raised, the steps
    done before it, and the expert biases after it (None without expert bias)."""
    if not harness.model_parallel_initialized():
        harness.init_model_parallel()
    config = harness.moe_config(**spec.get("config", {}))
    model = harness.build_gpt_moe(config, vocab_size=64, max_sequence_length=spec["seq"])
    megatron_gbl.enable(spec["scope"], model=model)
    routers = harness.routers_of(model)
    steps_done = []
    routers[1].register_forward_pre_hook(
        lambda module, args: (args[0] * float("nan"),) + args[1:]
        if len(steps_done) == spec["nan_step"] else None)
    error = None
    for seed in range(spec["steps"]):
        try:
            _train(model, None, [seed], spec)
        except FloatingPointError as raised:
            error = str(raised)
            break
        steps_done.append(seed)
    bias = [r.expert_bias.clone() for r in routers] \
        if config.moe_router_enable_expert_bias else None
    megatron_gbl.disable()
    return {"error": error, "steps_done": len(steps_done), "bias": bias}


def die_mid_step(rank: int, world_size: int, init_file: str, result_file: str,
                 timeout_s: float) -> None:
    """Rank 1 dies after the first micro-batch of step 2; rank 0 writes what it raised.

    Runs in its own process (not through harness.run_gloo, which stops at the first death).
    """
    import datetime
    import json
    import os
    import time

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world_size, timeout=datetime.timedelta(seconds=timeout_s))
    harness.install_cpu_shims()
    harness.init_model_parallel()
    spec = dict(microbatches=3, seq=8, bsz=2)
    model = harness.build_gpt_moe(harness.moe_config(), vocab_size=64, max_sequence_length=8)
    megatron_gbl.enable("global", model=model)
    _train(model, None, [1], spec)
    started = time.monotonic()
    outcome = {"error": None}
    try:
        _train(model, None, [2], spec, die_at_call=1 if rank == 1 else None)
    except Exception as error:  # noqa: BLE001 - reported to the test
        outcome = {"error": f"{type(error).__name__}: {error}"}
    outcome["seconds"] = time.monotonic() - started
    with open(result_file, "w") as f:
        json.dump(outcome, f)
    os._exit(0)  # the peer is gone: skip the process group's shutdown


def out_of_place_score_adds(rank: int, world_size: int, spec: dict) -> dict:
    """Per variant of benchmarks.router_bench: the out-of-place adds of [T, E] tensors (a new
    [T, E] buffer each) in one step of `routing` calls, seen by torch.profiler.

    spec: experts, seq, bsz, microbatches.
    """
    from types import SimpleNamespace

    from benchmarks import router_bench
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler
    from torch.profiler import ProfilerActivity, profile

    harness.init_model_parallel()
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0 / spec["microbatches"]))
    args = SimpleNamespace(hidden=16, topk=4, device="cpu")
    routers = router_bench.make_routers(args, spec["experts"])
    inputs = [torch.randn(spec["seq"], spec["bsz"], spec["experts"]).requires_grad_()
              for _ in range(spec["microbatches"])]
    score_numel = spec["seq"] * spec["bsz"] * spec["experts"]
    adds = {}
    for variant in router_bench.VARIANTS:
        router = router_bench.configure(variant, routers)
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            router_bench.train_step(variant, router, "routing", inputs)
        adds[variant] = sum(event.name == "aten::add"
                            and math.prod(event.input_shapes[0]) == score_numel
                            for event in prof.events())
    megatron_gbl.disable()
    return adds


def balance_block_timeout(rank: int, world_size: int, spec: dict) -> dict:
    """Megatron's groups with --distributed-timeout-minutes spec["minutes"], a balance block of
    all ranks (sync_group_size = world_size): the block's timeout; how long rank 0's count sum
    over it took to fail while rank 1 stalled; whether disable() destroyed the block."""
    import time

    from megatron.core import parallel_state
    from megatron_gbl import comm, steps

    parallel_state.initialize_model_parallel(distributed_timeout_minutes=spec["minutes"])
    model = harness.build_gpt_moe(harness.moe_config())
    megatron_gbl.enable("global", sync_group_size=world_size, model=model)
    block = steps.sync_group(harness.routers_of(model)[0], steps.phase())
    timeout = block._get_backend(torch.device("cpu")).options._timeout
    ranks = dist.get_process_group_ranks(block)
    failed_after = None
    if rank == 0:
        started = time.monotonic()
        try:
            comm.PendingSum(torch.ones(2), block, what="the test's count sum").wait()
        except comm.CollectiveError:
            failed_after = time.monotonic() - started
    else:
        time.sleep(spec["stall_s"])
    dist.barrier()  # the world group keeps the harness's timeout
    megatron_gbl.disable()
    try:
        dist.get_process_group_ranks(block)
        destroyed = False
    except KeyError:  # torch forgot it: destroyed
        destroyed = True
    return {"timeout_s": timeout.total_seconds(), "ranks": ranks, "failed_after": failed_after,
            "destroyed": destroyed}


def cuda_graph_rejections(rank: int, world_size: int, spec: dict) -> dict:
    """A GPT-MoE whose config has CUDA graphs (spec: TransformerConfig overrides): the error of
    enable(model=...) and of the first training step after a plain enable()."""
    harness.init_model_parallel()
    model = harness.build_gpt_moe(harness.moe_config(**spec), vocab_size=64,
                                  max_sequence_length=8)
    errors = {}
    for when in ("enable", "first step"):
        try:
            if when == "enable":
                megatron_gbl.enable("global", model=model)
            else:
                megatron_gbl.enable("global")
                _train(model, None, [0], dict(microbatches=2, seq=8, bsz=2))
        except ValueError as error:
            errors[when] = str(error)
        finally:
            megatron_gbl.disable()
    return errors


def sums_over_groups(rank: int, world_size: int) -> dict:
    """comm.all_reduce_sums over 4 ranks: the world group, another group of the same ranks,
    pairs of ranks, and no group; the sums and how many all-reduces it issued."""
    from megatron_gbl import comm

    same_ranks = dist.new_group(list(range(world_size)))
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    calls = []
    real_all_reduce = dist.all_reduce

    def all_reduce(*args, **kwargs):
        calls.append(None)
        return real_all_reduce(*args, **kwargs)

    dist.all_reduce = all_reduce
    try:
        sums = comm.all_reduce_sums([
            (torch.full((2, 3), float(rank + 1)), dist.group.WORLD),
            (torch.full((4,), 10.0 * (rank + 1)), pairs[rank // 2]),
            (torch.full((1,), 100.0 * (rank + 1)), same_ranks),
            (torch.full((2,), float(rank)), None)])
    finally:
        dist.all_reduce = real_all_reduce
    return {"sums": sums, "collectives": len(calls)}


def waits_per_reader(rank: int, world_size: int, readers: int) -> int:
    """How often the work of one count sum is waited on when `readers` read its result."""
    from megatron_gbl import comm

    waits = []
    real_all_reduce = dist.all_reduce

    class CountedWork:
        def __init__(self, work):
            self.work = work

        def wait(self):
            waits.append(None)
            return self.work.wait()

    def all_reduce(*args, **kwargs):
        return CountedWork(real_all_reduce(*args, **kwargs))

    dist.all_reduce = all_reduce
    try:
        pending = comm.PendingSum(torch.ones(3) * (rank + 1), dist.group.WORLD)
        results = [pending.wait() for _ in range(readers)]
    finally:
        dist.all_reduce = real_all_reduce
    assert all(torch.equal(result, torch.full((3,), 3.0)) for result in results)
    return len(waits)


def blocks_from_router_groups(rank: int, world_size: int) -> dict:
    """Routers with their own TP x DP x CP group (this rank alone, as a model built with its own
    process groups could have): the error when the balance blocks were cut from Megatron's
    parallel_state group, and the block's ranks when enable(model=...) cut them from the
    routers' group."""
    from megatron_gbl import steps

    harness.init_model_parallel()
    model = harness.build_gpt_moe(harness.moe_config(), vocab_size=64, max_sequence_length=8)
    own_groups = [dist.new_group([r]) for r in range(world_size)]
    for router in harness.routers_of(model):
        router.tp_dp_cp_group = own_groups[rank]
    spec = dict(microbatches=2, seq=8, bsz=2)
    megatron_gbl.enable("dp", sync_group_size=1)
    try:
        _train(model, None, [0], spec)
        error = None
    except RuntimeError as failure:
        error = str(failure)
    megatron_gbl.disable()
    megatron_gbl.enable("dp", sync_group_size=1, model=model)
    _train(model, None, [0], spec)
    block = steps.sync_group(harness.routers_of(model)[0], steps.phase())
    ranks = dist.get_process_group_ranks(block)
    megatron_gbl.disable()
    return {"error": error, "block_ranks": ranks}


def megatron_lm_training(rank: int, world_size: int, argv: list) -> None:
    """One rank of `python -m megatron_gbl.launch ENTRY ARGS...` (the launcher's own `main`)
    through Megatron-LM's training loop on CPU: the process group is run_gloo's, the rest is
    Megatron-LM's (it takes an initialized group as it finds it)."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))
    harness.install_megatron_lm_shims()
    launch.main([str(arg) for arg in argv])


def launcher_outcome(rank: int, world_size: int, argv: list, cpu_shims: bool) -> tuple[int, str]:
    """(exit status, stderr) of `python -m megatron_gbl.launch ARGV...` for a run that stops
    before training, in this process: what the interpreter would print and return. With
    `cpu_shims`, the installed megatron.training's (up to 0.17 it validates the arguments
    after checking for CUDA)."""
    if cpu_shims:
        harness.install_megatron_lm_shims()
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        try:
            launch.main([str(arg) for arg in argv])
            return 0, stderr.getvalue()
        except SystemExit as exit_:  # argparse's status, or the launcher's message
            if isinstance(exit_.code, str):
                return 1, stderr.getvalue() + exit_.code
            return exit_.code or 0, stderr.getvalue()
        except Exception:  # noqa: BLE001 - the traceback the interpreter would print
            return 1, stderr.getvalue() + traceback.format_exc()


def feature_model_steps(rank: int, world_size: int, spec: dict) -> dict:
    """Steps of a GPT-MoE (with multi-token prediction when config sets mtp_num_layers) or of a
    HybridModel (spec["pattern"]) through get_forward_backward_func, on data-parallel ranks.

    spec: scope (None: upstream), pattern, config (overrides), microbatches, step_seeds, seq,
    bsz, lm_loss, own_lbl_only (every router's input is recorded and detached: with lm_loss
    False, a router's weight gradient is then that of its own LBL alone). With scope None and
    expert bias, upstream's once-per-step update (finalize_model_grads) runs after each step.
    Returns per router, in model order: its layer index, calls per micro-batch, weight, DP-averaged
    gradient, expert bias after each step, and its inputs per call of the last step; every
    parameter's gradient; the aux-loss tracker's values. An `enable` that refuses the model
    returns {"error": message}.
    """
    finalize = importlib.import_module("megatron.core.distributed.finalize_model_grads")
    if not harness.model_parallel_initialized():
        harness.init_model_parallel()
    config = harness.moe_config(**spec.get("config", {}))
    if spec.get("pattern"):
        model = harness.build_hybrid_moe(config, spec["pattern"], max_sequence_length=spec["seq"])
    else:
        model = harness.build_gpt_moe(config, max_sequence_length=spec["seq"])
    if spec["scope"] is not None:
        try:
            megatron_gbl.enable(spec["scope"], model=model)
        except ValueError as error:
            megatron_gbl.disable()
            return {"error": str(error)}
    routers = harness.routers_of(model)
    inputs = [[] for _ in routers]
    if spec.get("own_lbl_only"):
        for router, record in zip(routers, inputs):
            router.register_forward_pre_hook(functools.partial(_record_and_detach, record))
    compat.clear_tracker()
    biases = [[] for _ in routers]
    for seed in spec["step_seeds"]:
        for record in inputs:
            record.clear()
        _train(model, None, [seed], spec)
        if spec["scope"] is None and config.moe_router_enable_expert_bias:
            finalize._update_router_expert_bias([model], config)
            for router in routers:
                router.local_tokens_per_expert.zero_()  # as finalize_model_grads does (0.15+)
        if config.moe_router_enable_expert_bias:
            for router, per_step in zip(routers, biases):
                per_step.append(router.expert_bias.detach().clone())
    logged = compat.tracker_values()
    grads = {name: param.grad.detach().clone() for name, param in model.named_parameters()
             if param.grad is not None}
    result = {"routers": [
        {"layer": compat.layer_index(router),
         "calls_per_microbatch": compat.calls_per_microbatch(router),
         "weight": router.weight.detach().clone(),
         "grad": None if router.weight.grad is None else router.weight.grad.detach().clone(),
         "biases": per_step, "inputs": record}
        for router, per_step, record in zip(routers, biases, inputs)],
        "grads": grads, "logged": logged}
    megatron_gbl.disable()
    return result


def _record_and_detach(record: list, module, args):
    """Forward pre-hook of a router: keep a training call's input, and cut the gradient path
    through it, so no later layer's loss reaches this router's weight through the hidden states."""
    if not (module.training and torch.is_grad_enabled()):
        return None
    record.append(args[0].detach().clone())
    return (args[0].detach(),) + args[1:]


def feature_model_runs(rank: int, world_size: int, specs: list) -> list:
    return [feature_model_steps(rank, world_size, spec) for spec in specs]
