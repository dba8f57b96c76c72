"""Edge cases, faults and invariances (issue 7), on real Megatron-Core models and gloo groups.

Bad input has its own catalog: tests/bad_input.py, tests/test_bad_input.py.
"""

import inspect
import json
import time

import pytest
import torch

import fault_workers
import reference
import workers
from megatron.core.transformer.moe.router import TopKRouter
from megatron_gbl import comm
from megatron_gbl_lab.harness import run_gloo

TOPK, COEFF, HIDDEN = 2, 1e-2, 32
padding_supported = "padding_mask" in inspect.signature(TopKRouter.routing).parameters
FULL_RECOMPUTE = dict(recompute_granularity="full", recompute_method="uniform",
                      recompute_num_layers=1)
LBL_AND_BIAS = dict(workers.AUX_FREE, moe_router_load_balancing_type="aux_loss",
                    moe_aux_loss_coeff=COEFF)


def rel_err(actual, expected):
    return float((actual.double() - expected).norm() / expected.norm())


def router_spec(scope, microbatches=2, **extra):
    return dict(dict(scope=scope, lbl_type="aux_loss", coeff=COEFF, microbatches=microbatches,
                     steps=1, padded=False, seed=0), **extra)


def reference_grad(result, spec, world_size, buffered):
    hidden, padding = workers.step_data(spec, spec["steps"] - 1, world_size, HIDDEN)
    return reference.grad_of(lambda w: reference.global_batch_lbl(
        w, hidden, padding, TOPK, COEFF, buffered)[0], result["weight"])


# Edge cases ------------------------------------------------------------------------------------

@pytest.mark.skipif(not padding_supported, reason="routing(padding_mask) needs megatron-core>=0.16")
def test_micro_batches_of_padding_only():
    # dp: one rank's micro-batch is all padding; global: micro-batch 1 is padding on every rank.
    specs = [router_spec("dp", 2, padded=True, seed=90, all_padding=[(0, 0)]),
             router_spec("global", 3, padded=True, seed=91,
                         all_padding=[(1, r) for r in range(2)])]
    results = run_gloo(workers.router_runs, 2, specs)[0]
    for spec, result in zip(specs, results):
        assert torch.isfinite(result["grad"]).all()
        assert rel_err(result["grad"], reference_grad(result, spec, 2, spec["scope"] == "global")) \
            <= 1e-5, spec["scope"]
        assert all(torch.isfinite(values).all() for values in result["metrics"].values())


def test_expert_without_tokens_in_a_whole_step():
    world_size, steps = 2, 2
    lbl, = run_gloo(workers.router_runs, world_size,
                    [router_spec("global", 3, seed=92, dead_expert=True)])[0]
    assert int(lbl["global_tokens_per_expert"][0, workers.DEAD_EXPERT]) == 0
    assert rel_err(lbl["grad"], reference_grad(lbl, router_spec("global", 3, seed=92,
                                                                dead_expert=True),
                                               world_size, True)) <= 1e-5
    assert all(torch.isfinite(values).all() for values in lbl["metrics"].values())
    # Aux-loss-free: the idle expert is underloaded at every update, so its bias rises by u.
    aux_free, = run_gloo(workers.bias_router_runs, world_size,
                         [dict(scope="global", microbatches=3, steps=steps, seed=93, rate=0.01,
                               dead_expert=True)])[0]
    assert [float(b[workers.DEAD_EXPERT]) for b in aux_free["biases"]] == pytest.approx(
        [0.01 * (s + 1) for s in range(steps)], rel=1e-6)


@pytest.mark.parametrize("precision", [{}, dict(bf16=True, params_dtype=torch.bfloat16)],
                         ids=["fp32", "bf16"])
def test_nan_router_logits_stop_the_step_naming_layer_and_iteration(precision):
    spec = dict(scope="global", config=dict(workers.AUX_FREE, **precision), nan_step=2, steps=4,
                microbatches=2, seq=8, bsz=2)
    for result in run_gloo(workers.nan_logits_run, 2, spec):
        assert result["steps_done"] == 2  # the two clean steps, then the error in the third
        assert result["error"] is not None
        for words in ("NaN or inf", "MoE layer(s) [2]", "iteration 2", "iteration 3",
                      "expert bias is not updated"):
            assert words in result["error"], result["error"]
        assert all(torch.isfinite(b).all() for b in result["bias"])


