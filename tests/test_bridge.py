"""Megatron-Bridge integration (megatron_gbl.bridge) through Bridge's real training loop.

On CPU, 4 gloo ranks (harness.run_gloo, the lab's Bridge shims of megatron_gbl_lab.bridge_cpu),
Bridge's own `pretrain` / `finetune`: its set-up, GPT forward step and loss, DDP, optimizer,
checkpoints and TensorBoard logger (tests/bridge_workers.py). Checked:
- at scope global, GA 2 x DP 4, every router's gradient equals the single-process reference's
  (reference.py) on the router inputs of all ranks, and the step is the global batch;
- the values Bridge's logger wrote to TensorBoard equal the plugin's own step metrics;
- a run stopped at iteration 2 and resumed from Bridge's checkpoint repeats an uninterrupted
  one exactly (expert bias, an LBL, a dp -> global scope switch at iteration 3);
- `python -m megatron_gbl.bridge` runs a recipe script (tests/bridge_recipe/run_recipe.py:
  Bridge's OLMoE recipe shrunk by KEY=VALUE overrides, its null tokenizer) end to end, pretrain
  and finetune, and stops bad flags before training with one message, from rank 0.

Needs megatron-bridge: `scripts/test.sh --bridge` sets up an environment with it.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if importlib.util.find_spec("megatron.bridge") is None:
    pytest.skip("megatron-bridge is not installed (scripts/test.sh --bridge sets up an "
                "environment with it)", allow_module_level=True)

import reference  # noqa: E402
from megatron_gbl import metrics  # noqa: E402
from megatron_gbl_lab import harness  # noqa: E402
from tensorboard_events import tensorboard_scalars  # noqa: E402

WORLD_SIZE, TOPK, COEFF, SEQ = 4, 2, 1e-2, 8  # bridge_workers.tiny_config's
MAX_REL_ERR = 1e-5
RECIPE_SCRIPT = Path(__file__).parent / "bridge_recipe" / "run_recipe.py"
# Bridge's OLMoE-7B recipe (its null tokenizer, mock data), shrunk to a tiny model with the
# CPU's settings: Megatron-Core's local layers, no fused or CUDA-only kernels, fp32, gloo.
SHRUNK_OLMOE = [
    "model.num_layers=2", "model.hidden_size=32", "model.ffn_hidden_size=64",
    "model.moe_ffn_hidden_size=64", "model.num_attention_heads=4", "model.num_query_groups=4",
    "model.kv_channels=8", "model.num_moe_experts=8", "model.moe_router_topk=2",
    "model.vocab_size=64", "tokenizer.vocab_size=64", "model.seq_length=8", "dataset.seq_length=8",
    "model.expert_model_parallel_size=1", "model.moe_per_layer_logging=true",
    "model.transformer_impl=local", "model.moe_grouped_gemm=false",
    "model.moe_permute_fusion=false", "model.moe_token_dispatcher_type=allgather",
    "model.moe_flex_dispatcher_backend=null", "model.recompute_granularity=null",
    "model.cross_entropy_loss_fusion=false", "model.persist_layer_norm=false",
    "model.bias_activation_fusion=false", "model.bias_dropout_fusion=false",
    "model.masked_softmax_fusion=false", "model.gradient_accumulation_fusion=false",
    "model.pipeline_dtype=null", "mixed_precision=null", "optimizer.bf16=false",
    "optimizer.use_precision_aware_optimizer=false", "optimizer.main_grads_dtype=torch.float32",
    "optimizer.exp_avg_dtype=torch.float32", "optimizer.exp_avg_sq_dtype=torch.float32",
    "optimizer.use_distributed_optimizer=false", "ddp.use_distributed_optimizer=false",
    "ddp.overlap_grad_reduce=false", "ddp.overlap_param_gather=false",
    "optimizer.clip_grad=0.0",  # Megatron's clipping asserts CUDA gradients
    "dataset.num_workers=0", "train.micro_batch_size=1", "train.manual_gc=false",
    "validation.eval_interval=null", "validation.eval_iters=0", "scheduler.lr_warmup_iters=0",
    "logger.log_interval=1", "dist.distributed_backend=gloo",
]
EXPERT_BIAS = dict(moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
                   moe_router_bias_update_rate=1e-2)
SWITCH = dict(scope="dp", switch_scope="global", switch_iteration=3)


def in_ranks(rank: int, world_size: int, calls: list) -> list:
    """bridge_workers.runs, imported in the ranks only (the server of run_gloo preloads it):
    this process never imports Bridge."""
    import bridge_workers

    return bridge_workers.runs(rank, world_size, calls)


def recipe(run_dir: Path, *arguments: str, iters: int = 2, global_batch_size: int = 4) -> list:
    """`run_recipe.py` of the shrunk OLMoE recipe, TensorBoard under run_dir/tb."""
    return [RECIPE_SCRIPT, "--recipe", "olmoe_7b_pretrain_config", *SHRUNK_OLMOE,
            f"train.train_iters={iters}", f"train.global_batch_size={global_batch_size}",
            f"scheduler.lr_decay_iters={iters}", f"logger.tensorboard_dir={run_dir / 'tb'}",
            *arguments]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """Every run of this module in one set of 4 ranks, one after the other."""
    root = tmp_path_factory.mktemp("bridge")
    resume = dict(train_iters=4, global_batch_size=8, **EXPERT_BIAS)
    pretrained = root / "recipe" / "ckpt"
    calls = {
        "gradients": ("train", dict(
            balancing=dict(scope="global", histogram_interval=1), isolate_routers=True,
            config=dict(run_dir=root / "gradients", train_iters=2, global_batch_size=8, lr=0.0))),
        "uninterrupted": ("train", dict(balancing=SWITCH, config=dict(
            resume, run_dir=root / "uninterrupted"))),
        "interrupted": ("train", dict(balancing=SWITCH, config=dict(
            resume, run_dir=root / "resumed", save_interval=2, exit_interval=2))),
        "resumed": ("train", dict(balancing=SWITCH, config=dict(
            resume, run_dir=root / "resumed", load=True))),
        "recipe": ("launch", recipe(
            root / "recipe", f"checkpoint.save={pretrained}", "checkpoint.save_interval=2",
            "--moe-lbl-scope=global", "--moe-lbl-histogram-interval=1")),
        "finetune": ("launch", recipe(
            root / "finetune", "--mode", "finetune",
            f"checkpoint.pretrained_checkpoint={pretrained}", "checkpoint.finetune=true",
            "checkpoint.save=null", "--moe-lbl-scope", "global")),
        "sync group not dividing DP": ("launch", recipe(
            root / "bad", "--moe-lbl-scope=global", "--moe-lbl-sync-group-size", "3")),
        "callback API": ("callback_api", {}),
    }
    per_rank = harness.run_gloo(in_ranks, WORLD_SIZE, list(calls.values()), timeout_s=1800,
                                preload=("bridge_workers",))
    results = {label: [rank_results[i] for rank_results in per_rank]
               for i, label in enumerate(calls)}
    results["dirs"] = {label: spec[1]["config"]["run_dir"] for label, spec in calls.items()
                       if spec[0] == "train"}
    results["dirs"].update(recipe=root / "recipe", finetune=root / "finetune")
    return results


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.double() - expected).norm() / expected.norm())


def test_router_gradients_match_the_reference_at_global_scope(runs):
    """GA 2 x DP 4 through Bridge's loop: each router's gradient (after Bridge's data-parallel
    all-reduce) is the gradient of the global-batch LBL with the buffer of Algorithm 1 over the
    router inputs of all ranks; the plugin marked Bridge's steps (Balance BSZ: the global batch)
    and was disabled at on_train_end."""
    per_rank = [result["steps"] for result in runs["gradients"]]
    assert all(len(steps) == 2 for steps in per_rank)
    for step in range(2):
        layers = per_rank[0][step]["routers"]
        assert sorted(layers) == [1, 2]
        for layer in layers:
            routers = [steps[step]["routers"][layer] for steps in per_rank]
            weight = routers[0]["weight"]
            assert all(torch.equal(router["weight"], weight) for router in routers)
            assert all(len(router["inputs"]) == 2 for router in routers)  # GA 2
            hidden = [[router["inputs"][k] for router in routers] for k in range(2)]
            expected = reference.grad_of(lambda w: reference.global_batch_lbl(
                w, hidden, None, TOPK, COEFF, buffered=True)[0], weight)
            assert expected.abs().sum() > 0
            errors = [rel_err(router["grad"], expected) for router in routers]
            print(f"\nstep {step}, layer {layer}: rel. err. {max(errors):.1e}")
            assert max(errors) <= MAX_REL_ERR, (step, layer, errors)
            balance_bsz = per_rank[0][step]["metrics"][metrics.BALANCE_BSZ][layer]
            assert balance_bsz == 8 * SEQ  # 8 sequences: GA 2 x DP 4 x 1
    assert not any(result["enabled_after"] for result in runs["gradients"])


def test_tensorboard_values_equal_the_plugin_metrics(runs):
    """What Bridge's logger wrote for each layer and step is the plugin's step metrics, averaged
    over the data-parallel ranks (Megatron's tracker reduction; global values are the same on
    every rank); histograms count every expert choice of the global batch."""
    scalars, histograms = tensorboard_scalars(runs["dirs"]["gradients"] / "tb")
    per_rank = [result["steps"] for result in runs["gradients"]]
    names = metrics.names(has_lbl=True, has_expert_bias=False)
    for name in names:
        for layer in (1, 2):
            plugin = [sum(steps[step]["metrics"][name][layer] for steps in per_rank) / WORLD_SIZE
                      for step in range(2)]
            logged = scalars[f"moe/{name}_layer_{layer - 1}"]
            assert logged == pytest.approx(plugin, rel=1e-6, abs=1e-7), (name, layer)
    assert scalars[metrics.GLOBAL_LBL] != pytest.approx(scalars[metrics.MICRO_LBL], rel=1e-4)
    assert sorted(histograms) == ["moe/tokens_per_expert_layer_0", "moe/tokens_per_expert_layer_1"]
    for per_step in histograms.values():
        assert len(per_step) == 2
        assert all(h.num == sum(h.bucket) == 8 * SEQ * TOPK for h in per_step)


def test_resume_from_a_bridge_checkpoint_repeats_the_uninterrupted_run(runs):
    """Stopped by Bridge's exit_interval at iteration 2 (a checkpoint saved, no on_train_end,
    as a killed job), then resumed: every step's language-model loss, plugin metrics, expert
    bias and router weight equal the uninterrupted run's; the scope is dp up to iteration 2 and
    global from 3 in both (Balance BSZ: one micro-batch of DP 4, then the global batch)."""
    uninterrupted = runs["uninterrupted"]
    assert not any(result["exited"] for result in uninterrupted)
    assert all(result["exited"] for result in runs["interrupted"])
    for rank in range(WORLD_SIZE):
        steps = uninterrupted[rank]["steps"]
        resumed = runs["interrupted"][rank]["steps"] + runs["resumed"][rank]["steps"]
        assert [step["iteration"] for step in resumed] == [0, 1, 2, 3]
        assert [step["iteration"] for step in steps] == [0, 1, 2, 3]
        for expected, actual in zip(steps, resumed):
            assert actual["lm loss"] == expected["lm loss"], actual["iteration"]
            assert actual["metrics"] == expected["metrics"], actual["iteration"]
            for layer, router in expected["routers"].items():
                assert torch.equal(actual["routers"][layer]["expert_bias"],
                                   router["expert_bias"])
                assert torch.equal(actual["routers"][layer]["weight"], router["weight"])
        balance_bsz = [step["metrics"][metrics.BALANCE_BSZ][1] for step in steps]
        assert balance_bsz == [4 * SEQ] * 3 + [8 * SEQ]
        biases = [step["routers"][1]["expert_bias"] for step in steps]
        assert all(not torch.equal(a, b) for a, b in zip(biases, biases[1:]))  # updated


def test_recipe_launcher_runs_pretrain_and_finetune(runs):
    """`-m megatron_gbl.bridge run_recipe.py --recipe olmoe_7b_pretrain_config ...
    --moe-lbl-scope=global`: the shrunk OLMoE recipe (seq_aux_loss) trains through Bridge's
    pretrain with the plugin; one micro-batch per rank, so the scoped loss Bridge logs under
    upstream's name is the global-batch LBL. Its checkpoint then finetunes the same way."""
    for label in ("recipe", "finetune"):
        assert all(result["status"] == 0 and result["trained"] for result in runs[label]), \
            [result["stderr"][-2000:] for result in runs[label]]
        scalars, histograms = tensorboard_scalars(runs["dirs"][label] / "tb")
        assert scalars[metrics.BALANCE_BSZ] == [4 * SEQ] * 2  # 4 sequences: DP 4 x 1, 2 steps
        assert scalars[metrics.GLOBAL_LBL] == pytest.approx(
            scalars["seq_load_balancing_loss"], rel=1e-5)
        assert scalars[metrics.GLOBAL_LBL] != pytest.approx(scalars[metrics.MICRO_LBL], rel=1e-4)
        if label == "recipe":  # --moe-lbl-histogram-interval=1
            for per_step in histograms.values():
                assert [h.num for h in per_step] == [4 * SEQ * TOPK] * 2


