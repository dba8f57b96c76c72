"""`megatron_gbl.step_metrics`, and Megatron-LM's per-iteration MoE logging through the plugin's
hook, for every configuration the plugin accepts: every scope, multi-token prediction with
separate and with repeated layers, frozen expert bias on all or some routers (aux-loss-free
alone and beside an LBL), dense first pipeline stages, HybridModel. Megatron-LM reaches the
hook at every iteration, so any of these failing would stop a real run."""

import dataclasses
import importlib.util

import pytest
import torch

import metrics_workers
import workers
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron_gbl import metrics
from megatron_gbl_lab.harness import run_gloo
from test_model_features import FULL_RECOMPUTE, mtp_recompute_runs

FIELDS = {field.name for field in dataclasses.fields(TransformerConfig)}
has_hybrid = importlib.util.find_spec("megatron.core.models.hybrid") is not None
AUX_FREE = workers.AUX_FREE  # expert bias alone, no LBL
LBL_AND_BIAS = dict(AUX_FREE, moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=1e-2)
MTP = dict(mtp_num_layers=2, mtp_loss_scaling_factor=0.1)


def spec(scope, **extra):
    return dict(dict(scope=scope, microbatches=2, seq=8, bsz=2, steps=2), **extra)


def check_reported(result: dict, label: str) -> None:
    """Every metric finite, and logged by Megatron's logging per step and per layer."""
    assert set(result["values"]) == set(result["names"]), label
    for name, values in result["values"].items():
        assert values.shape == (len(result["layer_numbers"]),), (label, name)
        assert torch.isfinite(values).all(), (label, name, values)
    if result["scalars"] is None:  # no Megatron-LM logging in this release
        return
    for name in result["names"]:
        assert name in result["scalars"], (label, name, sorted(result["scalars"]))
        for layer in result["layer_numbers"]:
            tag = f"moe/{name}_layer_{layer - 1}"
            assert tag in result["scalars"], (label, tag, sorted(result["scalars"]))


SCOPES = {"micro": spec("micro"), "seq": spec("seq"), "dp": spec("dp"),
          "global": spec("global"), "shuffle": spec("shuffle"),
          "global:1": spec("global", settings=dict(sync_group_size=1)),
          "global+device": spec("global", settings=dict(device_coeff=0.1, device_groups=2)),
          "aux-free dp": spec("dp", config=AUX_FREE),
          "LBL + bias, global": spec("global", config=LBL_AND_BIAS)}


def test_every_scope():
    results = run_gloo(metrics_workers.metrics_runs, 2, list(SCOPES.values()))
    for rank_results in results:
        for label, result in zip(SCOPES, rank_results):
            assert result["layer_numbers"] == [1, 2], label
            check_reported(result, label)


def test_frozen_expert_bias_on_all_or_some_routers():
    cases = {"aux-free, all frozen": spec("global", config=AUX_FREE, frozen=[0, 1]),
             "aux-free, layer 1 frozen": spec("dp", config=AUX_FREE, frozen=[0]),
             "LBL + bias, layer 2 frozen": spec("global", config=LBL_AND_BIAS, frozen=[1])}
    for rank_results in run_gloo(metrics_workers.metrics_runs, 2, list(cases.values())):
        for (label, case), result in zip(cases.items(), rank_results):
            check_reported(result, label)
            for index, (before, after) in enumerate(zip(result["biases_before"],
                                                        result["biases_after"])):
                frozen = index in case["frozen"]
                assert torch.equal(before, after) == frozen, (label, index)
                # A frozen layer reports its unchanged bias and the load it routed.
                assert result["values"][metrics.EXPERT_BIAS_STD][index] == pytest.approx(
                    float(after.double().std()), rel=1e-12), (label, index)
            assert (result["values"][metrics.GLOBAL_LOAD_VIOLATION] > 0).all(), label


@pytest.mark.skipif("mtp_num_layers" not in FIELDS,
                    reason="no multi-token prediction in this megatron-core")
def test_multi_token_prediction_one_row_per_depth():
    repeated = "mtp_use_repeated_layer" in FIELDS
    cases = {"separate MTP layers": spec("global", config=MTP)}
    if repeated:
        cases["repeated MTP layer"] = spec("global", config=dict(MTP, mtp_use_repeated_layer=True))
        if mtp_recompute_runs():
            cases["repeated MTP layer, recompute"] = spec("global", config=dict(
                MTP, mtp_use_repeated_layer=True, **FULL_RECOMPUTE))
    results = run_gloo(metrics_workers.metrics_runs, 2, list(cases.values()))
    for rank_results in results:
        by_label = dict(zip(cases, rank_results))
        for label, result in by_label.items():
            if "refused" in result:
                # 0.12-0.15 number every MTP layer's MoE layer 1: the plugin refuses the model.
                assert "layer number" in result["refused"], label
                continue
            # Two decoder MoE layers, then one row per prediction depth.
            assert result["layer_numbers"] == [1, 2, 3, 4], label
            check_reported(result, label)
        if "repeated MTP layer, recompute" in by_label:
            # The replays run the depths in reverse: each row still holds its own depth's
            # statistics, the same as without recompute.
            plain, replayed = by_label["repeated MTP layer"], \
                by_label["repeated MTP layer, recompute"]
            for name, values in plain["values"].items():
                torch.testing.assert_close(replayed["values"][name], values, rtol=1e-5,
                                           atol=1e-9, msg=name)


def test_dense_first_pipeline_stage():
    # PP 2 x DP 2: the first stage holds the two dense layers and no router, and still joins
    # Megatron's logging reduction with the same names.
    case = spec("global", pp=2, config=dict(num_layers=4, moe_layer_freq=[0, 0, 1, 1]))
    results = run_gloo(metrics_workers.metrics_runs, 4, [case])
    first_stage, last_stage = results[0][0], results[-1][0]
    assert first_stage["values"] is None and last_stage["layer_numbers"] == [3, 4]
    check_reported(last_stage, "last stage")
    if first_stage["scalars"] is not None:
        assert set(first_stage["names"]) <= set(first_stage["scalars"])


@pytest.mark.skipif(not has_hybrid, reason="HybridModel needs megatron-core>=0.18")
def test_hybrid_model():
    cases = [spec("global", pattern="*E*E", config=dict(num_layers=4)),
             spec("global", pattern="*E*E", config=dict(num_layers=4, **AUX_FREE))]
    for rank_results in run_gloo(metrics_workers.metrics_runs, 2, cases):
        for label, result in zip(("LBL", "aux-free"), rank_results):
            assert result["layer_numbers"] == [2, 4], label
            check_reported(result, label)


@pytest.mark.skipif(importlib.util.find_spec("megatron.training") is None,
                    reason="Megatron-LM's training code ships with megatron-core>=0.17")
def test_disable_then_enable_keeps_megatron_lm_logging():
    for logged in run_gloo(metrics_workers.reenable_run, 2, dict(seq=8, bsz=2, microbatches=2)):
        first, after_reenable = logged
        assert metrics.GLOBAL_LBL in first and metrics.MICRO_LOAD_VIOLATION in first
        assert after_reenable == first
