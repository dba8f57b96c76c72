"""Collectives and balance-group layouts. Every collective takes its group as an argument."""

from __future__ import annotations

import contextlib
import functools
import logging
from typing import Callable, Sequence, Union

import torch
import torch.distributed as dist

logger = logging.getLogger("megatron_gbl")


def all_reduce_sum(tensor: torch.Tensor, group, what: str = "an all-reduce") -> torch.Tensor:
    """Sum `tensor` in place over `group`; a no-op without a group or with a group of one."""
    return PendingSum(tensor, group, blocking=True, what=what).wait()


def all_reduce_average(tensor: torch.Tensor, group, what: str = "an all-reduce") -> torch.Tensor:
    """Average `tensor` in place over `group` with ReduceOp.AVG, the operation Megatron-Core's
    own step-end averages use; a no-op without a group or with a group of one."""
    issue = functools.partial(dist.all_reduce, tensor, op=dist.ReduceOp.AVG, group=group)
    return _Pending(tensor, group, issue, blocking=True, what=what).wait()


def all_reduce_sums(pairs: Sequence[tuple[torch.Tensor, object]],
                    what: str = "an all-reduce") -> list[torch.Tensor]:
    """Each tensor of `pairs` [(tensor, group)] summed over its group (None: left as it is), in
    one collective per set of ranks: tensors whose groups hold the same ranks travel as one flat
    buffer (of their common dtype) over the first of those groups. Every rank passes its pairs
    in the same order, so every rank of a group packs the same tensors."""
    results = [tensor for tensor, _ in pairs]
    batches: dict[tuple[int, ...], tuple[object, list[int]]] = {}
    for index, (_, group) in enumerate(pairs):
        if spans_ranks(group):
            ranks = tuple(dist.get_process_group_ranks(group))
            batches.setdefault(ranks, (group, []))[1].append(index)
    for group, indices in batches.values():
        flat = all_reduce_sum(torch.cat([results[i].reshape(-1) for i in indices]), group, what)
        chunks = flat.split([results[i].numel() for i in indices])
        for i, chunk in zip(indices, chunks):
            results[i] = chunk.view_as(results[i])
    return results


def world_group():
    """Every rank of the job (Megatron trains one model over all of them); None without
    torch.distributed."""
    return dist.group.WORLD if dist.is_initialized() else None


