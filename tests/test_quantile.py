"""Quantile balancing at a scope (megatron_gbl.quantile): the histogram math against an exact
sort, and real Megatron-Core GPT-MoE models trained through Megatron's schedule, DDP and
finalize_model_grads on gloo ranks (tests/layout_workers.py), against upstream (micro, bitwise)
and against one dual step taken by sorting the recorded logits of every rank
(reference.quantile_bias)."""

import pytest
import torch

import layout_workers
import reference
from megatron_gbl import compat, metrics, quantile
from megatron_gbl_lab.harness import run_gloo

pytestmark = pytest.mark.skipif(not compat.has_quantile_balancing(),
                                reason="quantile balancing needs megatron-core>=0.19")

TOPK, EXPERTS = 2, 8  # harness.moe_config's
QB = dict(moe_router_load_balancing_type="quantile_balancing", moe_aux_loss_coeff=0.0)


def window_width(beta_E: torch.Tensor, bins: int = quantile.BINS) -> float:
    lo, hi = quantile.histogram_window(beta_E.float())
    return float((hi - lo) / bins)


def histogram_estimate(parts, beta_E, bins):
    """(q estimate, clamped, width): each part's histogram of s - alpha, summed, read."""
    lo, hi = quantile.histogram_window(beta_E)
    counts_EB = torch.zeros(EXPERTS, bins + 2, dtype=torch.int64)
    for scores_TE in parts:
        _, alpha_T1 = quantile.dual_route(scores_TE, beta_E, TOPK)
        quantile.add_histograms(counts_EB, scores_TE - alpha_T1, lo, hi)
    num_tokens = sum(part.shape[0] for part in parts)
    assert (counts_EB.sum(-1) == num_tokens).all()
    rank = quantile.quantile_rank(torch.tensor([num_tokens]), TOPK, EXPERTS)
    estimate, clamped = quantile.histogram_quantile(counts_EB[None], rank, lo, hi)
    return estimate[0], clamped[0], float((hi - lo) / bins)


def test_dual_step_is_upstreams_and_the_sorted_reference():
    from megatron.core.transformer.moe.moe_utils import qb_dual_update

    gen = torch.Generator().manual_seed(0)
    scores_TE = torch.randn(64, EXPERTS, generator=gen) * 2
    beta_E = torch.randn(EXPERTS, generator=gen) * 0.5
    upstream_indices, upstream_q = qb_dual_update(scores_TE, TOPK, beta_E)
    indices, _ = quantile.dual_route(scores_TE, beta_E, TOPK)
    assert torch.equal(indices, upstream_indices)
    routing_map, q = reference.quantile_dual_step(scores_TE, beta_E, TOPK)
    assert torch.equal(routing_map, torch.zeros_like(routing_map).scatter(1, indices, True))
    assert torch.equal(q, upstream_q)


@pytest.mark.parametrize("bins", [10, 100, quantile.BINS])
def test_summed_histograms_give_the_global_quantile_within_one_bin(bins):
    # The issue's shape: 4 ranks x 2 micro-batches of 32 tokens, each rank its own domain (a
    # shifted logit distribution), one window for all.
    gen = torch.Generator().manual_seed(bins)
    beta_E = torch.randn(EXPERTS, generator=gen) * 0.3
    parts = [torch.randn(32, EXPERTS, generator=gen) + torch.randn(EXPERTS, generator=gen)
             for _ in range(8)]
    exact = reference.quantile_dual_step(torch.cat(parts), beta_E, TOPK)[1]
    estimate, clamped, width = histogram_estimate(parts, beta_E, bins)
    lo, hi = quantile.histogram_window(beta_E)
    inside = (exact >= lo) & (exact < hi)
    assert inside.sum() >= EXPERTS // 2, "most quantiles should lie in the window"
    assert torch.equal(clamped, ~inside)
    error = (estimate - exact.double()).abs()
    assert (error[inside] < width).all(), (error, width)
    # Clamped quantiles sit at the window's edge on the side where the exact one lies.
    edge = torch.where(exact.double() >= float(hi), float(hi), float(lo))
    assert torch.equal(estimate[~inside], edge[~inside])
    if bins == 10:
        assert error[inside].max() > width / 20  # the bound is not vacuous


