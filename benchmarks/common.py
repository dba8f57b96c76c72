"""What both benchmarks share: launching ranks, timing, interleaving, statistics, output.

CPU: ranks are spawned here on gloo with the harness's CPU shims (`harness.run_gloo`).
CUDA: one process per GPU under torchrun on NCCL, no shims; without torchrun, one rank.
"""

from __future__ import annotations

import json
import os
import platform
import random
import statistics
import time

import torch
import torch.distributed as dist

from megatron_gbl_lab import harness

HERE = os.path.dirname(os.path.abspath(__file__))


def add_common_args(parser, world_size: int) -> None:
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--backend", choices=("nccl", "gloo"), default=None,
                        help="CUDA (default nccl): gloo lets several ranks share one GPU")
    parser.add_argument("--world-size", type=int, default=world_size,
                        help="CPU: gloo ranks to spawn (CUDA: set by torchrun)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU: torch threads per rank (default: cores // ranks, at least 1)")
    parser.add_argument("--steps", type=int, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per variant first")
    parser.add_argument("--out", default=HERE, help="folder for the JSON and PNG")
    parser.add_argument("--timeout", type=float, default=3 * 3600, help="CPU: seconds before giving up")


def launch(worker, args):
    """Run `worker(rank, world_size, args)` on every rank; rank 0's return value, else None."""
    if args.device == "cpu":
        return harness.run_gloo(worker, args.world_size, args, timeout_s=args.timeout)[0]
    rank, world_size = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    dist.init_process_group(args.backend or "nccl", rank=rank, world_size=world_size)
    try:
        result = worker(rank, world_size, args)
    finally:
        dist.destroy_process_group()
    return result if rank == 0 else None


def setup_rank(args, world_size: int) -> None:
    """Threads (CPU), Megatron's model-parallel state (all DP) and, on CUDA, its RNG tracker."""
    if args.device == "cpu":
        torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // world_size))
    harness.init_model_parallel()
    if args.device == "cuda":
        from megatron.core import tensor_parallel

        tensor_parallel.model_parallel_cuda_manual_seed(1234)


def timed(fn, device: str) -> tuple[float, float]:
    """(wall, CPU) seconds `fn()` takes, queued device work included in the wall time.

    CPU time is this process's, all threads (gloo's too): on a loaded shared box it still
    counts the work a variant does, while the wall time also counts waiting for the scheduler.
    """
    if device == "cuda":
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - wall, time.process_time() - cpu


def host_syncs(fn, device: str):
    """CUDA: how often `fn()` made the host wait for the GPU (torch's sync debug mode); CPU: None."""
    if device != "cuda":
        return None
    import warnings

    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def aten_ops(fn) -> int:
    """How many aten operators `fn()` dispatches that run a kernel, forward and backward: on a
    GPU each is a kernel launch, so where the router is launch-bound this is its cost. Views
    (`view`, `select`, `detach`, ...) and bare allocations run none and are not counted."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        ops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.ops += _runs_a_kernel(func)
            return func(*args, **(kwargs or {}))

    # Backward on this thread, where the counting mode is (CUDA's runs on a worker otherwise).
    with torch.autograd.set_multithreading_enabled(False), Count():
        fn()
    return Count.ops


def _runs_a_kernel(func) -> bool:
    if func.__name__.split(".")[0] in ("empty", "empty_like", "new_empty", "empty_strided"):
        return False
    # A view returns an alias it does not write (schema "Tensor(a)"; in-place is "Tensor(a!)").
    return not any(ret.alias_info is not None and not ret.alias_info.is_write
                   for ret in func._schema.returns)


def per_call(count, microbatches: int):
    """A per-step count (None: not measured) per micro-batch call."""
    return None if count is None else count / microbatches


def slowest(samples: dict) -> dict:
    """Each sample's maximum over ranks (a synchronous step lasts as long as its slowest rank).

    One collective after all timing, with every rank's samples in the same order.
    """
    keys = list(samples)
    flat = torch.tensor([t for key in keys for t in samples[key]], dtype=torch.float64,
                        device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(flat, op=dist.ReduceOp.MAX)
    values, out = flat.tolist(), {}
    for key in keys:
        out[key], values = values[:len(samples[key])], values[len(samples[key]):]
    return out


def running_order(items: list, i: int) -> list:
    """Step i's running order, a row of a Williams design: over every n steps (2n for an odd
    number n of variants) each variant runs first, second, ... equally often, and right after
    each other variant equally often.

    Rotating one fixed order kept every variant's predecessor fixed, and at 16 tokens the
    predecessor showed: the plugin variant that always followed upstream global_aux_loss was
    the slowest of three whose instruction counts agree within 0.5%.
    """
    n = len(items)
    first = [0]  # 0, 1, n-1, 2, n-2, ...: every difference between neighbours occurs once
    for j in range(1, n):
        first.append((j + 1) // 2 if j % 2 else n - j // 2)
    rows = [[(index + shift) % n for index in first] for shift in range(n)]
    if n % 2:
        rows += [row[::-1] for row in rows]
    return [items[index] for index in rows[i % len(rows)]]


def sleep(seconds: float, device: str) -> None:
    """Hold this rank up for `seconds`: the host on CPU, the GPU's stream on CUDA."""
    if seconds <= 0:
        return
    if device == "cpu":
        time.sleep(seconds)
    else:
        torch.cuda._sleep(int(seconds * _gpu_cycles_per_second()))


