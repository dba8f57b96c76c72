"""Megatron-LM integration: the --moe-lbl-* flags, their validation, and step logging.

Megatron-LM's training code (`megatron.training`: a Megatron-LM checkout, or megatron-core wheels
from 0.17 on) looks these names up at call time, so wrapping them needs no edit to Megatron-LM
(`megatron_gbl.launch` does it):

| hook in `megatron.training`    | Megatron-LM          | what the wrapper adds       |
|--------------------------------|----------------------|-----------------------------|
| `arguments._add_moe_args`      | 0.10-0.19, main, dev | the flags (`add_arguments`) |
| `initialize.validate_args`     | 0.10-0.17            | `configure(args)` after it  |
| `arguments.validate_args`      | 0.18-0.19, main, dev | same (1)                    |
| `training.track_moe_metrics`   | 0.10-0.17            | step metrics, histograms    |
| `MoEMetricsTracker.report` (2) | 0.18-0.19, main, dev | same                        |

(1) called by `parse_and_validate_args`; (2) of `megatron.core.transformer.moe.moe_logging`.
main and dev checked at d98e8a64dd (2026-08-22) and d48bd6be0a (2026-08-21). A patched fork
(patches/) calls `add_arguments` and `configure` natively instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib
import inspect
from typing import Callable, Optional

import torch

from megatron_gbl import compat, metrics, patch, steps
from megatron_gbl.config import Balancing, Settings, check_sync_group_size, router_balancing
from megatron_gbl.scopes import SCOPES

HISTOGRAM_TAG = "moe/tokens_per_expert_layer_{}"
# The parameters of Megatron's MoE logging call that `_log_step` reads or extends.
_LOGGED_PARAMETERS = ("loss_scale", "iteration", "writer", "wandb_writer", "track_names")

# The Megatron-LM hooks' originals (patch.replace); apart from the plugin's own, so that
# megatron_gbl.disable() leaves the flags and the logging in place.
_HOOKS: dict = {}
# (metric names, histogram interval, histogram shape, histogram writers) of install_logging;
# None: not installed.
_LOGGING: Optional[tuple] = None


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the --moe-lbl-* flags to Megatron-LM's argument parser."""
    group = parser.add_argument_group(title="megatron-gbl (global-batch load balancing)")
    group.add_argument(
        "--moe-lbl-scope", choices=SCOPES, default=None,
        help="Token set the load-balancing loss's expert frequencies f_i are counted over: "
             "micro (micro-batch, Megatron's aux_loss), seq (sequence), dp (micro-batch over all "
             "data-parallel ranks), global (global batch: dp plus the gradient-accumulation "
             "buffer), shuffle (micro-batch-many tokens drawn from all ranks' micro-batches). "
             "With --moe-router-enable-expert-bias, micro/dp/global also set the load the "
             "bias is updated from (per micro-batch, or once per step for global); with "
             "--moe-router-load-balancing-type quantile_balancing (Megatron-Core 0.19+), the "
             "tokens its bias's quantile is taken over. "
             "Unset: Megatron's own behaviour.")
    group.add_argument(
        "--moe-lbl-sync-group-size", type=int, default=None,
        help="For dp/global: balance within blocks of this many consecutive data-parallel ranks "
             "(must divide the data-parallel size). Unset: all data-parallel ranks.")
    group.add_argument(
        "--moe-lbl-micro-coeff", type=float, default=0.0,
        help="For dp/global: add a micro-batch load-balancing loss with this coefficient beside "
             "the scoped one (paper Tab. 5 uses 1%% of --moe-aux-loss-coeff).")
    group.add_argument(
        "--moe-lbl-switch-scope", choices=SCOPES, default=None,
        help="Scope to use from --moe-lbl-switch-iteration on (paper Tab. 3, e.g. micro then "
             "global).")
    group.add_argument(
        "--moe-lbl-switch-iteration", type=int, default=None,
        help="Number of iterations trained at --moe-lbl-scope before --moe-lbl-switch-scope "
             "takes over (counted like --train-iters, so resumed runs switch at the same "
             "iteration).")
    group.add_argument(
        "--moe-lbl-blocking-sync", action="store_true",
        help="Wait for the expert-count all-reduce in the router's forward (like upstream) "
             "instead of overlapping it until the layer's backward. Same results.")
    group.add_argument(
        "--moe-lbl-device-coeff", type=float, default=0.0,
        help="Add a device-level load-balancing loss with this coefficient, at any scope "
             "(DeepSeek-V2's, over --moe-lbl-device-groups groups of consecutive experts), "
             "counted per micro-batch over the tokens of one all-to-all (TP x EP). 0: off.")
    group.add_argument(
        "--moe-lbl-device-groups", type=int, default=None,
        help="Groups of consecutive experts the device-level loss and the logged "
             "micro_batch_device_load_violation balance; must divide --num-experts. Unset: "
             "--expert-model-parallel-size (one group per expert-parallel rank).")
    group.add_argument(
        "--moe-lbl-histogram-interval", type=int, default=100,
        help="Log a per-layer tokens-per-expert histogram to TensorBoard / W&B every N "
             "iterations (0: never).")
    return parser