def test_a_quantile_outside_the_window_is_clamped_and_counted():
    gen = torch.Generator().manual_seed(3)
    beta_E = torch.zeros(EXPERTS)
    scores_TE = torch.randn(64, EXPERTS, generator=gen)
    scores_TE[:, 5] += 6.0  # expert 5 is everyone's choice: its quantile is far above beta
    exact = reference.quantile_dual_step(scores_TE, beta_E, TOPK)[1]
    estimate, clamped, _ = histogram_estimate([scores_TE], beta_E, quantile.BINS)
    assert exact[5] > 1.0 and bool(clamped[5]) and float(estimate[5]) == 1.0
    assert int(clamped.sum()) == int(((exact < -1) | (exact >= 1)).sum())


def test_counts_stay_exact_beyond_float32_integers():
    # 2^24 values in bin 1 and one each in bins 2 and 3: the 2nd largest is the one in bin 2.
    # In float32 the (2^24 + 1)-th smallest rounds to another rank and the read to another bin.
    bins = 4
    counts = torch.zeros(1, 1, bins + 2, dtype=torch.int64)
    counts[..., 1], counts[..., 2], counts[..., 3] = 2 ** 24, 1, 1
    lo, hi, rank = torch.tensor([[0.0]]), torch.tensor([[4.0]]), torch.tensor([2])
    exact_bin = quantile.histogram_quantile(counts, rank, lo, hi)[0]
    assert 1.0 <= float(exact_bin) < 2.0  # bin 2 = [1, 2)
    summed = counts + counts  # what the all-reduce adds: still exact
    assert int(summed.sum()) == 2 * (2 ** 24 + 2)
    float_bin = quantile.histogram_quantile(counts.float(), rank.float(), lo, hi)[0]
    assert not 1.0 <= float(float_bin) < 2.0


def test_upstream_would_carry_nan_logits_into_every_replicas_bias():
    # Why the plugin leaves the bias alone in a step it skips for non-finite router logits.
    from megatron.core.transformer.moe.moe_utils import qb_dual_update

    scores_TE = torch.full((16, EXPERTS), float("nan"))  # a NaN router input: every logit
    assert torch.isnan(qb_dual_update(scores_TE, TOPK, torch.zeros(EXPERTS))[1]).all()


def test_enable_takes_over_upstreams_update_and_disable_gives_it_back():
    import importlib

    import megatron_gbl
    from megatron.core.transformer.moe.router import TopKRouter

    finalize = importlib.import_module("megatron.core.distributed.finalize_model_grads")
    originals = (TopKRouter.quantile_balancing, finalize._update_router_qb_beta)
    with megatron_gbl.enabled("global"):
        assert TopKRouter.quantile_balancing.__wrapped__ is originals[0]
        assert finalize._update_router_qb_beta.__wrapped__ is originals[1]
        assert finalize._update_router_qb_beta(None, None) is None  # off: the plugin's runs
    assert (TopKRouter.quantile_balancing, finalize._update_router_qb_beta) == originals


# ------------------------------------------------------------------ through Megatron's schedule

def qb_run(steps, layout=None, config=None, **spec):
    run = dict(microbatches=2, seq=16, bsz=2, loss="mean", lm_loss=True, layout=layout or {},
               metrics=True,
               config={**QB, "num_layers": 1, **(config or {})}, steps=steps)
    run.update(spec)
    return ("layout_steps", run)


