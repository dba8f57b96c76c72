"""CUDA graphs that would capture the router are rejected before training; every reader of an
asynchronous collective's result waits on it (CUDA streams)."""

import dataclasses
from types import SimpleNamespace

import pytest
import torch

import workers
from megatron_gbl import compat
from megatron_gbl.config import router_balancing
from megatron_gbl_lab.harness import moe_config, run_gloo

# TransformerConfig overrides -> whether its training CUDA graphs capture the MoE router
CONFIGS = {
    "TE, whole layers": (dict(cuda_graph_impl="transformer_engine"), True),
    "TE, moe_router": (dict(cuda_graph_impl="transformer_engine", cuda_graph_scope="moe_router"),
                       True),
    "TE, attn and moe_router": (dict(cuda_graph_impl="transformer_engine",
                                     cuda_graph_scope=["attn", "moe_router"]), True),
    "TE, attn": (dict(cuda_graph_impl="transformer_engine", cuda_graph_scope="attn"), False),
    "external (deprecated), attn": (dict(external_cuda_graph=True, cuda_graph_scope="attn"), False),
    "local, whole layers": (dict(cuda_graph_impl="local"), True),
    "local, attn (graphs the whole layer)": (dict(cuda_graph_impl="local",
                                                  cuda_graph_scope="attn"), True),
    "enable_cuda_graph (deprecated)": (dict(enable_cuda_graph=True), True),
    "local, full_iteration": (dict(cuda_graph_impl="local", cuda_graph_scope="full_iteration"),
                              True),
    "off": (dict(), False),
}


def config_fields() -> set[str]:
    from megatron.core.transformer.transformer_config import TransformerConfig

    return {field.name for field in dataclasses.fields(TransformerConfig)}


def config_of_this_release(**overrides):
    """moe_config(**overrides), or a skip when this release's TransformerConfig lacks one of
    the fields (cuda_graph_impl is 0.15+; 0.12-0.14 spell it enable_cuda_graph /
    external_cuda_graph, the cases above that use those names)."""
    missing = set(overrides) - config_fields()
    if missing:
        pytest.skip(f"this release's TransformerConfig has no {', '.join(sorted(missing))}")
    return moe_config(**overrides)


@pytest.mark.parametrize("case", list(CONFIGS))
def test_cuda_graphs_of_a_transformer_config(case):
    overrides, captures_router = CONFIGS[case]
    config = config_of_this_release(**overrides)
    assert (compat.router_cuda_graphs(config) is not None) == captures_router
    if captures_router:
        with pytest.raises(ValueError, match="--cuda-graph-impl.*--cuda-graph-scope attn"):
            router_balancing(config)
    else:
        router_balancing(config)


# Megatron-LM's args after validate_args, per release: 0.12-0.14 (bools and a str scope),
# 0.15 (cuda_graph_impl, str scope), 0.16-0.17 (list scope), 0.18+ (cuda_graph_modules).
ARGS = [
    (dict(enable_cuda_graph=True, external_cuda_graph=False, cuda_graph_scope="attn"), True),
    (dict(enable_cuda_graph=False, external_cuda_graph=True, cuda_graph_scope="full"), True),
    (dict(enable_cuda_graph=False, external_cuda_graph=True, cuda_graph_scope="attn"), False),
    (dict(enable_cuda_graph=False, external_cuda_graph=False, cuda_graph_scope="full"), False),
    (dict(cuda_graph_impl="transformer_engine", cuda_graph_scope="attn"), False),
    (dict(cuda_graph_impl="transformer_engine", cuda_graph_scope=[]), True),
    (dict(cuda_graph_impl="transformer_engine", cuda_graph_modules=["attn", "mlp"]), False),
    (dict(cuda_graph_impl="transformer_engine", cuda_graph_modules=["moe"]), True),
    (dict(cuda_graph_impl="local", cuda_graph_modules=["mamba"]), False),
    (dict(cuda_graph_impl="full_iteration", cuda_graph_modules=[]), True),
    (dict(cuda_graph_impl="none", cuda_graph_modules=[]), False),
]


@pytest.mark.parametrize("args, captures_router", ARGS)
def test_cuda_graphs_of_megatron_lm_args(args, captures_router):
    assert (compat.router_cuda_graphs(SimpleNamespace(**args)) is not None) == captures_router


def test_cuda_graph_modules_are_read_from_this_releases_enums():
    # TransformerConfig turns the modules into CudaGraphScope (0.16-0.17) or CudaGraphModule
    # (0.18+) members.
    config = config_of_this_release(cuda_graph_impl="transformer_engine",
                                    cuda_graph_scope=["attn", "moe_router"])
    assert compat.router_cuda_graphs(config) == ("transformer_engine", ["attn", "moe_router"])


def test_cuda_graphs_rejected_at_enable_with_the_model_and_at_the_first_step():
    # Transformer Engine's graphs, as each release spells them: graphs made by the training
    # loop, none at model build, so the model builds on CPU.
    graphs = dict(cuda_graph_impl="transformer_engine", cuda_graph_scope="moe_router") \
        if "cuda_graph_impl" in config_fields() else dict(external_cuda_graph=True)
    errors = run_gloo(workers.cuda_graph_rejections, 1, graphs)[0]
    assert errors.keys() == {"enable", "first step"}
    for message in errors.values():
        assert "capture the MoE router" in message and "--cuda-graph-scope attn" in message


def test_every_reader_of_an_async_collective_waits_on_it():
    # On NCCL each wait() orders the reader's current CUDA stream after the collective, so a
    # reader on another stream than the first one is ordered too; here (gloo) the count of
    # waits on the real work is what shows it.
    assert run_gloo(workers.waits_per_reader, 2, 3) == [3, 3]


def test_sums_over_groups_of_the_same_ranks_share_one_collective():
    results = run_gloo(workers.sums_over_groups, 4)
    for rank, result in enumerate(results):
        world, pair, same, alone = result["sums"]
        assert torch.equal(world, torch.full((2, 3), 10.0))  # 1 + 2 + 3 + 4
        assert torch.equal(pair, torch.full((4,), 30.0 if rank < 2 else 70.0))
        assert torch.equal(same, torch.full((1,), 1000.0))
        assert torch.equal(alone, torch.full((2,), float(rank)))
        assert result["collectives"] == 2  # world + same ranks packed; the pair alone