@pytest.mark.parametrize("scope", ["dp", "global"])
def test_nan_router_logits_with_fp16_follow_the_optimizers_skip(scope):
    # NaN router input on rank 0 only, at step 1 of 4: with fp16 Megatron's grad scaler finds
    # the NaN gradients and skips that step on both ranks; the plugin follows it: no error, the
    # expert bias as before the step (at dp it was updated after each micro-batch, then
    # restored), and the next steps update it again.
    results = run_gloo(fault_workers.fp16_nan_logits_run, 2, dict(scope=scope))
    for result in results:
        assert result["applied"] == [True, False, True, True]
        before, skipped, after = result["biases"][:3]
        for layer_before, layer_skipped, layer_after in zip(before, skipped, after):
            assert torch.equal(layer_skipped, layer_before)
            assert not torch.equal(layer_after, layer_skipped)  # the next step updates again
            assert torch.isfinite(layer_after).all()
    for layer_0, layer_1 in zip(results[0]["biases"][-1], results[1]["biases"][-1]):
        assert torch.equal(layer_0, layer_1)


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_half_precision_models(dtype):
    half = {dtype: True, "params_dtype": {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]}
    run = dict(scope="global", microbatches=4, step_seeds=[5], seq=32, bsz=4,
               config=dict(LBL_AND_BIAS, **half))
    result, = run_gloo(workers.model_runs, 2, [run])[0]
    choices = TOPK * 4 * 32 * 4 * 2  # micro-batches x seq x bsz x ranks, top-2
    for buffer in result["buffers"]:
        assert buffer["dtype"] == torch.int64
        assert int(buffer["tokens_per_expert"].sum()) == choices  # global, all ranks
        assert buffer["load_num_tokens"] == choices // TOPK // 2  # local: this rank
    assert all(torch.isfinite(grad).all() for grad in result["grads"].values())
    assert any(grad.abs().sum() > 0 for name, grad in result["grads"].items() if "router" in name)


def test_token_dropping_with_a_capacity_factor():
    dropping = dict(LBL_AND_BIAS, moe_expert_capacity_factor=0.5, moe_token_drop_policy="probs")
    result, = run_gloo(workers.model_runs, 2, [dict(scope="global", microbatches=2,
                                                     step_seeds=[6], seq=16, bsz=2,
                                                     config=dropping)])[0]
    tokens = 2 * 16 * 2  # this rank's micro-batches x seq x bsz
    for buffer in result["buffers"]:
        # The LBL counts the plain top-k (as upstream 0.14+), the expert bias what was dispatched.
        assert int(buffer["tokens_per_expert"].sum()) == TOPK * tokens * 2  # both ranks
        assert int(buffer["load_tokens_per_expert"].sum()) < TOPK * tokens
    assert all(torch.isfinite(grad).all() for grad in result["grads"].values())


def test_single_data_parallel_rank_and_single_micro_batch():
    specs = [router_spec("global", 3, seed=94), router_spec("dp", 2, seed=95),
             router_spec(None, 2, seed=95), router_spec("global", 1, seed=96),
             router_spec("dp", 1, seed=96)]
    glob, dp, upstream, glob_one, dp_one = run_gloo(workers.router_runs, 1, specs)[0]
    assert rel_err(glob["grad"], reference_grad(glob, specs[0], 1, True)) <= 1e-5
    # One rank: dp is the micro-batch LBL, Megatron's aux_loss.
    torch.testing.assert_close(dp["grad"], upstream["grad"], rtol=1e-5, atol=1e-9)
    # One micro-batch per step: the buffer holds just it, so global is dp, bitwise.
    assert torch.equal(glob_one["grad"], dp_one["grad"])
    two_ranks = run_gloo(workers.router_runs, 2, [router_spec("global", 1, seed=97),
                                                  router_spec("dp", 1, seed=97)])[0]
    assert torch.equal(two_ranks[0]["grad"], two_ranks[1]["grad"])


# Faults ----------------------------------------------------------------------------------------

def test_a_rank_that_dies_mid_step_stops_the_others_with_a_clear_error(tmp_path):
    timeout_s = 20
    # Forked from the warm server run_gloo started (no interpreter start-up on a loaded box).
    context = torch.multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["megatron_gbl_lab.quiet", "megatron_gbl.patch",
                                    "megatron_gbl_lab.harness"])
    result_file = tmp_path / "rank0.json"
    procs = [context.Process(target=workers.die_mid_step,
                             args=(rank, 2, str(tmp_path / "rendezvous"), str(result_file),
                                   timeout_s)) for rank in range(2)]
    started = time.monotonic()
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=timeout_s + 90)
    alive = [proc for proc in procs if proc.is_alive()]
    for proc in alive:
        proc.kill()
    assert not alive, "a rank hung instead of stopping"
    assert procs[1].exitcode == 1  # the rank that died
    with open(result_file) as f:
        outcome = json.load(f)
    assert outcome["error"] is not None, "rank 0 finished the step without its peer"
    for words in ("megatron_gbl:", "of MoE layer", "failed", "process group"):
        assert words in outcome["error"], outcome["error"]
    assert outcome["seconds"] < timeout_s + 30
    assert time.monotonic() - started < timeout_s + 120


def test_only_peer_failures_are_relabelled():
    # A programming error in a collective keeps its own type and message; only the backend's
    # reports of a failed peer or a timeout become the plugin's "peer stopped" error.
    raised = run_gloo(fault_workers.collective_programming_error, 2)[0]
    assert raised is not None
    kind, message = raised
    assert kind == "RuntimeError" and not message.startswith("megatron_gbl:"), raised
    assert comm.peer_failure(RuntimeError("[gloo/transport/tcp/pair.cc:534] Connection reset"))
    assert comm.peer_failure(torch.distributed.DistError("store timeout"))
    assert not comm.peer_failure(RuntimeError("Invalid scalar type"))


