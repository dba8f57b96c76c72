"""Router micro-benchmark: forward + backward of one Megatron-Core TopKRouter, LBL included.

Variants, interleaved step by step on the same weights and inputs:
    upstream aux_loss          plugin off, moe_router_load_balancing_type="aux_loss"
    upstream global_aux_loss   plugin off, "global_aux_loss" (reset every step, as Megatron-LM does)
    plugin micro / dp / global megatron_gbl.enable(scope) on the aux_loss router

Two parts are timed: `router` (gating GEMM + routing + LBL, what a layer pays) and `routing`
(from the logits on, where the variants differ). A sample is one optimizer step: its
`--microbatches` calls with the gradient-accumulation loss scale, and the work at its boundary
(the plugin's start_step/finish_step, where it logs; upstream global_aux_loss's tracker reset).
It is the slowest rank's time, with a barrier before it, by the wall clock and by the process's
CPU time, reported per call (step / micro-batches). Ratios are per-sample paired against
upstream aux_loss. Needs megatron-core >= 0.15 (global_aux_loss).

    python -m benchmarks.router_bench                        # paper shapes, 2 gloo ranks on CPU
    python -m benchmarks.router_bench --mbs 1 --steps 2      # shorter
    torchrun --nproc-per-node 2 -m benchmarks.router_bench --device cuda    # GPUs, NCCL
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os

import torch
import torch.distributed as dist

import megatron_gbl
from benchmarks import common
from megatron_gbl_lab import harness

VARIANTS = ("upstream aux_loss", "upstream global_aux_loss", "plugin micro", "plugin dp",
            "plugin global")
BASELINE = "upstream aux_loss"
PARTS = ("router", "routing")
CLOCKS = ("wall", "cpu_time")


def make_router(args, num_experts: int, lbl_type: str):
    from megatron.core.transformer.moe import moe_utils
    from megatron.core.transformer.moe.router import TopKRouter

    config = harness.moe_config(
        hidden_size=args.hidden, num_attention_heads=16, ffn_hidden_size=4 * args.hidden,
        num_moe_experts=num_experts, moe_router_topk=args.topk, moe_ffn_hidden_size=args.hidden,
        moe_router_load_balancing_type=lbl_type, moe_aux_loss_coeff=1e-3, num_layers=1)
    kwargs = {}
    if hasattr(moe_utils, "get_default_pg_collection"):  # 0.15+
        kwargs["pg_collection"] = moe_utils.get_default_pg_collection()
    torch.manual_seed(0)  # the same gate weights for both routers
    router = TopKRouter(config, **kwargs)
    router.set_layer_number(1)
    return router.to(args.device)


def make_routers(args, num_experts: int) -> dict:
    """The two routers `configure` picks from, by load-balancing type, with the same weights."""
    return {lbl_type: make_router(args, num_experts, lbl_type)
            for lbl_type in ("aux_loss", "global_aux_loss")}


def call(router, part: str, inputs: torch.Tensor):
    """One training call: forward, then Megatron's zero main loss so only the LBL flows back."""
    inputs.grad = None
    if part == "router":
        probs, _ = router(inputs)
    else:
        probs, _ = router.routing(inputs)
    (probs * 0).sum().backward()


def configure(variant: str, routers: dict) -> torch.nn.Module:
    """Switch the plugin on or off for `variant`; the router to call."""
    if variant.startswith("plugin"):
        # With the model: its state is made now, not in the first timed step after a disable().
        megatron_gbl.enable(variant.split()[1], model=routers["aux_loss"])
        return routers["aux_loss"]
    megatron_gbl.disable()
    return routers[variant.split()[1]]


def train_step(variant: str, router, part: str, inputs: list) -> None:
    """One optimizer step of `router`: a call per micro-batch, and the step boundary's work."""
    if variant.startswith("plugin"):
        boundary = megatron_gbl.step(router, len(inputs))
    else:
        router.reset_global_aux_loss_tracker()  # what Megatron-LM does once per step
        boundary = contextlib.nullcontext()
    with boundary:
        for microbatch in inputs:
            call(router, part, microbatch)


