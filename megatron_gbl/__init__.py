"""megatron-gbl: global-batch load balancing for Megatron-Core MoE routers.

Qiu et al. 2025 (arXiv 2501.11873): compute the load-balancing loss's expert frequencies f_i
over the global batch (all data-parallel ranks, all gradient-accumulation micro-batches)
instead of one micro-batch.

    import megatron_gbl
    megatron_gbl.enable(scope="global")   # before or after the model is built
    ...                                   # unchanged Megatron-Core training
    megatron_gbl.disable()                # upstream behaviour again, exactly

Public API:
    enable(scope, *, sync_group_size=None, micro_coeff=0.0, blocking_sync=False,
           switch_scope=None, switch_iteration=None, shuffle_seed=0, device_coeff=0.0,
           device_groups=None, model=None)
                                  scopes: micro, seq, dp, global, shuffle
    disable()
    enabled(scope, **kw)          context manager around enable/disable
    is_enabled()
    step(model, num_microbatches=None)     a custom loop's step: start_step, then finish_step
    start_step / finish_step / discard_step(model)   the same, one call at a time
    set_iteration(iteration)      the index of the next step (scope switch after a resume)
    balance_bsz(model)            {layer_number: BalanceBSZ(tokens, sequences)}
    step_metrics(model=None)      LBLs, load violations, expert bias, Balance BSZ of the last step
    Settings, BalanceBSZ, StepMetrics, SCOPES

Auxiliary-loss-free balancing (moe_router_enable_expert_bias) takes the scope too: the expert
bias is updated from micro-batch (micro, dp) or global-batch (global) expert load. So does
Megatron-Core 0.19's quantile balancing: its bias is solved from the quantiles of a micro-batch
(micro, upstream's), a data-parallel micro-batch (dp) or the global batch (global).

Megatron-LM: `python -m megatron_gbl.launch pretrain_gpt.py ... --moe-lbl-scope=global`
(megatron_gbl.megatron_lm holds the flags and the logging hook).
"""

import importlib

# Public name -> the module that defines it. Imported on first use (PEP 562), so that
# `megatron_gbl.scopes` (and the lab's command line) load without torch and Megatron-Core.
_PUBLIC = {
    "SCOPES": "megatron_gbl.scopes",
    "BalanceBSZ": "megatron_gbl.lbl",
    "Settings": "megatron_gbl.config",
    "StepMetrics": "megatron_gbl.metrics",
    **dict.fromkeys(("disable", "enable", "enabled", "is_enabled"), "megatron_gbl.patch"),
    **dict.fromkeys(("balance_bsz", "discard_step", "finish_step", "set_iteration", "start_step",
                     "step", "step_metrics"), "megatron_gbl.steps"),
}
__all__ = sorted(_PUBLIC)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'megatron_gbl' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