# The issue's setting: 4 DP ranks x 2 micro-batches of 32 tokens (16 x 2), one MoE layer of 8
# experts (top-2), each rank's tokens from its own quarter of the vocabulary, EMA 0.
ISSUE = dict(domains=True)
ISSUE_RUNS = {
    "upstream": qb_run([(None, {})] * 3, **ISSUE),
    "micro": qb_run([("micro", {})] * 3, **ISSUE),
    "global": qb_run([("global", {})] * 3, **ISSUE),
    "dp": qb_run([("dp", {})] * 2, **ISSUE),
    "global:2": qb_run([("global", dict(sync_group_size=2))] * 2, **ISSUE),
    "dp:2": qb_run([("dp", dict(sync_group_size=2))] * 2, **ISSUE),
    "ema": qb_run([("global", {})] * 2, config=dict(moe_router_quantile_balancing_ema=0.5),
                  **ISSUE),
}


def _run(calls: dict, world_size: int) -> dict:
    per_rank = run_gloo(layout_workers.runs, world_size, list(calls.values()))
    return {label: [rank_results[i] for rank_results in per_rank]
            for i, label in enumerate(calls)}


@pytest.fixture(scope="module")
def issue_runs():
    return _run(ISSUE_RUNS, 4)


def holders(per_rank, step):
    """layer -> [(rank, its router result)] of the ranks that hold the layer."""
    layers = {}
    for rank, results in enumerate(per_rank):
        for layer, router in results[step]["routers"].items():
            layers.setdefault(layer, []).append((rank, router))
    return layers


def token_sets(routers, scope: str, blocks=None):
    """The token sets of (QB-2) at `scope` from every holder's recorded logits: per block, its
    whole step (global) or each micro-batch k (dp); blocks: lists of holder indices."""
    blocks = blocks or [list(range(len(routers)))]
    calls = len(routers[0][1]["calls"])
    if scope == "global":
        return [[logits for i in block for logits, _ in routers[i][1]["calls"]]
                for block in blocks]
    return [[routers[i][1]["calls"][k][0] for i in block] for block in blocks
            for k in range(calls)]


def bias_before(per_rank, step, layer):
    if step == 0:
        return torch.zeros(EXPERTS)
    return holders(per_rank, step - 1)[layer][0][1]["qb_beta"]


def assert_same_bias_everywhere(per_rank, label):
    for step in range(len(per_rank[0])):
        for layer, routers in holders(per_rank, step).items():
            for _, router in routers[1:]:
                assert torch.equal(router["qb_beta"], routers[0][1]["qb_beta"]), (label, layer)


def assert_matches_reference(per_rank, scope, label, blocks=None, ema=0.0):
    """Every step's bias within 2 bins of the sorted reference (QB-3 after a read within one
    bin: the re-centring adds at most another)."""
    assert_same_bias_everywhere(per_rank, label)
    for step in range(len(per_rank[0])):
        for layer, routers in holders(per_rank, step).items():
            before = bias_before(per_rank, step, layer)
            want = reference.quantile_bias(before, token_sets(routers, scope, blocks), TOPK, ema)
            error = float((routers[0][1]["qb_beta"].double() - want).abs().max())
            assert error < 2 * window_width(before), (label, step, layer, error)
            assert float((want - before.double()).abs().max()) > 4 * window_width(before), \
                f"{label}: the update is too small for the comparison to show anything"


def assert_micro_is_upstream(upstream, micro, label):
    for step in range(len(upstream[0])):
        for ours, theirs in zip(holders(micro, step).values(), holders(upstream, step).values()):
            for (_, got), (_, want) in zip(ours, theirs):
                assert torch.equal(got["qb_beta"], want["qb_beta"]), (label, step)
                assert len(got["calls"]) == len(want["calls"]) > 0
                for (logits, routing_map), (their_logits, their_map) in zip(got["calls"],
                                                                            want["calls"]):
                    assert torch.equal(logits, their_logits) and torch.equal(routing_map,
                                                                             their_map)
        assert not torch.equal(next(iter(holders(upstream, step).values()))[0][1]["qb_beta"],
                               torch.zeros(EXPERTS)), f"{label}: upstream never moved its bias"


