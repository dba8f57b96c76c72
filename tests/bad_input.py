"""Every misconfiguration megatron-gbl rejects before training, and the message each gets.

    python tests/bad_input.py > docs/bad_input.md      # regenerate the table in the docs

tests/test_bad_input.py checks that each message names what it must (`fragments`) and that
docs/bad_input.md shows exactly the messages the code gives; tests/test_api.py does the same
for the errors that need a real data-parallel run (`RUNTIME`, from workers.bad_input_messages).
"""

from __future__ import annotations

import argparse
import os
import sys

AUX_FREE = dict(moe_router_enable_expert_bias=True, moe_router_bias_update_rate=1e-3,
                moe_router_score_function="sigmoid", moe_router_load_balancing_type="none",
                moe_aux_loss_coeff=0.0)

# What Megatron-LM's validate_args leaves for a typical MoE run at data-parallel size 4, to
# which each case applies its overrides (argument names as in Megatron-LM's args).
MEGATRON_LM_BASE = dict(moe_lbl_scope="global", num_experts=8,
                        moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=1e-3,
                        moe_token_dispatcher_type="alltoall", data_parallel_size=4,
                        train_iters=1000)

# case: (overrides of MEGATRON_LM_BASE, fragments the message must contain)
MEGATRON_LM = {
    "no MoE layers": (dict(num_experts=None), ["--num-experts", "--moe-lbl-scope"]),
    "sinkhorn": (dict(moe_router_load_balancing_type="sinkhorn"),
                 ["'sinkhorn'", "--moe-router-load-balancing-type"]),
    "none": (dict(moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0),
             ["'none'", "--moe-router-load-balancing-type", "--moe-router-enable-expert-bias"]),
    "coeff 0": (dict(moe_aux_loss_coeff=0.0), ["--moe-aux-loss-coeff", "> 0"]),
    "two LBL types": (dict(moe_router_load_balancing_type=["aux_loss", "global_aux_loss"],
                           moe_aux_loss_coeff=[1e-3, 1e-3]), ["several", "--moe-lbl-micro-coeff"]),
    "N not dividing DP": (dict(moe_lbl_sync_group_size=3),
                          ["--moe-lbl-sync-group-size", "divide", "data-parallel size 4"]),
    "N larger than DP": (dict(moe_lbl_sync_group_size=16),
                         ["--moe-lbl-sync-group-size", "divide", "data-parallel size 4"]),
    "N < 1": (dict(moe_lbl_sync_group_size=0), ["--moe-lbl-sync-group-size", "positive"]),
    "negative micro coeff": (dict(moe_lbl_micro_coeff=-1e-4), ["--moe-lbl-micro-coeff", ">= 0"]),
    "micro coeff with micro scope": (dict(moe_lbl_scope="micro", moe_lbl_micro_coeff=1e-4),
                                     ["--moe-lbl-micro-coeff", "'dp' or 'global'"]),
    "N with seq scope": (dict(moe_lbl_scope="seq", moe_lbl_sync_group_size=2),
                         ["--moe-lbl-sync-group-size", "'dp' or 'global'"]),
    "N with shuffle scope": (dict(moe_lbl_scope="shuffle", moe_lbl_sync_group_size=2),
                             ["--moe-lbl-sync-group-size", "'dp' or 'global'"]),
    "N without scope": (dict(moe_lbl_scope=None, moe_lbl_sync_group_size=2),
                        ["--moe-lbl-sync-group-size", "--moe-lbl-scope"]),
    "micro coeff without scope": (dict(moe_lbl_scope=None, moe_lbl_micro_coeff=1e-4),
                                  ["--moe-lbl-micro-coeff", "--moe-lbl-scope"]),
    "negative histogram interval": (dict(moe_lbl_histogram_interval=-1),
                                    ["--moe-lbl-histogram-interval", ">= 0"]),
    "alltoall_seq": (dict(moe_token_dispatcher_type="alltoall_seq"),
                     ["--moe-token-dispatcher-type", "'alltoall'"]),
    "switch without scope": (dict(moe_lbl_scope=None, moe_lbl_switch_scope="global",
                                  moe_lbl_switch_iteration=10),
                             ["--moe-lbl-switch-scope", "needs --moe-lbl-scope"]),
    "switch scope without iteration": (dict(moe_lbl_scope="micro", moe_lbl_switch_scope="global"),
                                       ["--moe-lbl-switch-scope", "--moe-lbl-switch-iteration"]),
    "switch at iteration 0": (dict(moe_lbl_scope="micro", moe_lbl_switch_scope="global",
                                   moe_lbl_switch_iteration=0),
                              ["--moe-lbl-switch-iteration", ">= 1"]),
    "switch after the last iteration": (dict(moe_lbl_scope="micro", moe_lbl_switch_scope="global",
                                             moe_lbl_switch_iteration=1000),
                                        ["--moe-lbl-switch-iteration", "--train-iters", "never"]),
    "switch to the same scope": (dict(moe_lbl_switch_scope="global", moe_lbl_switch_iteration=5),
                                 ["--moe-lbl-switch-scope", "already the scope"]),
    "expert bias at seq scope": (dict(AUX_FREE, moe_lbl_scope="seq"),
                                 ["'seq'", "expert-bias", "micro, dp, global"]),
    "expert bias switching to shuffle": (dict(AUX_FREE, moe_lbl_scope="micro",
                                              moe_lbl_switch_scope="shuffle",
                                              moe_lbl_switch_iteration=5),
                                         ["'shuffle'", "--moe-lbl-switch-scope"]),
    "per-micro-batch bias with PP and recompute": (
        dict(AUX_FREE, moe_lbl_scope="micro", pipeline_model_parallel_size=2,
             recompute_granularity="full"),
        ["--pipeline-model-parallel-size", "--recompute-granularity", "scope 'global'"]),
    "micro coeff without an LBL": (dict(AUX_FREE, moe_lbl_micro_coeff=1e-4),
                                   ["--moe-lbl-micro-coeff", "--moe-aux-loss-coeff"]),
    "negative bias update rate": (dict(AUX_FREE, moe_router_bias_update_rate=-1e-3),
                                  ["--moe-router-bias-update-rate", ">= 0"]),
    "frozen bias and no LBL": (dict(AUX_FREE, moe_router_bias_update_rate=0.0),
                               ["'none'", "--moe-router-bias-update-rate > 0"]),
    "negative device coeff": (dict(moe_lbl_device_coeff=-1e-3),
                              ["--moe-lbl-device-coeff", ">= 0"]),
    "device groups < 1": (dict(moe_lbl_device_groups=0), ["--moe-lbl-device-groups", ">= 1"]),
    "device groups not dividing the experts": (
        dict(moe_lbl_device_coeff=1e-3, moe_lbl_device_groups=3),
        ["--moe-lbl-device-groups", "3 must divide", "experts 8", "--num-experts"]),
    "device coeff without expert parallelism": (
        dict(moe_lbl_device_coeff=1e-3, expert_model_parallel_size=1),
        ["--moe-lbl-device-coeff", "one group", "--expert-model-parallel-size",
         "--moe-lbl-device-groups"]),
    "device coeff with one device group": (
        dict(moe_lbl_device_coeff=1e-3, moe_lbl_device_groups=1, expert_model_parallel_size=4),
        ["--moe-lbl-device-coeff", "one group", "--moe-lbl-device-groups) is 1"]),
    "device coeff without an LBL": (dict(AUX_FREE, moe_lbl_device_coeff=1e-3,
                                         expert_model_parallel_size=4),
                                    ["--moe-lbl-device-coeff", "--moe-aux-loss-coeff"]),
    "device coeff without scope": (dict(moe_lbl_scope=None, moe_lbl_device_coeff=1e-3),
                                   ["--moe-lbl-device-coeff", "--moe-lbl-scope"]),
    "device groups without scope": (dict(moe_lbl_scope=None, moe_lbl_device_groups=4),
                                    ["--moe-lbl-device-groups", "--moe-lbl-scope"]),
    "CUDA graphs of whole layers": (dict(cuda_graph_impl="transformer_engine"),
                                    ["--cuda-graph-impl", "whole layers", "capture the MoE router",
                                     "--cuda-graph-scope attn"]),
    "CUDA graphs of the router": (dict(cuda_graph_impl="transformer_engine",
                                       cuda_graph_scope=["attn", "moe_router"]),
                                  ["['attn', 'moe_router']", "--cuda-graph-scope attn"]),
    "local CUDA graphs (whole layers, any scope)": (
        dict(cuda_graph_impl="local", cuda_graph_scope=["attn"]),
        ["cuda_graph_impl='local'", "graphs whole layers",
         "--cuda-graph-impl transformer_engine"]),
    "a CUDA graph of the whole iteration": (
        dict(cuda_graph_impl="local", cuda_graph_scope=["full_iteration"]),
        ["the whole training iteration", "--cuda-graph-impl none"]),
    "--enable-cuda-graph (before 0.15)": (dict(enable_cuda_graph=True),
                                          ["--enable-cuda-graph", "capture the MoE router"]),
}

