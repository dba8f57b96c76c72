"""Run real Megatron-Core MoE models on CPU with gloo: for tests, the demo and benchmarks.

Megatron-Core assumes CUDA in a few places that have nothing to do with load balancing.
`install_cpu_shims()` patches exactly those, reversibly. The plugin's runtime path never
imports this module.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import inspect
import io
import os
import queue
import tempfile
import time
import traceback
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

_SHIMS: list[tuple[object, str, object]] = []
# Factory functions Megatron calls with device="cuda" (schedules, causal masks).
_FACTORIES = ("empty", "full", "ones", "zeros", "tensor", "arange", "rand", "randn", "randint")


def _on_cpu(factory):
    def factory_on_cpu(*args, **kwargs):
        device = kwargs.get("device")
        if device is not None and torch.device(device).type == "cuda":
            kwargs["device"] = "cpu"
        return factory(*args, **kwargs)

    return factory_on_cpu


def _set(owner, name, value):
    _SHIMS.append((owner, name, getattr(owner, name, None)))
    setattr(owner, name, value)


def install_cpu_shims() -> None:
    """Make Megatron-Core's CUDA-only helpers work on CPU (idempotent)."""
    if _SHIMS:
        return
    from megatron.core import tensor_parallel, utils
    from megatron.core.tensor_parallel import random as megatron_random
    from megatron.core.transformer.moe import moe_utils

    _set(torch.cuda, "current_device", lambda: torch.device("cpu"))
    # Megatron keeps a scratch buffer on the current CUDA device for sequence-parallel gathers.
    _set(
        utils.GlobalMemoryBuffer,
        "get_tensor",
        lambda self, shape, dtype, name, *a, **k: torch.empty(shape, dtype=dtype),
    )
    tracker_cls = type(tensor_parallel.get_cuda_rng_tracker())
    _set(tracker_cls, "fork", lambda self, *a, **k: contextlib.nullcontext())
    # Activation recompute saves and restores the CUDA RNG; the CPU RNG is handled by Megatron.
    _set(megatron_random, "_get_cuda_rng_state", lambda *a, **k: torch.empty(0))
    _set(megatron_random, "_set_cuda_rng_state", lambda *a, **k: None)
    if not hasattr(moe_utils, "te_general_gemm"):
        # 0.13-0.16 name this symbol only when Transformer Engine imports.
        _set(moe_utils, "te_general_gemm", None)
    _set(torch.Tensor, "cuda", lambda self, *a, **k: self)
    _accept_cpu_params_in_fp16_optimizer()
    _set(torch.cuda, "synchronize", lambda *a, **k: None)  # pipeline p2p waits on streams
    for name in _FACTORIES:
        _set(torch, name, _on_cpu(getattr(torch, name)))


def _accept_cpu_params_in_fp16_optimizer() -> None:
    """Megatron's Float16OptimizerWithFloat16Params sorts its parameters by type name and takes
    only "torch.cuda.*Tensor": while it does, CPU tensors answer with the CUDA names."""
    from megatron.core.optimizer.optimizer import Float16OptimizerWithFloat16Params

    original = Float16OptimizerWithFloat16Params.__init__

    def __init__(self, *args, **kwargs):
        tensor_type = torch.Tensor.type

        def cuda_named(tensor, *type_args, **type_kwargs):
            if type_args or type_kwargs:
                return tensor_type(tensor, *type_args, **type_kwargs)
            return tensor_type(tensor).replace("torch.", "torch.cuda.", 1)

        torch.Tensor.type = cuda_named
        try:
            original(self, *args, **kwargs)
        finally:
            torch.Tensor.type = tensor_type

    _set(Float16OptimizerWithFloat16Params, "__init__", __init__)


class _NoStream:
    """Stand-in for a CUDA stream or event: on CPU all work runs in order, nothing to wait for."""

    def __init__(self, *args, **kwargs):
        pass

    def __getattr__(self, name):  # wait_stream, wait_event, record, synchronize, ...
        return lambda *args, **kwargs: None

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