def test_micro_scope_is_upstream_bitwise(issue_runs):
    assert_micro_is_upstream(issue_runs["upstream"], issue_runs["micro"], "issue setting")


def test_global_scope_is_one_dual_step_on_the_global_batch(issue_runs):
    """The issue's measurement: after one step, the largest deviation from the global batch's
    own dual step, as a fraction of that bias's range, for upstream and for the plugin."""
    upstream, glob = issue_runs["upstream"], issue_runs["global"]
    routers = holders(glob, 0)[1]
    exact = reference.quantile_bias(torch.zeros(EXPERTS), token_sets(routers, "global"), TOPK)
    spread = float(exact.max() - exact.min())
    deviation = {label: float((holders(run, 0)[1][0][1]["qb_beta"].double() - exact).abs().max())
                 / spread for label, run in (("upstream", upstream), ("global", glob))}
    print(f"\nissue setting, step 1: largest deviation from the global batch's dual step / its "
          f"range: upstream (mean of micro-batch quantiles) {deviation['upstream']:.4f}, "
          f"plugin global {deviation['global']:.4f} (bin width / range "
          f"{window_width(torch.zeros(EXPERTS)) / spread:.4f})")
    assert deviation["global"] < deviation["upstream"] / 4
    # Upstream's is the mean of micro-batch quantiles, which the reference reproduces.
    micro_sets = token_sets(holders(upstream, 0)[1], "dp", [[i] for i in range(4)])
    averaged = reference.quantile_bias(torch.zeros(EXPERTS), micro_sets, TOPK)
    torch.testing.assert_close(holders(upstream, 0)[1][0][1]["qb_beta"].double(), averaged,
                               rtol=0, atol=1e-5)
    # Step 1 routed with the same (zero) bias as upstream: the same experts.
    for (_, ours), (_, theirs) in zip(holders(glob, 0)[1], holders(upstream, 0)[1]):
        for (_, routing_map), (_, their_map) in zip(ours["calls"], theirs["calls"]):
            assert torch.equal(routing_map, their_map)
    assert_matches_reference(glob, "global", "global")


@pytest.mark.parametrize("label, scope, blocks", [
    ("dp", "dp", None), ("global:2", "global", [[0, 1], [2, 3]]),
    ("dp:2", "dp", [[0, 1], [2, 3]])])
def test_dp_and_block_scopes_match_the_reference(issue_runs, label, scope, blocks):
    assert_matches_reference(issue_runs[label], scope, label, blocks)


def test_ema_blends_with_the_previous_bias(issue_runs):
    assert_matches_reference(issue_runs["ema"], "global", "ema", ema=0.5)


def test_step_metrics(issue_runs):
    glob = issue_runs["global"]
    for results in glob:
        step = results[-1]["metrics"]
        assert set(step.values) == set(metrics.names(False, False, has_quantile=True))
        router = results[-1]["routers"][1]
        assert float(step.values[quantile.QB_BIAS_STD][0]) == pytest.approx(
            float(router["qb_beta"].double().std()), rel=1e-12)
        # The load violations of the dispatched routing, recounted from the routing maps.
        counts = [routing_map.sum(0).double() for _, routing_map in router["calls"]]
        want = sum(float(c.max() / c.mean() - 1) for c in counts) / len(counts)
        assert float(step.values[metrics.MICRO_LOAD_VIOLATION][0]) == pytest.approx(want)
        assert float(step.values[metrics.BALANCE_BSZ][0]) == 4 * 2 * 32  # the global batch
        assert float(step.values[quantile.CLAMPED_QUANTILES][0]) == 0
        # The values beyond the window, recounted from every rank's logits.
        before = bias_before(glob, len(results) - 1, 1)
        lo, hi = quantile.histogram_window(before)
        outside = 0
        for other in glob:
            for logits, _ in other[-1]["routers"][1]["calls"]:
                shifted = (logits - before).sort(dim=1, descending=True).values
                values = logits - shifted[:, TOPK:TOPK + 1]
                outside += int(((values < lo) | (values >= hi)).sum())
        assert float(step.values[quantile.CLAMPED_VALUES][0]) == outside
    every_rank = sum((routing_map.sum(0) for results in glob
                      for _, routing_map in results[-1]["routers"][1]["calls"]))
    global_violation = float(every_rank.max() / every_rank.double().mean() - 1)
    assert float(glob[0][-1]["metrics"].values[metrics.GLOBAL_LOAD_VIOLATION][0]) == \
        pytest.approx(global_violation)


