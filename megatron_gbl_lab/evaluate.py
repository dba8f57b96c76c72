"""Held-out evaluation of a demo model: loss per domain and routing statistics
(`megatron_gbl.analysis.RoutingCollector`), sharded over the gloo ranks and summed."""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from megatron_gbl.analysis import RoutingCollector
from megatron_gbl_lab import batches
from megatron_gbl_lab import harness
from megatron_gbl_lab.model import build_model


def evaluate(model, valid_streams, max_sequences: int, seq_length: int, micro_batch_size: int,
             domains: list[str], routing: bool = True) -> dict:
    """Held-out loss per domain and, with `routing`, the routing statistics; sharded over the
    ranks and summed. Leaves the model in eval mode.

    Each domain's first `max_sequences` windows, in single-domain micro-batches of
    `micro_batch_size` (so `micro_lbl` is the LBL of micro-batches shaped like training's).
    `heldout_loss_halves` is the mean loss of the even- and of the odd-numbered micro-batches:
    their difference measures the evaluation's own sampling noise.
    """
    rank, world_size = dist.get_rank(), dist.get_world_size()
    microbatches = [(d, i // micro_batch_size % 2, windows[i:i + micro_batch_size])
                    for d, stream in enumerate(valid_streams)
                    for windows in [batches.heldout_windows(stream, max_sequences, seq_length + 1)]
                    for i in range(0, len(windows), micro_batch_size)]
    loss_sums = torch.zeros(2, len(domains), dtype=torch.float64)  # [half, domain]
    token_counts = torch.zeros(2, len(domains), dtype=torch.float64)
    model.eval()
    collector = RoutingCollector(model, domains) if routing else contextlib.nullcontext()
    with torch.no_grad(), collector:
        for domain, half, windows in microbatches[rank::world_size]:
            if routing:
                collector.domain = domain
            tokens, labels = windows[:, :-1], windows[:, 1:]
            position_ids = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
            token_losses = model(tokens, position_ids, None, labels=labels)
            loss_sums[half, domain] += token_losses.double().sum()
            token_counts[half, domain] += token_losses.numel()
    dist.all_reduce(loss_sums)
    dist.all_reduce(token_counts)
    losses = (loss_sums.sum(0) / token_counts.sum(0)).tolist()
    result = {"heldout_loss": dict(zip(domains, losses)),
              "heldout_loss_mean": sum(losses) / len(losses),
              "heldout_loss_halves": (loss_sums / token_counts).mean(1).tolist()}
    if routing:
        stats = collector.stats()
        stats.all_reduce()
        result["routing"] = stats.summary()
    return result


def analyze_worker(rank: int, world_size: int, job: dict) -> dict:
    """Rank body for `megatron-gbl analyze`: rebuild a saved model and collect its routing."""
    harness.init_model_parallel()
    checkpoint = job["checkpoint"]
    model = build_model(checkpoint["model_overrides"], checkpoint["seq_length"], seed=0)
    model.load_state_dict(checkpoint["state_dict"])
    return evaluate(model, job["streams"], job["max_sequences"], checkpoint["seq_length"],
                    job["micro_batch_size"], job["domains"])
