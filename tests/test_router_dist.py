"""Scoped LBL through real Megatron-Core TopKRouters on real gloo groups of 2 and 4 processes.

Gradients are the data-parallel average that Megatron's DDP applies, compared with the
independent single-process references in reference.py on the concatenated batch.
"""

import inspect
import itertools

import pytest
import torch

import reference
import workers
from megatron.core.transformer.moe.router import TopKRouter
from megatron_gbl import compat, metrics
from megatron_gbl_lab.harness import run_gloo

TOPK, COEFF, HIDDEN = 2, 1e-2, 32
padding_supported = "padding_mask" in inspect.signature(TopKRouter.routing).parameters


def spec(scope, microbatches=1, padded=False, lbl_type="aux_loss", steps=1, seed=0, **extra):
    return dict(scope=scope, lbl_type=lbl_type, coeff=COEFF, microbatches=microbatches,
                steps=steps, padded=padded, seed=seed, **extra)


def rel_err(actual, expected):
    return float((actual.double() - expected).norm() / expected.norm())


def global_reference(result, world_size, microbatches, padded, seed, buffered, blocks=None):
    """DP-averaged gradient of the single-process global-batch LBL (mean over balance blocks)."""
    hidden, padding = workers.make_hidden(seed, microbatches, world_size, HIDDEN, padded)
    blocks = blocks or [list(range(world_size))]

    def loss(weight):
        return torch.stack([
            reference.global_batch_lbl(
                weight, [[h[r] for r in block] for h in hidden],
                None if padding is None else [[p[r] for r in block] for p in padding],
                TOPK, COEFF, buffered)[0]
            for block in blocks]).mean()

    return reference.grad_of(loss, result["weight"])


CASES = [(scope, ga, padded) for scope, ga, padded in
         itertools.product(("dp", "global"), (1, 4), (False, True)) if padding_supported or not padded]


@pytest.mark.parametrize("world_size", [2, 4])
def test_dp_and_global_match_single_process_reference(world_size):
    specs = [spec(scope, ga, padded, seed=10 + i, enable_before_build=i % 2 == 1)
             for i, (scope, ga, padded) in enumerate(CASES)]
    results = run_gloo(workers.router_runs, world_size, specs)
    for i, (scope, ga, padded) in enumerate(CASES):
        expected = global_reference(results[0][i], world_size, ga, padded, 10 + i,
                                    buffered=scope == "global")
        err = rel_err(results[0][i]["grad"], expected)
        assert err <= 1e-5, f"scope={scope} GA={ga} padded={padded}: rel. err {err:.2e}"
        for rank in range(1, world_size):
            torch.testing.assert_close(results[rank][i]["grad"], results[0][i]["grad"])


def mean_lbl_reference(result, seed, per_rank_lbl, world_size=2, microbatches=2, shards=1):
    """Gradient of the mean over micro-batches and data-parallel replicas of `per_rank_lbl`, a
    replica's micro-batch being the concatenation of its `shards` consecutive ranks' tokens."""
    hidden, _ = workers.make_hidden(seed, microbatches, world_size, HIDDEN, padded=False)
    return reference.grad_of(lambda w: torch.stack([
        per_rank_lbl(w, torch.cat(mb[r:r + shards]), TOPK, COEFF)
        for mb in hidden for r in range(0, world_size, shards)]).mean(), result["weight"])


