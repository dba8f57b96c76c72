"""Every parallel layout against the independent single-process reference, trained through
Megatron's own gradient path (tests/layout_workers.py): DistributedDataParallel with the
all-reduce overlapped with the backward, finalize_model_grads, the schedules' loss scaling.

Layouts: TP 2 with sequence parallelism, CP 2, EP 2 (allgather dispatcher), PP 2 with 1F1B and
with the interleaved schedule (VPP 2); on 8 ranks TP 2 x PP 2 x DP 2 (1F1B and interleaved) and
TP 2 x CP 2 x DP 2 with EP 2; pipeline stages without MoE layers at every scope; the
device-level loss (device_coeff) under TP 2 with expert-tensor sizes 2 and 1, and under TP x CP.
A router's gradient is compared with the gradient of the reference's LBL (reference.py: plain
torch on the concatenated global batch) on the inputs the router got on every rank: the
language-model loss is multiplied by 0 and the experts' output weights are 0, so each router's
gradient is its own layer's LBL gradient.
"""

import inspect

import pytest
import torch

import layout_workers
import reference
from megatron_gbl_lab.harness import run_gloo

TOPK, COEFF = 2, 1e-2  # harness.moe_config's
DEVICE = dict(device_coeff=1e-1)
MAX_REL_ERR = 1e-5
ROUTER_RUN = dict(microbatches=4, seq=8, bsz=2, lm_loss=False, isolate_routers=True,
                  steps=[("dp", {}), ("global", {})], config=dict(num_layers=2))
PIPELINED = dict(num_layers=4)
LBL_SCOPES = [(scope, {}) for scope in ("micro", "seq", "dp", "global", "shuffle")]
AUX_FREE = dict(moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
                moe_router_bias_update_rate=1e-2, moe_router_load_balancing_type="none",
                moe_aux_loss_coeff=0.0)
# The language-model loss too, every parameter's gradient: for schedule against schedule.
WHOLE_MODEL = dict(ROUTER_RUN, lm_loss=True, isolate_routers=False, all_grads=True,
                   steps=[("global", {})], config=PIPELINED)


def layout(**spec):
    return ("layout_steps", dict(ROUTER_RUN, **spec))


