"""megatron-gbl: global-batch load balancing for Megatron-Core MoE routers.

Qiu et al. 2025 (arXiv 2501.11873): compute the load-balancing loss's expert frequencies f_i
over the global batch (all data-parallel ranks, all gradient-accumulation micro-batches)
instead of one micro-batch.

    import megatron_gbl
    megatron_gbl.enable(scope="global")   # before or after the model is built
    ...                                   # unchanged Megatron-Core training
    megatron_gbl.disable()                # upstream behaviour again, exactly

Public API:
    enable(scope, *, sync_group_size=None, micro_coeff=0.0, model=None)
                                  scopes: micro, seq, dp, global
    disable()
    enabled(scope, **kw)          context manager around enable/disable
    is_enabled()
    start_step(model, num_microbatches=None)  step boundary for custom training loops
    balance_bsz(model)            {layer_number: BalanceBSZ(tokens, sequences)}
    step_metrics(model=None)      micro/global LBL, load violation, Balance BSZ of the last step
    Settings, BalanceBSZ, StepMetrics, SCOPES

Megatron-LM: `python -m megatron_gbl.launch pretrain_gpt.py ... --moe-lbl-scope=global`
(megatron_gbl.megatron_lm holds the flags and the logging hook).
"""

from megatron_gbl.config import SCOPES, Settings
from megatron_gbl.lbl import BalanceBSZ
from megatron_gbl.metrics import StepMetrics
from megatron_gbl.patch import (
    balance_bsz, disable, enable, enabled, is_enabled, start_step, step_metrics,
)

__all__ = [
    "SCOPES",
    "BalanceBSZ",
    "Settings",
    "StepMetrics",
    "balance_bsz",
    "disable",
    "enable",
    "enabled",
    "is_enabled",
    "start_step",
    "step_metrics",
]
__version__ = "0.1.0"
