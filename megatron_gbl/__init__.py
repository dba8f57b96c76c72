"""megatron-gbl: global-batch load balancing for Megatron-Core MoE routers.

Qiu et al. 2025 (arXiv 2501.11873): compute the load-balancing loss's expert frequencies f_i
over the global batch (all data-parallel ranks, all gradient-accumulation micro-batches)
instead of one micro-batch.

    import megatron_gbl
    megatron_gbl.enable(scope="global")   # before or after the model is built
    ...                                   # unchanged Megatron-Core training
    megatron_gbl.disable()                # upstream behaviour again, exactly

Public API:
    enable(scope, *, sync_group_size=None, model=None)  scopes: micro, seq, dp, global
    disable()
    enabled(scope, **kw)          context manager around enable/disable
    is_enabled()
    start_step(model, num_microbatches=None)  step boundary for custom training loops
    balance_bsz(model)            {layer_number: BalanceBSZ(tokens, sequences)}
    Settings, BalanceBSZ, SCOPES
"""

from megatron_gbl.config import SCOPES, Settings
from megatron_gbl.lbl import BalanceBSZ
from megatron_gbl.patch import balance_bsz, disable, enable, enabled, is_enabled, start_step

__all__ = [
    "SCOPES",
    "BalanceBSZ",
    "Settings",
    "balance_bsz",
    "disable",
    "enable",
    "enabled",
    "is_enabled",
    "start_step",
]
__version__ = "0.1.0"
