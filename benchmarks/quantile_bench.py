"""Quantile balancing: what the plugin's scopes cost at the step's end and per router call,
against upstream's own update in the same run (megatron-core 0.19+).

Step end, per optimizer step for L MoE layers of E experts (real TopKRouters, their buffers):
    upstream      finalize_model_grads._update_router_qb_beta: an AVG all-reduce of the
                  micro-batch quantiles [L, E] fp32 over DP x CP, the EMA, the re-centring
    plugin micro  the same from the step's end (quantile.step_update, scope micro)
    plugin global one all-reduce of the histograms [L, 1, E, B + 2] int64 over TP x DP x CP, the
                  quantile read from them, the same EMA and re-centring
Bytes all-reduced: upstream L E 4, plugin global L E (B + 2) 8 (B = quantile.BINS).

Per call, one micro-batch's fp32 logits [T, E] of one router (no TP x CP gather: one rank's):
    upstream      moe_utils.qb_dual_update (top-(K+1) per token, top-(C+1) per expert)
    plugin global quantile.dual_route + quantile.add_histograms into the step's histograms

    python -m benchmarks.quantile_bench                      # 2 gloo ranks, L 1 and 60, E 256
"""

from __future__ import annotations

import argparse
import json
import os
import platform

import torch
import torch.distributed as dist

from benchmarks import common


def worker(rank: int, world_size: int, args) -> dict:
    import importlib

    import megatron_gbl
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.moe import moe_utils
    from megatron.core.transformer.moe.router import TopKRouter
    from megatron_gbl import compat, quantile, steps
    from megatron_gbl_lab import harness

    common.setup_rank(args, world_size)
    device = torch.device(args.device, torch.cuda.current_device()) \
        if args.device == "cuda" else torch.device("cpu")
    finalize = importlib.import_module("megatron.core.distributed.finalize_model_grads")
    update_upstream = finalize._update_router_qb_beta  # before enable switches it off
    config = harness.moe_config(num_moe_experts=args.experts, moe_router_topk=args.topk,
                                hidden_size=8, num_attention_heads=1,
                                moe_router_load_balancing_type="quantile_balancing",
                                moe_aux_loss_coeff=0.0)
    groups = ProcessGroupCollection.use_mpu_process_groups()
    generator = torch.Generator(device=device).manual_seed(rank)
    logits_TE = torch.randn(args.tokens, args.experts, device=device, generator=generator)
    results = {"step_end": {}, "per_call": {}}
    for layers in args.layers:
        routers = torch.nn.ModuleList([TopKRouter(config=config, pg_collection=groups)
                                       for _ in range(layers)]).to(device)
        for number, router in enumerate(routers, 1):
            router.layer_number = number
            router.qb_beta.normal_(generator=generator)
        megatron_gbl.enable("global", model=routers)
        steps.start_step(routers)
        for router in routers:  # one call's histograms and upstream's accumulated quantile
            state = steps.router_state(router)
            state.qb = quantile.StepHistograms("global")
            _, alpha_T1 = quantile.dual_route(logits_TE, router.qb_beta, router.topk)
            state.qb.add(logits_TE - alpha_T1, router.qb_beta)
            router.qb_beta_accum.copy_(moe_utils.qb_dual_update(logits_TE, router.topk,
                                                                 router.qb_beta)[1])
            router.qb_beta_count.fill_(1)
        micro_states = [quantile.StepHistograms("micro", router.qb_beta_accum.clone(),
                                                router.qb_beta_count.clone())
                        for router in routers]
        global_states = [router._megatron_gbl.qb for router in routers]
        phase = steps.phase()
        sync_group = steps.sync_group(routers[0], phase)
        micro_phase = megatron_gbl.Settings("micro")

        def plugin_global():
            for router, state in zip(routers, global_states):
                router._megatron_gbl.qb = state
            quantile.step_update(routers, phase, sync_group)

        def plugin_micro():
            for router, state in zip(routers, micro_states):
                router._megatron_gbl.qb = state
            quantile.step_update(routers, micro_phase, None)

        variants = {"upstream": lambda: update_upstream([routers], config,
                                                        dp_cp_group=compat.dp_cp_group()),
                    "plugin micro": plugin_micro, "plugin global": plugin_global}
        results["step_end"][layers] = _time(variants, args)
        megatron_gbl.disable()
    # Per call: one router, the same logits.
    router = TopKRouter(config=config, pg_collection=groups).to(device)
    histograms = quantile.StepHistograms("global")

    def plugin_call():
        _, alpha_T1 = quantile.dual_route(logits_TE, router.qb_beta, router.topk)
        histograms.add(logits_TE - alpha_T1, router.qb_beta)
        histograms.histograms = histograms.histograms[:1]

    results["per_call"] = _time({
        "upstream": lambda: moe_utils.qb_dual_update(logits_TE, router.topk, router.qb_beta),
        "plugin global": plugin_call}, args)
    return results


