"""Megatron-Bridge integration: global-batch balancing in Bridge's own training loop.

In Python, a callback for Bridge's `pretrain` and `finetune`:

    from megatron_gbl.bridge import GlobalBatchBalancing
    pretrain(config, forward_step, callbacks=[GlobalBatchBalancing("global")])

For a recipe script (Bridge's scripts/training/run_recipe.py or any script that calls
`pretrain` / `finetune`), one word and one flag, any --moe-lbl-* flag of the Megatron-LM
integration (megatron_gbl.megatron_lm):

    torchrun --nproc-per-node 8 -m megatron_gbl.bridge run_recipe.py <its arguments> \\
        --moe-lbl-scope=global

How the callback meets Bridge's loop (megatron-bridge 0.6.2, training/train.py):
- `train()` takes its schedule from `get_forward_backward_func()` before any callback fires,
  so making the callback enables the plugin: the schedules are wrapped by then and mark each
  optimizer step themselves (patch.py), as in Megatron-LM's loop;
- `on_train_start` checks the settings against the ConfigContainer and the model, follows
  Bridge's iteration (`state.train_state.step`, restored on resume) for the scope switch, and
  adds the plugin's step metrics to Megatron-Core's MoE tracker report, which Bridge's
  `training_log` writes to TensorBoard, W&B, MLflow and Comet: the names of the Megatron-LM
  integration;
- `on_train_end` disables the plugin.

Bridge is imported on first use of `GlobalBatchBalancing` (PEP 562): this module imports, and
the plugin works, without Bridge installed.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import os
import runpy
import sys
from typing import Optional

from megatron_gbl import compat, megatron_lm, patch, steps
from megatron_gbl.config import Balancing, Settings
from megatron_gbl.launch import FlagParser as _FlagParser
from megatron_gbl.launch import parse_flags
from megatron_gbl.launch import stop_before_training as _stop

USAGE = "python -m megatron_gbl.bridge SCRIPT [SCRIPT ARGS ...] [--moe-lbl-* flags]"
DESCRIPTION = (
    "SCRIPT trains through Megatron-Bridge's pretrain or finetune (a recipe script such as "
    "Bridge's scripts/training/run_recipe.py). The --moe-lbl-* flags below are those of "
    "`python -m megatron_gbl.launch`; every other argument goes to SCRIPT.")
# (module, attribute) of Bridge's training entry points a recipe script calls.
ENTRY_POINTS = (("megatron.bridge.training.pretrain", "pretrain"),
                ("megatron.bridge.training", "pretrain"),  # the package re-exports it
                ("megatron.bridge.training.finetune", "finetune"))


class _GlobalBatchBalancing:
    """Megatron-Bridge callback: global-batch load balancing for one `pretrain` / `finetune`.

    `scope` and `settings`: those of `megatron_gbl.enable` (sync_group_size, micro_coeff,
    switch_scope, switch_iteration, device_coeff, ...), checked here the same way;
    `histogram_interval`: a tokens-per-expert histogram every N iterations (0: never), as
    --moe-lbl-histogram-interval. Making it enables the plugin (Bridge binds its schedule
    before the first callback fires); `on_train_start` checks the run's config, `on_train_end`
    disables the plugin again, so make one per `pretrain` / `finetune` call.
    """

    def __init__(self, scope: str = "global", *, histogram_interval: int = 100, **settings):
        self.settings = Settings(scope, **settings)
        megatron_lm.check_histogram_interval(histogram_interval)
        self.histogram_interval = histogram_interval
        patch.enable(**dataclasses.asdict(self.settings))

    def on_train_start(self, context) -> None:
        if not patch.is_enabled():
            raise RuntimeError(
                "megatron_gbl: this GlobalBatchBalancing was disabled (by the on_train_end of a "
                "finished pretrain / finetune, or by megatron_gbl.disable()) before Bridge bound "
                "its schedule; make a new GlobalBatchBalancing for each pretrain / finetune call")
        state = context.state
        config = state.cfg
        try:
            balancing = check(self.settings, config)
            patch.enable(**dataclasses.asdict(self.settings), model=context.model)
        except Exception:
            patch.disable()  # a rejected run leaves upstream untouched
            raise
        steps.set_iteration(state.train_state.step, source=lambda: state.train_state.step)
        # From the config, not from this rank's routers: a pipeline stage without MoE layers
        # joins the same reductions with the same shapes.
        megatron_lm.install_logging(
            megatron_lm.metric_names(self.settings, balancing), self.histogram_interval,
            (compat.tracker_num_layers(config.model), config.model.num_moe_experts),
            histogram_writers=lambda: (state.tensorboard_logger, state.wandb_logger))

    def on_train_end(self, context) -> None:
        patch.disable()


def __getattr__(name: str):
    """`GlobalBatchBalancing`, made on first use (PEP 562)."""
    if name != "GlobalBatchBalancing":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return _callback_class()


def _callback_class() -> type:
    """GlobalBatchBalancing: the callback above as a subclass of Bridge's Callback."""
    if "GlobalBatchBalancing" not in globals():
        from megatron.bridge.training.callbacks import Callback

        globals()["GlobalBatchBalancing"] = type(
            "GlobalBatchBalancing", (_GlobalBatchBalancing, Callback),
            {"__module__": __name__, "__doc__": _GlobalBatchBalancing.__doc__})
    return globals()["GlobalBatchBalancing"]


