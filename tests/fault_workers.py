"""The fault matrix of tests/test_fault_matrix.py: one fault in one parallel layout, on 4 fresh
gloo processes, through Megatron's own training path (its schedules, DistributedDataParallel,
finalize_model_grads and its optimizer, fp16 grad scaler included).

Each cell trains STEPS steps and puts its fault into step FAULT_STEP; a cell either stops, and
then every rank must exit non-zero, or continues, and then its gradients and expert biases
must equal those of the run the cell names as its reference.
"""

from __future__ import annotations

import datetime
import functools
import io
import os
import tempfile
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import megatron_gbl
import workers
from megatron_gbl_lab import harness

STEPS, FAULT_STEP, MICROBATCHES, SEQ, BSZ = 3, 1, 2, 8, 2
LOSS_SCALE = 1024.0  # fp16: a constant grad scaler (it skips steps like the dynamic one)
LBL_AND_BIAS = dict(workers.AUX_FREE, moe_router_load_balancing_type="aux_loss",
                    moe_aux_loss_coeff=1e-2)
PRECISIONS = {"fp32": {}, "bf16": dict(bf16=True, params_dtype=torch.bfloat16,
                                       pipeline_dtype=torch.bfloat16),
              "fp16": dict(fp16=True, params_dtype=torch.float16, pipeline_dtype=torch.float16)}
LAYOUTS = {"DP 4": {}, "PP 2 x DP 2": dict(pp=2), "TP 2 x DP 2": dict(tp=2)}


# Training -----------------------------------------------------------------------------------

def build(layout: dict, precision: str = "fp32", config: dict = LBL_AND_BIAS, seed: int = 0):
    """(model chunks wrapped in Megatron's DDP, Megatron's optimizer) of a 4-layer GPT-MoE."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    if not harness.model_parallel_initialized():
        harness.init_model_parallel(tensor_model_parallel_size=layout.get("tp", 1),
                                    pipeline_model_parallel_size=layout.get("pp", 1))
    model_config = harness.moe_config(num_layers=4, **config, **PRECISIONS[precision])
    chunks = harness.wrap_megatron_ddp(
        [harness.build_gpt_moe(model_config, max_sequence_length=SEQ, seed=seed)],
        grad_scale=LOSS_SCALE if precision == "fp16" else None)
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=1e-3, clip_grad=0.0, use_distributed_optimizer=False,
                        fp16=precision == "fp16", bf16=precision == "bf16",
                        loss_scale=LOSS_SCALE if precision == "fp16" else None),
        chunks)
    if precision == "fp16":  # the optimizer's scaler, not wrap_megatron_ddp's constant
        chunks[0].config.grad_scale_func = optimizer.scale_loss
    return chunks, optimizer


def train_step(chunks, optimizer, step: int, forward_step=None,
               told_microbatches: int = None) -> bool:
    """One optimizer step on the data of `step`; whether the optimizer applied it. With
    `told_microbatches`, as a custom loop that marks its steps itself (megatron_gbl.step) and
    tells the plugin that many micro-batches."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    dp_size = parallel_state.get_data_parallel_world_size()
    tokens = workers.make_tokens(step, MICROBATCHES, dp_size, SEQ, BSZ, 64)
    data = [replicas[parallel_state.get_data_parallel_rank()] for replicas in tokens]
    for chunk in chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    schedule = functools.partial(
        get_forward_backward_func(), forward_step_func=forward_step or _forward_step,
        data_iterator=iter(data), model=chunks[0], num_microbatches=MICROBATCHES,
        seq_length=SEQ, micro_batch_size=BSZ, forward_only=False)
    if told_microbatches is None:
        schedule()
    else:
        with megatron_gbl.step(chunks, num_microbatches=told_microbatches):
            schedule.func.__wrapped__(**schedule.keywords)  # the schedule the plugin wraps
    applied, _, _ = optimizer.step()
    return applied


def _forward_step(data_iterator, model):
    tokens = next(data_iterator)
    positions = torch.arange(SEQ).unsqueeze(0).expand_as(tokens)
    output = model(tokens, positions, None, labels=tokens)
    return output, lambda output_tensor: (output_tensor.float().mean(), {})


def state(chunks) -> dict:
    """What a continuing cell compares with its reference: every router's weight gradient (the
    last step's, unscaled by the optimizer) and expert bias, by layer number."""
    routers = [router for chunk in chunks for router in harness.routers_of(chunk.module)]
    return {router.layer_number: (router.weight.main_grad.detach().float().clone(),
                                  router.expert_bias.detach().clone()) for router in routers}


def routers_of(chunks) -> list:
    return [router for chunk in chunks for router in harness.routers_of(chunk.module)]


def mark(path: str) -> None:
    """Note on disk when this rank started the faulty step (the matrix times exits from it)."""
    with open(path, "w") as f:
        f.write(repr(time.time()))