def configure(args: argparse.Namespace) -> None:
    """Check the --moe-lbl-* flags against Megatron's validated args, then enable the plugin.

    Runs before the model is built and before any training; a no-op without --moe-lbl-scope.
    Raises ValueError naming the flag and the fix.
    """
    settings = settings_from_args(args)
    if settings is None:
        return
    balancing = check_run(settings, args, train_iters=getattr(args, "train_iters", None),
                          data_parallel_size=args.data_parallel_size)
    patch.enable(**dataclasses.asdict(settings))
    # Megatron-LM's train() sets args.curr_iteration (0-based, restored on resume) before each
    # step: the scope switch follows it.
    training = importlib.import_module("megatron.training")
    steps.set_iteration(0, source=lambda: getattr(training.get_args(), "curr_iteration", None))
    # From the arguments, not from this rank's routers: a pipeline stage without MoE layers
    # joins the same reductions with the same shapes.
    install_logging(metric_names(settings, balancing), args.moe_lbl_histogram_interval,
                    (compat.tracker_num_layers(args), args.num_experts))


def settings_from_args(args: argparse.Namespace) -> Optional[Settings]:
    """The --moe-lbl-* flags as Settings (None without --moe-lbl-scope), checked on their own.

    Raises ValueError naming the flag and the fix.
    """
    scope = getattr(args, "moe_lbl_scope", None)
    if scope is None:
        given = [flag for flag, value in (
            ("--moe-lbl-sync-group-size", args.moe_lbl_sync_group_size),
            ("--moe-lbl-micro-coeff", args.moe_lbl_micro_coeff or None),
            ("--moe-lbl-switch-scope", args.moe_lbl_switch_scope),
            ("--moe-lbl-switch-iteration", args.moe_lbl_switch_iteration),
            ("--moe-lbl-device-coeff", args.moe_lbl_device_coeff or None),
            ("--moe-lbl-device-groups", args.moe_lbl_device_groups)) if value is not None]
        if given:
            raise ValueError(f"megatron_gbl: {given[0]} needs --moe-lbl-scope (the scope to "
                             "start from); add it, or drop the flag")
        return None
    check_histogram_interval(args.moe_lbl_histogram_interval)
    return Settings(scope, args.moe_lbl_sync_group_size, args.moe_lbl_micro_coeff,
                    args.moe_lbl_blocking_sync, args.moe_lbl_switch_scope,
                    args.moe_lbl_switch_iteration, shuffle_seed=getattr(args, "seed", 0),
                    device_coeff=args.moe_lbl_device_coeff,
                    device_groups=args.moe_lbl_device_groups)


def check_histogram_interval(interval: int) -> None:
    """--moe-lbl-histogram-interval: every N iterations, 0 for never."""
    if interval < 0:
        raise ValueError(
            f"megatron_gbl: --moe-lbl-histogram-interval must be >= 0 (0 turns histograms off), "
            f"got {interval}")


