"""Bytes the plugin keeps per router, from the formula and measured on a real router.

Per router, for a step of M micro-batches with E experts (megatron_gbl/lbl.py, buffer.py), every
scope keeps per micro-batch, until the next step starts:
    local counts     [c_1..c_E, T] int64, for step_metrics
    probability sums s_1..s_E in the router's dtype, for step_metrics and the logged LBL
    LBL weights      w_1..w_E float64, for the logged LBL (metrics.log_lbl)
    logit sum        float32 [], for the NaN/inf check
and on top, by scope:
    global           the synced counts [c, T] int64 per micro-batch (a copy the all-reduce sums in
                     place) and their prefix sums Σ_{j<=k}, int64, for k >= 1 (k = 0 is the
                     synced counts themselves)
    dp               the last micro-batch's synced counts
    micro            nothing at TP x CP = 1 (no sum, so no copy); the last synced counts otherwise
(micro_coeff > 0 adds an int64 [E+1] per micro-batch that lives only until its backward.)
Upstream global_aux_loss keeps float32 [E] plus a float32 scalar per router; aux_loss keeps none.

The measurement walks everything reachable from `router._megatron_gbl` after a step (objects,
closures, partials) and adds up the distinct tensor storages.

    python -m benchmarks.memory
"""

from __future__ import annotations

import argparse
import functools
import os

import torch

import megatron_gbl
from megatron_gbl_lab import harness

INT64 = FLOAT64 = 8
FLOAT32 = 4

CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                      "moe_43a6.6b.args")
# The paper's 43A6.6B "128+buffer" run (Tab. 1, 5): f synced over 128 sequences, i.e. 128
# data-parallel replicas at micro-batch 1, and buffered over the global batch of 512.
BALANCE_REPLICAS = 128


def read_args(path: str) -> dict:
    """A Megatron-LM argument file (configs/*.args): {"--flag": "value" or None}."""
    flags = {}
    with open(path) as f:
        for line in f:
            words = line.split("#", 1)[0].split()
            if words:
                flags[words[0]] = words[1] if len(words) > 1 else None
    return flags


def plugin_bytes(experts: int, microbatches: int, scope: str = "global",
                 probs_bytes: int = FLOAT32) -> int:
    """The formula of the module docstring, at TP x CP = 1."""
    counts = (experts + 1) * INT64
    kept = microbatches * (counts + experts * probs_bytes + experts * FLOAT64 + FLOAT32)
    if scope == "global":
        return kept + microbatches * counts + (microbatches - 1) * counts
    if scope == "dp":
        return kept + counts
    return kept


def upstream_bytes(experts: int, lbl_type: str) -> int:
    return (experts + 1) * FLOAT32 if lbl_type == "global_aux_loss" else 0


def reachable_tensor_bytes(root) -> int:
    """Bytes of the distinct tensor storages reachable from `root`."""
    seen, storages, stack = set(), {}, [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen or obj is None or isinstance(obj, (str, int, float, bool, type)):
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            storage = obj.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        elif isinstance(obj, (list, tuple, set)):
            stack.extend(obj)
        elif isinstance(obj, dict):
            stack.extend(obj.values())
        elif isinstance(obj, functools.partial):
            stack.extend([obj.func, *obj.args, *obj.keywords.values()])
        elif callable(obj) and hasattr(obj, "__code__"):
            stack.extend(cell.cell_contents for cell in obj.__closure__ or ())
        elif hasattr(obj, "__self__"):
            stack.append(obj.__self__)
        elif hasattr(obj, "__dict__"):
            stack.extend(vars(obj).values())
    return sum(storages.values())


def measure(rank: int, world_size: int, experts: int, microbatches: int) -> dict:
    """Bytes held per router after one step of each scope (a real router, gloo)."""
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    harness.init_model_parallel()
    config = harness.moe_config(num_layers=1, num_moe_experts=experts, moe_router_topk=4,
                                moe_aux_loss_coeff=1e-3)
    router = harness.routers_of(harness.build_gpt_moe(config))[0]
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0 / microbatches))
    measured = {}
    for scope in ("micro", "dp", "global"):
        megatron_gbl.enable(scope)
        with megatron_gbl.step(router, microbatches):
            for _ in range(microbatches):
                probs, _ = router(torch.randn(64, 2, config.hidden_size))
                (probs * 0).sum().backward()
        measured[scope] = reachable_tensor_bytes(router._megatron_gbl)
        megatron_gbl.disable()
    return measured


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=CONFIG, help="Megatron-LM argument file")
    parser.add_argument("--data-parallel", type=int, default=BALANCE_REPLICAS,
                        help="replicas that sync f (DP size); M = global batch / (DP x micro-batch)")
    args = parser.parse_args(argv)
    config = read_args(args.config)
    e, layers = int(config["--num-experts"]), int(config["--num-layers"])
    m = int(config["--global-batch-size"]) // (args.data_parallel * int(config["--micro-batch-size"]))
    print(f"{os.path.basename(args.config)}: {layers} layers, E={e} experts, DP {args.data_parallel}"
          f" -> M={m} micro-batches per step")
    measured = harness.run_gloo(measure, 2, e, m)[0]
    print(f"E={e} experts, M={m} micro-batches per step: bytes per router (per layer)")
    print(f"  {'':28s} {'formula':>9s} {'measured':>9s}")
    for scope in ("micro", "dp", "global"):
        print(f"  plugin {scope:21s} {plugin_bytes(e, m, scope):9d} {measured[scope]:9d}")
    for lbl_type in ("aux_loss", "global_aux_loss"):
        print(f"  upstream {lbl_type:19s} {upstream_bytes(e, lbl_type):9d}")
    per_slot = plugin_bytes(e, m) / m
    print(f"  plugin global per micro-batch slot: {per_slot:.0f} bytes on average for E={e} "
          "(at most 3(E+1) int64 + E float64 + E float32 + 1 float32)")
    total = layers * plugin_bytes(e, m)
    print(f"  whole model, {layers} MoE layers: plugin global {total} bytes "
          f"({total / 2**10:.1f} KiB), upstream global_aux_loss "
          f"{layers * upstream_bytes(e, 'global_aux_loss')} bytes")
    assert all(measured[s] == plugin_bytes(e, m, s) for s in measured), "formula != measured"


if __name__ == "__main__":
    main()