# The cells ------------------------------------------------------------------------------------

def cell(fault: str, layout: dict, rank: int, marks: str):
    """The body of one rank of a cell; returns what a continuing cell compares, or raises."""
    from megatron.core import parallel_state

    last_rank = rank == dist.get_world_size() - 1
    if fault == "killed":
        chunks, optimizer = build(layout)
        megatron_gbl.enable("global", model=chunks)
        calls = []

        def dying_forward_step(data_iterator, model):
            calls.append(None)
            if last_rank and len(calls) == 2:
                os._exit(9)  # mid-step, no clean-up, like a crashed process
            return _forward_step(data_iterator, model)

        for step in range(STEPS):
            if step == FAULT_STEP:
                mark(marks)
            train_step(chunks, optimizer, step,
                       forward_step=dying_forward_step if step == FAULT_STEP else None)
        return None
    if fault in ("nan fp32", "nan bf16"):
        chunks, optimizer = build(layout, fault.split()[1])
        megatron_gbl.enable("global", model=chunks)
        router = routers_of(chunks)[-1]
        poisoned = [False]
        router.register_forward_pre_hook(
            lambda module, args: (args[0] * float("nan"),) + args[1:] if poisoned[0] else None)
        for step in range(STEPS):
            if step == FAULT_STEP:
                mark(marks)
                poisoned[0] = last_rank
            train_step(chunks, optimizer, step)
        return None
    if fault == "miscounted":
        chunks, optimizer = build(layout)
        megatron_gbl.enable("global", model=chunks)
        for step in range(STEPS):
            if step == FAULT_STEP:
                mark(marks)
            train_step(chunks, optimizer, step,
                       told_microbatches=MICROBATCHES + (step == FAULT_STEP))
        return None
    if fault == "fp16 overflow":
        # An inf in the gradients of the first stage's layers on one rank, at the fault step:
        # the grad scaler skips the step everywhere, and so does the expert bias. Reference:
        # the same run without that step.
        def run(skip_fault_step: bool):
            chunks, optimizer = build(layout, "fp16")
            megatron_gbl.enable("global", model=chunks)
            overflow = [False]

            def overflow_in_backward(module, args, output):
                if overflow[0]:
                    output[0].register_hook(lambda grad: grad * float("inf"))

            routers_of(chunks)[0].register_forward_hook(overflow_in_backward)
            applied = []
            for step in range(STEPS):
                if step == FAULT_STEP and skip_fault_step:
                    continue
                overflow[0] = step == FAULT_STEP and rank == 0
                applied.append(train_step(chunks, optimizer, step))
            megatron_gbl.disable()
            return state(chunks), applied

        faulty, applied = run(False)
        reference, _ = run(True)
        assert applied == [step != FAULT_STEP for step in range(STEPS)], applied
        return faulty, reference
    if fault == "frozen chunk":
        # The routers of the first pipeline stage (of the first two layers without pipelining)
        # frozen, aux-loss-free balancing at global scope. Reference: Megatron's own expert-bias
        # update in finalize_model_grads (the plugin off), which skips frozen routers (0.19).
        def run(plugin: bool):
            chunks, optimizer = build(layout, config=workers.AUX_FREE)
            if plugin:
                megatron_gbl.enable("global", model=chunks)
            for router in routers_of(chunks):
                router.frozen_expert_bias = parallel_state.is_pipeline_first_stage() \
                    if layout.get("pp") else router.layer_number <= 2
            for step in range(STEPS):
                train_step(chunks, optimizer, step)
            megatron_gbl.disable()
            return state(chunks)

        return run(True), run(False)
    if fault == "disable/enable":
        def run(toggle: bool):
            chunks, optimizer = build(layout)
            megatron_gbl.enable("global", model=chunks)
            for step in range(STEPS):
                if toggle and step == FAULT_STEP:
                    megatron_gbl.disable()
                    megatron_gbl.enable("global", model=chunks)
                train_step(chunks, optimizer, step)
            megatron_gbl.disable()
            return state(chunks)

        return run(True), run(False)
    if fault == "resumed at the switch":
        settings = dict(switch_scope="global", switch_iteration=FAULT_STEP)

        def uninterrupted():
            chunks, optimizer = build(layout)
            megatron_gbl.enable("micro", model=chunks, **settings)
            for step in range(STEPS):
                train_step(chunks, optimizer, step)
            megatron_gbl.disable()
            return state(chunks)

        chunks, optimizer = build(layout)
        megatron_gbl.enable("micro", model=chunks, **settings)
        for step in range(FAULT_STEP):
            train_step(chunks, optimizer, step)
        checkpoint = io.BytesIO()
        torch.save({"model": [chunk.state_dict() for chunk in chunks],
                    "optimizer": optimizer.state_dict()}, checkpoint)
        megatron_gbl.disable()
        # A restart: a new model with other initial weights and a new plugin, loaded.
        chunks, optimizer = build(layout, seed=1)
        checkpoint.seek(0)
        saved = torch.load(checkpoint, weights_only=False)
        for chunk, chunk_state in zip(chunks, saved["model"]):
            chunk.load_state_dict(chunk_state)
        optimizer.load_state_dict(saved["optimizer"])
        megatron_gbl.enable("micro", model=chunks, **settings)
        megatron_gbl.set_iteration(FAULT_STEP)
        for step in range(FAULT_STEP, STEPS):
            train_step(chunks, optimizer, step)
        megatron_gbl.disable()
        return state(chunks), uninterrupted()
    raise ValueError(fault)