def check_run(settings: Settings, config, *, train_iters: Optional[int],
              data_parallel_size: int) -> Balancing:
    """Check `settings` against the run: its MoE config (Megatron-LM's args, or a
    TransformerConfig), its length and its data-parallel size. Returns what the routers balance
    with; raises ValueError naming the flag and the fix."""
    if not (getattr(config, "num_experts", None) or getattr(config, "num_moe_experts", None)):
        raise ValueError(
            f"megatron_gbl: --moe-lbl-scope={settings.scope} needs an MoE model, but "
            "--num-experts is not set; add --num-experts (and --moe-router-topk), or drop "
            "--moe-lbl-scope")
    balancing = router_balancing(config, settings)
    if settings.switch_iteration is not None and train_iters \
            and settings.switch_iteration >= train_iters:
        raise ValueError(
            f"megatron_gbl: --moe-lbl-switch-iteration {settings.switch_iteration} is not below "
            f"--train-iters {train_iters}, so --moe-lbl-switch-scope would never take over; "
            "lower it, or drop the switch")
    if settings.sync_group_size is not None:
        check_sync_group_size(settings.sync_group_size, data_parallel_size)
    return balancing


def metric_names(settings: Settings, balancing: Balancing) -> tuple[str, ...]:
    """The plugin's step metrics a run with these settings logs, on every rank."""
    names = metrics.names(balancing.lbl_type is not None,
                          balancing.bias_update_rate is not None,
                          balancing.quantile_ema is not None)
    if settings.device_coeff:
        names += (metrics.DEVICE_LBL,)
    return names


def install() -> None:
    """Wrap Megatron-LM's parser and validation so the flags exist and take effect."""
    arguments = importlib.import_module("megatron.training.arguments")
    patch.replace(arguments, "_add_moe_args", lambda original: functools.wraps(original)(
        lambda parser: add_arguments(original(parser))), _HOOKS)
    initialize = importlib.import_module("megatron.training.initialize")
    for owner in (initialize, arguments):
        if hasattr(owner, "validate_args"):
            patch.replace(owner, "validate_args", lambda original: functools.wraps(original)(
                lambda args, *a, **k: _validate(original, args, *a, **k)), _HOOKS)


def install_logging(names: tuple[str, ...], histogram_interval: int,
                    histogram_shape: tuple[int, int],
                    histogram_writers: Optional[Callable[[], tuple]] = None) -> None:
    """Report the plugin's step metrics `names` through Megatron's per-iteration MoE logging
    (TensorBoard, W&B, the console), and every `histogram_interval` iterations the tokens per
    expert of each layer; `histogram_shape` is (layers incl. MTP, experts) of the whole model.
    Megatron-LM's and Megatron-Bridge's loops both log through this hook. The histograms go to
    the TensorBoard and W&B writers the tracker gets, or to those `histogram_writers()`
    returns (Bridge hands the tracker a scalars-only writer when MLflow or Comet logs too).

    Checked here, at start-up, rather than at the first logged iteration: the hook's
    parameters must be the ones the plugin fills in. Calling it again replaces the settings.
    """
    global _LOGGING
    owner, name = _logging_hook()
    missing = [parameter for parameter in _LOGGED_PARAMETERS
               if parameter not in inspect.signature(getattr(owner, name)).parameters]
    if missing:
        raise RuntimeError(
            f"megatron_gbl: Megatron's MoE logging {owner.__name__}.{name} (megatron-core "
            f"{compat.megatron_core_release()}) has no parameter {missing[0]!r}, so the plugin's "
            "metrics cannot be logged with this release; run without --moe-lbl-scope, or use "
            "a release the plugin supports (docs/versions.md)"
        )
    _LOGGING = (names, histogram_interval, histogram_shape, histogram_writers)
    patch.replace(owner, name, lambda original: functools.wraps(original)(
        lambda *a, **k: _log_step(original, *a, **k)), _HOOKS)


def uninstall() -> None:
    """Remove every Megatron-LM hook (flags, validation, logging)."""
    global _LOGGING
    patch.restore(_HOOKS)
    _LOGGING = None


def _validate(original, args, *rest, **kwargs):
    result = original(args, *rest, **kwargs)
    configure(args)
    return result


