"""Rank bodies of tests/test_step_metrics.py: train a real GPT-MoE (or HybridModel) through
get_forward_backward_func, then report the step through Megatron's own per-iteration MoE logging
with the plugin's hook in it, as Megatron-LM's training_log does."""

from __future__ import annotations

import importlib.util
import inspect

import megatron_gbl
import workers
from megatron_gbl import compat, megatron_lm, metrics
from megatron_gbl.config import router_balancing
from megatron_gbl_lab import harness


def megatron_logging_available() -> bool:
    """Whether this release has the per-iteration MoE logging call the plugin hooks: Megatron-
    Core's MoEMetricsTracker.report (0.18+) or megatron.training's track_moe_metrics."""
    return compat.moe_logging is not None \
        or importlib.util.find_spec("megatron.training") is not None


class RecordingWriter:
    """What a TensorBoard SummaryWriter receives: the last scalar of every tag."""

    def __init__(self):
        self.scalars: dict[str, float] = {}

    def add_scalar(self, tag, value, iteration):
        self.scalars[tag] = float(value)

    def add_histogram_raw(self, tag, **kwargs):
        pass


def report_through_megatron(config, names: tuple, iteration: int) -> dict:
    """Megatron-LM's per-iteration MoE logging call (training_log's), with the plugin's hook
    installed as configure() installs it: the TensorBoard scalars it writes, per layer too."""
    megatron_lm.install_logging(names, 0, (compat.tracker_num_layers(config),
                                           config.num_moe_experts))
    return _report(config, iteration)


def _report(config, iteration: int) -> dict:
    """The scalars of Megatron's per-iteration MoE logging call, as training_log makes it."""
    owner, name = megatron_lm._logging_hook()
    report = getattr(owner, name)
    if isinstance(owner, type):  # MoEMetricsTracker.report: a method of the one tracker
        report = getattr(compat.moe_logging.get_moe_metrics_tracker(), name)
    writer = RecordingWriter()
    offered = dict(loss_scale=1.0, iteration=iteration, writer=writer, wandb_writer=None,
                   total_loss_dict={}, per_layer_logging=True, force_initialize=True,
                   track_names=[], num_layers=config.num_layers,
                   moe_layer_freq=config.moe_layer_freq,
                   mtp_num_layers=getattr(config, "mtp_num_layers", None))
    parameters = inspect.signature(report).parameters
    report(**{key: value for key, value in offered.items() if key in parameters})
    return writer.scalars


def metrics_run(rank: int, world_size: int, spec: dict) -> dict:
    """spec["steps"] steps of a model (spec: scope, settings, config, pattern for a
    HybridModel, pp, frozen: indices of the routers whose expert bias is frozen, microbatches,
    seq, bsz), then the step's metrics through Megatron's logging where this release has it.

    Returns the plugin's StepMetrics (None on a stage without MoE layers), the scalars
    Megatron's logging wrote, and every router's expert bias before and after training."""
    harness.init_model_parallel(pipeline_model_parallel_size=spec.get("pp", 1))
    config = harness.moe_config(**spec.get("config", {}))
    if spec.get("pattern"):
        model = harness.build_hybrid_moe(config, spec["pattern"], max_sequence_length=spec["seq"])
    else:
        model = harness.build_gpt_moe(config, max_sequence_length=spec["seq"])
    try:
        megatron_gbl.enable(spec["scope"], model=model, **spec.get("settings", {}))
    except ValueError as error:
        megatron_gbl.disable()
        harness.destroy_model_parallel()
        return {"refused": str(error)}
    routers = harness.routers_of(model)
    for index in spec.get("frozen", ()):
        routers[index].frozen_expert_bias = True  # what 0.19's --freeze-all-layers sets
    biases_before = [router.expert_bias.clone() for router in routers
                     if router.expert_bias is not None]
    compat.clear_tracker()
    workers._train(model, None, range(spec.get("steps", 2)), spec)
    # From the configuration, as configure() takes them from the arguments: a stage without
    # MoE layers logs the same names.
    balancing = router_balancing(config)
    names = metrics.names(balancing.lbl_type is not None, balancing.bias_update_rate is not None)
    step = megatron_gbl.step_metrics(model)
    scalars = report_through_megatron(config, names, 2) if megatron_logging_available() else None
    result = {
        "layer_numbers": None if step is None else step.layer_numbers,
        "values": None if step is None else step.values,
        "names": names,
        "scalars": scalars,
        "biases_before": biases_before,
        "biases_after": [router.expert_bias.clone() for router in routers
                         if router.expert_bias is not None],
    }
    megatron_gbl.disable()
    megatron_lm.uninstall()
    harness.destroy_model_parallel()
    return result


def metrics_runs(rank: int, world_size: int, specs: list) -> list:
    return [metrics_run(rank, world_size, spec) for spec in specs]


def reenable_run(rank: int, world_size: int, spec: dict) -> list:
    """Megatron-LM's start-up (megatron_lm.configure with the run's arguments: the plugin and
    its logging hook), a step, then disable() and enable() again in the same process, as a
    custom loop or a callback may, and another step: the metric names Megatron's logging
    wrote after each step."""
    import argparse

    from megatron.training import global_vars

    harness.init_model_parallel()
    config = harness.moe_config()
    model = harness.build_gpt_moe(config, max_sequence_length=spec["seq"])
    args = megatron_lm.add_arguments(argparse.ArgumentParser()).parse_args([])
    vars(args).update(moe_lbl_scope="global", num_experts=config.num_moe_experts,
                      moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=1e-2,
                      moe_router_topk=config.moe_router_topk, data_parallel_size=world_size,
                      num_layers=config.num_layers, moe_lbl_histogram_interval=0)
    global_vars.set_args(args)  # configure's scope switch reads curr_iteration from it
    megatron_lm.configure(args)
    logged = []
    for step in range(2):
        if step:
            megatron_gbl.disable()
            megatron_gbl.enable("global", model=model)
        compat.clear_tracker()
        workers._train(model, None, [step], spec)
        logged.append(sorted(_report(config, step)))
    megatron_gbl.disable()
    megatron_lm.uninstall()
    return logged