# ------------------------------------------------------------------ layouts and features

FULL_RECOMPUTE = dict(recompute_granularity="full", recompute_method="uniform",
                      recompute_num_layers=1)
MTP = dict(num_layers=2, mtp_num_layers=2, mtp_loss_scaling_factor=0.1,
           mtp_use_repeated_layer=True)


def scope_runs(layout, config=None, scopes=("micro", "global", "dp"), **spec):
    """upstream (plugin off) and the plugin at each scope, 2 steps each, in one layout."""
    runs = {"upstream": qb_run([(None, {})] * 2, layout, config, **spec)}
    for scope in scopes:
        name, _, size = scope.partition(":")
        settings = dict(sync_group_size=int(size)) if size else {}
        runs[scope] = qb_run([(name, settings)] * 2, layout, config, **spec)
    return runs


LAYOUTS_2 = {
    "TP 2 + SP": scope_runs(dict(tp=2)),
    "CP 2": scope_runs(dict(cp=2)),
    "EP 2": scope_runs(dict(ep=2), loss="per_token"),
    "MTP (repeated layer), full recompute": dict(
        scope_runs({}, dict(MTP, **FULL_RECOMPUTE)),
        **{"global, no recompute": qb_run([("global", {})] * 2, {}, MTP)}),
}
LAYOUTS_4 = {
    "PP 2 interleaved (VPP 2)": scope_runs(dict(pp=2, vpp=2), dict(num_layers=4)),
    "dense first stage": scope_runs(dict(pp=2), dict(num_layers=2, moe_layer_freq=[0, 1]),
                                    scopes=("micro", "global")),
    "TP 2 + SP x DP 2": scope_runs(dict(tp=2), scopes=("micro", "global", "global:1")),
}


def _layout_runs(layouts: dict, world_size: int) -> dict:
    calls = {(label, run): call for label, runs in layouts.items() for run, call in runs.items()}
    results = _run(calls, world_size)
    return {label: {run: results[(label, run)] for run in runs}
            for label, runs in layouts.items()}


@pytest.fixture(scope="module")
def two_rank_layouts():
    return _layout_runs(LAYOUTS_2, 2)


@pytest.fixture(scope="module")
def four_rank_layouts():
    return _layout_runs(LAYOUTS_4, 4)


def replica_blocks(per_rank, layer, step=0):
    """Holder indices of `layer` grouped by data-parallel replica (the TP x CP ranks of one)."""
    replicas = {}
    for index, (rank, _) in enumerate(holders(per_rank, step)[layer]):
        replicas.setdefault(per_rank[rank][step]["replica"], []).append(index)
    return list(replicas.values())


def check_layout(runs: dict, label: str) -> None:
    assert_micro_is_upstream(runs["upstream"], runs["micro"], label)
    # Every token once: the ranks' logits are distinct tokens (TP, CP shards, replicas), and
    # the quantile's token set is the global batch, seq x bsz x replicas x micro-batches.
    glob = runs["global"]
    layer, routers = next(iter(holders(glob, 0).items()))
    calls = [call for _, router in routers for call, _ in router["calls"]]
    assert all(not torch.equal(a, b) for i, a in enumerate(calls) for b in calls[i + 1:])
    replicas = len({results[0]["replica"] for results in glob})
    balance = glob[routers[0][0]][0]["metrics"].values[metrics.BALANCE_BSZ][0]
    assert float(balance) == 16 * 2 * replicas * 2, label
    for run, per_rank in runs.items():
        if run in ("upstream", "micro"):
            continue
        scope = run.split(":")[0].split(",")[0]
        blocks = None
        if run.endswith(":1"):  # one replica per block
            blocks = replica_blocks(per_rank, next(iter(holders(per_rank, 0))))
        assert_matches_reference(per_rank, scope, f"{label}, {run}", blocks)


