"""Kernel launches and collectives, counted (benchmarks/launch_count.py's rule, 2 gloo ranks,
upstream in the same processes): the targets below hold, so the counts cannot drift back.

The device-level term's allowance is the count it has today (+7 launches over the same scope
without it); the target it should meet, +2, is not reached yet (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import argparse

import pytest

from benchmarks import launch_count
from megatron_gbl_lab import harness

DEVICE_TERM_LAUNCHES = 7  # over the same scope without it; the target is 2
STEP_BOUNDARY_MAX = 30


@pytest.fixture(scope="module")
def counts():
    args = argparse.Namespace(layers=[1, 16])
    return harness.run_gloo(launch_count.worker, 2, args, timeout_s=600)[0]


def _call(counts, label):
    return counts[label]["router call"]


@pytest.mark.parametrize("scope", ["micro", "dp", "global", "global:1"])
def test_router_call_at_most_upstream_aux_loss(counts, scope):
    plugin, upstream = _call(counts, f"plugin {scope}"), _call(counts, "upstream aux_loss")
    assert plugin["launches"] <= upstream["launches"], (plugin, upstream)
    assert plugin["collectives"] <= _call(counts, "upstream global_aux_loss")["collectives"]


def test_seq_router_call_at_most_upstream_seq_aux_loss(counts):
    plugin, upstream = _call(counts, "plugin seq"), _call(counts, "upstream seq_aux_loss")
    assert plugin["launches"] <= upstream["launches"], (plugin, upstream)
    assert plugin["collectives"] == 0


@pytest.mark.parametrize("scope", ["micro", "global"])
def test_device_term_allowance(counts, scope):
    with_term, without = _call(counts, f"plugin {scope}+device"), _call(counts, f"plugin {scope}")
    assert with_term["launches"] - without["launches"] <= DEVICE_TERM_LAUNCHES
    assert with_term["collectives"] - without["collectives"] <= 1


@pytest.mark.parametrize("scope", ["micro", "dp"])
def test_expert_bias_adds_at_most_one_collective_per_call(counts, scope):
    biased = _call(counts, f"plugin {scope}, expert bias")
    assert biased["collectives"] <= _call(counts, f"plugin {scope}")["collectives"] + 1


@pytest.mark.parametrize("label", [label for label, *_ in launch_count.PLUGIN])
@pytest.mark.parametrize("part", ["step boundary", "step_metrics"])
def test_step_costs_do_not_grow_with_the_layers(counts, label, part):
    one, many = (counts[label][f"{part}, {layers} layers"] for layers in (1, 16))
    assert many["launches"] <= 2 * one["launches"], (one, many)
    assert many["collectives"] == one["collectives"], (one, many)
    if part == "step boundary":
        assert many["launches"] <= STEP_BOUNDARY_MAX, many
