"""Per-rank bodies of tests/test_bridge.py: Megatron-Bridge's real `pretrain` on CPU with gloo.

Importing this module installs the lab's Bridge shims (megatron_gbl_lab.bridge_cpu) and imports
Bridge; harness.run_gloo's server imports it once per session (preload), its ranks fork from
there. The model is a tiny GPT-MoE GPTModelProvider of Megatron-Core's local layers, trained on
Bridge's mock data with Bridge's own GPT forward step and loss.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys

from megatron_gbl_lab import bridge_cpu

bridge_cpu.install_bridge_shims()

import torch  # noqa: E402
from megatron.core.datasets.gpt_dataset import MockGPTLowLevelDataset  # noqa: E402
from megatron.bridge.models.gpt_provider import GPTModelProvider, local_layer_spec  # noqa: E402
from megatron.bridge.training.callbacks import Callback  # noqa: E402
from megatron.bridge.training.config import (  # noqa: E402
    CheckpointConfig,
    ConfigContainer,
    DistributedDataParallelConfig,
    DistributedInitConfig,
    LoggerConfig,
    MockGPTDatasetConfig,
    OptimizerConfig,
    RNGConfig,
    SchedulerConfig,
    TokenizerConfig,
    TrainingConfig,
    ValidationConfig,
)
from megatron.bridge.training.gpt_step import forward_step  # noqa: E402
from megatron.bridge.training.pretrain import pretrain  # noqa: E402

import megatron_gbl  # noqa: E402
from megatron_gbl import bridge  # noqa: E402
from megatron_gbl_lab import harness  # noqa: E402

SEQ, VOCAB, TOPK, COEFF = 8, 64, 2, 1e-2
logging.getLogger("megatron").setLevel(logging.WARNING)
# Bridge's mock data (tiny_config's and the recipes'): 1000 documents of up to 64 tokens
# instead of 100000 of up to 4096, so the sample index of a few tiny steps takes milliseconds
# to build, not seconds per rank (as tests/megatron_lm_entry's FewMockDocuments).
MockGPTLowLevelDataset.size, MockGPTLowLevelDataset.max_sequence_length = 1000, 64


def runs(rank: int, world_size: int, calls: list) -> list:
    """[(name of a worker of this module, its spec)] one after the other in one set of
    processes (process start-up and Bridge's import dominate the test time)."""
    return [globals()[name](rank, world_size, spec) for name, spec in calls]


def tiny_config(run_dir: str, *, train_iters: int, global_batch_size: int,
                micro_batch_size: int = 1, lr: float = 1e-3, save_interval=None,
                exit_interval=None, load: bool = False, **model) -> ConfigContainer:
    """A tiny GPT-MoE on Bridge's mock data, TensorBoard under run_dir/tb, checkpoints (every
    `save_interval` iterations) under run_dir/ckpt, loaded from there when `load`; Bridge
    saves and exits after `exit_interval` iterations."""
    provider = GPTModelProvider(
        num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64,
        num_moe_experts=8, moe_router_topk=TOPK, moe_ffn_hidden_size=64,
        moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=COEFF,
        moe_token_dispatcher_type="allgather", moe_grouped_gemm=False, moe_per_layer_logging=True,
        add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0, seq_length=SEQ,
        vocab_size=VOCAB, make_vocab_size_divisible_by=VOCAB, use_cpu_initialization=True,
        transformer_layer_spec=local_layer_spec, pipeline_dtype=torch.float32,
        # Fused kernels: CUDA, or torch.compile on CPU (seconds per rank).
        bias_activation_fusion=False, bias_dropout_fusion=False, masked_softmax_fusion=False,
        persist_layer_norm=False, gradient_accumulation_fusion=False,
        cross_entropy_loss_fusion=False, **model)
    checkpoint = os.path.join(run_dir, "ckpt")
    return ConfigContainer(
        model=provider,
        train=TrainingConfig(train_iters=train_iters, global_batch_size=global_batch_size,
                             micro_batch_size=micro_batch_size, exit_interval=exit_interval),
        validation=ValidationConfig(eval_interval=None, eval_iters=0),
        optimizer=OptimizerConfig(optimizer="adam", lr=lr, min_lr=lr, bf16=False, fp16=False,
                                  clip_grad=0.0, use_distributed_optimizer=False),
        scheduler=SchedulerConfig(lr_warmup_iters=0, lr_decay_style="constant",
                                  start_weight_decay=0.0, end_weight_decay=0.0,
                                  weight_decay_incr_style="constant"),
        ddp=DistributedDataParallelConfig(use_distributed_optimizer=False),
        dataset=MockGPTDatasetConfig(random_seed=1234, seq_length=SEQ, reset_attention_mask=False,
                                     reset_position_ids=False, eod_mask_loss=False,
                                     num_workers=0, dataloader_type="single"),
        logger=LoggerConfig(log_interval=1, tensorboard_dir=os.path.join(run_dir, "tb")),
        tokenizer=TokenizerConfig(tokenizer_type="NullTokenizer", vocab_size=VOCAB),
        checkpoint=CheckpointConfig(save=checkpoint if save_interval else None,
                                    save_interval=save_interval,
                                    load=checkpoint if load else None, async_save=False,
                                    fully_parallel_save=False, ckpt_format="torch_dist"),
        dist=DistributedInitConfig(distributed_backend="gloo"),
        rng=RNGConfig(seed=1234))


class Recorder(Callback):
    """Per training step, what the tests compare, from every MoE layer of this rank: the router's
    input of every training call, its weight and weight gradient (main_grad, after Bridge's
    data-parallel all-reduce), its expert bias, and the plugin's step metrics.

    isolate_routers: the experts' output weights 0 (with lr 0 they stay 0), so no output
    depends on the routing probabilities and a router's gradient is its own layer's LBL's.
    """

    def __init__(self, isolate_routers: bool = False):
        self.isolate_routers = isolate_routers
        self.steps: list[dict] = []
        self.inputs: dict[int, list] = {}

    def on_train_start(self, context) -> None:
        for chunk in context.model:
            if self.isolate_routers:
                with torch.no_grad():
                    for name, param in chunk.named_parameters():
                        if "experts" in name and "linear_fc2" in name:
                            param.zero_()
            for router in harness.routers_of(chunk):
                recorded = self.inputs.setdefault(router.layer_number, [])
                router.register_forward_pre_hook(
                    lambda module, args, recorded=recorded:
                    recorded.append(args[0].detach().clone()) if torch.is_grad_enabled()
                    and module.training else None)

    def on_train_step_start(self, context) -> None:
        for recorded in self.inputs.values():
            recorded.clear()

    def on_train_step_end(self, context) -> None:
        step = megatron_gbl.step_metrics()  # a collective: every rank, after every step
        routers = {router.layer_number: router for chunk in context.model
                   for router in harness.routers_of(chunk)}
        self.steps.append({
            "iteration": context.state.train_state.step,
            "lm loss": float(context.loss_dict["lm loss"]),
            "metrics": None if step is None else {
                name: dict(zip(step.layer_numbers, values.tolist()))
                for name, values in step.values.items()},
            "routers": {layer: {
                "inputs": list(self.inputs[layer]),
                "grad": router.weight.main_grad.detach().double().clone(),
                "weight": router.weight.detach().clone(),
                "expert_bias": None if router.expert_bias is None
                else router.expert_bias.detach().clone()} for layer, router in routers.items()},
        })


def train(rank: int, world_size: int, spec: dict) -> dict:
    """Bridge's pretrain of `tiny_config(**spec["config"])`, with GlobalBatchBalancing(
    **spec["balancing"]) unless that is None, and a Recorder. Returns the recorded steps,
    whether Bridge exited the process (exit_interval: then this rank disables the plugin, as a
    new process starts without it) and whether the plugin was enabled after pretrain."""
    recorder = Recorder(spec.get("isolate_routers", False))
    callbacks = [recorder]
    if spec.get("balancing") is not None:
        callbacks.insert(0, bridge.GlobalBatchBalancing(**spec["balancing"]))
    exited = False
    try:
        pretrain(tiny_config(**spec["config"]), forward_step, callbacks=callbacks)
    except SystemExit:
        exited = True
    enabled_after = megatron_gbl.is_enabled()
    megatron_gbl.disable()
    return {"steps": recorder.steps, "exited": exited, "enabled_after": enabled_after}


def callback_api(rank: int, world_size: int, spec: dict) -> dict:
    """GlobalBatchBalancing outside a run: a Bridge Callback that enables the plugin when made,
    and settings enable rejects rejected the same way, the plugin left off."""
    from megatron.bridge.training.callbacks import Callback

    made = bridge.GlobalBatchBalancing("global")
    outcome = {"is_callback": isinstance(made, Callback),
               "enabled_when_made": megatron_gbl.is_enabled()}
    megatron_gbl.disable()
    try:
        bridge.GlobalBatchBalancing("micro", micro_coeff=1e-3)
        outcome["bad_settings"] = ""
    except ValueError as error:
        outcome["bad_settings"] = str(error)
    outcome["enabled_after_bad"] = megatron_gbl.is_enabled()
    return outcome


def launch(rank: int, world_size: int, argv: list) -> dict:
    """`python -m megatron_gbl.bridge ARGV` in this rank: its exit status, what it wrote to
    stderr, and whether Bridge's training loop started."""
    from megatron.bridge.training import train as bridge_train

    started = []
    original_train = bridge_train.train
    stderr = io.StringIO()
    try:
        # pretrain() looks train() up in its module at call time.
        sys.modules["megatron.bridge.training.pretrain"].train = \
            lambda *a, **k: (started.append(True), original_train(*a, **k))[1]
        with contextlib.redirect_stderr(stderr):
            bridge.main([str(arg) for arg in argv])
        status = 0
    except SystemExit as exit_:
        status = exit_.code
    finally:
        sys.modules["megatron.bridge.training.pretrain"].train = original_train
        megatron_gbl.disable()
    return {"status": status, "stderr": stderr.getvalue(), "trained": bool(started)}
