"""Collectives and balance-group layouts. Every collective takes its group as an argument."""

from __future__ import annotations

import contextlib
import functools
from typing import Optional, Sequence

import torch
import torch.distributed as dist


def all_reduce_sum(tensor: torch.Tensor, group, what: str = "an all-reduce") -> torch.Tensor:
    """Sum `tensor` in place over `group`; a no-op without a group or with a group of one."""
    return PendingSum(tensor, group, blocking=True, what=what).wait()


def spans_ranks(group) -> bool:
    return group is not None and dist.get_world_size(group) > 1


class _Pending:
    """A collective issued on `tensor` (the result); `wait()` returns the result.

    Issuing it asynchronously lets the forward pass go on while the data travels; the first
    `wait()` blocks until it arrived (later ones return at once). A collective that fails, for
    example because a rank of the group died or the group's timeout ran out, raises a
    `CollectiveError` that names it, instead of leaving a bare backend error (or a hang).
    """

    def __init__(self, tensor: torch.Tensor, group, issue, blocking: bool, what: str) -> None:
        self._tensor = tensor
        self._work = None
        self._what = what
        if spans_ranks(group):
            with self._named():
                self._work = issue(async_op=not blocking)

    def wait(self) -> torch.Tensor:
        if self._work is not None:
            with self._named():
                self._work.wait()
            self._work = None
        return self._tensor

    @contextlib.contextmanager
    def _named(self):
        try:
            yield
        except RuntimeError as error:  # torch.distributed's errors derive from it
            raise CollectiveError(
                f"megatron_gbl: {self._what} failed: {error}. A rank of its process group "
                "stopped or missed the process group's timeout (init_process_group(timeout=...), "
                "Megatron-LM's --distributed-timeout-minutes); this rank stops instead of "
                "hanging. Look for the first rank that failed."
            ) from error


class CollectiveError(RuntimeError):
    """A megatron_gbl collective failed: a peer died or timed out."""


class PendingSum(_Pending):
    """An in-place sum of `tensor` over `group` (nothing to do without a group of two or more)."""

    def __init__(self, tensor: torch.Tensor, group, blocking: bool = False,
                 what: str = "an all-reduce") -> None:
        super().__init__(tensor, group, functools.partial(dist.all_reduce, tensor, group=group),
                         blocking, what)


class PendingGather(_Pending):
    """Every rank's `tensor` of `group`, stacked along dim 0 in group-rank order: [G*N, ...]."""

    def __init__(self, tensor: torch.Tensor, group, blocking: bool = False,
                 what: str = "an all-gather") -> None:
        issue = None
        if spans_ranks(group):
            gathered = tensor.new_empty((dist.get_world_size(group) * tensor.shape[0],
                                         *tensor.shape[1:]))
            # all_gather_single replaces all_gather_into_tensor in newer torch releases.
            gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
            issue = functools.partial(gather, gathered, tensor, group=group)
            tensor = gathered
        super().__init__(tensor, group, issue, blocking, what)


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
