"""The device-level LBL and micro_batch_device_load_violation (issue 20), under real expert
parallelism: real TopKRouters on real gloo groups (4 ranks, TP 1, EP 2 and 4, the allgather
dispatcher), against the independent single-process references of reference.py.

Gradients are the data-parallel average Megatron's DDP applies; the expected ones are those of
coeff * (mean over ranks and micro-batches of the scoped LBL) + device_coeff * (mean over
micro-batches and token groups of the device-level loss of each token group's micro-batch).
"""

import argparse
import inspect

import pytest
import torch

import device_workers
import reference
import workers
from megatron.core.transformer.moe.router import TopKRouter
from megatron_gbl import loss, megatron_lm, metrics
from megatron_gbl_lab.harness import run_gloo

TOPK, COEFF, DEVICE_COEFF, HIDDEN, EXPERTS = 2, 1e-2, 1e-1, 32, 8
padding_supported = "padding_mask" in inspect.signature(TopKRouter.routing).parameters
AUX_FREE = dict(moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
                moe_router_bias_update_rate=1e-2)


def spec(scope, microbatches, seed, padded=False, lbl_type="aux_loss", coeff=COEFF, **extra):
    return dict(scope=scope, lbl_type=lbl_type, coeff=coeff, microbatches=microbatches,
                steps=1, padded=padded, seed=seed, **extra)


# name: (expert-parallel size, spec, D). Same seed for "micro+device" and "micro": their
# gradient difference is the device term alone.
CASES = {
    "micro+device": (2, spec("micro", 2, seed=1, device_coeff=DEVICE_COEFF), 2),
    "micro": (2, spec("micro", 2, seed=1), 2),
    "global+device": (2, spec("global", 3, seed=2, padded=padding_supported,
                              device_coeff=DEVICE_COEFF), 2),
    "global+device D=4": (2, spec("global", 2, seed=3, device_coeff=DEVICE_COEFF,
                                  device_groups=4), 4),
    "seq+device": (2, spec("seq", 1, seed=4, lbl_type="seq_aux_loss",
                           device_coeff=DEVICE_COEFF), 2),
    "aux-free": (2, spec("global", 2, seed=5, lbl_type="none", coeff=0.0, config=AUX_FREE), 2),
    "dp+device EP=4": (4, spec("dp", 2, seed=6, device_coeff=DEVICE_COEFF), 4),
}


@pytest.fixture(scope="module")
def runs():
    """{case: (token groups, {rank: result})}, from one set of 4 gloo processes."""
    layouts = {}
    for name, (expert_parallel, case_spec, _) in CASES.items():
        layouts.setdefault(expert_parallel, []).append((name, case_spec))
    per_rank = run_gloo(device_workers.ep_router_runs, 4,
                        [(ep, [s for _, s in cases]) for ep, cases in layouts.items()])
    out = {}
    for i, cases in enumerate(layouts.values()):
        groups = sorted({tuple(rank_result[i]["token_group"]) for rank_result in per_rank})
        for j, (name, _) in enumerate(cases):
            out[name] = ([list(g) for g in groups],
                         {r: rank_result[i]["runs"][j] for r, rank_result in enumerate(per_rank)})
    return out


def data(case):
    case_spec = CASES[case][1]
    return workers.step_data(case_spec, 0, 4, HIDDEN)


def scoped_loss(case, weight):
    """coeff * the scoped LBL of the case, as the DDP-averaged loss (mean over ranks for the
    per-rank scopes micro and seq)."""
    case_spec = CASES[case][1]
    hidden, padding = data(case)
    if case_spec["scope"] in ("dp", "global"):
        return reference.global_batch_lbl(weight, hidden, padding, TOPK, COEFF,
                                          buffered=case_spec["scope"] == "global")[0]
    per_rank = {"micro": reference.micro_batch_lbl, "seq": reference.sequence_lbl}[
        case_spec["scope"]]
    return torch.stack([per_rank(weight, h, TOPK, COEFF) for mb in hidden for h in mb]).mean()


def device_loss(case, weight, groups):
    hidden, padding = data(case)
    return reference.device_balance_loss(weight, hidden, padding, groups, TOPK, DEVICE_COEFF,
                                         CASES[case][2])


def rel_err(actual, expected):
    return float((actual.double() - expected).norm() / expected.norm())


def test_token_groups_are_megatrons_expert_parallel_layout(runs):
    # TP 1: the token group (tp_ep) is the expert-parallel group, EP consecutive ranks.
    assert runs["micro"][0] == [[0, 1], [2, 3]]
    assert runs["dp+device EP=4"][0] == [[0, 1, 2, 3]]


@pytest.mark.parametrize("case", ["micro+device", "global+device", "global+device D=4",
                                  "seq+device", "dp+device EP=4"])
def test_gradient_matches_reference(runs, case):
    groups, per_rank = runs[case]
    weight = per_rank[0]["weight"]
    expected = reference.grad_of(
        lambda w: scoped_loss(case, w) + device_loss(case, w, groups), weight)
    err = rel_err(per_rank[0]["grad"], expected)
    assert err <= 1e-5, f"{case}: rel. err {err:.2e}"
    for rank in range(1, 4):
        torch.testing.assert_close(per_rank[rank]["grad"], per_rank[0]["grad"])


def test_device_term_alone_matches_reference(runs):
    groups, with_device = runs["micro+device"]
    _, without = runs["micro"]
    weight = with_device[0]["weight"]
    torch.testing.assert_close(weight, without[0]["weight"], rtol=0, atol=0)
    expected = reference.grad_of(lambda w: device_loss("micro+device", w, groups), weight)
    assert expected.norm() > 0
    err = rel_err(with_device[0]["grad"] - without[0]["grad"], expected)
    assert err <= 1e-5, f"rel. err {err:.2e}"


