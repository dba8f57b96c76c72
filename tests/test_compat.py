"""The version adapter's fallbacks: an optional Megatron-Core attribute falls back to
parallel_state's default only on the releases before the one that sets it, and stops the run,
naming the attribute and the release, everywhere else."""

import types

import pytest

import compat_workers
from megatron_gbl import compat
from megatron_gbl_lab.harness import run_gloo


def test_the_release_table_matches_the_installed_routers():
    present, = run_gloo(compat_workers.optional_attributes, 1)
    for name, since in compat.ROUTER_ATTRIBUTE_SINCE.items():
        assert present[name] == (compat.release() >= since), (name, compat.release())
    assert present["token_dispatcher.tp_ep_group"]  # every release from 0.12


def test_a_missing_router_attribute_falls_back_only_where_the_table_says(monkeypatch):
    router = types.SimpleNamespace()  # a router without any of the optional attributes
    for name, since in compat.ROUTER_ATTRIBUTE_SINCE.items():
        monkeypatch.setitem(compat._ROUTER_ATTRIBUTE_REQUIRED, name, False)
        assert compat._router_attribute(router, name, "default") == "default"
        monkeypatch.setitem(compat._ROUTER_ATTRIBUTE_REQUIRED, name, True)
        with pytest.raises(RuntimeError, match=rf"'{name}'.* from {since[0]}\.{since[1]} on"):
            compat._router_attribute(router, name, "default")


def test_a_dispatcher_without_its_token_group_stops_the_run():
    layer = types.SimpleNamespace(token_dispatcher=types.SimpleNamespace())
    with pytest.raises(RuntimeError, match="'tp_ep_group'.*not supported"):
        compat.token_group(layer)
