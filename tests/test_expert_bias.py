"""Auxiliary-loss-free balancing (expert bias, Wang et al. 2024) at micro, dp and global scope,
through real sigmoid TopKRouters with expert bias on real gloo groups."""

import pytest
import torch

import reference
import workers
from megatron_gbl import bias, metrics
from megatron_gbl_lab.harness import run_gloo

TOPK, RATE = 2, 0.05  # a rate large enough that the bias really changes the routing


def spec(scope, microbatches=3, steps=2, seed=0, **extra):
    return dict(scope=scope, microbatches=microbatches, steps=steps, seed=seed, rate=RATE, **extra)


def hidden_steps(run_spec, world_size):
    return [workers.make_hidden(run_spec["seed"] + step, run_spec["microbatches"], world_size,
                                32, padded=False)[0] for step in range(run_spec["steps"])]


def test_load_error_sign_and_update_formula():
    counts = torch.tensor([[6, 2, 2, 2], [3, 3, 3, 3]])
    assert load_error_sign_list(counts) == [[-1, 1, 1, 1], [0, 0, 0, 0]]  # mean 3: exactly 0
    sign_sum = torch.tensor([2.0, 0.0, -2.0], dtype=torch.float64)  # two groups agree, disagree, agree
    assert bias.bias_update(sign_sum, num_groups=2, rate=0.1).tolist() == [0.1, 0.0, -0.1]


def load_error_sign_list(counts):
    return bias.load_error_sign(counts).long().tolist()


def test_bias_updates_and_biased_selection_match_reference():
    world_size = 4
    specs = [spec("micro", seed=1), spec("dp", seed=2), spec("global", seed=3),
             spec("global", seed=4, sync_group_size=2)]
    results = run_gloo(workers.bias_router_runs, world_size, specs)
    for i, run_spec in enumerate(specs):
        label = f"scope={run_spec['scope']} sync_group_size={run_spec.get('sync_group_size')}"
        ours = results[0][i]
        blocks = [[0, 1], [2, 3]] if run_spec.get("sync_group_size") else None
        steps = hidden_steps(run_spec, world_size)
        after_steps, routed_with = reference.aux_free_run(ours["weight"], steps, TOPK, RATE,
                                                          run_spec["scope"], blocks)
        assert after_steps[0].abs().sum() > 0  # the first update moves the bias
        for step, (got, want) in enumerate(zip(ours["biases"], after_steps)):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-7, msg=f"{label} step {step}")
        for rank in range(world_size):
            for got, want in zip(results[rank][i]["biases"], ours["biases"]):
                assert torch.equal(got, want), f"{label}: replicas' biases differ"
            # Every call chose experts by the biased scores of its time, and gated unbiased.
            calls = iter(results[rank][i]["calls"])
            for step, micro_batches in enumerate(steps):
                for k, ranks in enumerate(micro_batches):
                    call = next(calls)
                    want_map, want_gates = reference.biased_routing(
                        ours["weight"], ranks[rank].reshape(-1, 32), routed_with[step][k], TOPK)
                    assert torch.equal(call["routing_map"], want_map), (label, step, k, rank)
                    torch.testing.assert_close(call["probs"].double(), want_gates, rtol=1e-5,
                                               atol=1e-7)
        unbiased = reference.biased_routing(ours["weight"], steps[-1][-1][0].reshape(-1, 32),
                                            torch.zeros(8), TOPK)[0]
        assert not torch.equal(ours["calls"][-1]["routing_map"], unbiased), \
            f"{label}: the bias changed no routing decision, so the test would show nothing"


def test_global_scope_equals_megatron_expert_bias_update():
    # Megatron's own update (local_tokens_per_expert, finalize_model_grads'
    # _update_router_expert_bias) against the plugin's at global scope, same data, same run.
    upstream, ours = run_gloo(workers.bias_router_runs, 2,
                              [spec(None, steps=3, seed=7), spec("global", steps=3, seed=7)])[0]
    assert len(ours["biases"]) == 3
    for step, (got, want) in enumerate(zip(ours["biases"], upstream["biases"])):
        assert want.abs().sum() > 0
        assert got.dtype == want.dtype == torch.float32
        assert torch.equal(got, want), f"step {step}: {got} vs upstream {want}"
    assert not torch.equal(ours["biases"][0], ours["biases"][-1])  # it keeps moving