@pytest.mark.parametrize("case", ["micro+device", "micro", "global+device D=4", "aux-free",
                                  "dp+device EP=4"])
def test_device_load_violation_metric(runs, case):
    # Logged with or without the device term, with or without an LBL (aux-free: the dispatched
    # load; in the first step at global scope the bias is still 0, so it is the plain top-k).
    groups, per_rank = runs[case]
    hidden, _ = data(case)
    expected = reference.device_load_violation(per_rank[0]["weight"], hidden, groups, TOPK,
                                               CASES[case][2])
    assert any(value > 0 for value in expected.values())
    for rank, result in per_rank.items():
        values = result["metrics"]
        assert set(values) == set(metrics.names(has_lbl=case != "aux-free",
                                                has_expert_bias=case == "aux-free"))
        assert float(values[metrics.MICRO_DEVICE_LOAD_VIOLATION][0]) == pytest.approx(
            expected[rank], rel=1e-9, abs=1e-12)


def test_logged_device_loss_is_the_mean_over_token_groups(runs):
    # Megatron's tracker sums over TP x CP (1 here) and averages over DP; its report then
    # scales by 1 / micro-batches: the mean over micro-batches and token groups of L_dev.
    for case in ("micro+device", "global+device", "dp+device EP=4"):
        groups, per_rank = runs[case]
        name = metrics.DEVICE_LBL
        microbatches = CASES[case][1]["microbatches"]
        logged = sum(float(result["logged"][name].sum()) for result in per_rank.values()) / 4
        want = float(device_loss(case, per_rank[0]["weight"], groups)) / DEVICE_COEFF
        assert logged / microbatches == pytest.approx(want, rel=1e-5), case
    assert metrics.DEVICE_LBL not in runs["micro"][1][0]["logged"]


def test_device_count_sum_does_not_block_the_forward(tmp_path):
    # The device-count all-reduce over the token group is issued in the forward and waited for
    # in backward: rank 0 finishes its router forward before rank 1 starts its own.
    flag = str(tmp_path / "flag")
    assert run_gloo(device_workers.router_forward_before_peer, 2, flag, False) == ["done"] * 2
    with pytest.raises(RuntimeError, match="waited for rank 1"):
        run_gloo(device_workers.router_forward_before_peer, 2, str(tmp_path / "blocking"), True)


def test_device_weights_are_the_gradient_of_the_formula():
    # loss.device_balancing_weights against autograd of D * Σ_d F_d P_d written out directly.
    generator = torch.Generator().manual_seed(0)
    counts_E = torch.randint(0, 50, (12,), generator=generator)
    probs_sum_E = torch.rand(12, dtype=torch.float64, generator=generator).requires_grad_()
    num_tokens_f, num_tokens_p = torch.tensor(70), torch.tensor(33)
    for num_devices in (1, 2, 3, 4, 12):
        per_device = [slice(d * 12 // num_devices, (d + 1) * 12 // num_devices)
                      for d in range(num_devices)]
        value = 0.3 * num_devices * sum(
            counts_E[s].double().sum() / (2 * num_tokens_f) * probs_sum_E[s].sum() / num_tokens_p
            for s in per_device)
        (grad,) = torch.autograd.grad(value, probs_sum_E)
        weights = loss.device_balancing_weights(counts_E, num_tokens_f, num_tokens_p, 2,
                                                num_devices, 0.3)
        torch.testing.assert_close(weights, grad, rtol=1e-12, atol=0)
        torch.testing.assert_close(loss.tokens_per_device(counts_E, num_devices),
                                   torch.stack([counts_E[s].sum() for s in per_device]))


def test_flags_parse_with_defaults_that_add_nothing():
    parser = megatron_lm.add_arguments(argparse.ArgumentParser())
    args = parser.parse_args([])
    assert (args.moe_lbl_device_coeff, args.moe_lbl_device_groups) == (0.0, None)
    args = parser.parse_args(["--moe-lbl-device-coeff", "1e-3", "--moe-lbl-device-groups", "4"])
    assert (args.moe_lbl_device_coeff, args.moe_lbl_device_groups) == (1e-3, 4)


def test_launcher_logs_device_loss_and_violation(tmp_path):
    # Through torchrun, -m megatron_gbl.launch and Megatron-LM's logging names, at EP 1 with
    # one expert per device group (D = E = 8) and TP 1: the token group is the rank, so the
    # device-level loss is the micro-batch LBL and the device load violation the micro-batch
    # load violation, which the step metrics compute on another path.
    from test_megatron_lm import run_training

    scalars, _ = run_training(tmp_path, "device", [
        "--moe-lbl-scope", "global", "--moe-lbl-device-coeff", "1e-2",
        "--moe-lbl-device-groups", str(EXPERTS)], 16)
    assert scalars[metrics.DEVICE_LBL] == pytest.approx(scalars[metrics.MICRO_LBL], rel=1e-5)
    assert scalars[metrics.MICRO_DEVICE_LOAD_VIOLATION] == pytest.approx(
        scalars[metrics.MICRO_LOAD_VIOLATION], rel=1e-6)
    for layer in (0, 1):
        assert f"moe/{metrics.DEVICE_LBL}_layer_{layer}" in scalars
        assert f"moe/{metrics.MICRO_DEVICE_LOAD_VIOLATION}_layer_{layer}" in scalars
    assert all(value > 0 for value in scalars[metrics.MICRO_DEVICE_LOAD_VIOLATION])