TWO_RANKS = {
    # Loss forms: "mean" is Megatron's (loss, info), scaled by CP / micro-batches; "tokens" is
    # (loss sum, tokens, info) averaged by the schedule; "per_token" divides by the global
    # token count in finalize_model_grads. grad_scale is the loss scaler's factor.
    "TP 2 + SP": layout(layout=dict(tp=2), loss="mean", grad_scale=8.0),
    "CP 2": layout(layout=dict(cp=2), loss="mean"),
    # Whether the schedules' aux-loss scale holds the CP size is read off the scale they set:
    # no source needed, and a scale of neither form stops the step with a message.
    "CP 2, no source": ("cp_scale_read_off", dict(ROUTER_RUN, layout=dict(cp=2), loss="mean",
                                                  grad_scale=2.0)),
    "CP 2, unknown scale": ("cp_scale_read_off", dict(ROUTER_RUN, layout=dict(cp=2),
                                                      loss="mean", scale_factor=3.0)),
    # Per-token loss at TP x CP > 1: the aux-loss scale includes the TP x CP size.
    "TP 2 + SP, per-token": layout(layout=dict(tp=2), loss="per_token"),
    "CP 2, per-token": layout(layout=dict(cp=2), loss="per_token", grad_scale=2.0),
    "EP 2": layout(layout=dict(ep=2), loss="per_token", grad_scale=4.0),
    "no pipelining": ("layout_steps", dict(WHOLE_MODEL, layout={})),
    "batched p2p": ("batched_p2p_pairing", {}),
}
FOUR_RANKS = {
    "PP 2 1F1B": layout(layout=dict(pp=2), loss="tokens", grad_scale=4.0, config=PIPELINED),
    "PP 2 interleaved (VPP 2)": layout(layout=dict(pp=2, vpp=2), loss="per_token",
                                       config=PIPELINED),
    "interleaved, whole model": ("layout_steps", dict(WHOLE_MODEL, layout=dict(pp=2, vpp=2))),
    "CP 2 x DP 2, whole model": ("layout_steps", dict(WHOLE_MODEL, layout=dict(cp=2))),
    # Stages without MoE layers. 1F1B: layer 1 dense, so stage 0 has none.
    "dense stage": layout(layout=dict(pp=2), steps=LBL_SCOPES,
                          config=dict(num_layers=2, moe_layer_freq=[0, 1])),
    "dense stage, expert bias": layout(
        layout=dict(pp=2), steps=[(s, {}) for s in ("micro", "dp", "global")],
        config=dict(AUX_FREE, num_layers=2, moe_layer_freq=[0, 1])),
    # Interleaved: layers 1 and 3 (pipeline rank 0, both chunks) dense.
    "dense rank, interleaved": layout(layout=dict(pp=2, vpp=2), steps=LBL_SCOPES,
                                      config=dict(num_layers=4, moe_layer_freq=[0, 1, 0, 1])),
    "dense rank, interleaved, expert bias": layout(
        layout=dict(pp=2, vpp=2), steps=[(s, {}) for s in ("micro", "dp", "global")],
        config=dict(AUX_FREE, num_layers=4, moe_layer_freq=[0, 1, 0, 1])),
    # Uneven stages: stage 0 holds the one dense layer, stage 1 the two MoE layers.
    "uneven stages": layout(layout=dict(pp=2), steps=[("global", {})],
                            config=dict(num_layers=3, moe_layer_freq=[0, 1, 1],
                                        num_layers_in_first_pipeline_stage=1)),
    "dense model": ("dense_model_error", dict(pp=2)),
    # The device-level loss's token group G (expert-tensor x expert-parallel) against TP x CP:
    # G = all 4 ranks (ETP 2 x EP 2), G = the TP pair (ETP 1 x EP 2); on 8 ranks G = half of
    # TP x CP (lbl._device_weights' fractional R_G).
    "TP 2 + SP x EP 2, device": layout(
        layout=dict(tp=2, ep=2), steps=[("global", DEVICE), ("dp", dict(DEVICE, device_groups=4))]),
    "TP 2 + SP, ETP 1 x EP 2, device": layout(layout=dict(tp=2, etp=1, ep=2),
                                              steps=[("global", DEVICE)]),
}
EIGHT_RANKS = {
    "TP 2 x PP 2 x DP 2": layout(layout=dict(tp=2, pp=2), loss="tokens", config=PIPELINED),
    "TP 2 x PP 2 (VPP 2) x DP 2": layout(layout=dict(tp=2, pp=2, vpp=2), loss="mean",
                                         grad_scale=2.0, config=PIPELINED),
    "TP 2 x CP 2 x DP 2, EP 2": layout(layout=dict(tp=2, cp=2, ep=2), loss="mean",
                                       steps=ROUTER_RUN["steps"] + [("global", DEVICE)]),
    "TP 2 x CP 2 x DP 2, ETP 1 x EP 2, device": layout(layout=dict(tp=2, cp=2, etp=1, ep=2),
                                                       loss="mean", steps=[("global", DEVICE)]),
}


def _run(calls: dict, world_size: int) -> dict:
    per_rank = run_gloo(layout_workers.runs, world_size, list(calls.values()))
    return {label: [rank_results[i] for rank_results in per_rank]
            for i, label in enumerate(calls)}


@pytest.fixture(scope="module")
def two_ranks():
    return _run(TWO_RANKS, 2)


@pytest.fixture(scope="module")
def four_ranks():
    return _run(FOUR_RANKS, 4)


def rel_err(actual, expected):
    return float((actual.double() - expected).norm() / expected.norm())