def _logging_hook() -> tuple[object, str]:
    """The per-iteration MoE logging call of Megatron-LM's training_log: Megatron-Core's
    MoEMetricsTracker.report (0.18+), else megatron.training's track_moe_metrics. The tracker
    first: Megatron-Bridge's loop reports through it too, without Megatron-LM's training
    module."""
    if compat.moe_logging is not None:
        return compat.moe_logging.MoEMetricsTracker, "report"
    training = importlib.import_module("megatron.training.training")
    return training, "track_moe_metrics"


def _log_step(original, *args, **kwargs):
    """Megatron-LM's per-iteration MoE logging, with this step's plugin metrics added first
    (while the plugin is enabled).

    Every pipeline stage, with MoE layers or without, joins the same collectives in the same
    order: the histogram sum over the pipeline group, then Megatron's reduction of the same
    names.
    """
    if _LOGGING is None or not patch.is_enabled():
        return original(*args, **kwargs)
    names, histogram_interval, histogram_shape, histogram_writers = _LOGGING
    bound = inspect.signature(original).bind(*args, **kwargs)
    call = bound.arguments
    routers = steps.routers()
    step = metrics.step_metrics(routers)  # collectives within this stage only
    if step is not None:
        # The tracker multiplies everything by loss_scale (1 / micro-batches): undo it for
        # values that are per step, not sums over micro-batches. Averaging over TP x DP x CP
        # gives the data-parallel mean of the micro-batch values and leaves the global ones.
        router = routers[0]
        for name, values_L in step.values.items():
            compat.log_to_tracker(name, values_L / call["loss_scale"], step.layer_numbers,
                                  router.config, avg_group=compat.tp_dp_cp_group(router))
    # From the configuration, not from this rank's metrics: the same names on every stage.
    if call.get("track_names") is not None:
        call["track_names"] = list(call["track_names"]) + list(names)
    iteration = call["iteration"]
    if histogram_interval and iteration % histogram_interval == 0:
        writers = histogram_writers() if histogram_writers is not None \
            else (call.get("writer"), call.get("wandb_writer"))
        _log_histograms(step, histogram_shape, iteration, *writers)
    return original(*bound.args, **bound.kwargs)


def _log_histograms(step: Optional[metrics.StepMetrics], shape: tuple, iteration: int, writer,
                    wandb_writer) -> None:
    """Tokens per expert of every layer as a histogram with one bucket per expert.

    Every pipeline stage contributes its own layers (a sum over the pipeline group, as
    Megatron does for its scalars; zeros from a stage without MoE layers); the last rank holds
    the writers. `shape`: (layers, experts) of the whole model.
    """
    num_layers, num_experts = shape
    if step is not None:
        device = step.global_tokens_per_expert.device
    else:  # where Megatron's tracker puts a stage's placeholders
        device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
    counts_NE = torch.zeros(num_layers, num_experts, dtype=torch.int64, device=device)
    if step is not None:
        counts_NE[[n - 1 for n in step.layer_numbers]] = step.global_tokens_per_expert
    torch.distributed.all_reduce(counts_NE, group=compat.pipeline_group())
    if writer is None and wandb_writer is None:
        return
    experts_E = torch.arange(num_experts, dtype=torch.float64)
    for layer, counts_E in enumerate(counts_NE.double().cpu()):
        if counts_E.sum() == 0:
            continue  # a dense layer
        tag = HISTOGRAM_TAG.format(layer)
        if writer is not None:
            writer.add_histogram_raw(
                tag, min=0, max=num_experts - 1, num=int(counts_E.sum()),
                sum=float((experts_E * counts_E).sum()),
                sum_squares=float((experts_E ** 2 * counts_E).sum()),
                bucket_limits=(experts_E + 0.5).tolist(), bucket_counts=counts_E.tolist(),
                global_step=iteration)
        if wandb_writer is not None:
            import wandb

            edges = torch.arange(num_experts + 1, dtype=torch.float64) - 0.5
            wandb_writer.log(
                {tag: wandb.Histogram(np_histogram=(counts_E.numpy(), edges.numpy()))}, iteration)
