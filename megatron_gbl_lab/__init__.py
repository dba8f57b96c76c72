"""The lab beside the megatron-gbl plugin: `megatron-gbl demo` / `analyze`, the built-in corpus,
figures, and the CPU shims that run Megatron-Core on gloo for tests, the demo and benchmarks.

Nothing in `megatron_gbl` (the plugin a training job imports) imports this package; its extra
dependencies come with `pip install "megatron-gbl[demo]"`.
"""