def test_a_step_that_raises_leaves_no_stale_counts():
    spec = dict(scope="global", config=LBL_AND_BIAS, fail_call=1, microbatches=3, seq=8, bsz=2)
    for result in run_gloo(workers.failing_step_run, 2, spec):
        after, alone = result["after_failed_step"], result["alone"]
        for grad, expected in zip(after["grads"], alone["grads"]):
            assert grad.abs().sum() > 0 and torch.equal(grad, expected)
        for bias, expected in zip(after["biases"], alone["biases"]):
            assert bias.abs().sum() > 0 and torch.equal(bias, expected)


def test_save_and_resume_mid_run_with_lbl_and_expert_bias(tmp_path):
    run = dict(config=LBL_AND_BIAS, scope="global", settings=dict(micro_coeff=1e-3), steps=4,
               first=2, microbatches=2, seq=8, bsz=2, ckpt_dir=str(tmp_path))
    for result in run_gloo(workers.resume_run, 2, run):
        assert any(b.abs().sum() > 0 for b in result["saved_bias"])
        for name, value in result["uninterrupted"].items():
            assert torch.equal(result["resumed"][name], value), name


# Invariances -----------------------------------------------------------------------------------

def test_dp_scope_four_ranks_equal_one_rank_with_four_times_the_micro_batch():
    gen = torch.Generator().manual_seed(98)
    sequences = [torch.randn(workers.SEQ, 1, HIDDEN, generator=gen) for _ in range(4)]
    four = run_gloo(workers.router_runs, 4, [router_spec("dp", 1, hidden=[sequences])])[0][0]
    one = run_gloo(workers.router_runs, 1,
                   [router_spec("dp", 1, hidden=[[torch.cat(sequences, dim=1)]])])[0][0]
    torch.testing.assert_close(four["grad"], one["grad"], rtol=1e-5, atol=1e-10)
    assert torch.equal(four["global_tokens_per_expert"], one["global_tokens_per_expert"])
    assert four["seen"][-1]["balance"] == one["seen"][-1]["balance"]
    assert one["grad"].abs().sum() > 0


def test_global_scope_gradients_do_not_depend_on_schedule_or_recompute():
    # The same 4-layer model without pipelining (DP 2) and with 1F1B (PP 2 x DP 2), which runs
    # the micro-batches' forwards and backwards in another order, with and without recompute.
    run = dict(scope="global", microbatches=4, seq=8, bsz=2)
    no_pipelining = _merged(run_gloo(workers.layout_grads, 2, dict(run, pp=1)))
    assert any("router" in name for name in no_pipelining)
    for label, spec in {"1F1B": dict(run, pp=2),
                        "1F1B + full recompute": dict(run, pp=2, config=FULL_RECOMPUTE)}.items():
        grads = _merged(run_gloo(workers.layout_grads, 4, spec))
        assert grads.keys() == no_pipelining.keys(), label
        for name, grad in no_pipelining.items():
            torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-7,
                                       msg=f"{label}: {name}")


def _merged(per_rank: list) -> dict:
    merged = {}
    for grads in per_rank:
        merged.update(grads)
    return merged


def test_two_identical_runs_are_bitwise_identical():
    specs = [dict(scope="global", config=LBL_AND_BIAS, settings=dict(micro_coeff=1e-3), steps=3,
                  microbatches=2, seq=8, bsz=2),
             dict(scope="shuffle", config={}, steps=3, microbatches=2, seq=8, bsz=2)]
    for spec in specs:
        first, second = (run_gloo(workers.trained_state, 2, spec)[0] for _ in range(2))
        assert first.keys() == second.keys()
        for name, value in first.items():
            assert torch.equal(second[name], value), (spec["scope"], name)


def test_balance_blocks_take_megatrons_timeout_and_disable_destroys_them():
    # Megatron's groups get --distributed-timeout-minutes 0.1 (6 s); so does the balance block
    # cut from them (torch's default would be 30 min): with rank 1 stalled for 10 s, rank 0's
    # count sum over the block fails after about 6 s.
    results = run_gloo(workers.balance_block_timeout, 2, dict(minutes=0.1, stall_s=10))
    for result in results:
        assert result["timeout_s"] == pytest.approx(6.0)
        assert result["ranks"] == [0, 1]
        assert result["destroyed"]
    assert 5.0 <= results[0]["failed_after"] < 9.5, results[0]["failed_after"]


def test_balance_blocks_are_cut_from_the_routers_own_groups():
    for rank, result in enumerate(run_gloo(workers.blocks_from_router_groups, 2)):
        assert "cut from another TP x DP x CP group than MoE layer" in result["error"]
        assert "model=model" in result["error"]
        assert result["block_ranks"] == [rank]
