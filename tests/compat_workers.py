"""Rank bodies of tests/test_compat.py: real Megatron-Core routers and MoE layers of the
installed release."""

from __future__ import annotations

from megatron_gbl_lab import harness


def optional_attributes(rank: int, world_size: int) -> dict:
    """Which of the optional attributes the plugin reads a real router and a real token
    dispatcher of this release set: name -> present."""
    harness.init_model_parallel()
    model = harness.build_gpt_moe(harness.moe_config(num_layers=1))
    router, = harness.routers_of(model)
    layer = next(module for module in model.modules()
                 if getattr(module, "router", None) is router)
    from megatron_gbl import compat

    present = {name: name in vars(router) for name in compat.ROUTER_ATTRIBUTE_SINCE}
    present["token_dispatcher.tp_ep_group"] = \
        getattr(layer.token_dispatcher, "tp_ep_group", None) is not None
    harness.destroy_model_parallel()
    return present