def worker(rank: int, world_size: int, args) -> dict:
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    common.setup_rank(args, world_size)
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0 / args.microbatches, device=args.device))
    gen = torch.Generator().manual_seed(rank)
    samples, syncs, ops, machine = {}, {}, {}, common.machine(args.device)
    for num_experts in args.experts:
        routers = make_routers(args, num_experts)
        for mbs in args.mbs:
            for part in args.parts:
                width = args.hidden if part == "router" else num_experts
                inputs = [torch.randn(args.seq, mbs, width, generator=gen).to(args.device)
                          .requires_grad_() for _ in range(args.microbatches)]
                shape = f"E{num_experts} top{args.topk} mbs{mbs} {part}"
                times = {f"{shape} | {v} | {clock}": [] for v in VARIANTS for clock in CLOCKS}
                for step in range(args.warmup + args.steps):
                    for variant in common.running_order(list(VARIANTS), step):
                        run = functools.partial(train_step, variant, configure(variant, routers),
                                                part, inputs)
                        dist.barrier()
                        t = common.timed(run, args.device)
                        for clock, seconds in zip(CLOCKS, t):
                            if step >= args.warmup:
                                times[f"{shape} | {variant} | {clock}"].append(
                                    seconds / args.microbatches)
                for variant in VARIANTS:  # CUDA: does a call make the host wait? Launches?
                    run = functools.partial(train_step, variant, configure(variant, routers),
                                            part, inputs)
                    syncs[f"{shape} | {variant}"] = common.per_call(
                        common.host_syncs(run, args.device), args.microbatches)
                    ops[f"{shape} | {variant}"] = common.per_call(common.aten_ops(run),
                                                                  args.microbatches)
                megatron_gbl.disable()
                samples.update(common.slowest(times))
                if rank == 0:
                    print(f"  done {shape} (wall ms): " + ", ".join(
                        f"{v} {common.ms(samples[f'{shape} | {v} | wall']):.2f}" for v in VARIANTS),
                        flush=True)
    machine["load_avg_at_end"] = os.getloadavg()
    return {"samples": samples, "host_syncs": syncs, "aten_ops": ops, "machine": machine,
            "world_size": world_size}


def report(result: dict, args) -> None:
    samples, stem = result["samples"], f"router_bench_{args.device}_{result['world_size']}ranks"
    shapes = list(dict.fromkeys(key.split(" | ")[0] for key in samples))
    rows, groups = {}, {clock: {} for clock in CLOCKS}
    print(f"\nper call, slowest of {result['world_size']} ranks: median ms, and time / upstream "
          f"aux_loss as the median of paired ratios [95% CI]; wall clock, then process CPU time")
    for shape in shapes:
        rows[shape] = {}
        print(shape)
        for variant in VARIANTS:
            row = rows[shape][variant] = {
                "host_syncs_per_call": result["host_syncs"][f"{shape} | {variant}"],
                "aten_ops_per_call": result["aten_ops"][f"{shape} | {variant}"]}
            line = f"  {variant:26s}"
            for clock in CLOCKS:
                ts = samples[f"{shape} | {variant} | {clock}"]
                ratio = common.paired_ratio(ts, samples[f"{shape} | {BASELINE} | {clock}"])
                row[clock] = {"median_ms": common.ms(ts), "ratio_vs_aux_loss": ratio}
                groups[clock].setdefault(shape.replace(f" top{args.topk}", ""), {})[variant] = (
                    ratio["median"], ratio["lo"], ratio["hi"])
                line += f" {clock} {common.ms(ts):8.2f} ms x{common.fmt_ratio(ratio)}  "
            line += f" aten ops {row['aten_ops_per_call']}"
            if row["host_syncs_per_call"] is not None:
                line += f", host syncs per call: {row['host_syncs_per_call']}"
            print(line)
    for clock in CLOCKS:
        print(f"target plugin global <= 1.05x upstream aux_loss ({clock}):")
        for shape in shapes:
            ratio = rows[shape]["plugin global"][clock]["ratio_vs_aux_loss"]
            print(f"  {shape:28s} x{common.fmt_ratio(ratio)} -> {common.verdict(ratio, 1.05)}")
    common.save(stem, args, {"args": vars(args), "machine": result["machine"],
                             "world_size": result["world_size"], "summary": rows,
                             "samples_s": samples})
    for clock in CLOCKS:
        common.bar_chart(f"{stem}_{clock}", args, f"router fwd+bwd {clock} time / upstream aux_loss "
                         f"({args.device}, {result['world_size']} ranks)", groups[clock],
                         "time ratio (median, 95% CI)")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_args(parser, world_size=2)
    parser.add_argument("--experts", type=int, nargs="+", default=[64, 160])
    parser.add_argument("--topk", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--seq", type=int, default=4096, help="tokens per sequence")
    parser.add_argument("--mbs", type=int, nargs="+", default=[1, 2, 4], help="micro-batch sizes")
    parser.add_argument("--microbatches", type=int, default=4, help="per step (GA)")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.set_defaults(steps=3)
    args = parser.parse_args(argv)
    print(f"router benchmark: {vars(args)}", flush=True)
    result = common.launch(worker, args)
    if result is not None:
        report(result, args)


if __name__ == "__main__":
    main()