def install_cuda_runtime_shims() -> None:
    """`install_cpu_shims` plus the CUDA runtime calls of a whole training loop (Megatron-LM's
    `megatron.training`): one device, its RNG state, streams and events (idempotent)."""
    install_cpu_shims()
    if torch.cuda.Stream is _NoStream:
        return
    _set(torch.cuda, "device_count", lambda: 1)  # Megatron-LM builds model parallel only if > 0
    _set(torch.cuda, "set_device", lambda *a, **k: None)
    _set(torch.nn.Module, "cuda", lambda self, *a, **k: self)
    _set(torch.cuda, "get_rng_state", lambda *a, **k: torch.empty(0, dtype=torch.uint8))
    _set(torch.cuda, "set_rng_state", lambda *a, **k: None)
    _set(torch.cuda, "manual_seed", lambda *a, **k: None)
    _set(torch.cuda, "Stream", _NoStream)
    _set(torch.cuda, "Event", _NoStream)
    _set(torch.cuda, "current_stream", lambda *a, **k: _NoStream())
    _set(torch.cuda, "stream", lambda *a, **k: contextlib.nullcontext())


def install_megatron_lm_shims() -> None:
    """`install_cuda_runtime_shims` plus the two CUDA-only steps of Megatron-LM's
    `initialize_megatron` (idempotent). `megatron.training` must be importable: the installed
    wheel's (0.17 on) or a checkout's on sys.path."""
    install_cuda_runtime_shims()
    import megatron.training.initialize as initialize
    import megatron.training.training as training

    if isinstance(training.initialize_megatron, functools.partial):
        return
    # pretrain() asserts "Megatron requires CUDA" unless initialize_megatron(allow_no_cuda=True).
    _set(training, "initialize_megatron",
         functools.partial(training.initialize_megatron, allow_no_cuda=True))
    # It would run `make` for the dataset helpers (the wheels ship them built) and need CUDA.
    _set(initialize, "_compile_dependencies", lambda: None)
    # Warms up fused GPU kernels through torch.compile, which on CPU builds C++ for seconds per
    # rank; runs on CPU turn those fusions off (--no-bias-gelu-fusion, --no-bias-dropout-fusion).
    _set(training, "set_jit_fusion_options", lambda *args, **kwargs: None)


def uninstall_cpu_shims() -> None:
    """Restore everything `install_cpu_shims` (and `install_cuda_runtime_shims`) changed."""
    while _SHIMS:
        owner, name, value = _SHIMS.pop()
        setattr(owner, name, value)