_CYCLES: list = []


def _gpu_cycles_per_second() -> float:
    if not _CYCLES:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        cycles = 50_000_000
        torch.cuda._sleep(cycles)  # warm up
        start.record()
        torch.cuda._sleep(cycles)
        end.record()
        end.synchronize()
        _CYCLES.append(cycles / (start.elapsed_time(end) / 1e3))
    return _CYCLES[0]


def ms(samples: list) -> float:
    return 1e3 * statistics.median(samples)


def paired_ratio(samples: list, baseline: list, boot: int = 2000, seed: int = 0) -> dict:
    """Median over i of samples[i] / baseline[i] and its bootstrap 95% interval.

    Samples i of two variants ran back to back (interleaved), so their ratio cancels the
    machine's slow drifts (other jobs on a shared box).
    """
    ratios = [a / b for a, b in zip(samples, baseline)]
    rng = random.Random(seed)
    medians = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(boot))
    return {"median": statistics.median(ratios), "lo": medians[int(0.025 * boot)],
            "hi": medians[int(0.975 * boot) - 1], "n": len(ratios)}


def verdict(r: dict, limit: float, strict: bool = False) -> str:
    """Is the ratio <= limit (< limit if strict), judged on its 95% interval?"""
    below = (lambda x: x < limit) if strict else (lambda x: x <= limit)
    if below(r["hi"]):
        return "met"
    if not below(r["lo"]):
        return "NOT met"
    return f"undecided (95% CI contains {limit:g}; median {'meets' if below(r['median']) else 'misses'} it)"


def fmt_ratio(r: dict) -> str:
    return f"{r['median']:.3f} [{r['lo']:.3f}, {r['hi']:.3f}]"


def machine(device: str) -> dict:
    import megatron.core

    info = {"python": platform.python_version(), "torch": torch.__version__,
            "megatron_core": getattr(megatron.core, "__version__", "?"),
            "cpu": _cpu_model(), "cores": os.cpu_count(), "load_avg_at_start": os.getloadavg()}
    # The caller adds "load_avg_at_end": other jobs on a shared box show up here.
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


def save(stem: str, args, payload: dict) -> str:
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"{stem}.json")
    with open(path, "w") as f:
        json.dump(payload, f, indent=1)
    print(f"raw numbers: {path}")
    return path


def bar_chart(stem: str, args, title: str, groups: dict, ylabel: str) -> None:
    """Grouped bars: groups = {group label: {variant: (value, lo, hi)}}; PNG next to the JSON."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no plot: matplotlib is not installed")
        return
    variants = list(next(iter(groups.values())))
    width = 0.8 / len(variants)
    fig, ax = plt.subplots(figsize=(min(14.0, 3.0 + 0.18 * len(groups) * len(variants)), 4.5))
    for j, variant in enumerate(variants):
        xs = [i + (j - (len(variants) - 1) / 2) * width for i in range(len(groups))]
        vals = [groups[g][variant] for g in groups]
        ax.bar(xs, [v[0] for v in vals], width, label=variant,
               yerr=[[v[0] - v[1] for v in vals], [v[2] - v[0] for v in vals]], capsize=2)
    ax.set_xticks(range(len(groups)), list(groups), fontsize=8, rotation=20, ha="right")
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    low = min(v[1] for g in groups.values() for v in g.values())
    ax.set_ylim(bottom=max(0.0, round(low - 0.15, 1)))
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = os.path.join(args.out, f"{stem}.png")
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")
