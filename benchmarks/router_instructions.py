"""Instructions per router call, counted by callgrind: the host work each variant does.

A GPU router at the paper's shapes is bound by its host work (Python, operator dispatch,
kernel launches): the H100 run of RESULTS.md found its time flat from 4096 to 16384 tokens.
That work can be counted on any CPU: on the shared CPU box of RESULTS.md wall and CPU times
move by 5% or more between runs, while three repeated counts agreed to 0.005% (separate runs
with other arguments differ by up to 0.4%, so compare variants within one run).

Each variant of `router_bench` runs in a process of its own under `valgrind --tool=callgrind`,
which counts only its timed steps (`callgrind_control` switches counting on and off around
them), on the same weights and inputs: one rank, gloo, one thread, so no collective runs and
what is counted is the host work per call, not communication. A step is `--microbatches`
calls and its boundary work, as in `router_bench`; the count is per call. Needs valgrind
(Debian: `apt-get install valgrind`).

    python -m benchmarks.router_instructions                     # 16 tokens, E64 top-4, ~5 min
    python -m benchmarks.router_instructions --seq 4096 --parts routing --steps 2
"""

from __future__ import annotations

import argparse
import concurrent.futures
import glob
import os
import subprocess
import sys
import tempfile

import torch

from benchmarks import common, router_bench
from megatron_gbl_lab import harness

BASELINE = router_bench.BASELINE


def count(variant: str, part: str, argv: list) -> int:
    """Instructions of the timed steps of `variant` (callgrind, in a fresh process that parses
    this run's own arguments `argv`, so it sees the same shapes and step counts)."""
    with tempfile.TemporaryDirectory() as tmp:
        command = [
            "valgrind", "--tool=callgrind", "--instr-atstart=no",
            f"--callgrind-out-file={tmp}/callgrind.out",
            sys.executable, "-m", "benchmarks.router_instructions", *argv, "--worker", variant,
            "--parts", part]
        # A fixed hash seed: string hashing and set order otherwise vary the count between runs.
        run = subprocess.run(command, capture_output=True, text=True,
                             env={**os.environ, "PYTHONHASHSEED": "0"})
        if run.returncode:
            raise RuntimeError(f"{variant} {part} under callgrind failed:\n{run.stderr[-3000:]}")
        totals = []
        for path in glob.glob(f"{tmp}/callgrind.out*"):
            with open(path) as profile:
                totals += [int(line.split()[1]) for line in profile if line.startswith("totals:")]
        if not totals:
            raise RuntimeError(f"{variant} {part}: callgrind wrote no totals")
        return sum(totals)


def worker(args) -> None:
    """One variant's steps in this process, counted only while they run."""
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    variant, part = args.worker, args.parts[0]
    with tempfile.TemporaryDirectory() as tmp:
        harness.join_gloo(os.path.join(tmp, "rendezvous"), 0, 1)
        harness.init_model_parallel()
        MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0 / args.microbatches))
        routers = router_bench.make_routers(args, args.experts)
        gen = torch.Generator().manual_seed(0)
        width = args.hidden if part == "router" else args.experts
        inputs = [torch.randn(args.seq, args.mbs, width, generator=gen).requires_grad_()
                  for _ in range(args.microbatches)]
        router = router_bench.configure(variant, routers)
        for _ in range(args.warmup):
            router_bench.train_step(variant, router, part, inputs)
        _collect("on")
        for _ in range(args.steps):
            router_bench.train_step(variant, router, part, inputs)
        _collect("off")


def _collect(state: str) -> None:
    subprocess.run(["callgrind_control", "--instr=" + state, str(os.getpid())], check=True,
                   capture_output=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq", type=int, default=16, help="tokens per sequence")
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--topk", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--mbs", type=int, default=1, help="micro-batch size")
    parser.add_argument("--microbatches", type=int, default=4, help="per step (GA)")
    parser.add_argument("--steps", type=int, default=8, help="counted steps per variant")
    parser.add_argument("--warmup", type=int, default=3, help="uncounted steps first")
    parser.add_argument("--parts", nargs="+", choices=router_bench.PARTS,
                        default=list(router_bench.PARTS))
    parser.add_argument("--variants", nargs="+", choices=router_bench.VARIANTS,
                        default=list(router_bench.VARIANTS))
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                        help="variants counted at once (one core each)")
    parser.add_argument("--out", default=common.HERE, help="folder for the JSON and PNG")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    args.device = "cpu"  # router_bench.make_routers
    if args.worker:
        worker(args)
        return
    variants = list(dict.fromkeys([BASELINE, *args.variants]))
    print(f"router instructions: {vars(args)}", flush=True)
    jobs = [(part, variant) for part in args.parts for variant in variants]
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        futures = {job: pool.submit(count, job[1], job[0], argv) for job in jobs}
        per_call = {}
        for job in jobs:
            per_call[job] = futures[job].result() / (args.steps * args.microbatches)
            print(f"  counted {job[0]} | {job[1]}: {per_call[job]:,.0f} per call", flush=True)
    report(per_call, args, variants)


def report(per_call: dict, args, variants: list) -> None:
    shape = f"E{args.experts} top{args.topk} {args.seq}x{args.mbs} tokens"
    print(f"\ninstructions per call ({shape}), and / upstream aux_loss:")
    rows, groups = {}, {}
    for part in args.parts:
        base = per_call[(part, BASELINE)]
        rows[part] = {variant: {"instructions_per_call": per_call[(part, variant)],
                                "ratio_vs_aux_loss": per_call[(part, variant)] / base}
                      for variant in variants}
        for variant in variants:
            row = rows[part][variant]
            print(f"  {part:8s} {variant:26s} {row['instructions_per_call']:12,.0f}  "
                  f"x{row['ratio_vs_aux_loss']:.3f}")
            ratio = row["ratio_vs_aux_loss"]
            groups.setdefault(f"{shape} {part}", {})[variant] = (ratio, ratio, ratio)
    stem = f"router_instructions_E{args.experts}_{args.seq * args.mbs}tokens"
    common.save(stem, args, {"args": vars(args), "machine": common.machine("cpu"),
                             "per_call": rows})
    common.bar_chart(stem, args, "instructions per call / upstream aux_loss (callgrind)", groups,
                     "instruction ratio")


if __name__ == "__main__":
    main()
