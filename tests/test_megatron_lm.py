"""Megatron-LM integration: the --moe-lbl-* flags, their validation, the launcher, the metrics.

End-to-end runs go through torchrun, `-m megatron_gbl.launch` and a Megatron-LM-shaped entry
script (tests/megatron_lm_shaped: the hook points of Megatron-LM's training code at the same
names, a real Megatron-Core GPT-MoE, real gloo processes), and read back real TensorBoard events.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_gbl import megatron_lm, metrics

SHAPED = Path(__file__).parent / "megatron_lm_shaped"
ENTRY = SHAPED / "pretrain_gpt.py"
MODEL_ARGS = ["--num-experts", "8", "--moe-aux-loss-coeff", "1e-2", "--seq-length", "8",
              "--micro-batch-size", "2", "--train-iters", "2"]


def parse(argv):
    return megatron_lm.add_arguments(argparse.ArgumentParser()).parse_args(argv)


def test_flags_parse_with_defaults_that_leave_megatron_untouched():
    args = parse([])
    assert (args.moe_lbl_scope, args.moe_lbl_sync_group_size, args.moe_lbl_micro_coeff,
            args.moe_lbl_histogram_interval) == (None, None, 0.0, 100)
    args = parse(["--moe-lbl-scope=global", "--moe-lbl-sync-group-size", "8",
                  "--moe-lbl-micro-coeff", "1e-5", "--moe-lbl-histogram-interval", "10"])
    assert (args.moe_lbl_scope, args.moe_lbl_sync_group_size, args.moe_lbl_micro_coeff,
            args.moe_lbl_histogram_interval) == ("global", 8, 1e-5, 10)
    with pytest.raises(SystemExit):
        parse(["--moe-lbl-scope", "batch"])
    megatron_lm.configure(parse([]))  # no scope: nothing to check, nothing enabled


def launch(argv, world_size=1, tmp_path=None, env=None):
    """Run `-m megatron_gbl.launch` (through torchrun when world_size > 1)."""
    runner = [sys.executable, "-m", "torch.distributed.run", "--standalone",
              f"--nproc-per-node={world_size}"] if world_size > 1 else [sys.executable]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([*runner, "-m", "megatron_gbl.launch", *map(str, argv)],
                          capture_output=True, text=True, env=full_env, timeout=600,
                          cwd=tmp_path)


def tensorboard_scalars(log_dir: Path) -> tuple[dict, dict]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "histograms": 0})
    events.Reload()
    scalars = {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    histograms = {tag: [e.histogram_value for e in events.Histograms(tag)]
                  for tag in events.Tags()["histograms"]}
    return scalars, histograms


def run_shaped(tmp_path, name, extra, global_batch_size):
    log_dir = tmp_path / name
    result = launch([ENTRY, *MODEL_ARGS, "--global-batch-size", global_batch_size,
                     "--tensorboard-dir", log_dir, *extra], world_size=4, tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    return tensorboard_scalars(log_dir)


def test_launcher_enables_plugin_and_logs_the_megatron_way(tmp_path):
    # micro scope, 2 micro-batches per rank: the no-grad micro-batch LBL of the step equals the
    # LBL value Megatron's own tracker logged for the active (micro) scope.
    micro, _ = run_shaped(tmp_path, "micro", ["--moe-lbl-scope", "micro"], 16)
    assert micro["micro_batch_lbl"] == pytest.approx(micro["load_balancing_loss"], rel=1e-5)
    for layer in (0, 1):
        assert micro[f"moe/micro_batch_lbl_layer_{layer}"] == pytest.approx(
            micro[f"moe/load_balancing_loss_layer_{layer}"], rel=1e-5)

    # global scope, one micro-batch per rank: the scoped loss (global f, local P), averaged over
    # DP, is the global-batch LBL; Balance BSZ is the global batch; histograms count every choice.
    glob, histograms = run_shaped(
        tmp_path, "global", ["--moe-lbl-scope=global", "--moe-lbl-histogram-interval", "1"], 8)
    assert glob["global_batch_lbl"] == pytest.approx(glob["load_balancing_loss"], rel=1e-5)
    assert glob["global_batch_lbl"] != pytest.approx(glob["micro_batch_lbl"], rel=1e-5)
    assert glob["balance_bsz_tokens"] == [8 * 8] * 2  # global batch 8 sequences x 8 tokens
    for name in (metrics.MICRO_LOAD_VIOLATION, metrics.GLOBAL_LOAD_VIOLATION):
        assert all(0 <= value <= 8 - 1 for value in glob[name])  # max/mean - 1 <= E - 1
    assert sorted(histograms) == ["moe/tokens_per_expert_layer_0", "moe/tokens_per_expert_layer_1"]
    for per_step in histograms.values():
        assert len(per_step) == 2
        for histogram in per_step:
            assert histogram.num == sum(histogram.bucket) == 8 * 8 * 2  # tokens x top-2
            assert histogram.bucket_limit == [e + 0.5 for e in range(8)]

    # No --moe-lbl-scope: Megatron untouched, no plugin metrics.
    plain, _ = run_shaped(tmp_path, "plain", [], 8)
    assert "load_balancing_loss" in plain and "global_batch_lbl" not in plain


def test_launcher_aux_free_and_scope_switch(tmp_path):
    # Aux-loss-free at global scope: no LBL names, the bias and the load violation logged.
    aux_free, _ = run_shaped(tmp_path, "auxfree", [
        "--moe-lbl-scope", "global", "--moe-router-score-function", "sigmoid",
        "--moe-router-enable-expert-bias", "--moe-router-bias-update-rate", "1e-2",
        "--moe-router-load-balancing-type", "none", "--moe-aux-loss-coeff", "0"], 8)
    assert set(metrics.names(has_lbl=False, has_expert_bias=True)) <= set(aux_free)
    assert not {"load_balancing_loss", metrics.MICRO_LBL, metrics.GLOBAL_LBL} & set(aux_free)
    assert all(std > 0 for std in aux_free[metrics.EXPERT_BIAS_STD])  # updated every step
    assert aux_free["balance_bsz_tokens"] == [8 * 8] * 2

    # micro for one iteration, then global (2 micro-batches per rank at DP 4).
    switched, _ = run_shaped(tmp_path, "switch", [
        "--moe-lbl-scope", "micro", "--moe-lbl-switch-scope", "global",
        "--moe-lbl-switch-iteration", "1"], 16)
    assert switched["balance_bsz_tokens"] == [2 * 8, 16 * 8]


def test_launcher_errors_before_training(tmp_path):
    result = launch([ENTRY, *MODEL_ARGS, "--moe-lbl-scope", "global",
                     "--moe-lbl-sync-group-size", "3"], env={"WORLD_SIZE": "4"})
    assert result.returncode != 0
    assert "--moe-lbl-sync-group-size" in result.stderr and "divide" in result.stderr
    assert "init_process_group" not in result.stderr  # failed in validation, before set-up

    result = launch([ENTRY, "--moe-lbl-scope", "global"])
    assert result.returncode != 0 and "--num-experts" in result.stderr

    result = launch([ENTRY, *MODEL_ARGS, "--moe-lbl-scope", "batch"])
    assert result.returncode == 2 and "--moe-lbl-scope" in result.stderr

    result = launch([tmp_path / "missing.py"])
    assert result.returncode != 0 and "entry script" in result.stderr

    lone_script = tmp_path / "pretrain_gpt.py"
    lone_script.write_text("import megatron.training\n")
    result = launch([lone_script, "--moe-lbl-scope", "global"], tmp_path=tmp_path)
    assert result.returncode != 0 and "Megatron-LM checkout" in result.stderr
