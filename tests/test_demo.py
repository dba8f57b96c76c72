"""`megatron-gbl demo` then `megatron-gbl analyze`, end to end with tiny settings (4 gloo ranks)."""

import json
import math
import os

import pytest
import torch

from megatron_gbl import compat
from megatron_gbl_lab import cli, harness, model, runs

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
RANKS, MICROBATCHES, MICRO_BATCH_SIZE, SEQ = 4, 2, 2, 16


def assert_png(path):
    with open(path, "rb") as f:
        data = f.read()
    assert data.startswith(PNG_SIGNATURE), path
    assert len(data) > 5000, f"{path}: only {len(data)} bytes"


# Balance BSZ in sequences of each run: a micro-batch, 2 ranks' micro-batches, the global batch.
GLOBAL_BATCH = RANKS * MICROBATCHES * MICRO_BATCH_SIZE
BALANCE_SEQUENCES = {
    "global": GLOBAL_BATCH, "auxfree-micro": MICRO_BATCH_SIZE, "auxfree-dp:2": 2 * MICRO_BATCH_SIZE,
    "auxfree-global": GLOBAL_BATCH, "shuffle": MICRO_BATCH_SIZE, "global+micro": GLOBAL_BATCH,
    "micro-then-global@2": GLOBAL_BATCH,  # micro for 2 of the 3 steps, then global
    "auxfree-micro+matched": MICRO_BATCH_SIZE,
    "global+device": GLOBAL_BATCH,
}
AUX_FREE_RUNS = ("auxfree-micro", "auxfree-dp:2", "auxfree-global", "auxfree-micro+matched")
QUANTILE_RUNS = ("qb-micro", "qb-global", "qb-micro-then-qb-global@2")  # Megatron-Core 0.19+
if compat.has_quantile_balancing():
    BALANCE_SEQUENCES.update({"qb-micro": MICRO_BATCH_SIZE, "qb-global": GLOBAL_BATCH,
                              "qb-micro-then-qb-global@2": GLOBAL_BATCH})


