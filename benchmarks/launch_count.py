"""Kernel launches and collectives per router call, per step boundary and per step_metrics call.

On a GPU a router call on a small micro-batch costs its kernel launches (a few microseconds
each, whatever the tensor size), so they are what to count, and they can be counted exactly on
a CPU: torch.profiler records every aten operator of the forward and the backward. The rule:

- an operator launches a kernel when it is not a view, an alias, an allocation or a no-op
  conversion (`NO_KERNEL`) and no operator below it is anything else (a leaf, but for the
  allocations and views it makes);
- a `_foreach_*` operator counts once (one fused launch on a GPU), its per-tensor loop on the
  CPU not at all.

Collectives are the torch.distributed calls a rank makes over a group of two or more ranks.
Every count runs on 2 gloo ranks (so the collectives are real), with upstream Megatron-Core
measured in the same process: one TopKRouter per layer, E 64, top-4, hidden 1024, 16 tokens,
the step's second micro-batch (the first of a step is no different at these scopes, and this
leaves out one-time work). With CUDA present the profiler's CUDA kernel count is added.

    python -m benchmarks.launch_count            # JSON, figure, and the table for RESULTS.md
    python -m benchmarks.launch_count --layers 1 16   # fewer layer counts
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os

import torch
import torch.distributed as dist

import megatron_gbl
from benchmarks import common
from megatron_gbl import compat
from megatron_gbl_lab import harness

NO_KERNEL = {
    "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "as_strided",
    "view", "_unsafe_view", "reshape", "_reshape_alias", "alias", "detach", "slice", "select",
    "squeeze", "unsqueeze", "expand", "expand_as", "permute", "t", "transpose", "split",
    "split_with_sizes", "unbind", "chunk", "narrow", "view_as", "unflatten", "flatten",
    "lift_fresh", "resolve_conj", "resolve_neg", "view_as_real", "numpy_T", "set_", "resize_",
    # No-ops unless a copy runs below them (counted there); metadata reads.
    "contiguous", "to", "type_as", "_to_copy", "clone", "result_type",
    "_has_compatible_shallow_copy_type",
}
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor",
               "reduce_scatter", "broadcast", "all_to_all", "all_to_all_single", "reduce",
               "gather", "scatter", "all_gather_single")
# What is measured: (label, router load-balancing type, plugin scope or None, enable kwargs,
# expert bias).
UPSTREAM = [("upstream aux_loss", "aux_loss", None, {}, False),
             ("upstream seq_aux_loss", "seq_aux_loss", None, {}, False),
             ("upstream global_aux_loss", "global_aux_loss", None, {}, False)]
PLUGIN = [(f"plugin {scope}", "aux_loss", scope, {}, False)
          for scope in ("micro", "seq", "dp", "global", "shuffle")]
PLUGIN += [("plugin global:1", "aux_loss", "global", dict(sync_group_size=1), False),
           ("plugin micro+device", "aux_loss", "micro", dict(device_coeff=0.1, device_groups=4),
            False),
           ("plugin global+device", "aux_loss", "global",
            dict(device_coeff=0.1, device_groups=4), False)]
PLUGIN += [(f"plugin {scope}, expert bias", "none", scope, {}, True)
           for scope in ("micro", "dp", "global")]


def launches(fn) -> dict:
    """Kernel launches of `fn()` by the rule above (forward and backward on this thread), and
    the CUDA kernels the profiler saw where CUDA ran."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.autograd.set_multithreading_enabled(False), \
            torch.profiler.profile(activities=activities) as profile:
        fn()
    events = profile.events()
    counted = 0
    for event in events:
        if not event.name.startswith("aten::") or _inside_foreach(event):
            continue
        counted += _launches_a_kernel(event)
    result = {"launches": counted}
    if torch.cuda.is_available():
        result["cuda_kernels"] = sum(1 for event in events
                                     if event.device_type == torch.autograd.DeviceType.CUDA)
    return result


def _op(event) -> str:
    return event.name[len("aten::"):] if event.name.startswith("aten::") else ""


def _launches_a_kernel(event) -> bool:
    op = _op(event)
    if op.startswith("_foreach_"):
        return True
    return bool(op) and op not in NO_KERNEL and not _kernel_below(event)


def _kernel_below(event) -> bool:
    return any((_op(child) and _op(child) not in NO_KERNEL) or _kernel_below(child)
               for child in event.cpu_children)


def _inside_foreach(event) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("aten::_foreach_"):
            return True
        parent = parent.cpu_parent
    return False


@contextlib.contextmanager
def counting_collectives():
    """Count the torch.distributed collectives issued over a group of two or more ranks."""
    issued = []
    originals = {name: getattr(dist, name) for name in COLLECTIVES if hasattr(dist, name)}

    def counted(name, original, *args, **kwargs):
        group = kwargs.get("group")
        if group is None:
            group = next((arg for arg in args if isinstance(arg, dist.ProcessGroup)), None)
        if dist.get_world_size(group) > 1:
            issued.append(name)
        return original(*args, **kwargs)

    for name, original in originals.items():
        setattr(dist, name, functools.partial(counted, name, original))
    try:
        yield issued
    finally:
        for name, original in originals.items():
            setattr(dist, name, original)


def measure(fn) -> dict:
    with counting_collectives() as issued:
        counts = launches(fn)
    return dict(counts, collectives=len(issued))


