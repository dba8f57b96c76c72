"""The plugin on Megatron-Core's newer model features: the multi-token-prediction (MTP) layers of
a GPT-MoE and the MoE layers of a HybridModel, trained through get_forward_backward_func() on
real gloo data-parallel groups."""

import dataclasses
import importlib.util
import inspect

import pytest
import torch

import reference
import workers
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron_gbl import compat
from megatron_gbl_lab.harness import run_gloo

FIELDS = {field.name for field in dataclasses.fields(TransformerConfig)}
TOPK, COEFF = 2, 1e-2  # harness.moe_config's
LBL_NAME = compat.tracker_name("aux_loss")
FULL_RECOMPUTE = dict(recompute_granularity="full", recompute_method="uniform",
                      recompute_num_layers=1)
has_hybrid = importlib.util.find_spec("megatron.core.models.hybrid") is not None


def mtp_recompute_runs() -> bool:
    """0.18 hands padding_mask to the MTP layer's own _checkpointed_forward, which does not take
    it: recomputing MTP layers fails there, with or without the plugin."""
    from megatron.core.transformer.multi_token_prediction import MultiTokenPredictionLayer

    parameters = inspect.signature(MultiTokenPredictionLayer._checkpointed_forward).parameters
    return "padding_mask" in parameters or any(
        parameter.kind is parameter.VAR_KEYWORD for parameter in parameters.values())


def spec(scope, **extra):
    return dict(dict(scope=scope, microbatches=3, step_seeds=[5], seq=8, bsz=2), **extra)


def own_lbl_spec(scope, config):
    """Only the LBLs give gradients, and each router's weight only its own LBL's."""
    return spec(scope, config=config, lm_loss=False, own_lbl_only=True)


def router_reference(per_rank: list, i: int):
    """(gradient, logged value) of router i: coeff x the mean over micro-batches of the
    global-batch LBL with the buffer of Alg. 1 on every rank's recorded router inputs; the calls
    of a repeated MTP layer are its prediction depths, each with its own buffer, averaged."""
    router = per_rank[0]["routers"][i]
    depths, calls = router["calls_per_microbatch"], len(router["inputs"])

    def depth_lbl(weight, depth):
        hidden = [[result["routers"][i]["inputs"][call] for result in per_rank]
                  for call in range(depth, calls, depths)]
        return reference.global_batch_lbl(weight, hidden, None, TOPK, COEFF, buffered=True)

    grad = reference.grad_of(lambda weight: torch.stack(
        [depth_lbl(weight, depth)[0] for depth in range(depths)]).mean(), router["weight"])
    value = sum(sum(depth_lbl(router["weight"], depth)[1]) for depth in range(depths)) / depths
    return grad, value


def assert_global_matches_reference(per_rank: list, index: int, label: str) -> None:
    """Every router's gradient against the reference, and its logged LBL after Megatron's
    tracker reduction (the data-parallel mean) against the reference's Σ_k LBL_k."""
    routers = per_rank[0][index]["routers"]
    runs = [result[index] for result in per_rank]
    for i, router in enumerate(routers):
        grad, value = router_reference(runs, i)
        err = float((router["grad"].double() - grad).norm() / grad.norm())
        assert err <= 1e-5, f"{label}, MoE layer {router['layer']}: rel. err {err:.2e}"
        logged = sum(float(run["logged"][LBL_NAME][router["layer"] - 1]) for run in runs)
        assert logged / len(runs) == pytest.approx(value, rel=1e-5), (label, router["layer"])


def assert_same_training(ours: dict, upstream: dict, label: str) -> None:
    """Every parameter's gradient, and the LBL values logged per layer, as upstream's."""
    assert ours["grads"].keys() == upstream["grads"].keys()
    for name, grad in upstream["grads"].items():
        # Float sums in another order (the LBL gradient joins elsewhere): rounding only.
        torch.testing.assert_close(ours["grads"][name], grad, rtol=1e-5, atol=1e-7,
                                   msg=f"{label}: {name}")
    assert ours["logged"].keys() == upstream["logged"].keys() == {LBL_NAME}
    torch.testing.assert_close(ours["logged"][LBL_NAME], upstream["logged"][LBL_NAME],
                               rtol=1e-6, atol=0)


