"""enable/disable contract and bad input: clear errors that name the option and the fix."""

import os

import pytest

import bad_input
import megatron_gbl
import workers
from megatron.core.pipeline_parallel import schedules
from megatron.core.transformer.moe.router import TopKRouter
from megatron_gbl import compat
from megatron_gbl_lab.harness import moe_config, run_gloo

switch_name = compat.upstream_lbl_switch()[0]
DOC = os.path.join(os.path.dirname(__file__), "..", "docs", "bad_input.md")


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


def test_router_config_takes_the_users_type_and_coefficient():
    from megatron_gbl.config import Balancing, router_balancing

    assert router_balancing(moe_config(moe_aux_loss_coeff=3e-3)) == Balancing("aux_loss", 3e-3, None)
    assert router_balancing(moe_config(moe_router_load_balancing_type="seq_aux_loss")) == \
        Balancing("seq_aux_loss", 1e-2, None)


def test_errors_in_a_real_data_parallel_run():
    messages = run_gloo(workers.bad_input_messages, 4)[0]
    assert messages.keys() == bad_input.RUNTIME.keys()
    with open(DOC) as f:
        doc = f.read()
    for case, words in bad_input.RUNTIME.items():
        assert all(word in messages[case] for word in words), (case, messages[case])
        assert bad_input._cell(messages[case]) in doc, f"{case}: docs/bad_input.md is stale"


def test_quantile_balancing_on_a_release_without_it(monkeypatch):
    """0.12-0.18 have no quantile balancing: the message names the installed release (here
    simulated on releases that have it: compat decides by the feature, not the version)."""
    from megatron_gbl import compat, megatron_lm

    if compat.has_quantile_balancing():
        monkeypatch.setattr(compat, "has_quantile_balancing", lambda: False)
    with pytest.raises(ValueError) as error:
        megatron_lm.configure(bad_input.megatron_lm_args(bad_input.QB))
    message = str(error.value)
    assert f"this is megatron-core {compat.megatron_core_release()}" in message, message
    assert "needs Megatron-Core 0.19 or later" in message, message
    import megatron_gbl

    assert not megatron_gbl.is_enabled()


def test_quantile_balancing_that_estimates_on_the_global_batch_itself(monkeypatch):
    """Megatron-LM dev's quantile balancing (PR #6637: its own global-batch histogram, other
    hooks than 0.19's) is not rescoped: the message names its option (simulated: the feature
    is detected by the config field)."""
    from megatron_gbl import compat, megatron_lm

    monkeypatch.setattr(compat, "has_quantile_balancing", lambda: False)
    monkeypatch.setattr(compat, "has_own_global_quantile_balancing", lambda: True)
    with pytest.raises(ValueError) as error:
        megatron_lm.configure(bad_input.megatron_lm_args(bad_input.QB))
    assert "--moe-router-quantile-balancing-estimation-scope" in str(error.value)
    assert "drop --moe-lbl-scope" in str(error.value)
