"""Balance-block layouts (sync_group_size) at 64 and 512 ranks, with mocked process groups."""

import pytest
import torch.distributed as dist

from megatron.core.parallel_state import RankGenerator
from megatron_gbl import comm

LAYOUTS = [  # (tp, cp, pp, dp): 64 and 512 ranks in Megatron's default rank order
    (2, 2, 2, 8),
    (4, 1, 4, 32),
    (2, 2, 1, 128),
]


def megatron_members(tp, cp, pp, dp, order="tp-cp-ep-dp-pp"):
    """(tp_dp_cp ranks, dp_rank) of every global rank, from Megatron's own RankGenerator."""
    gen = RankGenerator(tp=tp, ep=1, dp=dp, pp=pp, cp=cp, order=order)
    group_of = {r: tuple(g) for g in gen.get_ranks("tp-dp-cp") for r in g}
    dp_rank = {r: g.index(r) for g in gen.get_ranks("dp") for r in g}
    return [(group_of[r], dp_rank[r]) for r in range(tp * cp * pp * dp)], gen


def process_groups(gen, world_size):
    """(tp_dp_cp ranks, tp_cp ranks) of every global rank: what a rank knows of its groups."""
    tp_dp_cp = {r: tuple(g) for g in gen.get_ranks("tp-dp-cp") for r in g}
    tp_cp = {r: tuple(g) for g in gen.get_ranks("tp-cp") for r in g}
    return [(tp_dp_cp[r], tp_cp[r]) for r in range(world_size)]


@pytest.mark.parametrize("order", ["tp-cp-ep-dp-pp", "tp-cp-ep-pp-dp"])
@pytest.mark.parametrize("tp, cp, pp, dp", LAYOUTS)
def test_data_parallel_ranks_from_the_process_groups_are_megatrons(tp, cp, pp, dp, order):
    members, gen = megatron_members(tp, cp, pp, dp, order)
    assert comm.data_parallel_ranks(process_groups(gen, len(members))) == \
        [(tuple(sorted(group)), dp_rank) for group, dp_rank in members]


@pytest.mark.parametrize("tp, cp, pp, dp", LAYOUTS)
@pytest.mark.parametrize("block", [1, 2, 8])
def test_blocks_partition_ranks_into_consecutive_dp_replicas(tp, cp, pp, dp, block):
    members, gen = megatron_members(tp, cp, pp, dp)
    blocks = comm.sync_block_layout(members, block)
    assert sorted(r for b in blocks for r in b) == list(range(len(members)))
    assert len(blocks) == pp * dp // block
    tp_cp = {frozenset(g) for g in gen.get_ranks("tp-cp")}
    for ranks in blocks:
        assert len(ranks) == tp * cp * block
        assert len({members[r][0] for r in ranks}) == 1  # one pipeline stage's group
        dp_ranks = sorted({members[r][1] for r in ranks})
        assert dp_ranks == list(range(dp_ranks[0], dp_ranks[0] + block))
        assert dp_ranks[0] % block == 0
        # Whole sequences: every TP x CP shard of a replica is in the same block.
        for shard_group in tp_cp:
            assert shard_group <= set(ranks) or not (shard_group & set(ranks))


def test_whole_dp_block_is_the_tp_dp_cp_group():
    members, gen = megatron_members(2, 2, 2, 8)
    assert sorted(map(tuple, comm.sync_block_layout(members, 8))) == sorted(
        tuple(sorted(g)) for g in gen.get_ranks("tp-dp-cp"))


@pytest.mark.parametrize("world_rank", [0, 37, 511])
def test_build_sync_block_group_with_mocked_process_groups(monkeypatch, world_rank):
    members, gen = megatron_members(4, 1, 4, 32)
    groups = process_groups(gen, len(members))
    created = []
    monkeypatch.setattr(dist, "get_world_size",
                        lambda group=None: len(members) if group is None else len(group))
    monkeypatch.setattr(dist, "get_rank", lambda group=None: world_rank)
    monkeypatch.setattr(dist, "get_process_group_ranks", lambda group: list(group))

    def all_gather_object(out, obj):
        assert obj == tuple(map(list, groups[world_rank]))
        out[:] = groups

    monkeypatch.setattr(dist, "all_gather_object", all_gather_object)
    monkeypatch.setattr(dist, "new_group",
                        lambda ranks, **settings: created.append(ranks) or tuple(ranks))
    own = comm.build_sync_block_group(*groups[world_rank], 8)
    # Every rank creates every block, in the same order (new_group is a world collective).
    assert created == comm.sync_block_layout(members, 8)
    assert world_rank in own and len(own) == 4 * 8


@pytest.mark.skipif(not hasattr(dist, "ProcessGroupNCCL"), reason="a torch build without NCCL")
def test_balance_blocks_get_megatrons_nccl_options_not_the_groups_identity():
    # What Megatron's get_nccl_options sets from --nccl-communicator-config-path is copied; the
    # ranks, name and split colour of the group it was set on are not (new_group would keep them).
    options = dist.ProcessGroupNCCL.Options(is_high_priority_stream=True)
    options.config.cga_cluster_size, options.config.max_ctas = 2, 8
    options.config.min_ctas, options.config.net_name = 2, "IB"
    options.global_ranks_in_group, options.group_name, options.split_color = [0, 1], "tp_dp_cp", 5
    like = comm.nccl_options_like(options)
    assert like.is_high_priority_stream
    assert (like.config.cga_cluster_size, like.config.max_ctas, like.config.min_ctas,
            like.config.net_name) == (2, 8, 2, "IB")
    fresh = dist.ProcessGroupNCCL.Options()
    assert (like.global_ranks_in_group, like.group_name, like.split_color) == \
        (fresh.global_ranks_in_group, fresh.group_name, fresh.split_color)
    assert comm.nccl_options_like(fresh).config.max_ctas == fresh.config.max_ctas  # unset
