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


AUX_FREE = dict(moe_router_enable_expert_bias=True, moe_router_bias_update_rate=1e-3,
                moe_router_score_function="sigmoid", moe_router_load_balancing_type="none",
                moe_aux_loss_coeff=0.0)


def validated_args(**overrides):
    """What Megatron-LM's validate_args leaves for a typical MoE run at data-parallel size 4."""
    args = parse(["--moe-lbl-scope", "global"])
    vars(args).update(num_experts=8, moe_router_load_balancing_type="aux_loss",
                      moe_aux_loss_coeff=1e-3, moe_token_dispatcher_type="alltoall",
                      data_parallel_size=4)
    vars(args).update(overrides)
    return args


BAD = {
    "no MoE layers": (dict(num_experts=None), ["--num-experts", "--moe-lbl-scope"]),
    "sinkhorn": (dict(moe_router_load_balancing_type="sinkhorn"),
                 ["'sinkhorn'", "--moe-router-load-balancing-type"]),
    "none": (dict(moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0),
             ["'none'", "--moe-router-load-balancing-type"]),
    "coeff 0": (dict(moe_aux_loss_coeff=0.0), ["--moe-aux-loss-coeff", "> 0"]),
    "two LBL types": (dict(moe_router_load_balancing_type=["aux_loss", "global_aux_loss"],
                           moe_aux_loss_coeff=[1e-3, 1e-3]), ["several", "--moe-lbl-micro-coeff"]),
    "N not dividing DP": (dict(moe_lbl_sync_group_size=3),
                          ["--moe-lbl-sync-group-size", "divide", "data-parallel size 4"]),
    "N < 1": (dict(moe_lbl_sync_group_size=0), ["--moe-lbl-sync-group-size", "positive"]),
    "negative micro coeff": (dict(moe_lbl_micro_coeff=-1e-4), ["--moe-lbl-micro-coeff", ">= 0"]),
    "micro coeff with micro scope": (dict(moe_lbl_scope="micro", moe_lbl_micro_coeff=1e-4),
                                     ["--moe-lbl-micro-coeff", "'dp' or 'global'"]),
    "N with seq scope": (dict(moe_lbl_scope="seq", moe_lbl_sync_group_size=2),
                         ["--moe-lbl-sync-group-size", "'dp' or 'global'"]),
    "N without scope": (dict(moe_lbl_scope=None, moe_lbl_sync_group_size=2),
                        ["--moe-lbl-sync-group-size", "--moe-lbl-scope"]),
    "micro coeff without scope": (dict(moe_lbl_scope=None, moe_lbl_micro_coeff=1e-4),
                                  ["--moe-lbl-micro-coeff", "--moe-lbl-scope"]),
    "negative histogram interval": (dict(moe_lbl_histogram_interval=-1),
                                    ["--moe-lbl-histogram-interval", ">= 0"]),
    "alltoall_seq": (dict(moe_token_dispatcher_type="alltoall_seq"),
                     ["--moe-token-dispatcher-type", "'alltoall'"]),
    "switch without scope": (dict(moe_lbl_scope=None, moe_lbl_switch_scope="global",
                                  moe_lbl_switch_iteration=10),
                             ["--moe-lbl-switch-scope", "needs --moe-lbl-scope"]),
    "switch scope without iteration": (dict(moe_lbl_scope="micro", moe_lbl_switch_scope="global"),
                                       ["--moe-lbl-switch-scope", "--moe-lbl-switch-iteration"]),
    "switch at iteration 0": (dict(moe_lbl_scope="micro", moe_lbl_switch_scope="global",
                                   moe_lbl_switch_iteration=0),
                              ["--moe-lbl-switch-iteration", ">= 1"]),
    "switch to the same scope": (dict(moe_lbl_switch_scope="global", moe_lbl_switch_iteration=5),
                                 ["--moe-lbl-switch-scope", "already the scope"]),
    "expert bias at seq scope": (dict(AUX_FREE, moe_lbl_scope="seq"),
                                 ["'seq'", "expert-bias", "micro, dp, global"]),
    "expert bias switching to shuffle": (dict(AUX_FREE, moe_lbl_scope="micro",
                                              moe_lbl_switch_scope="shuffle",
                                              moe_lbl_switch_iteration=5),
                                         ["'shuffle'", "--moe-lbl-switch-scope"]),
    "per-micro-batch bias with PP and recompute": (
        dict(AUX_FREE, moe_lbl_scope="micro", pipeline_model_parallel_size=2,
             recompute_granularity="full"),
        ["--pipeline-model-parallel-size", "--recompute-granularity", "scope 'global'"]),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_combinations_fail_naming_the_flag_and_fix(case):
    overrides, fragments = BAD[case]
    with pytest.raises(ValueError) as error:
        megatron_lm.configure(validated_args(**overrides))
    for fragment in fragments:
        assert fragment in str(error.value), (case, str(error.value))


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
