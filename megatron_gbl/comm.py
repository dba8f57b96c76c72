"""Collectives and balance-group layouts. Every collective takes its group as an argument."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist


def all_reduce_sum(tensor: torch.Tensor, group) -> torch.Tensor:
    """Sum `tensor` in place over `group`; a no-op without a group or with a group of one."""
    return PendingSum(tensor, group).wait()


def _spans_ranks(group) -> bool:
    return group is not None and dist.get_world_size(group) > 1


class _Pending:
    """A collective that was issued with its result in `tensor`; `wait()` returns the result.

    Issuing it asynchronously lets the forward pass go on while the data travels; the first
    `wait()` blocks until it arrived (later ones return at once).
    """

    def __init__(self, tensor: torch.Tensor, work) -> None:
        self._tensor = tensor
        self._work = work

    def wait(self) -> torch.Tensor:
        if self._work is not None:
            self._work.wait()
            self._work = None
        return self._tensor


class PendingSum(_Pending):
    """An in-place sum of `tensor` over `group` (nothing to do without a group of two or more)."""

    def __init__(self, tensor: torch.Tensor, group, blocking: bool = False) -> None:
        work = None
        if _spans_ranks(group):
            work = dist.all_reduce(tensor, group=group, async_op=not blocking)
        super().__init__(tensor, work)


class PendingGather(_Pending):
    """Every rank's `tensor` of `group`, stacked along dim 0 in group-rank order: [G*N, ...]."""

    def __init__(self, tensor: torch.Tensor, group, blocking: bool = False) -> None:
        work = None
        if _spans_ranks(group):
            gathered = tensor.new_empty((dist.get_world_size(group) * tensor.shape[0],
                                         *tensor.shape[1:]))
            # all_gather_single replaces all_gather_into_tensor in newer torch releases.
            gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
            work = gather(gathered, tensor, group=group, async_op=not blocking)
            tensor = gathered
        super().__init__(tensor, work)


def sync_block_layout(
    members: Sequence[tuple[Sequence[int], int]], sync_group_size: int
) -> list[list[int]]:
    """Ranks of every balance block, in an order every rank computes identically.

    `members[r] = (tp_dp_cp_ranks, dp_rank)` for global rank r: the ranks of r's TP x DP x CP
    group (one per pipeline stage) and r's data-parallel index. A block holds the ranks of one
    TP x DP x CP group whose dp_rank // sync_group_size agree, so TP and CP shards of a
    sequence always stay together and each block spans `sync_group_size` DP replicas.
    """
    blocks: dict[tuple, list[int]] = {}
    for rank, (group_ranks, dp_rank) in enumerate(members):
        key = (tuple(sorted(group_ranks)), dp_rank // sync_group_size)
        blocks.setdefault(key, []).append(rank)
    return [sorted(ranks) for _, ranks in sorted(blocks.items())]


def build_sync_block_group(
    tp_dp_cp_group, dp_rank: int, sync_group_size: int
) -> Optional[dist.ProcessGroup]:
    """This rank's balance-block process group; a collective over the whole world.

    Every rank must call it (torch.distributed.new_group needs all ranks, members or not).
    """
    member = (dist.get_process_group_ranks(tp_dp_cp_group), dp_rank)
    members: list = [None] * dist.get_world_size()
    dist.all_gather_object(members, member)
    own = None
    for ranks in sync_block_layout(members, sync_group_size):
        group = dist.new_group(ranks)
        if dist.get_rank() in ranks:
            own = group
    return own
