"""End-to-end step time of a small GPT-MoE trained data-parallel through Megatron's schedules.

Every rank runs `--microbatches` micro-batches through `get_forward_backward_func()`, then
averages its gradients over data parallel in one flat all-reduce (what DDP does). There is no
optimizer update, so every variant routes the same tokens the same way at every step. Variants,
interleaved step by step, each with the straggler jitter off and on:

    upstream aux_loss          plugin off (micro-batch LBL, the usual baseline)
    micro                      megatron_gbl scope "micro"
    global                     megatron_gbl scope "global", count all-reduce waited in backward
    global blocking            megatron_gbl scope "global", blocking_sync=True (waited in forward)
    upstream global_aux_loss   plugin off, Megatron-Core's own global-batch LBL (blocking)

Jitter imitates expert-load stragglers: a forward pre-hook on every MoE layer holds the rank
up for an exponential draw (mean `--jitter-ms`), a different draw per rank, layer and
micro-batch, the same draws for every variant (a GPU sleep on CUDA). A step's time is its
slowest rank's. Needs megatron-core >= 0.15 (global_aux_loss).

    python -m benchmarks.e2e_bench                       # 4 gloo ranks on CPU
    torchrun --nproc-per-node 8 -m benchmarks.e2e_bench --device cuda
"""

from __future__ import annotations

import argparse
import functools
import os

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

import megatron_gbl
from benchmarks import common
from megatron_gbl_lab import harness

# name, the model's moe_router_load_balancing_type, plugin scope (None = off), plugin options
VARIANTS = (
    ("upstream aux_loss", "aux_loss", None, {}),
    ("micro", "aux_loss", "micro", {}),
    ("global", "aux_loss", "global", {}),
    ("global blocking", "aux_loss", "global", {"blocking_sync": True}),
    ("upstream global_aux_loss", "global_aux_loss", None, {}),
)
RUNS = [(name, jitter) for jitter in (False, True) for name, *_ in VARIANTS]


class Jitter:
    """Holds a rank up before every MoE layer's forward by draws[step, micro-batch, layer]."""

    def __init__(self, models, draws_SML: torch.Tensor, device: str):
        self.draws, self.device = draws_SML.tolist(), device
        self.step, self.on, self.calls = 0, False, []
        common.sleep(1e-3, device)  # CUDA: calibrates the GPU's sleep now, not in a timed step
        for model in models:
            for layer_index, layer in enumerate(moe_layers(model)):
                layer.register_forward_pre_hook(functools.partial(self._hook, layer_index))

    def start_step(self, step: int, on: bool) -> None:
        self.step, self.on, self.calls = step, on, [0] * len(self.draws[0][0])

    def _hook(self, layer_index, module, args):
        if self.on:
            microbatch = self.calls[layer_index]
            self.calls[layer_index] += 1
            common.sleep(self.draws[self.step][microbatch][layer_index], self.device)


def moe_layers(model) -> list:
    from megatron.core.transformer.moe.moe_layer import MoELayer

    return [m for m in model.modules() if isinstance(m, MoELayer)]


def build(args, lbl_type: str):
    config = harness.moe_config(
        num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads,
        ffn_hidden_size=4 * args.hidden, num_moe_experts=args.experts, moe_router_topk=args.topk,
        moe_ffn_hidden_size=args.expert_hidden, moe_router_load_balancing_type=lbl_type,
        moe_aux_loss_coeff=1e-2)
    model = harness.build_gpt_moe(config, vocab_size=args.vocab, max_sequence_length=args.seq)
    return model.to(args.device)