def test_demo_then_analyze(tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli.main(["demo", "--scopes", ",".join(BALANCE_SEQUENCES), "--steps", "3",
                     "--ranks", str(RANKS), "--microbatches", str(MICROBATCHES),
                     "--micro-batch-size", str(MICRO_BATCH_SIZE), "--seq-length", str(SEQ),
                     "--eval-sequences", "4", "--eval-checkpoints", "3", "--out", str(out),
                     "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "held-out loss, mean" in printed and "MI(domain; expert)" in printed
    assert "LBL + 1% micro" in printed and "LBL, micro→global@2" in printed

    with open(out / "results.json") as f:
        results = json.load(f)
    domains = results["domains"]
    assert len(domains) == 4 and results["settings"]["steps"] == 3 and results["seeds"] == [0]
    runs = results["per_seed"]["0"]["scopes"]
    assert list(runs) == list(BALANCE_SEQUENCES)
    assert {label: run["balance_bsz"]["sequences"] for label, run in runs.items()} == \
        BALANCE_SEQUENCES
    assert [runs[label]["method"] for label in ("global", "auxfree-global", "shuffle")] == [
        "LBL", "aux-free", "shuffle LBL"]
    # The matched aux-free run updates every micro-batch at u / micro-batches per step.
    rates = {label: torch.load(os.path.join(runs[label]["model_dir"], "model.pt"),
                               weights_only=False)["model_overrides"]["moe_router_bias_update_rate"]
             for label in ("auxfree-micro", "auxfree-micro+matched")}
    assert rates["auxfree-micro+matched"] == pytest.approx(rates["auxfree-micro"] / MICROBATCHES)
    # Same initial weights and the same first global batch: the same first loss for every LBL
    # run. (Aux-free runs differ in gating, and at micro/dp scope the expert bias changes
    # between the first step's micro-batches: see the next test for their weights.)
    first_losses = {run["train_curves"]["loss"][0] for label, run in runs.items()
                    if label not in AUX_FREE_RUNS}
    assert len(first_losses) == 1
    # A plugin argument that did not arrive would leave the run identical to plain global.
    for label in ("global+micro", "micro-then-global@2", "global+device"):
        assert runs[label]["heldout_loss"] != runs["global"]["heldout_loss"], label
    assert runs["global+device"]["method"] == "LBL + 100% device"
    if "qb-micro" in runs:  # the switch arrived: after 2 qb-micro steps, one at global
        assert runs["qb-micro-then-qb-global@2"]["heldout_loss"] != runs["qb-micro"]["heldout_loss"]
        assert runs["qb-global"]["method"] == "quantile"
    lbl_curves = {"micro_lbl", "global_lbl"}
    for label, run in runs.items():
        curves = run["train_curves"]
        assert set(curves) == {"loss", "micro_load_violation", "global_load_violation",
                               "micro_device_load_violation"} | (
            set() if label in AUX_FREE_RUNS + QUANTILE_RUNS else lbl_curves), label
        assert all(len(curve) == 3 for curve in curves.values())
        # 4 simulated devices of 2 experts: max / mean - 1 is at most 4 - 1.
        assert all(0 <= value <= 3 for value in curves["micro_device_load_violation"])
        assert any(value > 0 for value in curves["micro_device_load_violation"])
        assert all(value >= 0 for value in curves["micro_load_violation"]
                   + curves["global_load_violation"])
        assert set(run["heldout_loss"]) == set(domains)
        # The held-out loss is the mean over the last 3 checkpoints (here every step).
        checkpoints = run["heldout_checkpoints"]
        assert [entry["step"] for entry in checkpoints] == [1, 2, 3]
        assert run["heldout_loss_mean"] == pytest.approx(
            sum(entry["heldout_loss_mean"] for entry in checkpoints) / 3, rel=1e-12)
        for entry in checkpoints:  # two halves of 2 windows each: their mean is the whole's
            assert sum(entry["heldout_loss_halves"]) / 2 == pytest.approx(
                entry["heldout_loss_mean"], rel=1e-9)
        assert all(0 < loss < math.log(257) + 1 for loss in run["heldout_loss"].values())
        assert run["seconds_per_step"] > 0
        routing = run["routing"]
        topk, experts = routing["topk"], routing["num_experts"]
        # 4 held-out sequences of SEQ tokens per domain, every token chose top-k experts.
        assert routing["tokens_per_domain"] == [4 * SEQ] * 4
        for layer in routing["selection_frequency"]:
            for row in layer:
                assert len(row) == experts and sum(row) == topk
        assert all(0 <= mi <= math.log2(4) + 1e-9 for mi in routing["mutual_information_bits"])
        assert all(value >= 1 - 1e-6 for value in routing["global_lbl"])  # 1 is the minimum
        state_dict = torch.load(os.path.join(run["model_dir"], "model.pt"),
                                weights_only=False)["state_dict"]
        biases = [value for key, value in state_dict.items()
                  if key.endswith("mlp.router.expert_bias")]
        quantile_biases = [value for key, value in state_dict.items()
                           if key.endswith("mlp.router.qb_beta")]
        if label in AUX_FREE_RUNS:
            # Every layer's expert bias moved away from its initial zeros during training.
            assert len(biases) == results["settings"]["num_layers"]
            assert all(bias.abs().max() > 0 for bias in biases), label
        else:
            assert biases == [], label
        if label in QUANTILE_RUNS:  # the same for quantile balancing's bias
            assert len(quantile_biases) == results["settings"]["num_layers"]
            assert all(bias.abs().max() > 0 for bias in quantile_biases), label
        else:
            assert quantile_biases == [], label
    for path in results["files"].values():
        assert_png(path)
    # The built-in corpus is written out so `analyze` can read the same held-out text.
    with open(out / "valid.jsonl") as f:
        assert {json.loads(line)["domain"] for line in f} == set(domains)

    # A saved aux-free model (sigmoid gating, expert bias) is rebuilt by `analyze`: the same
    # model on the same held-out batches gives the demo's own numbers again.
    analyzed = out / "auxfree-global"
    assert cli.main(["analyze", "--model", str(analyzed), "--data", str(out / "valid.jsonl"),
                     "--max-sequences", "4"]) == 0
    assert "MI(domain; expert)" in capsys.readouterr().out
    with open(analyzed / "analysis" / "analysis.json") as f:
        analysis = json.load(f)
    demo_routing = runs["auxfree-global"]["routing"]
    assert analysis["routing"]["selection_frequency"] == demo_routing["selection_frequency"]
    assert sum(analysis["routing"]["topk_score_sum"], []) == pytest.approx(
        sum(demo_routing["topk_score_sum"], []), rel=1e-9)
    final = runs["auxfree-global"]["heldout_checkpoints"][-1]
    assert final["step"] == 3
    assert analysis["heldout_loss"] == pytest.approx(final["heldout_loss"], rel=1e-9)
    layers = len(analysis["routing"]["high_frequency_overlap"])
    assert layers == results["settings"]["num_layers"]
    for path in analysis["files"].values():
        assert_png(path)
    checkpoint = torch.load(analyzed / "model.pt", weights_only=False)
    assert checkpoint["scope"] == "auxfree-global" and checkpoint["domains"] == domains
    assert checkpoint["model_overrides"]["moe_router_enable_expert_bias"]


def lbl_and_aux_free_weights(rank, world_size, settings):
    harness.init_model_parallel()
    return [{name: param.detach() for name, param in model.build_model(
                settings.model_overrides(aux_free), settings.seq_length,
                settings.seed).named_parameters()}
            for aux_free in (False, True)]


def test_lbl_and_aux_free_models_start_from_the_same_weights():
    lbl, aux_free = harness.run_gloo(lbl_and_aux_free_weights, 1, runs.DemoSettings())[0]
    # The aux-free router's expert bias is a buffer: the parameters are the same ones.
    assert list(lbl) == list(aux_free)
    for name, value in lbl.items():
        assert torch.equal(value, aux_free[name]), name


def test_seeds_summary_recomputed_from_per_seed(tmp_path, capsys):
    out = tmp_path / "seeds"
    seeds = [3, 1, 4]
    assert cli.main(["demo", "--scopes", "micro,global", "--seeds", ",".join(map(str, seeds)),
                     "--steps", "2", "--ranks", str(RANKS), "--microbatches", "1",
                     "--micro-batch-size", "2", "--seq-length", str(SEQ),
                     "--eval-sequences", "2", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "Δ vs micro, 95% CI" in printed and "mean ± sd over seeds" in printed
    with open(out / "results.json") as f:
        results = json.load(f)
    assert results["seeds"] == seeds and "seed" not in results["settings"]
    assert set(results["per_seed"]) == {"3", "1", "4"}
    # Independently of report.py: mean, sample sd, and the t interval with n - 1 = 2 degrees of
    # freedom, whose 0.975 quantile has the closed form 0.95 * sqrt(2 / (1 - 0.95^2)).
    t_975 = 0.95 * math.sqrt(2 / (1 - 0.95 ** 2))
    values = {
        "heldout_loss_mean": lambda run: run["heldout_loss_mean"],
        "mi_bits": lambda run: sum(run["routing"]["mutual_information_bits"])
        / len(run["routing"]["mutual_information_bits"]),
    }
    for name, value in values.items():
        per_label = {label: [value(results["per_seed"][str(seed)]["scopes"][label])
                             for seed in seeds] for label in ("micro", "global")}
        for label, xs in per_label.items():
            mean = sum(xs) / 3
            sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / 2)
            assert results["summary"][label][name] == pytest.approx(
                {"mean": mean, "sd": sd, "n": 3}, rel=1e-12)
        differences = [g - m for g, m in zip(per_label["global"], per_label["micro"])]
        mean = sum(differences) / 3
        half = t_975 * math.sqrt(sum((d - mean) ** 2 for d in differences) / 2) / math.sqrt(3)
        wins = sum(d < 0 if name == "heldout_loss_mean" else d > 0 for d in differences)
        paired = results["paired"]["global"][name]
        assert paired["mean_diff"] == pytest.approx(mean, rel=1e-12)
        assert paired["ci95"] == pytest.approx([mean - half, mean + half], rel=1e-9)
        assert (paired["wins"], paired["n"]) == (wins, 3)
    assert "micro" not in results["paired"]
    # The loss noise: over seeds, the sd of global - micro, and the RMS of each run's own sd.
    def sample_sd(xs):
        return math.sqrt(sum((x - sum(xs) / len(xs)) ** 2 for x in xs) / (len(xs) - 1))

    losses = {label: [results["per_seed"][str(seed)]["scopes"][label]["heldout_loss_mean"]
                      for seed in seeds] for label in ("micro", "global")}
    assert results["noise"]["seed"] == pytest.approx(
        sample_sd([g - m for g, m in zip(losses["global"], losses["micro"])]))
    assert results["noise"]["level"] == pytest.approx(
        math.sqrt(sum(sample_sd(xs) ** 2 for xs in losses.values()) / 2))
    # The same results paired against global: every difference the other way round.
    assert cli.main(["compare", str(out / "results.json"), "--against", "global"]) == 0
    printed = capsys.readouterr().out
    assert "Δ vs global, 95% CI" in printed and printed.index("| global") < printed.index("micro")
    mean_diff = results["paired"]["global"]["heldout_loss_mean"]["mean_diff"]
    assert f"{-mean_diff:+.4f}" in printed
    # Every seed's model, and one point per seed in the seeds figure.
    for seed in seeds:
        assert (out / f"seed{seed}" / "global" / "model.pt").is_file()
    assert_png(results["files"]["seeds"])


def test_evaluating_checkpoints_leaves_training_unchanged(tmp_path):
    """Held-out evaluations during training (--eval-checkpoints) do not change the model."""
    finals = []
    for checkpoints in ("1", "3"):
        out = tmp_path / checkpoints
        assert cli.main(["demo", "--scopes", "global", "--steps", "3", "--ranks", str(RANKS),
                         "--microbatches", "1", "--micro-batch-size", "2", "--seq-length",
                         str(SEQ), "--eval-sequences", "4", "--eval-checkpoints", checkpoints,
                         "--out", str(out), "--no-progress"]) == 0
        with open(out / "results.json") as f:
            run = json.load(f)["per_seed"]["0"]["scopes"]["global"]
        assert len(run["heldout_checkpoints"]) == int(checkpoints)
        finals.append((run["heldout_checkpoints"][-1], run["routing"], run["train_curves"],
                       torch.load(out / "global" / "model.pt", weights_only=False)["state_dict"]))
    (*one, state_one), (*three, state_three) = finals
    assert one == three  # final held-out loss, routing statistics, training curves
    assert all(torch.equal(state_one[name], state_three[name]) for name in state_one
               if isinstance(state_one[name], torch.Tensor))