def simulate_expert_parallel_token_groups(size: int) -> None:
    """The plugin's device statistics as under expert parallelism of `size`, without sharding
    the experts: blocks of `size` consecutive ranks become the token group of one all-to-all
    (megatron_gbl.compat.token_group; with real expert parallelism it is the dispatcher's
    tp_ep group, `size` consecutive data-parallel ranks at TP 1). Only the device-level LBL and
    micro_batch_device_load_violation read that group; routing, dispatch and the experts stay
    as they are. A collective (every rank builds every block); reversed by uninstall_cpu_shims.
    """
    from megatron_gbl import compat

    rank, world_size = dist.get_rank(), dist.get_world_size()
    blocks = [dist.new_group(list(range(start, start + size)))
              for start in range(0, world_size, size)]
    _set(compat, "token_group", lambda moe_layer, group=blocks[rank // size]: group)


def run_gloo(fn: Callable, world_size: int, *args, timeout_s: float = 600.0,
             preload: tuple[str, ...] = ()) -> list:
    """Run `fn(rank, world_size, *args)` in `world_size` fresh processes joined by gloo.

    `fn` must be importable: the ranks are forked from a server process, not from this one.
    `preload` names modules for that server to import too, if this call starts it (the first
    of the session). Returns each rank's return value; raises with the failing rank's
    traceback, or when the run outlives `timeout_s`.
    """
    ctx = mp.get_context("forkserver")
    # Ranks fork from one server that imported torch and Megatron-Core once per session,
    # instead of each spawned rank importing them again (seconds per process, per run).
    ctx.set_forkserver_preload(["megatron_gbl_lab.quiet", "megatron_gbl.patch",
                                "megatron_gbl_lab.harness", *preload])
    results = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        procs = [
            ctx.Process(target=_worker, args=(fn, rank, world_size, init_file, results, args))
            for rank in range(world_size)
        ]
        for proc in procs:
            proc.start()
        outcome: dict[int, tuple[bool, object]] = {}
        deadline = time.monotonic() + timeout_s
        try:
            while len(outcome) < world_size:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"run_gloo: {fn.__name__} did not finish in {timeout_s}s")
                try:
                    rank, ok, value = results.get(timeout=min(remaining, 5.0))
                except queue.Empty:
                    dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                    if dead and len(outcome) < world_size and results.empty():
                        raise RuntimeError(f"run_gloo: a rank died with exit code {dead[0]}")
                    continue
                outcome[rank] = (ok, value)
                if not ok:
                    raise RuntimeError(f"rank {rank} failed:\n{value}")
        finally:
            for proc in procs:
                proc.join(timeout=10)
                if proc.is_alive():
                    proc.kill()
    return [torch.load(io.BytesIO(outcome[rank][1]), weights_only=False)
            for rank in range(world_size)]


def join_gloo(init_file: str, rank: int, world_size: int) -> None:
    """Make this process rank `rank` of a gloo group that meets at `init_file`, one thread,
    with the CPU shims. `run_gloo`'s ranks call it; so does a tool that must run in this very
    process (callgrind counts the process it started)."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
        timeout=datetime.timedelta(seconds=300),
    )
    install_cpu_shims()


def _worker(fn, rank, world_size, init_file, results, args):
    try:
        join_gloo(init_file, rank, world_size)
        # Bytes, not tensors: shared-memory tensors die with the process that made them.
        payload = io.BytesIO()
        torch.save(fn(rank, world_size, *args), payload)
        results.put((rank, True, payload.getvalue()))
    except BaseException:  # noqa: BLE001 - the parent re-raises it with the traceback
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def init_model_parallel(tensor_model_parallel_size: int = 1, pipeline_model_parallel_size: int = 1,
                        context_parallel_size: int = 1,
                        virtual_pipeline_model_parallel_size: Optional[int] = None,
                        expert_model_parallel_size: int = 1,
                        expert_tensor_parallel_size: Optional[int] = None) -> None:
    """Megatron's initialize_model_parallel; expert_tensor_parallel_size None: the TP size."""
    from megatron.core import parallel_state

    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        context_parallel_size=context_parallel_size,
        virtual_pipeline_model_parallel_size=virtual_pipeline_model_parallel_size,
        expert_model_parallel_size=expert_model_parallel_size,
        expert_tensor_parallel_size=expert_tensor_parallel_size,
    )


def destroy_model_parallel() -> None:
    """Megatron's destroy_model_parallel, so that the next init_model_parallel in this process
    starts clean: 0.12 leaves the position-embedding ranks behind, and a later layout whose
    position-embedding group leaves this rank out would still count it a member."""
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if hasattr(parallel_state, "_POSITION_EMBEDDING_GLOBAL_RANKS"):
        parallel_state._POSITION_EMBEDDING_GLOBAL_RANKS = None


def model_parallel_initialized() -> bool:
    from megatron.core import parallel_state

    return parallel_state.model_parallel_is_initialized()


