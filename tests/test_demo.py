"""`megatron-gbl demo` then `megatron-gbl analyze`, end to end with tiny settings (4 gloo ranks)."""

import json
import math
import os

import pytest
import torch

from megatron_gbl import cli

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
RANKS, MICROBATCHES, MICRO_BATCH_SIZE, SEQ = 4, 2, 2, 16


def assert_png(path):
    with open(path, "rb") as f:
        data = f.read()
    assert data.startswith(PNG_SIGNATURE), path
    assert len(data) > 5000, f"{path}: only {len(data)} bytes"


def test_demo_then_analyze(tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli.main(["demo", "--scopes", "micro,dp:2,global", "--steps", "3",
                     "--ranks", str(RANKS), "--microbatches", str(MICROBATCHES),
                     "--micro-batch-size", str(MICRO_BATCH_SIZE), "--seq-length", str(SEQ),
                     "--eval-sequences", "4", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "held-out loss, mean" in printed and "MI(domain; expert)" in printed

    with open(out / "results.json") as f:
        results = json.load(f)
    domains = results["domains"]
    assert len(domains) == 4 and results["settings"]["steps"] == 3
    runs = results["scopes"]
    assert list(runs) == ["micro", "dp:2", "global"]
    # Balance BSZ in sequences: one micro-batch, 2 ranks' micro-batches, the whole global batch.
    assert [run["balance_bsz"]["sequences"] for run in runs.values()] == [
        MICRO_BATCH_SIZE, 2 * MICRO_BATCH_SIZE, RANKS * MICROBATCHES * MICRO_BATCH_SIZE]
    first_losses = {run["train_curves"]["loss"][0] for run in runs.values()}
    assert len(first_losses) == 1  # same initial weights and the same first global batch
    for label, run in runs.items():
        assert set(run["heldout_loss"]) == set(domains)
        assert all(0 < loss < math.log(257) + 1 for loss in run["heldout_loss"].values())
        assert run["seconds_per_step"] > 0
        assert all(len(curve) == 3 for curve in run["train_curves"].values())
        routing = run["routing"]
        topk, experts = routing["topk"], routing["num_experts"]
        # 4 held-out sequences of SEQ tokens per domain, every token chose top-k experts.
        assert routing["tokens_per_domain"] == [4 * SEQ] * 4
        for layer in routing["selection_frequency"]:
            for row in layer:
                assert len(row) == experts and sum(row) == topk
        assert all(0 <= mi <= math.log2(4) + 1e-9 for mi in routing["mutual_information_bits"])
        assert all(value >= 1 - 1e-6 for value in routing["global_lbl"])  # 1 is the minimum
        assert os.path.isfile(os.path.join(run["model_dir"], "model.pt")), label
    for path in results["files"].values():
        assert_png(path)
    # The built-in corpus is written out so `analyze` can read the same held-out text.
    with open(out / "valid.jsonl") as f:
        assert {json.loads(line)["domain"] for line in f} == set(domains)

    assert cli.main(["analyze", "--model", str(out / "global"), "--data", str(out / "valid.jsonl"),
                     "--max-sequences", "4"]) == 0
    assert "MI(domain; expert)" in capsys.readouterr().out
    with open(out / "global" / "analysis" / "analysis.json") as f:
        analysis = json.load(f)
    # The same model on the same held-out batches: the demo's own numbers again.
    assert (analysis["routing"]["selection_frequency"]
            == runs["global"]["routing"]["selection_frequency"])
    assert analysis["heldout_loss"] == pytest.approx(runs["global"]["heldout_loss"], rel=1e-9)
    layers = len(analysis["routing"]["high_frequency_overlap"])
    assert layers == results["settings"]["num_layers"]
    for path in analysis["files"].values():
        assert_png(path)
    checkpoint = torch.load(out / "global" / "model.pt", weights_only=False)
    assert checkpoint["scope"] == "global" and checkpoint["domains"] == domains