def reference_loss(scope: str, hidden: list, settings: dict, token_groups: list, spec: dict):
    """The step's loss at `scope` as a function of the router weight; hidden[k][r] is rank r's
    router input of micro-batch k (every rank of the stage holds distinct tokens; for micro and
    seq, as used here, each rank is its own TP x CP group). With device_coeff in the step's
    `settings`, plus the device-level loss over `token_groups` (lists of indices r)."""
    if scope in ("dp", "global"):
        def scoped(weight):
            return reference.global_batch_lbl(weight, hidden, None, TOPK, COEFF,
                                              buffered=scope == "global")[0]
    else:
        per_call = {"micro": reference.micro_batch_lbl, "seq": reference.sequence_lbl}[scope]

        def scoped(weight):
            # Megatron's DDP averages the ranks' gradients, the schedule the micro-batches'.
            return torch.stack([per_call(weight, h, TOPK, COEFF)
                                for ranks in hidden for h in ranks]).mean()
    if not settings.get("device_coeff"):
        return scoped
    num_devices = settings.get("device_groups") or spec["layout"].get("ep", 1)
    return lambda weight: scoped(weight) + reference.device_balance_loss(
        weight, hidden, None, token_groups, TOPK, settings["device_coeff"], num_devices)


def router_errors(per_rank: list, step: int, spec: dict, factor: float = 1.0) -> dict:
    """Per MoE layer: the largest relative error, over the ranks that hold it, of the router
    gradient against `factor` times the reference's."""
    scope, settings = spec["steps"][step]
    holders = {}
    for results in per_rank:
        for layer, router in results[step]["routers"].items():
            holders.setdefault(layer, []).append(router)
    token_groups = sorted({tuple(results[step]["token_group"]) for results in per_rank})
    errors = {}
    for layer, routers in holders.items():
        # The device loss's token groups index hidden by rank: every rank must hold the layer.
        assert not settings.get("device_coeff") or len(routers) == len(per_rank), layer
        weight = routers[0]["weight"]
        assert all(torch.equal(r["weight"], weight) for r in routers), layer
        assert all(len(r["inputs"]) == spec["microbatches"] for r in routers), layer
        hidden = [[r["inputs"][k] for r in routers] for k in range(spec["microbatches"])]
        loss = reference_loss(scope, hidden, settings, token_groups, spec)
        expected = factor * reference.grad_of(loss, weight)
        assert expected.abs().sum() > 0
        errors[layer] = max(rel_err(r["grad"], expected) for r in routers)
    return errors


def check_against_reference(label: str, per_rank: list, spec: dict, factor: float = 1.0) -> None:
    for step, (scope, settings) in enumerate(spec["steps"]):
        if scope == "shuffle":  # a random draw, no closed-form reference: it trains the routers
            assert all(router["grad"].abs().sum() > 0 for results in per_rank
                       for router in results[step]["routers"].values()), label
            continue
        per_layer = router_errors(per_rank, step, spec, factor)
        assert per_layer, f"{label}: no MoE layer"
        print(f"\n{label}, scope {scope} {settings or ''}: rel. err. per MoE layer "
              + ", ".join(f"{layer}: {err:.1e}" for layer, err in sorted(per_layer.items())))
        assert max(per_layer.values()) <= MAX_REL_ERR, (label, scope, per_layer)


@pytest.mark.parametrize("label", ["TP 2 + SP", "CP 2", "TP 2 + SP, per-token",
                                   "CP 2, per-token", "EP 2"])
def test_two_rank_layouts_match_reference(two_ranks, label):
    spec = TWO_RANKS[label][1]
    factor = 1.0
    if spec["loss"] == "per_token" and spec["layout"].get("cp", 1) > 1 \
            and not per_token_count_includes_context_parallel():
        # 0.12's finalize_model_grads sums the token count over DP only: at CP 2 it divides every
        # gradient, the language-model loss's too, by half the tokens. The LBL follows the
        # divisor Megatron uses, so it keeps its weight against the language-model loss.
        factor = spec["layout"]["cp"]
    check_against_reference(label, two_ranks[label], spec, factor)


