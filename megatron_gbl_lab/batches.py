"""The paper's batch layout (Sec. 2.2) over token streams: every micro-batch holds packed and
truncated sequences of one domain, every global batch mixes micro-batches of different
domains."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from megatron_gbl_lab import corpus


@dataclass(frozen=True)
class Corpus:
    """Token streams per domain: `train[d]` and `valid[d]` are 1-D int64 tensors of the
    domain's documents, byte tokens with EOD after each document (packed, as in pre-training)."""

    domains: list[str]
    train: list[torch.Tensor]
    valid: list[torch.Tensor]

    def sha256(self) -> str:
        """A fingerprint of the domains and both splits' tokens (a resumed demo checks that its
        seeds saw the same text)."""
        digest = hashlib.sha256("\n".join(self.domains).encode())
        for stream in self.train + self.valid:
            digest.update(len(stream).to_bytes(8, "little") + stream.numpy().tobytes())
        return digest.hexdigest()


def domain_streams(records: list[dict], domains: list[str]) -> list[torch.Tensor]:
    """Per domain (in the order of `domains`), its documents' tokens with EOD after each: 1-D
    int64 (packed, as in pre-training)."""
    return [torch.tensor(tokens, dtype=torch.long)
            for tokens in corpus.domain_tokens(records, domains)]


def build_corpus(train_records: list[dict], valid_records: list[dict],
                 domains: list[str]) -> Corpus:
    """Both splits' token streams of `domains` (checked by corpus.check_corpus)."""
    return Corpus(domains, domain_streams(train_records, domains),
                  domain_streams(valid_records, domains))


def step_domains(seed: int, step: int, num_slots: int, num_domains: int) -> list[int]:
    """The domain of each of a step's `num_slots` micro-batches (all ranks x accumulation).

    Domains are spread as evenly as the slots allow and shuffled per step, so every global
    batch mixes domains while every micro-batch holds one. Same on every rank and every scope.
    """
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    order = torch.randperm(num_slots, generator=generator)
    offset = int(torch.randint(num_domains, (1,), generator=generator))
    return [int(order[slot] + offset) % num_domains for slot in range(num_slots)]


def sample_windows(stream: torch.Tensor, count: int, length: int,
                   generator: torch.Generator) -> torch.Tensor:
    """`count` random windows of `length` tokens from a packed stream: [count, length]."""
    starts = torch.randint(len(stream) - length + 1, (count,), generator=generator)
    return torch.stack([stream[start:start + length] for start in starts.tolist()])


def heldout_windows(stream: torch.Tensor, max_count: int, length: int) -> torch.Tensor:
    """Up to `max_count` consecutive non-overlapping windows from the start: [n, length]."""
    count = min(max_count, len(stream) // length)
    return stream[:count * length].view(count, length)