@pytest.mark.parametrize("label", list(LAYOUTS_2))
def test_two_rank_layouts(two_rank_layouts, label):
    runs = two_rank_layouts[label]
    check_layout(runs, label)
    if "global, no recompute" in runs:
        # MTP layers took part, and recompute changed nothing: no call counted twice.
        layers = holders(runs["global"], 0)
        assert sorted(layers) == [1, 2, 3]  # 2 decoder layers, the repeated MTP layer
        assert len(layers[3][0][1]["calls"]) == 2 * 2  # 2 micro-batches x 2 depths
        # The step metrics give each depth of the repeated layer a row (one bias: one spread).
        step = runs["global"][0][-1]["metrics"]
        assert step.layer_numbers == [1, 2, 3, 4]
        spread = step.values[quantile.QB_BIAS_STD]
        assert float(spread[2]) == float(spread[3]) > 0
        for step in range(2):
            for layer, routers in holders(runs["global"], step).items():
                other = holders(runs["global, no recompute"], step)[layer]
                assert torch.equal(routers[0][1]["qb_beta"], other[0][1]["qb_beta"]), layer


@pytest.mark.parametrize("label", list(LAYOUTS_4))
def test_four_rank_layouts(four_rank_layouts, label):
    runs = four_rank_layouts[label]
    if label == "dense first stage":
        assert any(not results[0]["routers"] for results in runs["global"])
    check_layout(runs, label)


# ------------------------------------------------------------------ resume, skipped steps

def test_resume_mid_run_restores_the_bias_and_continues_identically(tmp_path):
    import workers

    run = dict(config=dict(QB, bf16=True, params_dtype=torch.bfloat16), scope="global", steps=4,
               first=2, microbatches=2, seq=8, bsz=2, ckpt_dir=str(tmp_path))
    for result in run_gloo(workers.resume_run, 2, run):
        for saved, loaded in zip(result["saved_bias"], result["loaded_bias"]):
            assert saved.dtype == loaded.dtype == torch.float32  # in a bf16 model
            assert torch.equal(saved, loaded) and saved.abs().sum() > 0
        assert [name for name in result["uninterrupted"] if name.endswith("qb_beta")]
        for name, value in result["uninterrupted"].items():
            assert torch.equal(result["resumed"][name], value), name


@pytest.mark.parametrize("scope", ["micro", "global"])
def test_a_step_that_fp16_skips_leaves_the_bias_alone(scope):
    """The plugin's choice: a step Megatron's optimizer skips (fp16: its grad scaler found inf
    or NaN in the gradients) leaves the bias as it was before the step, as it leaves the
    weights; upstream updates the bias in every step, here from NaN quantiles
    (test_upstream_would_carry_...). NaN router input on rank 0 only, through Megatron's
    schedule, DDP and optimizer: both ranks skip, and agree."""
    import fault_workers

    results = run_gloo(fault_workers.fp16_nan_logits_run, 2, dict(scope=scope, config=QB))
    for result in results:
        assert result["applied"] == [True, False, True, True]
        before, skipped, after = result["biases"][:3]
        for layer_before, layer_skipped, layer_after in zip(before, skipped, after):
            assert torch.equal(layer_skipped, layer_before)
            assert not torch.equal(layer_after, layer_skipped)  # the next step updates again
            assert torch.isfinite(layer_after).all()
    for layer_0, layer_1 in zip(results[0]["biases"][-1], results[1]["biases"][-1]):
        assert torch.equal(layer_0, layer_1)
