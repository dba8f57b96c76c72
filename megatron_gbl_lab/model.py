"""The demo model: build it (the same seed gives every run the same initial weights), save it,
read it back for `megatron-gbl analyze`."""

from __future__ import annotations

import dataclasses
import os

import torch

from megatron_gbl_lab.corpus import VOCAB_SIZE
from megatron_gbl_lab import harness
from megatron_gbl_lab.runs import MODEL_FILE, DemoSettings, ScopeSpec, checkpoint_path


def build_model(model_overrides: dict, seq_length: int, seed: int):
    """The demo GPT-MoE; the same `seed` gives the same initial weights for every scope."""
    config = harness.moe_config(**model_overrides)
    return harness.build_gpt_moe(config, vocab_size=VOCAB_SIZE,
                                 max_sequence_length=seq_length, seed=seed)


def save_model(model_dir: str, model, settings: DemoSettings, spec: ScopeSpec,
               domains: list[str]) -> None:
    """`model.pt`: the state dict plus what `analyze_worker` needs to rebuild the model."""
    os.makedirs(model_dir, exist_ok=True)
    torch.save({"state_dict": model.state_dict(),
                "model_overrides": spec.model_overrides(settings),
                "seq_length": settings.seq_length, "micro_batch_size": settings.micro_batch_size,
                "domains": domains, "scope": spec.label,
                "settings": dataclasses.asdict(settings)},
               os.path.join(model_dir, MODEL_FILE))


def read_checkpoint(model_dir: str) -> dict:
    return torch.load(checkpoint_path(model_dir), weights_only=False)
