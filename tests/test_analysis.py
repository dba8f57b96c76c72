"""analysis.py on hand-built routing (numbers worked out by hand), the collector hook on a real
TopKRouter, and the clear errors of `megatron-gbl demo` / `analyze` on bad arguments."""

import inspect
import json
import math

import pytest
import torch

from megatron_gbl import analysis
from megatron_gbl_lab import cli, harness
from megatron_gbl.config import Settings
from megatron_gbl_lab.runs import DemoSettings, parse_scopes

# Two domains, 4 experts, top-2, 4 tokens each. Choices per token:
#   A: {0,1} {0,1} {0,2} {0,1}  -> counts [4, 3, 1, 0]
#   B: {2,3} {2,3} {1,3} {2,3}  -> counts [0, 1, 3, 4]
CHOICES = torch.tensor([[[4, 3, 1, 0], [0, 1, 3, 4]]])  # [L=1, D=2, E=4]
TOKENS = torch.tensor([[4, 4]])


def test_selection_frequency_and_top_expert():
    frequency = analysis.selection_frequency(CHOICES, TOKENS)
    assert frequency.tolist() == [[[1.0, 0.75, 0.25, 0.0], [0.0, 0.25, 0.75, 1.0]]]
    assert frequency.sum(-1).tolist() == [[2.0, 2.0]]  # each token chose K = 2 experts
    assert analysis.top_expert_frequency(frequency).tolist() == [[1.0, 1.0]]


def test_mutual_information_by_hand():
    # p(d) = 1/2, p(e) = 4/16 = 1/4 for every expert, so I = Σ p(d,e) log2(8 p(d,e)):
    # per domain 4/16 log2(2) + 3/16 log2(3/2) + 1/16 log2(1/2) = 3/16 log2(3); both: 3/8 log2(3).
    assert analysis.mutual_information(CHOICES).item() == pytest.approx(0.375 * math.log2(3))
    same = torch.tensor([[[2, 2, 1, 1], [4, 4, 2, 2]]])  # same proportions in both domains
    assert analysis.mutual_information(same).item() == pytest.approx(0.0, abs=1e-12)
    disjoint = torch.tensor([[[5, 5, 0, 0], [0, 0, 5, 5]]])  # the expert names the domain
    assert analysis.mutual_information(disjoint).item() == pytest.approx(1.0)


def test_load_balancing_loss_micro_versus_global():
    # E = 2, K = 1. Micro-batch 1 (domain A): tokens with scores [.8,.2] and [.6,.4], both chose
    # expert 0: f = [1, 0], P = [.7, .3], LBL = 2 * (1 * .7) = 1.4. Micro-batch 2 (domain B) is
    # the mirror image, also 1.4. Together: f = [.5, .5], P = [.5, .5], LBL = 1: the routing
    # micro-batch balance penalises is perfectly balanced over the global batch (eq. 3 vs 4).
    counts = torch.tensor([[2, 0], [0, 2]])
    score_sums = torch.tensor([[1.4, 0.6], [0.6, 1.4]])
    tokens = torch.tensor([2, 2])
    micro = analysis.load_balancing_loss(counts, score_sums, tokens, topk=1)
    assert micro.tolist() == pytest.approx([1.4, 1.4])
    whole = analysis.load_balancing_loss(counts.sum(0), score_sums.sum(0), tokens.sum(), topk=1)
    assert whole.item() == pytest.approx(1.0)
    # Megatron-Core's aux_loss formula (switch_load_balancing_loss_func), written out.
    topk, num_tokens, experts = 1, 2, 2
    megatron = (score_sums[0] * counts[0]).sum() * experts / (num_tokens * num_tokens * topk)
    assert micro[0].item() == pytest.approx(megatron.item())