def test_cp_scale_decided_from_the_schedules_behaviour(two_ranks):
    spec = TWO_RANKS["CP 2, no source"][1]
    check_against_reference("CP 2, no source", two_ranks["CP 2, no source"], spec)
    for outcome in two_ranks["CP 2, unknown scale"]:
        assert "context-parallel size 2" in outcome["error"], outcome
        assert "neither 1" in outcome["error"] and "not supported" in outcome["error"]


def per_token_count_includes_context_parallel() -> bool:
    """Whether finalize_model_grads sums the per-token-loss token count over DP x CP (0.13+)."""
    from megatron.core.distributed import finalize_model_grads

    source = inspect.getsource(finalize_model_grads)
    return "with_context_parallel=True" in source or "dp_cp_group" in source


@pytest.mark.parametrize("label", ["PP 2 1F1B", "PP 2 interleaved (VPP 2)",
                                   "TP 2 + SP x EP 2, device", "TP 2 + SP, ETP 1 x EP 2, device"])
def test_four_rank_layouts_match_reference(four_ranks, label):
    check_against_reference(label, four_ranks[label], FOUR_RANKS[label][1])


def test_eight_rank_layouts_match_reference():
    results = _run(EIGHT_RANKS, 8)
    for label, per_rank in results.items():
        check_against_reference(label, per_rank, EIGHT_RANKS[label][1])


@pytest.mark.parametrize("label", ["interleaved, whole model", "CP 2 x DP 2, whole model"])
def test_layout_gives_the_gradients_of_data_parallel_alone(two_ranks, four_ranks, label):
    """Every parameter's gradient, with the language-model loss, of the same 4-layer model on the
    same data at DP 2 alone and at PP 2 (interleaved schedule) or CP 2 (harness attention)."""
    def merged(per_rank):
        grads = {}
        for results in per_rank:
            grads.update(results[0]["grads"])
        return grads

    flat, other = merged(two_ranks["no pipelining"]), merged(four_ranks[label])
    assert other.keys() == flat.keys()
    assert any("router" in name for name in flat)
    for name, grad in flat.items():
        torch.testing.assert_close(other[name], grad, rtol=1e-4, atol=1e-7, msg=name)


def test_megatron_core_default_batched_p2p_swaps_messages_at_pp2(two_ranks):
    """Why the harness runs the interleaved schedule with Megatron-LM's p2p settings: with
    Megatron-Core's default batch_p2p_comm, rank 0 receives rank 1's gradient as the activation
    from its previous rank and the activation as the gradient from its next rank."""
    received = two_ranks["batched p2p"]
    assert received[0] == {"from_previous": 11.0, "from_next": 12.0}  # not 12 and 11
    assert received[1] == {"from_previous": 1.0, "from_next": 2.0}


@pytest.mark.parametrize("label", ["dense stage", "dense rank, interleaved", "uneven stages"])
def test_stages_without_moe_layers_train_at_every_scope(four_ranks, label):
    per_rank, spec = four_ranks[label], FOUR_RANKS[label][1]
    assert any(not results[0]["routers"] for results in per_rank)  # a rank without MoE layers
    check_against_reference(label, per_rank, spec)


@pytest.mark.parametrize("label", ["dense stage, expert bias",
                                   "dense rank, interleaved, expert bias"])
def test_stages_without_moe_layers_update_expert_bias(four_ranks, label):
    per_rank = four_ranks[label]
    assert any(not results[0]["routers"] for results in per_rank)
    for step, (scope, _) in enumerate(FOUR_RANKS[label][1]["steps"]):
        biases = {}
        for results in per_rank:
            for layer, router in results[step]["routers"].items():
                biases.setdefault(layer, []).append(router["expert_bias"])
        assert biases, label
        for layer, values in biases.items():
            assert values[0].abs().sum() > 0, (label, scope, layer)
            for value in values[1:]:  # one bias per layer on all its ranks
                assert torch.equal(value, values[0]), (label, scope, layer)


def test_model_without_moe_layers_is_rejected_on_every_stage(four_ranks):
    for message in four_ranks["dense model"]:
        assert "the model has no MoE layer" in message, message