def _time(variants: dict, args) -> dict:
    """Per variant: the slowest rank's wall seconds of each timed sample, interleaved."""
    for fn in variants.values():
        for _ in range(args.warmup):
            fn()
    samples = {name: [] for name in variants}
    for i in range(args.steps):
        for name in common.running_order(list(variants), i):
            dist.barrier()
            samples[name].append(common.timed(variants[name], args.device)[0])
    return common.slowest(samples)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_common_args(parser, world_size=2)
    parser.add_argument("--layers", type=int, nargs="+", default=[1, 60])
    parser.add_argument("--experts", type=int, default=256)
    parser.add_argument("--topk", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=4096, help="per call (a micro-batch)")
    args = parser.parse_args(argv)
    args.steps = args.steps or 10
    from megatron_gbl import quantile

    results = common.launch(worker, args)
    if results is None:
        return
    bins = quantile.BINS
    lines = [f"quantile balancing, {args.world_size if args.device == 'cpu' else 'torchrun'} "
             f"{args.device} rank(s), E {args.experts}, K {args.topk}, B {bins} bins; median ms "
             f"of {args.steps} samples (slowest rank), ratio to upstream with its 95% interval",
             "", "| step end | bytes all-reduced | upstream ms | plugin micro | plugin global |"
             " plugin global per layer ms |", "|---|---|---|---|---|---|"]
    for layers, samples in results["step_end"].items():
        base = samples["upstream"]
        ratios = {name: common.paired_ratio(samples[name], base)
                  for name in ("plugin micro", "plugin global")}
        upstream_bytes, plugin_bytes = (layers * args.experts * 4,
                                        layers * args.experts * (bins + 2) * 8)
        lines.append(
            f"| L = {layers} | {upstream_bytes:,} / {plugin_bytes:,}"
            f" | {common.ms(base):.3f} | "
            + " | ".join(f"{r['median']:.2f} [{r['lo']:.2f}, {r['hi']:.2f}]"
                         for r in ratios.values())
            + f" | {common.ms(samples['plugin global']) / layers:.3f} |")
    call = results["per_call"]
    ratio = common.paired_ratio(call["plugin global"], call["upstream"])
    lines += ["", f"per call, T {args.tokens} tokens: upstream qb_dual_update "
              f"{common.ms(call['upstream']):.3f} ms, plugin global (dual route + histogram) "
              f"{common.ms(call['plugin global']):.3f} ms, ratio {ratio['median']:.2f} "
              f"[{ratio['lo']:.2f}, {ratio['hi']:.2f}]"]
    print("\n".join(lines))
    name = f"quantile_bench_{args.device}_{args.world_size}ranks.json"
    with open(os.path.join(args.out, name), "w") as f:
        json.dump({"args": vars(args), "bins": bins, "machine": platform.platform(),
                   "load_average": os.getloadavg(), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