def make_routers(num_layers: int, lbl_type: str, expert_bias: bool) -> torch.nn.ModuleList:
    """`num_layers` TopKRouters (one per MoE layer) as Megatron-Core builds them."""
    from megatron.core.transformer.moe import moe_utils
    from megatron.core.transformer.moe.router import TopKRouter

    config = harness.moe_config(
        hidden_size=1024, num_attention_heads=16, ffn_hidden_size=4096, num_moe_experts=64,
        moe_router_topk=4, moe_ffn_hidden_size=1024, moe_router_load_balancing_type=lbl_type,
        moe_aux_loss_coeff=0.0 if lbl_type == "none" else 1e-3, num_layers=num_layers,
        **(dict(moe_router_enable_expert_bias=True, moe_router_score_function="sigmoid",
                moe_router_bias_update_rate=1e-3) if expert_bias else {}))
    kwargs = {}
    if hasattr(moe_utils, "get_default_pg_collection"):  # 0.15+
        kwargs["pg_collection"] = moe_utils.get_default_pg_collection()
    routers = torch.nn.ModuleList()
    for layer in range(1, num_layers + 1):
        torch.manual_seed(layer)
        router = TopKRouter(config, **kwargs)
        router.set_layer_number(layer)
        routers.append(router)
    return routers


def call(router, inputs: torch.Tensor) -> None:
    """One training call: forward, then Megatron's zero main loss so only the LBL flows back."""
    probs, _ = router(inputs)
    (probs * 0).sum().backward()


def worker(rank: int, world_size: int, args) -> dict:
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    torch.set_num_threads(1)
    harness.init_model_parallel()
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(0.5))
    inputs = torch.randn(16, 1, 1024, generator=torch.Generator().manual_seed(rank))
    results = {}
    for label, lbl_type, scope, settings, expert_bias in UPSTREAM + PLUGIN:
        for num_layers in args.layers:
            routers = make_routers(num_layers, lbl_type, expert_bias)
            megatron_gbl.disable()
            compat.clear_tracker()  # its per-layer vectors are sized by the first model's layers
            if scope is not None:
                megatron_gbl.enable(scope, model=routers, **settings)
            for step in range(2):
                counted = step == 1  # the first step of a fresh model does one-time work
                start = _measured(counted, lambda: _start(scope, routers))
                call(routers[0], inputs)  # the step's first micro-batch
                router_call = _measured(counted, lambda: call(routers[0], inputs))
                for router in routers[1:]:
                    call(router, inputs)
                    call(router, inputs)
                finish = _measured(counted, lambda: _finish(scope, routers))
            entry = results.setdefault(label, {})
            if num_layers == 1:
                entry["router call"] = router_call
            entry[f"step boundary, {num_layers} layers"] = _add(start, finish)
            if scope is not None:
                entry[f"step_metrics, {num_layers} layers"] = measure(
                    lambda: megatron_gbl.step_metrics(routers))
    megatron_gbl.disable()
    return results


def _measured(counted: bool, fn):
    """measure(fn) when `counted`, else just run it."""
    if counted:
        return measure(fn)
    fn()
    return None


def _start(scope, routers) -> None:
    if scope is None:
        for router in routers:  # what Megatron-LM's finalize_model_grads resets once per step
            if getattr(router, "global_tokens_per_expert", None) is not None:
                router.reset_global_aux_loss_tracker()
    else:
        megatron_gbl.start_step(routers, num_microbatches=2)


def _finish(scope, routers) -> None:
    if scope is not None:
        megatron_gbl.finish_step(routers)


def _add(first: dict, second: dict) -> dict:
    return {key: first.get(key, 0) + second.get(key, 0) for key in first.keys() | second.keys()}


def table(results: dict, layer_counts: list) -> str:
    columns = ["router call"] + [f"step boundary, {n} layers" for n in layer_counts] + \
        [f"step_metrics, {n} layers" for n in layer_counts]
    lines = ["| path | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for label, entry in results.items():
        cells = []
        for column in columns:
            count = entry.get(column)
            cells.append("" if count is None else
                         f"{count['launches']} ({count['collectives']})")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--out", default=common.HERE, help="folder for the JSON and PNG")
    args = parser.parse_args(argv)
    if 1 not in args.layers:
        args.layers = [1, *args.layers]  # the router call is counted at 1 layer
    results = harness.run_gloo(worker, 2, args, timeout_s=3600)[0]
    path = os.path.join(args.out, "launch_count.json")
    with open(path, "w") as f:
        json.dump({"results": results, "machine": common.machine("cpu")}, f, indent=1)
    print("kernel launches (collectives), per rank:\n" + table(results, args.layers))
    plot(results, args.layers, os.path.join(args.out, "launch_count.png"))
    print(f"wrote {path} and launch_count.png")


def plot(results: dict, layer_counts: list, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (calls, boundary) = plt.subplots(1, 2, figsize=(13, 5))
    labels = list(results)
    calls.barh(labels, [results[label]["router call"]["launches"] for label in labels])
    calls.set_xlabel("kernel launches per router call (forward + backward)")
    calls.invert_yaxis()
    for label in labels:
        if label.startswith("plugin") or label == "upstream global_aux_loss":
            counts = [results[label][f"step boundary, {n} layers"]["launches"]
                      for n in layer_counts]
            boundary.plot(layer_counts, counts, marker="o", label=label,
                          linestyle="--" if label.startswith("upstream") else "-")
    boundary.set_xscale("log", base=2)
    boundary.set_yscale("symlog", linthresh=32)
    boundary.set_xlabel("MoE layers")
    boundary.set_ylabel("kernel launches per step boundary\n(plugin: start_step + finish_step; "
                        "upstream: its per-step reset)")
    boundary.legend(fontsize=7)
    fig.suptitle("Kernel launches counted on CPU (torch.profiler; views and allocations not "
                 "counted, a _foreach_ op once)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