def test_high_frequency_experts_and_overlap():
    frequency = analysis.selection_frequency(CHOICES, TOKENS)
    # factor 1.5: threshold 1.5 * K / E = 0.75
    high = analysis.high_frequency_experts(frequency, topk=2, factor=1.5)
    assert high.tolist() == [[[True, True, False, False], [False, False, True, True]]]
    sets = torch.tensor([[[1, 1, 0, 0],    # A {0, 1}
                          [0, 0, 1, 1],    # B {2, 3}
                          [1, 0, 0, 1],    # C {0, 3}
                          [0, 0, 0, 0]]],  # D {}
                        dtype=torch.bool)
    overlap = analysis.expert_overlap(sets)[0]
    assert overlap[0, 1] == 0 and overlap[0, 0] == 1
    assert overlap[0, 2].item() == pytest.approx(1 / 3)  # {0} of {0, 1, 3}
    assert overlap[1, 2].item() == pytest.approx(1 / 3)  # {3} of {0, 2, 3}
    assert overlap[0, 3] == 0 and math.isnan(overlap[3, 3])


def test_routing_stats_summary():
    stats = analysis.RoutingStats(
        choices=CHOICES, tokens=TOKENS,
        score_sums=torch.tensor([[[2.0, 1.0, 0.6, 0.4], [0.4, 0.6, 1.0, 2.0]]], dtype=torch.double),
        topk_score_sums=torch.tensor([[3.2, 2.8]], dtype=torch.double),
        micro_lbl_sums=torch.tensor([3.0], dtype=torch.double), calls=torch.tensor([2]), topk=2)
    summary = stats.summary(high_factor=1.5)
    json.dumps(summary)  # JSON-ready
    assert summary["uniform_frequency"] == 0.5 and summary["uniform_topk_score_sum"] == 0.5
    assert summary["topk_score_sum"] == [[0.8, 0.7]]
    assert summary["high_frequency_experts"] == [[[0, 1], [2, 3]]]
    assert summary["micro_lbl"] == [1.5]
    # Global: counts [4, 4, 4, 4] / (2 * 8) = 1/4 each, P = [2.4, 1.6, 1.6, 2.4] / 8: LBL = 1.
    assert summary["global_lbl"] == [pytest.approx(1.0)]


def collect_on_real_router(rank, world_size):
    """One real TopKRouter (4 experts, top-2, hidden 4) with weight 5 * I, so logits = 5 * x."""
    harness.init_model_parallel()
    model = harness.build_gpt_moe(harness.moe_config(
        num_layers=1, hidden_size=4, num_attention_heads=1, num_moe_experts=4, moe_router_topk=2))
    router = harness.routers_of(model)[0]
    with torch.no_grad():
        router.weight.copy_(5 * torch.eye(4))
    # [S=3, B=1, H=4]: token 0 prefers experts 0 and 1, token 1 experts 2 and 3, token 2 is
    # padding (its 1s would pick experts 0 and 3); routers take a padding mask from 0.16 on.
    hidden = torch.tensor([[[1.0, 0.8, 0.0, 0.0]], [[0.0, 0.0, 1.0, 0.9]], [[1.0, 0.0, 0.0, 1.0]]])
    padding = torch.tensor([[False], [False], [True]])
    takes_padding = "padding_mask" in inspect.signature(router.forward).parameters
    model.eval()
    with torch.no_grad(), analysis.RoutingCollector(model, ["a", "b"]) as collector:
        collector.domain = 1
        if takes_padding:
            router(hidden, padding_mask=padding)
        else:
            router(hidden[:2])
        collector.domain = 0
        router(hidden[:1])
    return collector.stats(), hidden