@pytest.mark.skipif("mtp_num_layers" not in FIELDS,
                    reason="no multi-token prediction in this megatron-core")
@pytest.mark.parametrize("repeated", [False, True] if "mtp_use_repeated_layer" in FIELDS
                         else [False])
def test_mtp_layers_balanced_like_the_decoder_layers(repeated):
    mtp = dict(mtp_num_layers=2, mtp_loss_scaling_factor=0.1,
               **({"mtp_use_repeated_layer": True} if repeated else {}))
    specs = [spec(None, config=mtp), spec("micro", config=mtp),
             own_lbl_spec("global", dict(mtp, mtp_loss_scaling_factor=0.0))]
    recompute = repeated and mtp_recompute_runs()
    if recompute:  # a recompute replays the depths in reverse order, in every micro-batch alike
        specs += [spec("global", config=mtp), spec("global", config=dict(mtp, **FULL_RECOMPUTE))]
    per_rank = run_gloo(workers.feature_model_runs, 2, specs)
    upstream, micro = per_rank[0][:2]
    layers = [router["layer"] for router in upstream["routers"]]
    if "error" in micro:
        # 0.12-0.15 number the MTP layers' MoE layers from 1, unmarked: refused, not mixed.
        assert len(set(layers)) < len(layers)
        assert "layer number 1" in micro["error"] and "--mtp-num-layers" in micro["error"]
        return
    # Two decoder MoE layers, then the MTP ones, logged after them (upstream's convention).
    assert layers == ([1, 2, 3] if repeated else [1, 2, 3, 4])
    depths = [router["calls_per_microbatch"] for router in upstream["routers"]]
    assert depths == ([1, 1, 2] if repeated else [1, 1, 1, 1])
    assert all(upstream["logged"][LBL_NAME][layer - 1] > 0 for layer in layers)
    assert_same_training(micro, upstream, f"MTP repeated={repeated}, scope micro")
    assert_global_matches_reference(per_rank, 2, f"MTP repeated={repeated}, scope global")
    if recompute:
        off, full = per_rank[0][3:]
        for name, grad in off["grads"].items():
            torch.testing.assert_close(full["grads"][name], grad, rtol=1e-5, atol=1e-7,
                                       msg=f"full recompute: {name}")


@pytest.mark.skipif(not has_hybrid, reason="HybridModel needs megatron-core>=0.18")
def test_hybrid_model_moe_layers():
    hybrid = dict(pattern="*E*E")
    layers = dict(num_layers=4)
    aux_free = dict(layers, **workers.AUX_FREE)
    per_rank = run_gloo(workers.feature_model_runs, 2, [
        spec(None, config=layers, **hybrid), spec("micro", config=layers, **hybrid),
        dict(own_lbl_spec("global", layers), **hybrid),
        spec(None, config=aux_free, step_seeds=[5, 6, 7], **hybrid),
        spec("global", config=aux_free, step_seeds=[5, 6, 7], **hybrid),
        # Two MTP depths with an MoE layer each: numbered 2 again, like the decoder's first.
        spec("global", config=dict(layers, mtp_num_layers=2, mtp_loss_scaling_factor=0.1),
             pattern="*E*E/*E/*E")])
    upstream, micro, _, upstream_bias, ours_bias, with_mtp = per_rank[0]
    assert "layer number 2" in with_mtp["error"] and "--hybrid-layer-pattern" in with_mtp["error"]
    assert [router["layer"] for router in upstream["routers"]] == [2, 4]  # the 'E's
    assert_same_training(micro, upstream, "HybridModel, scope micro")
    assert_global_matches_reference(per_rank, 2, "HybridModel, scope global")
    # Aux-loss-free balancing at global: Megatron's own once-per-step update, bitwise.
    for ours, theirs in zip(ours_bias["routers"], upstream_bias["routers"]):
        assert len(ours["biases"]) == 3 and ours["biases"][0].abs().sum() > 0
        assert not torch.equal(ours["biases"][0], ours["biases"][-1])  # it keeps moving
        for step, (got, want) in enumerate(zip(ours["biases"], theirs["biases"])):
            assert got.dtype == want.dtype == torch.float32
            assert torch.equal(got, want), f"MoE layer {ours['layer']}, step {step}"