def check(settings: Settings, config) -> Balancing:
    """Check `settings` against a Bridge ConfigContainer: its model (`config.model`, a
    TransformerConfig), `train.train_iters` and data-parallel size, as the Megatron-LM
    integration checks Megatron-LM's args. Raises ValueError naming the option and the fix."""
    from megatron.bridge.utils.common_utils import get_world_size_safe

    return megatron_lm.check_run(
        settings, config.model, train_iters=config.train.train_iters,
        data_parallel_size=config.get_data_parallel_size(get_world_size_safe()))


def install(settings: Settings, histogram_interval: int) -> None:
    """Make every call of Bridge's `pretrain` and `finetune` in this process add a
    GlobalBatchBalancing with `settings` (`shuffle_seed`: the run's `rng.seed`, as the
    Megatron-LM integration takes --seed) after checking them against the call's config (what
    `-m megatron_gbl.bridge` does before it runs the script). A second call replaces the
    settings."""
    # All imported before any is wrapped: finetune binds the unwrapped pretrain at its import.
    owners = [importlib.import_module(module_name) for module_name, _ in ENTRY_POINTS]
    for owner, (_, name) in zip(owners, ENTRY_POINTS):
        original = getattr(owner, name)
        if getattr(original, "_megatron_gbl", False):
            original = original.__wrapped__
        setattr(owner, name, _with_balancing(original, settings, histogram_interval))


def _with_balancing(original, settings: Settings, histogram_interval: int):
    @functools.wraps(original)
    def train(config, forward_step_func, callbacks=None):
        run_settings = dataclasses.replace(settings, shuffle_seed=config.rng.seed)
        try:
            check(run_settings, config)
            _check_no_callback_in(callbacks)
        except ValueError as error:
            _stop(error)
        callback = _callback_class()(**dataclasses.asdict(run_settings),
                                     histogram_interval=histogram_interval)
        return original(config, forward_step_func, callbacks=_added(callback, callbacks))

    train._megatron_gbl = True
    return train


def _check_no_callback_in(callbacks) -> None:
    """`callbacks` (Bridge's argument: None, a list of Callbacks or a CallbackManager) holds no
    GlobalBatchBalancing of its own."""
    from megatron.bridge.training.callbacks import CallbackManager

    registered = callbacks.list_callbacks("on_train_start") \
        if isinstance(callbacks, CallbackManager) else callbacks or []
    if any(isinstance(getattr(entry, "__self__", entry), _GlobalBatchBalancing)
           for entry in registered):
        raise ValueError(
            "megatron_gbl: the script passes its own GlobalBatchBalancing to pretrain / "
            "finetune, and the --moe-lbl-* flags add another; drop the flags or the callback")


def _added(callback, callbacks):
    from megatron.bridge.training.callbacks import CallbackManager

    if isinstance(callbacks, CallbackManager):
        callbacks.add(callback)
        return callbacks
    return [*(callbacks or []), callback]


def main(argv: Optional[list[str]] = None) -> None:
    """`python -m megatron_gbl.bridge SCRIPT ...`: strip the --moe-lbl-* flags, check them, add
    the callback to Bridge's pretrain and finetune, run SCRIPT as `__main__` with the rest."""
    argv = sys.argv[1:] if argv is None else argv
    flags_parser = megatron_lm.add_arguments(
        _FlagParser(usage=USAGE, description=DESCRIPTION, add_help=False, allow_abbrev=False))
    if not argv or argv[0] in ("-h", "--help"):
        print(flags_parser.format_help())
        return
    script, *arguments = argv
    flags, settings, script_arguments = parse_flags(flags_parser, arguments)
    misspelt = [argument for argument in script_arguments if argument.startswith("--moe-lbl-")]
    if misspelt:
        _stop(f"megatron_gbl: unknown flag {misspelt[0].split('=')[0]}; `python -m "
              "megatron_gbl.bridge --help` lists the --moe-lbl-* flags")
    if not os.path.isfile(script):
        _stop(f"megatron_gbl.bridge: script {script!r} not found; pass the recipe script "
              "(e.g. Megatron-Bridge's scripts/training/run_recipe.py) as the first argument")
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))  # as `python SCRIPT` does
    if settings is not None:
        install(settings, flags.moe_lbl_histogram_interval)
    sys.argv = [script, *script_arguments]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    # The package's module, not this __main__ copy: scripts that import megatron_gbl.bridge
    # then see the same callback class.
    importlib.import_module("megatron_gbl.bridge").main()