def test_micro_and_seq_equal_upstream_aux_and_seq_aux_loss():
    # (scope, upstream's type, padded, calculate_per_token_loss)
    cases = [(scope, lbl_type, padded, per_token)
             for scope, lbl_type in (("micro", "aux_loss"), ("seq", "seq_aux_loss"))
             for padded in ((False, True) if padding_supported else (False,))
             for per_token in (False, True)]
    specs = [spec(s, 2, padded, lbl_type=lbl_type, seed=3, per_token_loss=per_token)
             for scope, lbl_type, padded, per_token in cases for s in (None, scope)]
    results = run_gloo(workers.router_runs, 2, specs)[0]
    for i, (scope, lbl_type, padded, per_token) in enumerate(cases):
        upstream, ours = results[2 * i], results[2 * i + 1]
        label = f"scope={scope} padded={padded} per-token={per_token}"
        assert upstream["grad"].abs().sum() > 0
        if not padded:
            # Per-token loss or not, the gradient Megatron's optimizer sees is that of the mean
            # over ranks and micro-batches (eq. 3) of the micro-batch or per-sequence LBL.
            per_rank = reference.micro_batch_lbl if scope == "micro" else reference.sequence_lbl
            err = rel_err(ours["grad"], mean_lbl_reference(ours, 3, per_rank))
            assert err <= 1e-5, f"{label}: rel. err {err:.2e} against the reference"
        ratio = float(upstream["grad"].norm() / ours["grad"].norm())
        if scope == "seq" and per_token and ratio != pytest.approx(1.0, rel=1e-5):
            # Megatron-Core 0.16-0.18 scale a per-token-loss seq_aux_loss by one sequence's
            # tokens instead of the micro-batch's, so its gradient shrinks with the micro-batch
            # size (fixed in 0.19 by Megatron-LM PR 5798); the plugin follows the reference.
            print(f"\n{label}: upstream seq_aux_loss gradient is megatron_gbl's / {1 / ratio:.4f}")
            assert ratio == pytest.approx(1 / workers.MICRO_BSZ, rel=1e-5)
            torch.testing.assert_close(ours["grad"] * ratio, upstream["grad"], rtol=1e-5,
                                       atol=1e-9)
        else:
            torch.testing.assert_close(ours["grad"], upstream["grad"], rtol=1e-5, atol=1e-9,
                                       msg=f"{label} differs from upstream {lbl_type}")
        # The value Megatron's aux-loss tracker logs, under upstream's own name.
        assert ours["logged"].keys() == upstream["logged"].keys() == {compat.tracker_name(lbl_type)}
        for name, values in upstream["logged"].items():
            assert values.abs().sum() > 0
            torch.testing.assert_close(ours["logged"][name], values, rtol=1e-6, atol=0)


def test_per_token_loss_scale_at_tp2():
    # Two tensor-parallel ranks with sequence parallelism, each routing its own half of the
    # tokens. In per-token-loss mode the aux loss is multiplied back by the local tokens times
    # the TP x CP size: the gradient of the mean-loss mode again. That is upstream's scale from
    # Megatron-Core 0.19 (Megatron-LM PR 5047); before, upstream left TP x CP out (issue 1652),
    # and the plugin uses the correct scale on every version.
    specs = [spec(s, 2, seed=4, per_token_loss=per_token, tp=2)
             for per_token in (False, True) for s in (None, "micro")]
    upstream, ours, upstream_per_token, ours_per_token = run_gloo(workers.router_runs, 2,
                                                                  specs)[0]
    expected = mean_lbl_reference(ours, 4, reference.micro_batch_lbl, shards=2)
    assert rel_err(ours["grad"], expected) <= 1e-5  # the LBL of the TP group's micro-batch
    torch.testing.assert_close(ours["grad"], upstream["grad"], rtol=1e-5, atol=1e-9)
    assert rel_err(ours_per_token["grad"], expected) <= 1e-5
    assert upstream_per_token["grad"].abs().sum() > 0
    ratio = float(upstream_per_token["grad"].norm() / ours_per_token["grad"].norm())
    print(f"\nTP=2, per-token loss: upstream aux_loss gradient = {ratio:.4f} x megatron_gbl's "
          f"(1 from Megatron-Core 0.19, 1/2 before)")
    assert ratio == pytest.approx(1.0, rel=1e-5) or ratio == pytest.approx(0.5, rel=1e-5)