def fp16_nan_logits_run(rank: int, world_size: int, spec: dict) -> dict:
    """fp16 training at spec["scope"] (spec["config"]: the model's balancing, default an LBL
    and expert bias) with NaN router input in MoE layer 2 on rank 0 at the fault step: whether
    Megatron's optimizer applied each step, and every router's bias after each."""
    chunks, optimizer = build({}, "fp16", config=spec.get("config", LBL_AND_BIAS))
    megatron_gbl.enable(spec["scope"], model=chunks)
    routers = routers_of(chunks)
    poisoned = [False]
    routers[1].register_forward_pre_hook(
        lambda module, args: (args[0] * float("nan"),) + args[1:] if poisoned[0] else None)
    applied, biases = [], []
    for step in range(STEPS + 1):
        poisoned[0] = step == FAULT_STEP and rank == 0
        applied.append(train_step(chunks, optimizer, step))
        biases.append([workers.balancing_bias(router).clone() for router in routers])
    megatron_gbl.disable()
    return {"applied": applied, "biases": biases}


# The runner -----------------------------------------------------------------------------------

def run_cells(faults: tuple, layout: dict, world_size: int = 4,
              deadline_s: float = 300.0) -> list:
    """Run the cells of `faults` one after the other on `world_size` fresh gloo processes
    (timeout 300 s, so a prompt stop is the plugin's or the backend's doing, not the
    timeout's); a stopping fault must come last. Returns per rank: exit code, seconds from the
    faulty step's start to the exit (None if it ran past `deadline_s` and was killed), the
    error message, and what each continuing cell returned."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["megatron_gbl_lab.quiet", "megatron_gbl.patch",
                                "megatron_gbl_lab.harness"])
    with tempfile.TemporaryDirectory() as tmp:
        procs = [ctx.Process(target=_rank, args=(faults, layout, rank, world_size, tmp))
                 for rank in range(world_size)]
        started = time.time()
        for proc in procs:
            proc.start()
        exited = {}
        while len(exited) < world_size and time.time() - started < deadline_s:
            for rank, proc in enumerate(procs):
                if rank not in exited and proc.exitcode is not None:
                    exited[rank] = time.time()
            time.sleep(0.05)
        for proc in procs:
            if proc.exitcode is None:
                proc.kill()
            proc.join()
        marks = [float(open(path).read()) for path in
                 (os.path.join(tmp, f"mark{rank}") for rank in range(world_size))
                 if os.path.exists(path)]
        fault_started = min(marks) if marks else started
        outcomes = []
        for rank, proc in enumerate(procs):
            path = os.path.join(tmp, f"result{rank}")
            result = torch.load(path, weights_only=False) if os.path.exists(path) else {}
            outcomes.append(dict(result, exitcode=proc.exitcode,
                                 seconds=exited[rank] - fault_started if rank in exited else None))
    return outcomes


def _rank(faults, layout, rank, world_size, tmp):
    """One process of a cell: join the group, run the cell, leave its outcome on disk, exit
    (without the process group's shutdown, which waits for peers that may be gone)."""
    code, outcome = 0, {}
    try:
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank,
                                world_size=world_size, timeout=datetime.timedelta(seconds=300))
        harness.install_cpu_shims()
        outcome = {"values": [cell(fault, layout, rank, os.path.join(tmp, f"mark{rank}"))
                              for fault in faults]}
    except BaseException as error:  # noqa: BLE001 - reported to the test
        code = 1
        outcome = {"error": f"{type(error).__name__}: {error}",
                   "traceback": traceback.format_exc()}
    with open(os.path.join(tmp, f"result{rank}"), "wb") as f:
        torch.save(outcome, f)
    os._exit(code)



def collective_programming_error(rank: int, world_size: int):
    """(type name, message) of what the plugin's sum raises for a programming error: a dtype
    gloo cannot sum."""
    from megatron_gbl import comm

    try:
        comm.PendingSum(torch.ones(4, dtype=torch.uint16), dist.group.WORLD, blocking=True,
                        what="the test's sum").wait()
    except RuntimeError as error:
        return type(error).__name__, str(error)
    return None
