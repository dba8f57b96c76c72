"""What the plugin keeps per router: benchmarks/memory.py's formula against a real router."""

from benchmarks import memory
from megatron_gbl_lab.harness import run_gloo


def test_kept_bytes_match_the_formula():
    experts, microbatches = 8, 3
    measured = run_gloo(memory.measure, 2, experts, microbatches)[0]
    assert measured == {scope: memory.plugin_bytes(experts, microbatches, scope)
                        for scope in ("micro", "dp", "global")}