@pytest.mark.skipif(not hasattr(TopKRouter, "_apply_global_aux_loss"),
                    reason="upstream global_aux_loss needs megatron-core>=0.15")
@pytest.mark.parametrize("world_size", [2, 4])
def test_side_by_side_with_upstream_global_aux_loss(world_size):
    specs = [spec(None, 4, lbl_type="global_aux_loss", seed=7),
             spec("global", 4, lbl_type="global_aux_loss", seed=7)]
    per_rank = run_gloo(workers.router_runs, world_size, specs)
    upstream, ours = per_rank[0]
    expected = global_reference(ours, world_size, 4, False, 7, buffered=True)
    hidden, _ = workers.make_hidden(7, 4, world_size, HIDDEN, padded=False)
    lbl_sum = sum(reference.global_batch_lbl(ours["weight"], hidden, None, TOPK, COEFF, True)[1])
    # Logged values after Megatron's tracker reduction: ours is DP-averaged, upstream's is
    # summed over TP x DP x CP. Both report the true global-batch LBL; only the gradients differ.
    name = "global_load_balancing_loss"
    ours_logged = sum(float(r[1]["logged"][name].sum()) for r in per_rank) / world_size
    upstream_logged = sum(float(r[0]["logged"][name].sum()) for r in per_rank)
    assert ours_logged == pytest.approx(lbl_sum, rel=1e-5)
    assert upstream_logged == pytest.approx(lbl_sum, rel=1e-5)
    ours_err = rel_err(ours["grad"], expected)
    ratio = float(expected.norm() / upstream["grad"].double().norm())
    cosine = float(torch.nn.functional.cosine_similarity(
        expected.flatten(), upstream["grad"].double().flatten(), dim=0))
    print(f"\nDP={world_size}: megatron_gbl rel. err {ours_err:.2e}; "
          f"upstream global_aux_loss gradient is reference/{ratio:.4f} (cosine {cosine:.6f})")
    assert ours_err <= 1e-5
    assert ratio == pytest.approx(world_size, rel=1e-5)  # Megatron-LM issue 3672
    assert cosine == pytest.approx(1.0, abs=1e-6)


def test_buffer_prefix_and_reset_per_step():
    results = run_gloo(workers.router_runs, 2, [spec("global", 3, steps=2, seed=20)])[0][0]
    # Micro-batch k of each step sees micro-batches 0..k, and each step starts empty.
    assert [s["microbatches"] for s in results["seen"]] == [1, 2, 3, 1, 2, 3]
    tokens = workers.SEQ * workers.MICRO_BSZ * 2
    assert [(b.tokens, b.sequences) for b in (s["balance"] for s in results["seen"][:3])] == [
        (tokens, 2 * workers.MICRO_BSZ), (2 * tokens, 4 * workers.MICRO_BSZ),
        (3 * tokens, 6 * workers.MICRO_BSZ)]
    # The last step's gradient is that of its own data only (seed 21), nothing from step 1.
    expected = global_reference(results, 2, 3, False, 21, buffered=True)
    assert rel_err(results["grad"], expected) <= 1e-5


def test_sync_group_size_blocks_at_dp4():
    results = run_gloo(workers.router_runs, 4, [spec("global", 2, seed=30, sync_group_size=2),
                                                spec("dp", 1, seed=31, sync_group_size=4)])
    blocked, whole = results[0]
    expected = global_reference(blocked, 4, 2, False, 30, buffered=True, blocks=[[0, 1], [2, 3]])
    assert rel_err(blocked["grad"], expected) <= 1e-5
    not_expected = global_reference(blocked, 4, 2, False, 30, buffered=True)
    assert rel_err(blocked["grad"], not_expected) > 1e-3  # blocks really are smaller
    assert blocked["seen"][-1]["balance"].sequences == 2 * 2 * workers.MICRO_BSZ
    assert rel_err(whole["grad"], global_reference(whole, 4, 1, False, 31, buffered=False)) <= 1e-5