# case: (enable() keyword arguments, TransformerConfig overrides of the model or None,
#        fragments the message must contain)
PYTHON_API = {
    "unknown scope": (dict(scope="batch"), None,
                      ["scope (--moe-lbl-scope) 'batch'", "micro, seq, dp, global, shuffle"]),
    "no scope": (dict(scope=None), None,
                 ["scope (--moe-lbl-scope) None", "micro, seq, dp, global, shuffle"]),
    "scope not a string": (dict(scope=2), None, ["scope (--moe-lbl-scope) 2", "choose one of"]),
    "scope a list": (dict(scope=["global"]), None,
                     ["scope (--moe-lbl-scope) ['global']", "choose one of"]),
    "switch_scope not a string": (dict(scope="micro", switch_scope=1, switch_iteration=5), None,
                                  ["switch_scope (--moe-lbl-switch-scope) 1"]),
    "sync_group_size with micro": (dict(scope="micro", sync_group_size=8), None,
                                   ["sync_group_size", "8", "'dp' or 'global'"]),
    "sync_group_size 0": (dict(scope="dp", sync_group_size=0), None,
                          ["sync_group_size", "positive"]),
    "micro_coeff with seq": (dict(scope="seq", micro_coeff=1e-4), None,
                             ["micro_coeff", "'dp' or 'global'"]),
    "negative micro_coeff": (dict(scope="global", micro_coeff=-1.0), None,
                             ["micro_coeff", ">= 0"]),
    "micro_coeff not a number": (dict(scope="global", micro_coeff="1e-4"), None,
                                 ["micro_coeff", "number"]),
    "switch_scope alone": (dict(scope="micro", switch_scope="global"), None,
                           ["switch_scope", "switch_iteration", "go together"]),
    "unknown switch_scope": (dict(scope="micro", switch_scope="glob", switch_iteration=5), None,
                             ["switch_scope (--moe-lbl-switch-scope) 'glob'"]),
    "negative shuffle_seed": (dict(scope="shuffle", shuffle_seed=-1), None,
                              ["shuffle_seed", ">= 0"]),
    "sinkhorn model": (dict(scope="global"),
                       dict(moe_router_load_balancing_type="sinkhorn", moe_aux_loss_coeff=0.0),
                       ["moe_router_load_balancing_type='sinkhorn'", "aux_loss"]),
    "model without balancing": (dict(scope="global"),
                                dict(moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0),
                                ["moe_router_load_balancing_type='none'",
                                 "moe_router_enable_expert_bias"]),
    "coefficient 0": (dict(scope="global"), dict(moe_aux_loss_coeff=0.0),
                      ["moe_aux_loss_coeff=0.0", "> 0"]),
    "negative coefficient": (dict(scope="global"), dict(moe_aux_loss_coeff=-1e-3),
                             ["moe_aux_loss_coeff=-0.001"]),
    "expert bias with shuffle": (dict(scope="shuffle"), AUX_FREE,
                                 ["'shuffle'", "expert-bias", "micro, dp, global"]),
    "negative device_coeff": (dict(scope="micro", device_coeff=-1.0), None,
                              ["device_coeff", ">= 0"]),
    "device_coeff not a number": (dict(scope="global", device_coeff="1e-3"), None,
                                  ["device_coeff", "number"]),
    "device_groups 0": (dict(scope="global", device_groups=0), None,
                        ["device_groups", ">= 1"]),
    "device_groups not an int": (dict(scope="global", device_coeff=1e-3, device_groups=2.0), None,
                                 ["device_groups", "int", "2.0"]),
    "device_groups not dividing the experts": (
        dict(scope="global", device_coeff=1e-3, device_groups=3), dict(num_moe_experts=8),
        ["device_groups", "3 must divide", "experts 8"]),
    "device_coeff at expert-parallel size 1": (
        dict(scope="seq", device_coeff=1e-3), dict(expert_model_parallel_size=1),
        ["device_coeff", "one group", "expert_model_parallel_size", "is 1"]),
    "device_coeff without an LBL": (dict(scope="global", device_coeff=1e-3, device_groups=2),
                                    AUX_FREE, ["device_coeff", "auxiliary-loss-free"]),
    "model with CUDA graphs of the router": (
        dict(scope="global"), dict(cuda_graph_impl="transformer_engine",
                                   cuda_graph_scope="moe_router"),
        ["cuda_graph_impl='transformer_engine'", "['moe_router']", "cuda_graph_scope",
         "--cuda-graph-scope attn"]),
    "model with CUDA graphs of whole layers": (
        dict(scope="micro"), dict(cuda_graph_impl="local"),
        ["cuda_graph_impl='local'", "whole layers", "--cuda-graph-impl none"]),
}

