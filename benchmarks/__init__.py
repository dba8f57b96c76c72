"""Benchmarks of megatron_gbl against Megatron-Core's own load-balancing losses (see RESULTS.md)."""