def test_collector_hook_on_a_real_router():
    stats, hidden = harness.run_gloo(collect_on_real_router, 1)[0]
    assert stats.choices.tolist() == [[[1, 1, 0, 0], [1, 1, 1, 1]]]
    assert stats.tokens.tolist() == [[1, 2]]
    assert stats.calls.tolist() == [2]
    scores = torch.softmax(5 * hidden[:2, 0].double(), dim=-1)  # independent of the collector
    torch.testing.assert_close(stats.score_sums[0, 1], scores.sum(0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(stats.score_sums[0, 0], scores[0], rtol=1e-6, atol=1e-6)
    top2 = scores.topk(2, dim=-1).values.sum(-1)
    assert stats.topk_score_sums[0].tolist() == pytest.approx(
        [top2[0].item(), top2.sum().item()], rel=1e-6)
    # Micro LBL: call 1 has f = [1, 1, 1, 1] / 4, so LBL = 4 * Σ P_i / 4 = 1; call 2 is one
    # token on experts 0 and 1: 4 * (scores[0][0] + scores[0][1]) / 2.
    expected = (1.0 + 2 * (scores[0, 0] + scores[0, 1]).item()) / 2
    assert stats.micro_lbl().item() == pytest.approx(expected, rel=1e-6)


# Bad arguments: exit status 2 before any process starts, with a message naming the flag.

@pytest.fixture
def no_training(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("training started despite bad arguments")

    monkeypatch.setattr(harness, "run_gloo", refuse)


def error_of(capsys, *argv):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(list(argv))
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def write_lines(path, records):
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return str(path)


def test_demo_rejects_bad_arguments(tmp_path, capsys, no_training):
    good = write_lines(tmp_path / "good.jsonl", [{"text": "x" * 200, "domain": d} for d in "ab"])
    cases = {
        ("--ranks", "2"): "--ranks 2: the demo needs at least 4 data-parallel ranks",
        ("--scopes", "micro,best"): "--scopes: unknown scope 'best'",
        ("--scopes", "global:3"):
            "'global:3' syncs blocks of 3 ranks, which does not divide --ranks 4",
        ("--scopes", "micro:2"): "only dp and global take :N",
        ("--scopes", "micro,micro"): "names the same run twice",
        ("--steps", "3", "--scopes", "micro-then-global@3"): "1 <= S < --steps 3",
        ("--scopes", "auxfree-shuffle"): "use auxfree-micro, auxfree-dp or auxfree-global",
        ("--steps", "0"): "--steps 0: must be at least 1",
        ("--train-data", str(tmp_path / "missing.jsonl"), "--valid-data", good):
            "missing.jsonl: no such file",
        ("--train-data", good): "--train-data and --valid-data go together",
    }
    for argv, message in cases.items():
        assert message in error_of(capsys, "demo", "--out", str(tmp_path / "out"), *argv), argv


def test_demo_rejects_bad_data(tmp_path, capsys, no_training):
    good = write_lines(tmp_path / "good.jsonl", [{"text": "x" * 200, "domain": d} for d in "ab"])
    no_domain = write_lines(tmp_path / "no_domain.jsonl",
                            [{"text": "a", "domain": "a"}, {"text": "b", "source": "web"}])
    one_domain = write_lines(tmp_path / "one.jsonl", [{"text": "x" * 200, "domain": "a"}])
    other_domains = write_lines(tmp_path / "other.jsonl",
                                [{"text": "x" * 200, "domain": d} for d in "ac"])
    short = write_lines(tmp_path / "short.jsonl",
                        [{"text": "x" * 200, "domain": "a"}, {"text": "x", "domain": "b"}])
    not_json = tmp_path / "broken.jsonl"
    not_json.write_text('{"text": "a", "domain": "a"}\n{"text": \n')
    cases = {
        (no_domain, good): "no_domain.jsonl:2: no domain field 'domain' (fields: source, text)",
        (str(not_json), good): "broken.jsonl:2: not a JSON object",
        (one_domain, good): "needs at least 2",
        (good, other_domains): "--valid-data: domains ['a', 'c'] differ",
        (good, short): "--valid-data: domain 'b' has 2 tokens, fewer than one sequence (65)",
    }
    for (train, valid), message in cases.items():
        err = error_of(capsys, "demo", "--out", str(tmp_path / "out"),
                       "--train-data", train, "--valid-data", valid)
        assert message in err, (train, valid, err)
    assert "--domain-key" in error_of(capsys, "demo", "--train-data", no_domain, "--valid-data",
                                      good, "--out", str(tmp_path / "out"))


def test_analyze_rejects_bad_arguments(tmp_path, capsys, no_training):
    data = write_lines(tmp_path / "valid.jsonl", [{"text": "abc", "domain": "a"}])
    err = error_of(capsys, "analyze", "--model", str(tmp_path / "nowhere"), "--data", data)
    assert "--model" in err and "model.pt" in err
    model_dir = tmp_path / "global"
    model_dir.mkdir()
    (model_dir / "model.pt").write_bytes(b"")
    err = error_of(capsys, "analyze", "--model", str(model_dir), "--data", data,
                   "--domain-key", "lang")
    assert "--data" in err and "no domain field 'lang'" in err
    err = error_of(capsys, "analyze", "--model", str(model_dir), "--data", str(tmp_path / "x"))
    assert "--data" in err and "no such file" in err


def test_parse_scopes():
    settings = DemoSettings(ranks=4, steps=500)
    specs = parse_scopes("micro, dp:2,dp,global", settings)
    assert [(s.label, s.scope, s.sync_group_size, s.dirname) for s in specs] == [
        ("micro", "micro", None, "micro"), ("dp:2", "dp", 2, "dp-2"),
        ("dp", "dp", None, "dp"), ("global", "global", None, "global")]
    assert [s.method for s in specs] == ["LBL"] * 4


# label -> (dirname, method, megatron_gbl.enable's scope and keyword arguments) at the demo's
# defaults: aux_loss_coeff 1e-2, seed 0.
ABLATIONS = {
    "shuffle": ("shuffle", "shuffle LBL", "shuffle", {}),
    "auxfree-micro": ("auxfree-micro", "aux-free", "micro", {}),
    "auxfree-dp:2": ("auxfree-dp-2", "aux-free", "dp", dict(sync_group_size=2)),
    "auxfree-global": ("auxfree-global", "aux-free", "global", {}),
    "global+micro": ("global+micro", "LBL + 1% micro", "global", dict(micro_coeff=1e-4)),
    "dp:2+micro=0.1": ("dp-2+micro=0.1", "LBL + 10% micro", "dp",
                       dict(sync_group_size=2, micro_coeff=1e-3)),
    "micro-then-global@250": ("micro-then-global@250", "LBL, micro→global@250", "micro",
                              dict(switch_scope="global", switch_iteration=250)),
    "auxfree-micro-then-auxfree-global@1": (
        "auxfree-micro-then-auxfree-global@1", "aux-free, micro→global@1", "micro",
        dict(switch_scope="global", switch_iteration=1)),
    "seq-then-global:2+micro@499": (
        "seq-then-global-2+micro@499", "LBL + 1% micro, seq→global@499", "seq",
        dict(switch_scope="global", switch_iteration=499, sync_group_size=2, micro_coeff=1e-4)),
    "global+device": ("global+device", "LBL + 100% device", "global", dict(device_coeff=1e-2)),
    "micro+device=0.3": ("micro+device=0.3", "LBL + 30% device", "micro",
                         dict(device_coeff=3e-3)),
    "qb-micro": ("qb-micro", "quantile", "micro", {}),
    "qb-dp:2": ("qb-dp-2", "quantile", "dp", dict(sync_group_size=2)),
    "qb-global": ("qb-global", "quantile", "global", {}),
    "qb-micro-then-qb-global:2@3": ("qb-micro-then-qb-global-2@3", "quantile, micro→global@3",
                                    "micro", dict(switch_scope="global", switch_iteration=3,
                                                  sync_group_size=2)),
}


def test_parse_scopes_ablations():
    settings = DemoSettings(ranks=4, steps=500)
    specs = parse_scopes(",".join(ABLATIONS), settings)
    assert [spec.label for spec in specs] == list(ABLATIONS)
    defaults = dict(sync_group_size=None, micro_coeff=0.0, switch_scope=None,
                    switch_iteration=None, shuffle_seed=settings.seed, device_coeff=0.0,
                    device_groups=settings.device_groups)
    for spec, (dirname, method, scope, arguments) in zip(specs, ABLATIONS.values()):
        assert (spec.dirname, spec.method, spec.scope) == (dirname, method, scope), spec.label
        assert spec.enable_arguments(settings) == pytest.approx({**defaults, **arguments})
        Settings(spec.scope, **spec.enable_arguments(settings))  # the plugin accepts them
        overrides = spec.model_overrides(settings)
        assert overrides.get("moe_router_enable_expert_bias", False) == spec.label.startswith(
            "auxfree-")
        if spec.aux_free:
            assert overrides["moe_router_score_function"] == "sigmoid"
            assert overrides["moe_router_bias_update_rate"] == settings.expert_bias_update_rate
            assert (overrides["moe_router_load_balancing_type"],
                    overrides["moe_aux_loss_coeff"]) == ("none", 0.0)
        elif spec.label.startswith("qb-"):
            assert (overrides["moe_router_load_balancing_type"],
                    overrides["moe_aux_loss_coeff"]) == ("quantile_balancing", 0.0)
        else:
            assert (overrides["moe_router_load_balancing_type"],
                    overrides["moe_aux_loss_coeff"]) == ("aux_loss", settings.aux_loss_coeff)
        # The rest of the model is the same for every run.
        base = settings.model_overrides()
        shared = set(base) - {"moe_router_load_balancing_type", "moe_aux_loss_coeff"}
        assert {key: overrides[key] for key in shared} == {key: base[key] for key in shared}


@pytest.mark.parametrize("text, message", [
    ("best", "unknown scope 'best'"),
    ("micro-then-best@3", "unknown scope 'best' in 'micro-then-best@3'"),
    ("micro,", "an entry is empty"),
    ("auxfree-seq", "use auxfree-micro, auxfree-dp or auxfree-global"),
    ("auxfree-shuffle", "use auxfree-micro, auxfree-dp or auxfree-global"),
    ("micro:2", "only dp and global take :N"),
    ("dp:", "only dp and global take :N"),
    ("auxfree-global:3", "does not divide --ranks 4"),
    ("global+micro=0", "R in +micro=R must be a decimal number > 0"),
    ("global+micro=1e-3", "R in +micro=R must be a decimal number > 0"),
    ("global+lbl", "'+lbl' is unknown; the additions are +micro"),
    ("micro+matched", "+matched divides the expert-bias rate of an aux-free run"),
    ("auxfree-global+matched", "use auxfree-micro+matched or auxfree-dp+matched"),
    ("auxfree-micro+matched-then-auxfree-global@5", "cannot change half-way"),
    ("shuffle+micro", "only dp and global (and dp:N, global:N) take +micro"),
    ("auxfree-global+micro", "auxfree- runs have no LBL"),
    ("micro-then-global", "write one switch as A-then-B@S"),
    ("global@3", "write one switch as A-then-B@S"),
    ("micro-then-dp-then-global@3", "write one switch as A-then-B@S"),
    ("micro-then-global@0", "1 <= S < --steps 10"),
    ("micro-then-global@10", "1 <= S < --steps 10"),
    ("micro-then-global@x", "1 <= S < --steps 10"),
    ("micro-then-auxfree-global@3", "give both halves the same method"),
    ("qb-micro-then-global@3", "give both halves the same method"),
    ("qb-seq", "use qb-micro, qb-dp or qb-global"),
    ("qb-shuffle", "use qb-micro, qb-dp or qb-global"),
    ("qb-micro:2", "only dp and global take :N"),
    ("qb-global:3", "does not divide --ranks 4"),
    ("qb-global+micro", "qb- runs take no additions"),
    ("qb-dp+device", "qb- runs take no additions"),
    ("global-then-global@3", "switches from global to global"),
    ("dp:2-then-global@3", "give them the same :N and +micro"),
    ("dp+micro-then-global@3", "give them the same :N and +micro"),
    ("global+micro,global+micro=0.01", "names the same run twice"),
])
def test_parse_scopes_rejects(text, message):
    with pytest.raises(ValueError) as error:
        parse_scopes(text, DemoSettings(ranks=4, steps=10))
    assert str(error.value).startswith("--scopes: ") and message in str(error.value)
    assert "e.g. --scopes micro,global,auxfree-global" in str(error.value)  # the usage


def test_an_unknown_scope_is_one_short_line_with_a_pointer():
    with pytest.raises(ValueError) as error:
        parse_scopes("micro,bogus", DemoSettings(ranks=4))
    message = str(error.value)
    assert message.startswith("--scopes: unknown scope 'bogus'") and "docs/demo.md" in message
    assert "\n" not in message and len(message) <= 200, (len(message), message)