def test_micro_coeff_adds_the_micro_batch_lbl():
    micro_coeff = 3e-3
    results = run_gloo(workers.router_runs, 2,
                       [spec("global", 2, seed=40, micro_coeff=micro_coeff)])
    ours = results[0][0]
    hidden, _ = workers.make_hidden(40, 2, 2, HIDDEN, padded=False)
    micro = reference.grad_of(lambda w: torch.stack(
        [reference.micro_batch_lbl(w, h, TOPK, micro_coeff) for mb in hidden for h in mb]).mean(),
        ours["weight"])
    expected = global_reference(ours, 2, 2, False, 40, buffered=True) + micro
    assert rel_err(ours["grad"], expected) <= 1e-5
    assert rel_err(ours["grad"], expected - micro) > 1e-3  # the micro term is really there


def test_step_metrics_match_reference():
    world_size, microbatches = 2, 3
    per_rank = run_gloo(workers.router_runs, world_size, [spec("global", microbatches, seed=50)])
    hidden, _ = workers.make_hidden(50, microbatches, world_size, HIDDEN, padded=False)
    weight = per_rank[0][0]["weight"]
    lbl, violation, counts = reference.batch_statistics(
        weight, [h for mb in hidden for h in mb], TOPK)
    for rank, (result,) in enumerate(per_rank):
        values = result["metrics"]
        micro = [reference.batch_statistics(weight, [mb[rank]], TOPK) for mb in hidden]
        assert float(values[metrics.MICRO_LBL][0]) == pytest.approx(
            sum(m[0] for m in micro) / microbatches, rel=1e-6)
        assert float(values[metrics.MICRO_LOAD_VIOLATION][0]) == pytest.approx(
            sum(m[1] for m in micro) / microbatches, rel=1e-6)
        assert float(values[metrics.GLOBAL_LBL][0]) == pytest.approx(lbl, rel=1e-6)
        assert float(values[metrics.GLOBAL_LOAD_VIOLATION][0]) == pytest.approx(violation, rel=1e-6)
        assert float(values[metrics.BALANCE_BSZ][0]) == microbatches * world_size * \
            workers.SEQ * workers.MICRO_BSZ
        assert torch.equal(result["global_tokens_per_expert"][0], counts.long())


def test_async_sync_has_no_forward_barrier(tmp_path):
    # A blocking count all-reduce would make rank 0 wait for rank 1 inside the forward.
    assert run_gloo(workers.forward_before_peer, 2, str(tmp_path / "flag"), False) == ["done"] * 2
    with pytest.raises(RuntimeError, match="waited for rank 1"):
        run_gloo(workers.forward_before_peer, 2, str(tmp_path / "flag_blocking"), True)


def test_blocking_and_async_sync_give_identical_results():
    specs = [spec("global", 3, seed=60, blocking_sync=blocking, steps=2)
             for blocking in (False, True)]
    overlapped, blocking = run_gloo(workers.router_runs, 2, specs)[0]
    torch.testing.assert_close(overlapped["grad"], blocking["grad"], rtol=0, atol=0)
    for name, values in blocking["logged"].items():
        torch.testing.assert_close(overlapped["logged"][name], values, rtol=0, atol=0)


@pytest.mark.skipif(not hasattr(TopKRouter, "_apply_global_aux_loss"),
                    reason="benchmarks.router_bench needs megatron-core>=0.15")
def test_lbl_gradient_joins_routings_in_place():
    # Upstream routing and the LBL both read the logits. Where their gradients meet, autograd
    # sums them in place as in upstream; two sibling views of the logits made it allocate a new
    # [T, E] sum per call (profiled: 7% of the routing part on CPU at E64, 4096 tokens).
    adds = run_gloo(workers.out_of_place_score_adds, 2,
                    dict(experts=16, seq=32, bsz=2, microbatches=4))[0]
    assert adds == dict.fromkeys(adds, 0)