def test_bad_flag_stops_before_training_with_one_message(runs):
    """A flag that the run's config rejects (--moe-lbl-sync-group-size 3 at DP 4): every rank
    stops before Bridge's training loop, rank 0 with status 2 and the plugin's one-line message
    on its stderr, the others quietly."""
    outcomes = runs["sync group not dividing DP"]
    assert [outcome["status"] for outcome in outcomes] == [2, 0, 0, 0]
    assert not any(outcome["trained"] for outcome in outcomes)
    message = outcomes[0]["stderr"].strip()
    assert message.startswith("megatron_gbl:") and "\n" not in message
    assert "--moe-lbl-sync-group-size" in message and "divide" in message
    assert all("megatron_gbl" not in outcome["stderr"] for outcome in outcomes[1:])


def test_callback_is_a_bridge_callback_checked_when_made(runs):
    outcome = runs["callback API"][0]
    assert outcome["is_callback"]
    assert "micro_coeff" in outcome["bad_settings"] and not outcome["enabled_after_bad"]
    assert outcome["enabled_when_made"]


def test_launcher_flag_error_in_a_torchrun_launch(tmp_path):
    """Through torchrun, 4 processes: a bad --moe-lbl-* value stops every rank before the script
    runs; the launch fails with one message on its stderr (rank 0's), however late rank 0
    gets there."""
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone",
         f"--nproc-per-node={WORLD_SIZE}", "-m", "megatron_gbl.bridge", RECIPE_SCRIPT,
         "--recipe", "olmoe_7b_pretrain_config", "--moe-lbl-scope", "batch"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if "megatron_gbl:" in line]
    assert len(lines) == 1, result.stderr[-3000:]
    assert "--moe-lbl-scope" in lines[0] and "'batch'" in lines[0]