def average_gradients(model, world_size: int) -> None:
    """Data-parallel gradient averaging in one flat all-reduce, as DDP's bucket does."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    flat = _flatten_dense_tensors(grads)
    dist.all_reduce(flat)
    flat.div_(world_size)
    for grad, averaged in zip(grads, _unflatten_dense_tensors(flat, grads)):
        grad.copy_(averaged)


def worker(rank: int, world_size: int, args) -> dict:
    from megatron.core.pipeline_parallel import get_forward_backward_func

    common.setup_rank(args, world_size)
    machine = common.machine(args.device)
    models = {t: build(args, t) for t in ("aux_loss", "global_aux_loss")}
    total_steps = args.warmup + args.steps
    gen = torch.Generator().manual_seed(1000 * args.seed + rank)
    data = [[torch.randint(0, args.vocab, (args.mbs, args.seq), generator=gen).to(args.device)
             for _ in range(args.microbatches)] for _ in range(total_steps)]
    draws = torch.empty(total_steps, args.microbatches, args.layers).exponential_(
        1e3 / args.jitter_ms, generator=gen)
    jitter = Jitter(models.values(), draws, args.device)
    position_ids = torch.arange(args.seq, device=args.device).unsqueeze(0).expand(args.mbs, -1)

    def forward_step(data_iterator, model):
        tokens = next(data_iterator)
        output = model(tokens, position_ids, None, labels=tokens)
        return output, lambda out: (out.float().mean(), {})

    def step(model, batches):
        get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(batches), model=model,
            num_microbatches=args.microbatches, seq_length=args.seq, micro_batch_size=args.mbs,
            forward_only=False)
        average_gradients(model, world_size)

    spec = {name: (lbl_type, scope, options) for name, lbl_type, scope, options in VARIANTS}
    times = {f"{name} | jitter {'on' if on else 'off'}": [] for name, on in RUNS}
    for s in range(total_steps):
        for name, on in common.running_order(RUNS, s):
            lbl_type, scope, options = spec[name]
            model = models[lbl_type]
            if scope is None:
                megatron_gbl.disable()
                for router in harness.routers_of(model):
                    router.reset_global_aux_loss_tracker()
            else:
                megatron_gbl.enable(scope, **options)
            model.zero_grad(set_to_none=True)
            jitter.start_step(s, on)
            dist.barrier()
            t, _ = common.timed(functools.partial(step, model, data[s]), args.device)
            if s >= args.warmup:
                times[f"{name} | jitter {'on' if on else 'off'}"].append(t)
        if rank == 0:
            print(f"  step {s + 1}/{total_steps}{' (warm-up)' if s < args.warmup else ''}: "
                  + ", ".join(f"{k} {1e3 * v[-1]:.0f} ms" for k, v in times.items() if v
                              and s >= args.warmup), flush=True)
    megatron_gbl.disable()
    machine["load_avg_at_end"] = os.getloadavg()
    return {"samples": common.slowest(times), "machine": machine, "world_size": world_size}


def report(result: dict, args) -> None:
    samples = result["samples"]
    summary, groups, stem = {}, {}, f"e2e_bench_{args.device}_{result['world_size']}ranks"
    print(f"\nmedian step time (slowest of {result['world_size']} ranks), ratios as median of "
          f"paired per-step ratios [95% CI]")
    for jitter in ("off", "on"):
        run = {name: samples[f"{name} | jitter {jitter}"] for name, *_ in VARIANTS}
        label = f"jitter {jitter}" + (f" (exp. mean {args.jitter_ms} ms)" if jitter == "on" else "")
        print(label)
        summary[label], groups[label] = {}, {}
        for name, ts in run.items():
            vs_micro = common.paired_ratio(ts, run["micro"])
            vs_upstream = common.paired_ratio(ts, run["upstream global_aux_loss"])
            summary[label][name] = {"median_ms": common.ms(ts), "ratio_vs_micro": vs_micro,
                                    "ratio_vs_upstream_global_aux_loss": vs_upstream}
            groups[label][name] = (vs_micro["median"], vs_micro["lo"], vs_micro["hi"])
            print(f"  {name:26s} {common.ms(ts):8.1f} ms   vs micro {common.fmt_ratio(vs_micro)}"
                  f"   vs upstream global_aux_loss {common.fmt_ratio(vs_upstream)}")
    off = summary["jitter off"]["global"]["ratio_vs_micro"]
    on = summary[next(k for k in summary if k.startswith("jitter on"))]["global"]
    on = on["ratio_vs_upstream_global_aux_loss"]
    print(f"\ntarget global vs micro overhead <= 1% (no jitter): {100 * (off['median'] - 1):+.2f}% "
          f"[{100 * (off['lo'] - 1):+.2f}%, {100 * (off['hi'] - 1):+.2f}%] -> "
          f"{common.verdict(off, 1.01)}")
    print(f"target global < upstream global_aux_loss (jitter): x{common.fmt_ratio(on)} -> "
          f"{common.verdict(on, 1.0, strict=True)}")
    common.save(stem, args, {"args": vars(args), "machine": result["machine"],
                                    "world_size": result["world_size"], "summary": summary,
                                    "samples_s": samples})
    common.bar_chart(stem, args, f"GPT-MoE step time / plugin micro "
                     f"({args.device}, {result['world_size']} ranks)", groups,
                     "step-time ratio (median, 95% CI)")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_args(parser, world_size=4)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--topk", type=int, default=4)
    parser.add_argument("--expert-hidden", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=256)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--mbs", type=int, default=2, help="micro-batch size")
    parser.add_argument("--microbatches", type=int, default=4, help="per step (GA)")
    parser.add_argument("--jitter-ms", type=float, default=5.0, help="mean straggler delay")
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(steps=30, warmup=2)
    args = parser.parse_args(argv)
    print(f"end-to-end benchmark: {vars(args)}", flush=True)
    result = common.launch(worker, args)
    if result is not None:
        report(result, args)


if __name__ == "__main__":
    main()
