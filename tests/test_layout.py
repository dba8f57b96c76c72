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


def megatron_members(tp, cp, pp, dp):
    """(tp_dp_cp ranks, dp_rank) of every global rank, from Megatron's own RankGenerator."""
    gen = RankGenerator(tp=tp, ep=1, dp=dp, pp=pp, cp=cp, order="tp-cp-ep-dp-pp")
    group_of = {r: tuple(g) for g in gen.get_ranks("tp-dp-cp") for r in g}
    dp_rank = {r: g.index(r) for g in gen.get_ranks("dp") for r in g}
    return [(group_of[r], dp_rank[r]) for r in range(tp * cp * pp * dp)], gen


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
    members, _ = megatron_members(4, 1, 4, 32)
    created = []
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: len(members))
    monkeypatch.setattr(dist, "get_rank", lambda group=None: world_rank)
    monkeypatch.setattr(dist, "get_process_group_ranks", lambda group: list(group))

    def all_gather_object(out, obj):
        assert obj == (list(members[world_rank][0]), members[world_rank][1])
        out[:] = members

    monkeypatch.setattr(dist, "all_gather_object", all_gather_object)
    monkeypatch.setattr(dist, "new_group", lambda ranks: created.append(ranks) or tuple(ranks))
    own = comm.build_sync_block_group(members[world_rank][0], members[world_rank][1], 8)
    # Every rank creates every block, in the same order (new_group is a world collective).
    assert created == comm.sync_block_layout(members, 8)
    assert world_rank in own and len(own) == 4 * 8
