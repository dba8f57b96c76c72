"""Megatron-LM integration: the --moe-lbl-* flags, their validation, the launcher, the metrics.

End-to-end runs go through the launcher (`megatron_gbl.launch.main`, what `python -m
megatron_gbl.launch` runs) on 4 gloo ranks, and read back the TensorBoard events Megatron-LM's
logging wrote. Where the installed megatron-core wheel ships Megatron-LM's training code
(`megatron.training`: 0.19, and 0.17-0.18 with pyyaml), that is the loop:
tests/megatron_lm_entry/pretrain_gpt.py through the real argument parsing and validation,
`pretrain` and logging, ranks forked by harness.run_gloo. Elsewhere the entry script is the
stand-in tests/megatron_lm_shaped (the hook points of Megatron-LM's training code at the same
names, a real Megatron-Core GPT-MoE), through torchrun.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

import bad_input
import megatron_gbl
import workers
from tensorboard_events import tensorboard_scalars
from megatron_gbl import compat, megatron_lm, metrics, quantile
from megatron_gbl_lab import harness


def installed_training_loop() -> bool:
    """Whether the installed megatron-core wheel ships Megatron-LM's training loop (0.17 on).
    Where it does, it must import: a broken import fails here, instead of turning the real-loop
    tests into stand-in tests (0.17 and 0.18 need pyyaml, which the test extra installs)."""
    if importlib.util.find_spec("megatron.training") is None:
        return False
    importlib.import_module("megatron.training.training")
    return True


REAL_LOOP = installed_training_loop()
ENTRY = Path(__file__).parent / ("megatron_lm_entry" if REAL_LOOP else "megatron_lm_shaped") \
    / "pretrain_gpt.py"
SHAPE_ARGS = ["--seq-length", "8", "--micro-batch-size", "2", "--train-iters", "2"]
MODEL_ARGS = ["--num-experts", "8", "--moe-aux-loss-coeff", "1e-2", *SHAPE_ARGS]
# What the real loop needs beyond them (the stand-in has these as defaults): a tiny GPT-MoE,
# mock data, no evaluation, every step logged, per-layer scalars; on CPU with gloo, the local
# layers without fused GPU kernels and without gradient clipping (it asserts CUDA gradients).
REAL_LOOP_ARGS = [
    "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
    "--ffn-hidden-size", "64", "--max-position-embeddings", "8", "--moe-router-topk", "2",
    "--moe-token-dispatcher-type", "allgather", "--disable-bias-linear", "--lr", "1e-3",
    "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "64",
    "--num-workers", "0", "--eval-iters", "0", "--eval-interval", "1000", "--log-interval", "1",
    "--moe-per-layer-logging", "--distributed-backend", "gloo", "--transformer-impl", "local",
    "--no-gradient-accumulation-fusion", "--no-persist-layer-norm", "--no-bias-gelu-fusion",
    "--no-bias-dropout-fusion", "--clip-grad", "0",
] if REAL_LOOP else []
PRELOAD = ("megatron.training.training",) if REAL_LOOP else ()  # imported once, not per rank
CPU_LAUNCH = Path(__file__).parent / "real_megatron_lm" / "cpu_launch.py"
AUX_FREE_ARGS = ["--moe-router-score-function", "sigmoid", "--moe-router-enable-expert-bias",
                 "--moe-router-bias-update-rate", "1e-2"]


@pytest.mark.skipif(importlib.util.find_spec("megatron.training") is None,
                    reason="this megatron-core wheel ships no Megatron-LM training code")
def test_a_broken_training_loop_import_fails_instead_of_falling_back(monkeypatch):
    # An import that fails (here as if pyyaml were missing) must not turn the real-loop tests
    # into stand-in tests.
    monkeypatch.setitem(sys.modules, "megatron.training.training", None)
    with pytest.raises(ImportError):
        installed_training_loop()


@pytest.mark.skipif(importlib.util.find_spec("megatron.training") is None,
                    reason="this megatron-core wheel ships no Megatron-LM training code")
def test_a_renamed_logging_parameter_fails_at_start_up(monkeypatch):
    # Megatron-LM's per-iteration MoE logging with a parameter the plugin fills in renamed: the
    # run must stop at start-up, naming it and the release, not at the first logged iteration.
    owner, name = megatron_lm._logging_hook()

    def renamed(*args, scale=1.0, iteration=0, writer=None, wandb_writer=None,
                track_names=None):
        pass

    monkeypatch.setattr(owner, name, renamed)
    try:
        with pytest.raises(RuntimeError, match=r"megatron-core \d.*no parameter 'loss_scale'"):
            megatron_lm.configure(bad_input.megatron_lm_args(dict(num_layers=2)))
    finally:
        megatron_gbl.disable()
        megatron_lm.uninstall()


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
    """Run `-m megatron_gbl.launch` (through torchrun when world_size > 1); for Megatron-LM's
    own loop, with the lab's CPU shims (CPU_LAUNCH: they, then the launcher's `main`)."""
    runner = [sys.executable, "-m", "torch.distributed.run", "--standalone",
              f"--nproc-per-node={world_size}"] if world_size > 1 else [sys.executable]
    launcher = [CPU_LAUNCH] if REAL_LOOP else ["-m", "megatron_gbl.launch"]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([*runner, *launcher, *map(str, argv)], capture_output=True, text=True,
                          env=full_env, timeout=600, cwd=tmp_path)


def run_training(tmp_path, name, extra, global_batch_size):
    """Train 2 iterations on 4 ranks through the launcher; the TensorBoard scalars, histograms."""
    log_dir = tmp_path / name
    argv = [ENTRY, *MODEL_ARGS, *REAL_LOOP_ARGS, "--global-batch-size", global_batch_size,
            "--tensorboard-dir", log_dir, *extra]
    if REAL_LOOP:
        harness.run_gloo(workers.megatron_lm_training, 4, argv, timeout_s=300, preload=PRELOAD)
    else:
        result = launch(argv, world_size=4, tmp_path=tmp_path)
        assert result.returncode == 0, result.stderr[-4000:]
    return tensorboard_scalars(log_dir)


def test_launcher_enables_plugin_and_logs_the_megatron_way(tmp_path):
    # micro scope, 2 micro-batches per rank: the no-grad micro-batch LBL of the step equals the
    # LBL value Megatron's own tracker logged for the active (micro) scope.
    micro, _ = run_training(tmp_path, "micro", ["--moe-lbl-scope", "micro"], 16)
    assert micro["micro_batch_lbl"] == pytest.approx(micro["load_balancing_loss"], rel=1e-5)
    for layer in (0, 1):
        assert micro[f"moe/micro_batch_lbl_layer_{layer}"] == pytest.approx(
            micro[f"moe/load_balancing_loss_layer_{layer}"], rel=1e-5)

    # global scope, one micro-batch per rank: the scoped loss (global f, local P), averaged over
    # DP, is the global-batch LBL; Balance BSZ is the global batch; histograms count every choice.
    glob, histograms = run_training(
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
    plain, _ = run_training(tmp_path, "plain", [], 8)
    assert "load_balancing_loss" in plain and "global_batch_lbl" not in plain


def test_launcher_aux_free_and_scope_switch(tmp_path):
    # Aux-loss-free at global scope: no LBL names, the bias and the load violation logged.
    aux_free, _ = run_training(tmp_path, "auxfree", [
        "--moe-lbl-scope", "global", *AUX_FREE_ARGS,
        "--moe-router-load-balancing-type", "none", "--moe-aux-loss-coeff", "0"], 8)
    assert set(metrics.names(has_lbl=False, has_expert_bias=True)) <= set(aux_free)
    assert not {"load_balancing_loss", metrics.MICRO_LBL, metrics.GLOBAL_LBL} & set(aux_free)
    assert all(std > 0 for std in aux_free[metrics.EXPERT_BIAS_STD])  # updated every step
    assert aux_free["balance_bsz_tokens"] == [8 * 8] * 2

    # micro for one iteration, then global (2 micro-batches per rank at DP 4).
    switched, _ = run_training(tmp_path, "switch", [
        "--moe-lbl-scope", "micro", "--moe-lbl-switch-scope", "global",
        "--moe-lbl-switch-iteration", "1"], 16)
    assert switched["balance_bsz_tokens"] == [2 * 8, 16 * 8]


def launcher_outcome(argv):
    """(exit status, stderr) of `python -m megatron_gbl.launch ARGV...` stopping before
    training, run in a process forked from the warm server (no interpreter start-up)."""
    return harness.run_gloo(workers.launcher_outcome, 1, argv, REAL_LOOP, timeout_s=300,
                            preload=PRELOAD)[0]


def test_launcher_errors_before_training(tmp_path):
    # In a fresh interpreter, at the world size torchrun would give.
    result = launch([ENTRY, *MODEL_ARGS, *REAL_LOOP_ARGS, "--moe-lbl-scope", "global",
                     "--moe-lbl-sync-group-size", "3"], env={"WORLD_SIZE": "4"})
    assert result.returncode != 0
    assert "--moe-lbl-sync-group-size" in result.stderr and "divide" in result.stderr
    assert "init_process_group" not in result.stderr  # failed in validation, before set-up

    status, stderr = launcher_outcome([ENTRY, *SHAPE_ARGS, *REAL_LOOP_ARGS,
                                       "--moe-lbl-scope", "global"])
    assert status != 0 and "--num-experts" in stderr

    status, stderr = launcher_outcome([ENTRY, *MODEL_ARGS, *REAL_LOOP_ARGS,
                                       "--moe-lbl-scope", "batch"])
    assert status == 2 and "--moe-lbl-scope" in stderr

    status, stderr = launcher_outcome([tmp_path / "missing.py"])
    assert status != 0 and "entry script" in stderr

    # A script outside any Megatron-LM checkout: a wheel with megatron.training lets the
    # launcher hook it; without one, the launcher says where megatron.training comes from.
    lone_script = tmp_path / "pretrain_gpt.py"
    lone_script.write_text("import megatron.training.arguments as arguments\n"
                           "assert hasattr(arguments._add_moe_args, '__wrapped__')\n")
    status, stderr = launcher_outcome([lone_script, "--moe-lbl-scope", "global"])
    if REAL_LOOP:
        assert status == 0, stderr[-4000:]
    elif importlib.util.find_spec("megatron.training") is not None:  # a dependency missing
        assert status != 0 and "megatron.training) imports" in stderr
    else:
        assert status != 0 and "Megatron-LM checkout" in stderr


@pytest.mark.parametrize("bad_flag, message", [
    (["--moe-lbl-micro-coeff", "-1"], "megatron_gbl: micro_coeff (--moe-lbl-micro-coeff)"),
    (["--moe-lbl-sync-group-size", "3"],  # checked against Megatron's data-parallel size
     "megatron_gbl: sync_group_size (--moe-lbl-sync-group-size) 3 must divide"),
], ids=["flag-alone", "against-megatron-args"])
def test_a_bad_flag_is_one_line_from_rank_0(tmp_path, bad_flag, message):
    # Through torchrun on 2 ranks: the plugin's message once, no traceback through the plugin
    # (torchrun's own failure summary may follow), a non-zero exit.
    result = launch([ENTRY, *MODEL_ARGS, *REAL_LOOP_ARGS, "--global-batch-size", "4",
                     "--moe-lbl-scope", "global", *bad_flag], world_size=2, tmp_path=tmp_path)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert output.count(message) == 1, output[-4000:]
    assert "megatron_gbl/" not in output and "ValueError" not in output, output[-4000:]


@pytest.mark.skipif(not REAL_LOOP, reason="pipeline parallelism needs Megatron-LM's own loop "
                    "(megatron.training of the megatron-core wheel, not importable here)")
@pytest.mark.parametrize("moe_layer_freq, moe_layer", [
    ("[0,1]", 1),
    pytest.param("[1,0]", 0, marks=pytest.mark.xfail(
        REAL_LOOP and importlib.util.find_spec("megatron.core.transformer.moe.moe_logging") is None,
        strict=True, raises=AssertionError,
        reason="up to 0.17, Megatron's tracker reduction gives the placeholders of a stage "
        "without MoE layers no data-parallel average, so its writer logs one DP rank's "
        "micro-batch values (load_balancing_loss, micro_batch_*); global values are right")),
], ids=["dense-first-stage", "dense-last-stage"])
def test_pipeline_stage_without_moe_layers(tmp_path, moe_layer_freq, moe_layer):
    """PP 2 x DP 2, one stage dense (first-k-dense models; the last stage holds the writer):
    both stages join the same logging collectives (no hang, no crash), and the MoE stage's
    metrics and histogram reach TensorBoard. One micro-batch per rank: the global-scope loss
    is the global-batch LBL."""
    scalars, histograms = run_training(tmp_path, "pp", [
        "--pipeline-model-parallel-size", "2", "--moe-layer-freq", moe_layer_freq,
        "--moe-lbl-scope", "global", "--moe-lbl-histogram-interval", "1"], 4)
    assert scalars["global_batch_lbl"] == pytest.approx(scalars["load_balancing_loss"], rel=1e-5)
    assert scalars["balance_bsz_tokens"] == [4 * 8] * 2  # global batch 4 sequences x 8 tokens
    for name in (metrics.MICRO_LBL, metrics.MICRO_LOAD_VIOLATION, metrics.GLOBAL_LOAD_VIOLATION):
        assert len(scalars[name]) == 2
    dense_layer = 1 - moe_layer
    assert scalars[f"moe/global_batch_lbl_layer_{dense_layer}"] == [0.0, 0.0]
    assert scalars[f"moe/global_batch_lbl_layer_{moe_layer}"] == scalars["global_batch_lbl"]
    assert list(histograms) == [f"moe/tokens_per_expert_layer_{moe_layer}"]
    for histogram in histograms[f"moe/tokens_per_expert_layer_{moe_layer}"]:
        assert histogram.num == sum(histogram.bucket) == 4 * 8 * 2  # tokens x top-2


# 0.17-0.18 have the option, but their own loop fails on a repeated MTP layer without the plugin
# too (an IndexError in process_mtp_loss's cross entropy, checked with 0.17.1 and 0.18.2).
@pytest.mark.skipif(not REAL_LOOP or compat.release() < (0, 19),
                    reason="a repeated MTP layer through Megatron-LM's own loop (0.19+)")
def test_logging_with_a_repeated_mtp_layer(tmp_path):
    # Two prediction depths of one repeated MTP layer, an LBL and expert bias: Megatron-LM's
    # logging at every iteration gets one row per depth, after the two decoder layers.
    mtp, _ = run_training(tmp_path, "mtp", [
        "--moe-lbl-scope", "global", "--mtp-num-layers", "2", "--mtp-use-repeated-layer",
        "--position-embedding-type", "rope", "--no-rope-fusion", *AUX_FREE_ARGS], 8)
    for name in metrics.names(has_lbl=True, has_expert_bias=True):
        assert len(mtp[name]) == 2, name
        for layer in range(4):
            assert len(mtp[f"moe/{name}_layer_{layer}"]) == 2, (name, layer)


@pytest.mark.skipif(not REAL_LOOP or not compat.has_quantile_balancing(),
                    reason="quantile balancing needs megatron-core>=0.19 (its own training loop)")
def test_launcher_quantile_balancing_at_global_scope(tmp_path):
    """Megatron-LM's loop (finalize_model_grads, the optimizer) with quantile balancing at
    global scope: the plugin's update replaces upstream's, and its metrics reach TensorBoard."""
    qb = ["--moe-router-load-balancing-type", "quantile_balancing", "--moe-aux-loss-coeff", "0"]
    scalars, _ = run_training(tmp_path, "qb", [*qb, "--moe-lbl-scope", "global",
                                               "--moe-router-quantile-balancing-ema", "0.5"], 16)
    assert set(metrics.names(False, False, has_quantile=True)) <= set(scalars)
    assert not {"load_balancing_loss", metrics.MICRO_LBL} & set(scalars)
    assert all(std > 0 for std in scalars[quantile.QB_BIAS_STD])  # updated every step
    assert scalars["balance_bsz_tokens"] == [16 * 8] * 2  # the global batch
    assert scalars[quantile.CLAMPED_QUANTILES] == [0.0, 0.0]
