"""enable/disable contract and bad input: clear errors that name the option and the fix."""

import pytest

import megatron_gbl
import workers
from megatron.core.pipeline_parallel import schedules
from megatron.core.transformer.moe.router import TopKRouter
from megatron_gbl import compat
from megatron_gbl.harness import moe_config, run_gloo

switch_name = compat.upstream_lbl_switch()[0]


def test_enable_is_idempotent_and_disable_restores_originals():
    originals = {name: TopKRouter.__dict__[name] for name in ("routing", switch_name)}
    schedule = schedules.forward_backward_no_pipelining
    try:
        megatron_gbl.enable("global")
        patched = TopKRouter.__dict__["routing"]
        assert patched is not originals["routing"] and patched.__wrapped__ is originals["routing"]
        assert schedules.forward_backward_no_pipelining.__wrapped__ is schedule
        megatron_gbl.enable("global")
        megatron_gbl.enable("dp")
        assert TopKRouter.__dict__["routing"] is patched  # never stacked
        assert megatron_gbl.is_enabled()
    finally:
        megatron_gbl.disable()
    assert not megatron_gbl.is_enabled()
    for name, original in originals.items():
        assert TopKRouter.__dict__[name] is original
    assert schedules.forward_backward_no_pipelining is schedule
    megatron_gbl.disable()  # a second disable is harmless


def test_enabled_context_manager_disables_on_error():
    with pytest.raises(KeyError):
        with megatron_gbl.enabled("micro"):
            assert megatron_gbl.is_enabled()
            raise KeyError("boom")
    assert not megatron_gbl.is_enabled()


@pytest.mark.parametrize("kwargs, words", [
    (dict(scope="batch"), ["scope (--moe-lbl-scope) 'batch'", "micro, seq, dp, global"]),
    (dict(scope="micro", sync_group_size=8), ["sync_group_size", "8", "'dp' or 'global'"]),
    (dict(scope="dp", sync_group_size=0), ["sync_group_size", "positive"]),
    (dict(scope="seq", micro_coeff=1e-4), ["micro_coeff", "'dp' or 'global'"]),
    (dict(scope="global", micro_coeff=-1.0), ["micro_coeff", ">= 0"]),
    (dict(scope="global", micro_coeff="1e-4"), ["micro_coeff", "number"]),
])
def test_bad_settings_fail_at_enable(kwargs, words):
    with pytest.raises(ValueError) as info:
        megatron_gbl.enable(**kwargs)
    assert all(word in str(info.value) for word in words)
    assert not megatron_gbl.is_enabled()


@pytest.mark.parametrize("overrides, words", [
    (dict(moe_router_load_balancing_type="sinkhorn", moe_aux_loss_coeff=0.0),
     ["moe_router_load_balancing_type='sinkhorn'", "aux_loss"]),
    (dict(moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0),
     ["moe_router_load_balancing_type='none'"]),
    (dict(moe_aux_loss_coeff=0.0), ["moe_aux_loss_coeff=0.0", "> 0"]),
    (dict(moe_aux_loss_coeff=-1e-3), ["moe_aux_loss_coeff=-0.001"]),
])
def test_router_config_errors(overrides, words):
    from megatron_gbl.config import router_balancing

    with pytest.raises(ValueError) as info:
        router_balancing(moe_config(**overrides))
    assert all(word in str(info.value) for word in words), str(info.value)


def test_router_config_takes_the_users_type_and_coefficient():
    from megatron_gbl.config import Balancing, router_balancing

    assert router_balancing(moe_config(moe_aux_loss_coeff=3e-3)) == Balancing("aux_loss", 3e-3, None)
    assert router_balancing(moe_config(moe_router_load_balancing_type="seq_aux_loss")) == \
        Balancing("seq_aux_loss", 1e-2, None)


def test_errors_in_a_real_data_parallel_run():
    messages = run_gloo(workers.bad_input_messages, 4)[0]
    expected = {
        "sync_group_size=3 at DP=4": ["sync_group_size", "3 must divide the data-parallel size 4"],
        "dense model": ["no MoE layer", "num_moe_experts"],
        "sinkhorn": ["moe_router_load_balancing_type='sinkhorn'"],
        "none": ["moe_router_load_balancing_type='none'"],
        "coeff 0": ["moe_aux_loss_coeff=0.0"],
        "no step boundary": ["get_forward_backward_func", "start_step"],
        "counted twice": ["counted twice", "1 micro-batches"],
    }
    assert messages.keys() == expected.keys()
    for case, words in expected.items():
        assert all(word in messages[case] for word in words), (case, messages[case])