def moe_config(**overrides):
    """A tiny GPT-MoE TransformerConfig that runs on CPU (the allgather dispatcher)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    kwargs = dict(
        num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64,
        num_moe_experts=8, moe_router_topk=2, moe_ffn_hidden_size=64,
        moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=1e-2,
        moe_token_dispatcher_type="allgather", use_cpu_initialization=True,
        add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0,
        pipeline_dtype=torch.float32,
    )
    if model_parallel_initialized():
        from megatron.core import parallel_state

        # The layout initialize_model_parallel set up (without it every pipeline stage would
        # build all the layers). Megatron trains MoE layers under TP only with sequence
        # parallelism.
        tp = parallel_state.get_tensor_model_parallel_world_size()
        vpp = parallel_state.get_virtual_pipeline_model_parallel_world_size()
        kwargs.update(
            tensor_model_parallel_size=tp, sequence_parallel=tp > 1,
            pipeline_model_parallel_size=parallel_state.get_pipeline_model_parallel_world_size(),
            virtual_pipeline_model_parallel_size=vpp,
            context_parallel_size=parallel_state.get_context_parallel_world_size(),
            expert_model_parallel_size=parallel_state.get_expert_model_parallel_world_size(),
            expert_tensor_parallel_size=parallel_state.get_expert_tensor_parallel_world_size(),
        )
        if vpp is not None:
            # Megatron-LM's p2p settings for the interleaved schedule (overlap on, so no
            # batching). Megatron-Core's default batches a step's sends and receives; at PP 2,
            # where the previous and the next rank are the same, a batch then pairs the
            # activation sent forward with the gradient received backward (both the same
            # shape), which Megatron-LM's validate_args forbids.
            kwargs.update(overlap_p2p_comm=True, batch_p2p_comm=False)
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def build_gpt_moe(config, vocab_size: int = 64, max_sequence_length: int = 64, seed: int = 0,
                  vp_stage: Optional[int] = None):
    """A real Megatron-Core GPTModel with MoE layers: this rank's pipeline stage, or its model
    chunk `vp_stage` under a virtual pipeline (interleaved schedule), and its
    multi-token-prediction block when `config.mtp_num_layers` is set.

    Layers are dense or MoE as `config.moe_layer_freq` says (Megatron's decoder block spec,
    local modules), split over the stages as Megatron splits them (uneven first / last stages
    included). Under context parallelism the core attention is `ContextParallelAttention`
    (Megatron's local attention has none), under sequence parallelism the norms are
    `SequenceParallelLayerNorm` (torch's, as Megatron wraps it, refuses it). Weights are
    identical on every data-parallel rank.
    """
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_decoder_block_spec, get_gpt_layer_local_spec)

    stage = {} if vp_stage is None else {"vp_stage": vp_stage}
    if stage and "vp_stage" not in inspect.signature(get_gpt_decoder_block_spec).parameters:
        # 0.12 builds the chunk of the virtual rank set in parallel_state (Megatron-LM's
        # get_model did so), and its GPTModel takes no vp_stage.
        parallel_state.set_virtual_pipeline_model_parallel_rank(vp_stage)
        stage = {}
    block_spec = get_gpt_decoder_block_spec(config, use_transformer_engine=False, **stage)
    for layer_spec in block_spec.layer_specs:
        if config.context_parallel_size > 1:
            layer_spec.submodules.self_attention.submodules.core_attention = \
                ContextParallelAttention
        if config.sequence_parallel:
            layer_spec.submodules.input_layernorm = SequenceParallelLayerNorm
            layer_spec.submodules.pre_mlp_layernorm = SequenceParallelLayerNorm
    if config.sequence_parallel:
        block_spec.layer_norm = SequenceParallelLayerNorm
    mtp = {}
    if getattr(config, "mtp_num_layers", None):
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_mtp_block_spec

        mtp["mtp_block_spec"] = get_gpt_mtp_block_spec(
            config, get_gpt_layer_local_spec(num_experts=config.num_moe_experts),
            use_transformer_engine=False)
    torch.manual_seed(seed)
    model = GPTModel(
        config=config,
        transformer_layer_spec=block_spec,
        vocab_size=vocab_size,
        max_sequence_length=max_sequence_length,
        pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, **stage),
        post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, **stage),
        **stage, **mtp,
    )
    return _as_float16_module_would(model, config)


def build_hybrid_moe(config, pattern: str, vocab_size: int = 64, max_sequence_length: int = 64,
                     seed: int = 0):
    """A real Megatron-Core HybridModel (0.18+) whose layers follow `pattern`: '*' attention,
    'E' MoE (config.num_layers = the decoder's layers), then '/' and the layers of each
    multi-token-prediction depth (config.mtp_num_layers = the depths).

    Upstream's hybrid_stack_spec is built from Transformer Engine modules only, so the '*' and
    'E' layers here are the attention and MoE halves of the local GPT layer spec, and the stack's
    final norm, which HybridStack builds as TENorm whatever the spec, is that spec's local norm.
    """
    from megatron.core import parallel_state
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.hybrid import hybrid_block
    from megatron.core.models.hybrid.hybrid_model import HybridModel
    from megatron.core.tensor_parallel import ColumnParallelLinear
    from megatron.core.transformer import multi_token_prediction as mtp
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_layer import (
        MoETransformerLayer, TransformerLayer, TransformerLayerSubmodules)

    gpt = get_gpt_layer_local_spec(num_experts=config.num_moe_experts).submodules
    attention = TransformerLayerSubmodules(input_layernorm=gpt.input_layernorm,
                                           self_attention=gpt.self_attention,
                                           self_attn_bda=gpt.self_attn_bda)
    moe = TransformerLayerSubmodules(pre_mlp_layernorm=gpt.pre_mlp_layernorm, mlp=gpt.mlp,
                                     mlp_bda=gpt.mlp_bda)
    norm = gpt.input_layernorm
    # The MTP depth's norms and projection; its layers come from the pattern after '/'.
    mtp_layer = mtp.MultiTokenPredictionLayerSubmodules(
        enorm=norm, hnorm=norm, eh_proj=ColumnParallelLinear, mtp_model_layer=None,
        layer_norm=norm)
    mtp_block = ModuleSpec(module=mtp.MultiTokenPredictionBlock,
                           submodules=mtp.MultiTokenPredictionBlockSubmodules(layer_specs=[
                               ModuleSpec(module=mtp.MultiTokenPredictionLayer,
                                          submodules=mtp_layer)]))
    stack = ModuleSpec(module=hybrid_block.HybridStack,
                       submodules=hybrid_block.HybridStackSubmodules(
                           attention_layer=ModuleSpec(module=TransformerLayer,
                                                      submodules=attention),
                           moe_layer=ModuleSpec(module=MoETransformerLayer, submodules=moe),
                           mtp_block_spec=mtp_block))
    torch.manual_seed(seed)
    te_norm, hybrid_block.TENorm = hybrid_block.TENorm, norm
    try:
        model = HybridModel(
            config=config, hybrid_stack_spec=stack, vocab_size=vocab_size,
            max_sequence_length=max_sequence_length, hybrid_layer_pattern=pattern,
            position_embedding_type="learned_absolute",
            pre_process=parallel_state.is_pipeline_first_stage(),
            post_process=parallel_state.is_pipeline_last_stage(),
        )
    finally:
        hybrid_block.TENorm = te_norm
    return _as_float16_module_would(model, config)


def _as_float16_module_would(model, config):
    # What Megatron's Float16Module does to the weights and buffers (the router's expert bias
    # is kept fp32 by the router itself).
    if config.bf16:
        model = model.bfloat16()
    elif config.fp16:
        model = model.half()
    return model


def routers_of(model) -> list:
    from megatron.core.transformer.moe.router import TopKRouter

    return [m for m in model.modules() if isinstance(m, TopKRouter)]


class _GatherSequence(torch.autograd.Function):
    """All-gather [s, ...] shards over `group` along dim 0 (group-rank order); the backward sums
    the gradient over the group and keeps this rank's rows (an all-reduce: gloo has no
    reduce-scatter)."""

    @staticmethod
    def forward(ctx, shard, group):
        ctx.group, ctx.rows = group, shard.shape[0]
        parts = [torch.empty_like(shard) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, shard.contiguous(), group=group)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        start = dist.get_rank(ctx.group) * ctx.rows
        return grad[start:start + ctx.rows], None


def context_parallel_positions(seq_length: int, cp_size: int, cp_rank: int) -> torch.Tensor:
    """The positions of the sequence a context-parallel rank holds, as Megatron-LM splits it
    (get_batch_on_this_cp_rank): 2 x cp chunks, rank r the chunks r and 2 cp - 1 - r, so that
    causal attention costs every rank the same."""
    chunks = torch.arange(seq_length).view(2 * cp_size, -1)
    return torch.cat([chunks[cp_rank], chunks[2 * cp_size - 1 - cp_rank]])


class ContextParallelAttention(torch.nn.Module):
    """Causal softmax attention across context-parallel ranks, on CPU: a stand-in for Transformer
    Engine's context-parallel attention (Megatron's local DotProductAttention has none).

    Each rank holds the queries, keys and values of its positions (`context_parallel_positions`);
    the keys and values of all ranks are gathered, and a query attends to every key at or
    before its position: softmax(q k^T / sqrt(d)) v.
    """

    def __init__(self, config, layer_number, attn_mask_type, attention_type, *args, **kwargs):
        super().__init__()
        from megatron.core import parallel_state

        self.heads = config.num_attention_heads // config.tensor_model_parallel_size
        self.scale = kwargs.get("softmax_scale") or config.kv_channels ** -0.5
        self.group = parallel_state.get_context_parallel_group()

    def forward(self, query, key, value, attention_mask, *args, **kwargs):
        """query, key, value: [s, b, n, d] of this rank's positions -> [s, b, n * d]."""
        cp_size, cp_rank = dist.get_world_size(self.group), dist.get_rank(self.group)
        local = query.shape[0]
        positions = [context_parallel_positions(local * cp_size, cp_size, r)
                     for r in range(cp_size)]
        key, value = (_GatherSequence.apply(x, self.group) for x in (key, value))
        key, value = (x.repeat_interleave(self.heads // x.shape[2], dim=2) for x in (key, value))
        visible = positions[cp_rank].unsqueeze(1) >= torch.cat(positions).unsqueeze(0)  # [sq, sk]
        scores = torch.einsum("qbnd,kbnd->bnqk", query.float(), key.float()) * self.scale
        probs = scores.masked_fill(~visible, float("-inf")).softmax(dim=-1).to(value.dtype)
        context = torch.einsum("bnqk,kbnd->qbnd", probs, value)
        return context.reshape(local, query.shape[1], -1)


class SequenceParallelLayerNorm(torch.nn.LayerNorm):
    """torch's LayerNorm with its weight and bias marked `sequence_parallel`, as Apex's
    FusedLayerNorm marks them (absent here; Megatron's WrappedTorchNorm refuses sequence
    parallelism): finalize_model_grads then sums their gradients over tensor parallel, where
    each rank normalised other tokens."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **kwargs):
        super().__init__(hidden_size, eps=eps)
        for param in (self.weight, self.bias):
            setattr(param, "sequence_parallel", config.sequence_parallel)


def wrap_megatron_ddp(chunks: list, grad_scale: Optional[float] = None) -> list:
    """Megatron's DistributedDataParallel around each model chunk, with the schedule hooks that
    Megatron-LM's `train()` installs: no_sync_func / grad_sync_func (gradient all-reduce
    overlapped with the backward), finalize_model_grads_func (DP all-reduce, sequence-parallel
    and embedding all-reduces, per-token scaling), and grad_scale_func when `grad_scale` is
    given (what the optimizer's loss scaler does; divide the gradients by it after the step, as
    the optimizer unscales them). Gradients end up in each parameter's `main_grad`.
    """
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )

    install_cuda_runtime_shims()  # 0.19's gradient buffers order their all-reduce by streams
    config = chunks[0].config
    ddp_config = DistributedDataParallelConfig(overlap_grad_reduce=True)
    # As Megatron-LM: one bucket for every chunk after the first.
    model = [DistributedDataParallel(config, ddp_config, chunk, disable_bucketing=index > 0)
             for index, chunk in enumerate(chunks)]
    config.no_sync_func = [chunk.no_sync for chunk in model]
    config.grad_sync_func = [chunk.start_grad_sync for chunk in model]
    if len(model) == 1:
        config.no_sync_func, config.grad_sync_func = config.no_sync_func[0], \
            config.grad_sync_func[0]
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = None if grad_scale is None else (lambda loss: loss * grad_scale)
    return model