# Quantile balancing (Megatron-Core 0.19+): the same forms, checked where the release has it.
QB = dict(moe_router_load_balancing_type="quantile_balancing", moe_aux_loss_coeff=0.0)
QUANTILE_MEGATRON_LM = {
    "quantile balancing with an aux-loss coefficient": (
        dict(QB, moe_aux_loss_coeff=1e-3), ["--moe-aux-loss-coeff", "must be 0"]),
    "quantile balancing beside an LBL": (
        dict(moe_router_load_balancing_type=["quantile_balancing", "aux_loss"],
             moe_aux_loss_coeff=[0.0, 1e-3]),
        ["--moe-router-load-balancing-type", "single string", "alone"]),
    "quantile balancing beside expert bias": (
        dict(AUX_FREE, **QB), ["--moe-router-enable-expert-bias", "second per-expert bias"]),
    "quantile balancing with router fusion": (
        dict(QB, moe_router_fusion=True), ["--moe-router-fusion"]),
    "quantile balancing with group-limited routing": (
        dict(QB, moe_router_num_groups=2, moe_router_group_topk=1),
        ["--moe-router-num-groups", "--moe-router-group-topk"]),
    "quantile balancing EMA above 1": (
        dict(QB, moe_router_quantile_balancing_ema=1.5),
        ["--moe-router-quantile-balancing-ema", "[0, 1]"]),
    "quantile balancing with N K not a multiple of E": (
        dict(QB, micro_batch_size=1, seq_length=3, moe_router_topk=2),
        ["--micro-batch-size", "--seq-length", "N = 3", "E = 8"]),
    "quantile balancing at seq scope": (
        dict(QB, moe_lbl_scope="seq"), ["'seq'", "micro, dp, global"]),
    "quantile balancing switching to shuffle": (
        dict(QB, moe_lbl_scope="micro", moe_lbl_switch_scope="shuffle",
             moe_lbl_switch_iteration=5), ["'shuffle'", "--moe-lbl-switch-scope"]),
    "quantile balancing with a micro-batch LBL": (
        dict(QB, moe_lbl_micro_coeff=1e-4), ["--moe-lbl-micro-coeff", "no LBL"]),
}
QUANTILE_PYTHON_API = {
    "quantile balancing at shuffle": (dict(scope="shuffle"), QB,
                                      ["'shuffle'", "micro, dp, global"]),
    "quantile balancing with device_coeff": (dict(scope="global", device_coeff=1e-3), QB,
                                             ["device_coeff", "no LBL"]),
    "quantile balancing as a one-element list": (
        dict(scope="global"), dict(QB, moe_router_load_balancing_type=["quantile_balancing"],
                                   moe_aux_loss_coeff=[0.0]),
        ["['quantile_balancing']", "single string"]),
}
# case: fragments; the messages come from workers.quantile_bad_input_messages (1 gloo rank)
QUANTILE_RUNTIME = {
    "a padding mask": ["padding_mask", "quantile balancing", "without padding_mask"],
    "a micro-batch with N K not a multiple of E": ["N = 3 tokens", "not a multiple of E = 8",
                                                   "--micro-batch-size"],
}

