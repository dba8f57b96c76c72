"""Real GPT-MoE models trained through Megatron-Core's get_forward_backward_func() on gloo."""

import dataclasses

import pytest
import torch

import workers
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron_gbl_lab.harness import run_gloo

FIELDS = {f.name for f in dataclasses.fields(TransformerConfig)}
FULL_RECOMPUTE = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
# MoE-layer recompute: `recompute_modules=["moe"]` from 0.14, `moe_layer_recompute` before.
MOE_RECOMPUTE = (dict(recompute_granularity="selective", recompute_modules=["moe"])
                 if "recompute_modules" in FIELDS else dict(moe_layer_recompute=True))


def run(specs, world_size=2):
    return run_gloo(workers.model_runs, world_size, specs)[0]


def base(**kw):
    return dict(dict(scope="global", microbatches=3, step_seeds=[5], seq=8, bsz=2), **kw)


def test_recompute_on_equals_off():
    off, full, moe = run([base(), base(config=FULL_RECOMPUTE), base(config=MOE_RECOMPUTE)])
    assert any("router" in name for name in off["grads"])
    for other, label in ((full, "full recompute"), (moe, "MoE-layer recompute")):
        assert other["grads"].keys() == off["grads"].keys()
        for name, grad in off["grads"].items():
            torch.testing.assert_close(other["grads"][name], grad, rtol=1e-5, atol=1e-7,
                                       msg=f"{label}: {name}")
        for ours, ref in zip(other["buffers"], off["buffers"]):
            assert ours["microbatches"] == 3  # counted once per micro-batch, not twice
            assert torch.equal(ours["tokens_per_expert"], ref["tokens_per_expert"])


def test_pipeline_1f1b_counts_each_microbatch_once_with_and_without_recompute():
    # 4 ranks: 2 pipeline stages x 2 data-parallel replicas, 1F1B with 4 micro-batches.
    spec = base(pp=2, microbatches=4)
    results = run_gloo(workers.model_runs, 4, [spec, dict(spec, config=FULL_RECOMPUTE)])
    for stage_rank in (0, 2):  # global rank 0 is stage 0, rank 2 is stage 1
        off, full = results[stage_rank]
        assert off["buffers"] and all(b["microbatches"] == 4 for b in off["buffers"])
        for ours, ref in zip(full["buffers"], off["buffers"]):
            assert torch.equal(ours["tokens_per_expert"], ref["tokens_per_expert"])
        for name, grad in off["grads"].items():
            torch.testing.assert_close(full["grads"][name], grad, rtol=1e-5, atol=1e-7)


def test_schedule_resets_buffer_every_step_without_extra_call():
    two_steps, last_step_alone = run([base(step_seeds=[1, 2], lm_loss=False),
                                      base(step_seeds=[2], lm_loss=False)])
    for buffer in two_steps["buffers"]:
        assert buffer["microbatches"] == 3
        assert buffer["num_tokens"] == 3 * 2 * 8 * 2  # micro-batches x ranks x seq x bsz
    routers = [n for n in two_steps["grads"] if "router" in n]
    assert routers
    for name in routers:
        assert two_steps["grads"][name].abs().sum() > 0
        torch.testing.assert_close(two_steps["grads"][name], last_step_alone["grads"][name],
                                   rtol=1e-6, atol=0)


@pytest.mark.parametrize("lbl_type", ["aux_loss"])
def test_bf16_model_counts_exact(lbl_type):
    bf16 = dict(bf16=True, params_dtype=torch.bfloat16, moe_router_load_balancing_type=lbl_type)
    runs = [base(config=bf16, microbatches=4, seq=64, bsz=4, lm_loss=False)]
    upstream_global = hasattr(TopKRouter, "_apply_global_aux_loss")
    if upstream_global:
        runs.append(base(scope=None, microbatches=4, seq=64, bsz=4, lm_loss=False,
                         config=dict(bf16, moe_router_load_balancing_type="global_aux_loss")))
    results = run(runs)
    topk, tokens = 2, 4 * 2 * 64 * 4  # micro-batches x ranks x seq x bsz
    for buffer in results[0]["buffers"]:
        assert buffer["dtype"] == torch.int64
        assert buffer["num_tokens"] == tokens
        assert int(buffer["tokens_per_expert"].sum()) == topk * tokens
        assert buffer["tokens_per_expert"].max() > 256  # beyond bf16's exact integers
    if upstream_global:
        upstream = results[1]["buffers"][0]
        drift = float(upstream["tokens_per_expert"].double().sum()) / (topk * tokens) - 1
        print(f"\nbf16 model, {topk * tokens} expert choices: megatron_gbl counts int64, exact; "
              f"upstream global_tokens_per_expert is {upstream['dtype']}, total off by {drift:+.2%}")
        assert upstream["dtype"] == torch.bfloat16