def test_bias_metrics_and_balance_bsz():
    world_size, microbatches = 2, 3
    (micro, glob), _ = run_gloo(workers.bias_router_runs, world_size,
                                [spec("micro", microbatches, steps=1, seed=9),
                                 spec("global", microbatches, steps=1, seed=9)])
    tokens = workers.SEQ * workers.MICRO_BSZ
    assert (micro["balance"].tokens, micro["balance"].sequences) == (tokens, workers.MICRO_BSZ)
    assert (glob["balance"].tokens, glob["balance"].sequences) == (
        world_size * microbatches * tokens, world_size * microbatches * workers.MICRO_BSZ)
    for run in (micro, glob):
        values = run["metrics"]
        assert set(values) == set(metrics.names(has_lbl=False, has_expert_bias=True))
        assert float(values[metrics.EXPERT_BIAS_STD][0]) == pytest.approx(
            float(run["biases"][-1].double().std()), rel=1e-9)
        assert float(values[metrics.EXPERT_BIAS_STD][0]) > 0
        # The load violation is of the dispatched (biased) routing: recount it from the calls.
        last_step = run["calls"][-microbatches:]
        counts = [call["routing_map"].sum(0).double() for call in last_step]
        want = sum(float(c.max() / c.mean() - 1) for c in counts) / microbatches
        assert float(values[metrics.MICRO_LOAD_VIOLATION][0]) == pytest.approx(want, rel=1e-9)


def test_checkpoint_round_trip_continues_identically(tmp_path):
    run = dict(config=dict(workers.AUX_FREE, bf16=True, params_dtype=torch.bfloat16),
               scope="global", steps=4, first=2, microbatches=2, seq=8, bsz=2,
               ckpt_dir=str(tmp_path))
    results = run_gloo(workers.resume_run, 2, run)
    for result in results:
        for saved, loaded in zip(result["saved_bias"], result["loaded_bias"]):
            assert saved.dtype == loaded.dtype == torch.float32  # in a bf16 model
            assert torch.equal(saved, loaded) and saved.abs().sum() > 0
        biased = [name for name in result["uninterrupted"] if name.endswith("expert_bias")]
        assert biased
        for name, value in result["uninterrupted"].items():
            assert torch.equal(result["resumed"][name], value), name


def test_bf16_model_expert_load_exact():
    # Upstream counts the expert-bias load in a float buffer that Float16Module-style casting
    # (model.bfloat16()) turns into bf16 (Megatron-LM PR 7081); the plugin counts int64.
    bf16 = dict(workers.AUX_FREE, bf16=True, params_dtype=torch.bfloat16)
    run = dict(microbatches=8, step_seeds=[5], seq=128, bsz=4, config=bf16)
    ours, upstream = run_gloo(workers.model_runs, 2,
                              [dict(run, scope="global"), dict(run, scope=None)])[0]
    choices = TOPK * 8 * 128 * 4  # this rank's micro-batches x seq x bsz, top-2
    for buffer in ours["buffers"]:
        assert buffer["dtype"] == torch.int64
        assert int(buffer["load_tokens_per_expert"].sum()) == choices
        assert buffer["load_tokens_per_expert"].max() > 256  # beyond bf16's exact integers
    exact = ours["buffers"][0]["load_tokens_per_expert"]  # same data and routing: bias is 0
    upstream_load = upstream["buffers"][0]["tokens_per_expert"]
    error = (upstream_load.double() - exact.double()).abs().max()
    print(f"\nbf16 model, {choices} expert choices per rank: megatron_gbl load int64, exact; "
          f"upstream local_tokens_per_expert is {upstream_load.dtype}, off by up to "
          f"{float(error):.0f} choices per expert (max count {int(exact.max())})")
    assert upstream_load.dtype == torch.bfloat16 and error > 0