# case: (arguments of `python -m megatron_gbl.launch`, fragments the message must contain)
LAUNCHER = {
    "no entry script": (["missing/pretrain_gpt.py", "--moe-lbl-scope", "global"],
                        ["entry script", "pretrain_gpt.py"]),
    "--yaml-cfg with --moe-lbl-* flags": (
        [__file__, "--yaml-cfg", "run.yaml", "--moe-lbl-scope", "global"],
        ["--yaml-cfg", "--moe-lbl-* flags would be ignored", "on the command line"]),
}

# case: fragments; the messages come from workers.bad_input_messages (4 gloo ranks, DP 4)
RUNTIME = {
    "sync_group_size=3 at DP=4": ["sync_group_size", "3 must divide the data-parallel size 4"],
    "dense model": ["no MoE layer", "num_moe_experts"],
    "sinkhorn": ["moe_router_load_balancing_type='sinkhorn'"],
    "none": ["moe_router_load_balancing_type='none'"],
    "coeff 0": ["moe_aux_loss_coeff=0.0"],
    "no step boundary": ["get_forward_backward_func", "megatron_gbl.step(model)"],
    "counted twice": ["counted twice", "1 micro-batch(es)", "MoE layer 1 ran 2"],
    "routing overridden without the base": ["without a call of TopKRouter.routing",
                                            "MoE layer 2 (OwnRoutingRouter)", "super().routing"],
    "two MoE layers with one layer number": ["layer number 1", "--hybrid-layer-pattern"],
    "MoE layers that balance differently": ["balance in different ways", "an LBL",
                                            "no LBL", "moe_router_enable_expert_bias"],
    "step never finished": ["never finished", "finish_step", "discard_step"],
    "before enable": ["start_step", "enable(scope) first"],
}


