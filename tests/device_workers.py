"""Per-rank bodies for tests/test_device_balance.py: real TopKRouters under expert parallelism.

Megatron-Core's allgather dispatcher runs on CPU, so expert-parallel groups are real gloo
groups; every rank is also a data-parallel replica (TP 1), as in tests/workers.py.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

import megatron_gbl
import workers
from megatron_gbl_lab import harness


def init_expert_parallel(expert_parallel: int) -> list[int]:
    """Megatron's model-parallel groups with expert-parallel size `expert_parallel`; returns
    the ranks of this rank's expert-tensor x expert-parallel group (the token group)."""
    from megatron.core import parallel_state

    parallel_state.initialize_model_parallel(expert_model_parallel_size=expert_parallel)
    return dist.get_process_group_ranks(
        parallel_state.get_expert_tensor_and_model_parallel_group())


def ep_router_runs(rank: int, world_size: int, layouts: list) -> list:
    """For each (expert-parallel size, specs) of `layouts`: workers.router_steps of every spec,
    models built at that size. Returns per layout {token_group: ranks, runs: results}."""
    from megatron.core import parallel_state

    results = []
    for expert_parallel, specs in layouts:
        if parallel_state.model_parallel_is_initialized():
            harness.destroy_model_parallel()
        token_group = init_expert_parallel(expert_parallel)
        specs = [dict(spec, config=dict(spec.get("config", {}),
                                        expert_model_parallel_size=expert_parallel))
                 for spec in specs]
        results.append({"token_group": token_group,
                        "runs": workers.router_runs(rank, world_size, specs)})
    return results


def router_forward_before_peer(rank: int, world_size: int, flag_path: str,
                               blocking_sync: bool) -> str:
    """At expert-parallel size 2, rank 0 runs a router forward with the device-level LBL before
    rank 1 starts its own, then both run backward. Scope "micro" at TP 1 syncs nothing, so the
    device-count sum over the token group is the only collective: possible only if the forward
    does not wait for it."""
    init_expert_parallel(2)
    model = harness.build_gpt_moe(harness.moe_config(expert_model_parallel_size=2))
    router = harness.routers_of(model)[0]
    megatron_gbl.enable("micro", device_coeff=1e-2, blocking_sync=blocking_sync, model=model)
    megatron_gbl.start_step(model, num_microbatches=1)
    generator = torch.Generator().manual_seed(rank)
    hidden = torch.randn(8, 2, model.config.hidden_size, generator=generator)
    if rank == 1:
        workers.wait_for_peer_forward(flag_path)
    probs, _ = router(hidden)
    if rank == 0:
        open(flag_path, "w").close()
    (probs * 0).sum().backward()
    megatron_gbl.finish_step(model)
    megatron_gbl.disable()
    return "done"