def collective_device() -> torch.device:
    """Where a tensor for a collective over the default backend lives: the current CUDA device
    (NCCL), else the CPU (gloo)."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
        else torch.device("cpu")


def spans_ranks(group) -> bool:
    return group is not None and dist.get_world_size(group) > 1


class _Pending:
    """A collective issued on `tensor` (the result); `wait()` returns the result.

    Issuing it asynchronously lets the forward pass go on while the data travels; `wait()`
    blocks until it arrived. A collective that fails, for example because a rank of the group
    died or the group's timeout ran out, raises a `CollectiveError` that names it, instead of
    leaving a bare backend error (or a hang).

    Every `wait()` waits on the work again. On NCCL, `work.wait()` blocks no host thread: it
    makes the caller's current CUDA stream wait for the collective, so each reader of the
    result is ordered after it on its own stream, not only the stream of the first reader (on
    gloo a finished work returns at once). Values the plugin derives from a result (w, the
    buffer's prefix sums, the bias update) are computed on the stream of the wait that produced
    them; in Megatron that is the stream the step runs on, which the step's later readers
    (finish_step, step_metrics) share: the router and its backward run on the schedule's
    compute stream, which is the current stream (pipeline_parallel.utils.get_comp_stream;
    0.14-0.17 fix it to the current stream at the first overlapped step), also under
    overlap_moe_expert_parallel_comm, where only the token dispatch and combine run on the
    communication stream.
    """

    def __init__(self, tensor: torch.Tensor, group, issue, blocking: bool,
                 what: Union[str, Callable[[], str]]) -> None:
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
        return self._tensor

    @property
    def what(self) -> str:
        """The collective's name for errors (a callable is asked only when one happens)."""
        return self._what() if callable(self._what) else self._what

    @contextlib.contextmanager
    def _named(self):
        try:
            yield
        except RuntimeError as error:  # torch.distributed's errors derive from it
            if not peer_failure(error):
                raise  # a programming error (a bad dtype, ...) keeps its own message
            raise CollectiveError(
                f"megatron_gbl: {self.what} failed: {error}. A rank of its process group "
                "stopped or missed the process group's timeout (init_process_group(timeout=...), "
                "Megatron-LM's --distributed-timeout-minutes); this rank stops instead of "
                "hanging. Look for the first rank that failed."
            ) from error


def peer_failure(error: RuntimeError) -> bool:
    """Whether a collective's error is the backend's report that a peer failed or the group's
    timeout ran out: torch.distributed's DistError family (NCCL's watchdog, the store), or
    gloo's transport errors, plain RuntimeErrors raised in its tcp transport ("Connection reset
    by peer", "Timed out waiting ... for recv")."""
    return isinstance(error, dist.DistError) or "gloo/transport" in str(error)


class CollectiveError(RuntimeError):
    """A megatron_gbl collective failed: a peer died or timed out."""


class PendingSum(_Pending):
    """An in-place sum of `tensor` over `group` (nothing to do without a group of two or more)."""

    def __init__(self, tensor: torch.Tensor, group, blocking: bool = False,
                 what: Union[str, Callable[[], str]] = "an all-reduce") -> None:
        super().__init__(tensor, group, functools.partial(dist.all_reduce, tensor, group=group),
                         blocking, what)


class PendingGather(_Pending):
    """Every rank's `tensor` of `group`, stacked along dim 0 in group-rank order: [G*N, ...]."""

    def __init__(self, tensor: torch.Tensor, group, blocking: bool = False,
                 what: Union[str, Callable[[], str]] = "an all-gather") -> None:
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


def data_parallel_ranks(
    groups: Sequence[tuple[Sequence[int], Sequence[int]]]
) -> list[tuple[tuple[int, ...], int]]:
    """`(tp_dp_cp_ranks, dp_rank)` of every global rank r from `groups[r] = (tp_dp_cp_ranks,
    tp_cp_ranks)`, its two process groups.

    A data-parallel replica is one TP x CP group of a TP x DP x CP group; replicas are numbered
    by their lowest rank, as Megatron's rank orders (tp-cp-ep-dp-pp, tp-cp-ep-pp-dp) put the
    data-parallel rank above the tensor and context ranks.
    """
    replicas: dict[tuple[int, ...], set[int]] = {}
    for tp_dp_cp, tp_cp in groups:
        replicas.setdefault(tuple(sorted(tp_dp_cp)), set()).add(min(tp_cp))
    order = {group: sorted(firsts) for group, firsts in replicas.items()}
    return [(tuple(sorted(tp_dp_cp)), order[tuple(sorted(tp_dp_cp))].index(min(tp_cp)))
            for tp_dp_cp, tp_cp in groups]


def build_sync_block_group(tp_dp_cp_group, tp_cp_group, sync_group_size: int):
    """This rank's balance-block process group, cut from its TP x DP x CP group; a collective
    over the whole world.

    Every rank must call it (torch.distributed.new_group needs all ranks, members or not). The
    blocks get the timeout and NCCL options of `tp_dp_cp_group` (`group_settings`).
    """
    groups: list = [None] * dist.get_world_size()
    dist.all_gather_object(groups, (dist.get_process_group_ranks(tp_dp_cp_group),
                                    dist.get_process_group_ranks(tp_cp_group)))
    settings = group_settings(tp_dp_cp_group)
    own = None
    for ranks in sync_block_layout(data_parallel_ranks(groups), sync_group_size):
        group = dist.new_group(ranks, **settings)
        if dist.get_rank() in ranks:
            own = group
    return own


# What Megatron's parallel_state.get_nccl_options sets (0.12-0.19) from
# --nccl-communicator-config-path, besides is_high_priority_stream.
_NCCL_CONFIG_FIELDS = ("cga_cluster_size", "max_ctas", "min_ctas", "net_name")


def group_settings(group) -> dict:
    """new_group keyword arguments that make a group like `group`: its timeout (Megatron's
    --distributed-timeout-minutes for the groups of initialize_model_parallel) and, on NCCL, its
    options. Read through torch's private backend options; where this torch has none, the
    blocks get torch's defaults, and a warning says so."""
    settings = {}
    for device_type in getattr(group, "_device_types", ()):
        options = getattr(group._get_backend(torch.device(device_type)), "options", None)
        if options is None:
            continue
        settings["timeout"] = options._timeout
        nccl = getattr(dist, "ProcessGroupNCCL", None)
        if nccl is not None and isinstance(options, nccl.Options):
            settings["pg_options"] = nccl_options_like(options)
    if "timeout" not in settings:
        logger.warning("megatron_gbl: this torch does not expose the timeout of Megatron's "
                       "TP x DP x CP group; the balance-block groups (sync_group_size) get "
                       "torch's default timeout and options")
    return settings


def nccl_options_like(options):
    """A fresh ProcessGroupNCCL.Options with the stream priority and communicator config of
    `options`. Not a copy: new_group keeps another group's split source and ranks on a copy."""
    like = type(options)(is_high_priority_stream=options.is_high_priority_stream)
    for name in _NCCL_CONFIG_FIELDS:
        value = getattr(options.config, name)
        if value is not None:
            setattr(like.config, name, value)
    return like


def destroy_group(group) -> None:
    """Destroy a group this plugin made; every member calls it (a no-op once torch.distributed
    is shut down, which destroyed it already)."""
    if group is not None and dist.is_initialized():
        dist.destroy_process_group(group)