def megatron_lm_args(overrides: dict) -> argparse.Namespace:
    from megatron_gbl import megatron_lm

    args = megatron_lm.add_arguments(argparse.ArgumentParser()).parse_args([])
    vars(args).update(MEGATRON_LM_BASE)
    vars(args).update(overrides)
    return args


def megatron_lm_message(case: str) -> str:
    from megatron_gbl import megatron_lm

    try:
        megatron_lm.configure(megatron_lm_args({**MEGATRON_LM, **QUANTILE_MEGATRON_LM}[case][0]))
    except ValueError as error:
        return str(error)
    finally:
        _disable()
    raise AssertionError(f"{case}: configure accepted it")


def python_api_message(case: str) -> str:
    """The error of `enable(...)`, or of `enable(..., model=...)` for a model config."""
    from megatron_gbl.config import Settings, router_balancing
    from megatron_gbl_lab.harness import moe_config

    kwargs, overrides, _ = {**PYTHON_API, **QUANTILE_PYTHON_API}[case]
    try:
        settings = Settings(**kwargs)
        if overrides is not None:
            router_balancing(moe_config(**overrides), settings)
    except ValueError as error:
        return str(error)
    raise AssertionError(f"{case}: accepted")


def launcher_message(case: str) -> str:
    """What `python -m megatron_gbl.launch ...` exits with, before it imports Megatron-LM."""
    from megatron_gbl import launch

    try:
        launch.main(LAUNCHER[case][0])
    except SystemExit as exit_:
        return str(exit_.code).split("\n")[0]
    raise AssertionError(f"{case}: the launcher ran the script")


def _disable() -> None:
    import megatron_gbl

    megatron_gbl.disable()


def _flags(overrides: dict) -> str:
    parts = []
    for name, value in overrides.items():
        flag = "--" + name.replace("_", "-")
        if value is None:
            parts.append(f"no {flag}")
        elif value is True:
            parts.append(flag)
        else:
            parts.append(f"{flag} {' '.join(map(str, value)) if isinstance(value, list) else value}")
    return " ".join(f"`{part}`" for part in parts)


def _call(kwargs: dict, overrides) -> str:
    scope = kwargs.get("scope")
    rest = ", ".join(f"{k}={v!r}" for k, v in kwargs.items() if k != "scope")
    model = "" if overrides is None else ", model=<" + ", ".join(
        f"{k}={v!r}" for k, v in overrides.items()) + ">"
    return f"`enable({scope!r}{', ' + rest if rest else ''}{model})`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def has_quantile_balancing() -> bool:
    from megatron_gbl import compat

    return compat.has_quantile_balancing()


def render(runtime_messages: dict, quantile_runtime_messages: dict) -> str:
    lines = [
        "# Bad input: what megatron-gbl rejects, and the message",
        "",
        "Every case fails before training starts (at argument validation, at `enable`, or at",
        "the first training step), with a `ValueError` or `RuntimeError` that names the flag or",
        "argument and the fix. Nothing falls back to micro-batch balancing silently.",
        "Generated by `python tests/bad_input.py > docs/bad_input.md`; the tests check that",
        "every message here is the one the code gives.",
        "",
        "## Megatron-LM flags",
        "",
        "Through `megatron_gbl.launch` or a patched fork, right after Megatron-LM's own",
        "`validate_args`, before the model is built. Each case changes a valid run "
        f"({_flags({k: v for k, v in MEGATRON_LM_BASE.items() if k != 'data_parallel_size'})}, "
        f"data-parallel size {MEGATRON_LM_BASE['data_parallel_size']}) by:",
        "",
        "| # | misconfiguration | flags | message |",
        "|---|---|---|---|",
    ]
    for i, (case, (overrides, _)) in enumerate(MEGATRON_LM.items(), 1):
        lines.append(f"| {i} | {case} | {_flags(overrides)} | "
                     f"{_cell(megatron_lm_message(case))} |")
    lines += ["", "## Python API", "", "At `megatron_gbl.enable(...)` (a model's config: with "
              "`model=`, or at the first training step).", "",
              "| # | misconfiguration | call | message |", "|---|---|---|---|"]
    for i, (case, (kwargs, overrides, _)) in enumerate(PYTHON_API.items(), 1):
        lines.append(f"| {i} | {case} | {_call(kwargs, overrides)} | "
                     f"{_cell(python_api_message(case))} |")
    lines += ["", "## The launcher", "", "`python -m megatron_gbl.launch SCRIPT ARGS...`, before "
              "Megatron-LM is imported.", "", "| # | misconfiguration | arguments | message |",
              "|---|---|---|---|"]
    for i, (case, (argv, _)) in enumerate(LAUNCHER.items(), 1):
        shown = " ".join("SCRIPT" if arg == __file__ else arg for arg in argv)
        lines.append(f"| {i} | {case} | `{shown}` | {_cell(launcher_message(case))} |")
    lines += ["", "## In a real data-parallel run", "",
              "Found at `enable`, at a step boundary or at the first training call, before any "
              "optimizer step (tests/test_api.py, 4 gloo ranks).", "",
              "| # | situation | message |", "|---|---|---|"]
    for i, case in enumerate(RUNTIME, 1):
        lines.append(f"| {i} | {case} | {_cell(runtime_messages[case])} |")
    lines += ["", "## Quantile balancing", "",
              "Megatron-Core 0.19's `quantile_balancing` at a scope (megatron_gbl.quantile) keeps "
              "upstream's constraints, each with a message. On 0.12-0.18 (no quantile "
              "balancing) the message names the installed release (tests/test_quantile.py).", "",
              "| # | misconfiguration | flags, call or situation | message |", "|---|---|---|---|"]
    rows = [(case, _flags(overrides), megatron_lm_message(case))
            for case, (overrides, _) in QUANTILE_MEGATRON_LM.items()]
    rows += [(case, _call(kwargs, overrides), python_api_message(case))
             for case, (kwargs, overrides, _) in QUANTILE_PYTHON_API.items()]
    rows += [(case, "first training call", quantile_runtime_messages[case])
             for case in QUANTILE_RUNTIME]
    for i, (case, given, message) in enumerate(rows, 1):
        lines.append(f"| {i} | {case} | {given} | {_cell(message)} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    import warnings

    warnings.filterwarnings("ignore")
    import workers
    from megatron_gbl_lab.harness import run_gloo

    runtime_messages = run_gloo(workers.bad_input_messages, 4)[0]
    quantile_runtime_messages = run_gloo(workers.quantile_bad_input_messages, 1)[0]
    sys.stdout.write(render(runtime_messages, quantile_runtime_messages))


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main()
