"""Importing this module silences the notices third-party packages print on a machine without a
GPU software stack, in this process and in the gloo ranks forked from it (harness.run_gloo
preloads it):

- Megatron-Core's "Transformer Engine and Apex are not installed ... Falling back" and "Apex is
  not installed. Falling back to Torch Norm" warnings (on import and at every model build);
- torch's "No CUDA runtime is found, using CUDA_HOME=..." (CUDA builds of torch on a CPU);
- Megatron-Core 0.19's "GPTModel IS DEPRECATED" at every build: the lab builds GPTModel on
  every release so that its runs compare across releases;
- Megatron-Core 0.16's "full scope is deprecated" at every TransformerConfig, about its own
  default cuda_graph_scope (CUDA graphs are off);
- on Megatron-LM's training loop on CPU (scripts/try_megatron_lm.sh): Megatron-Core's "Only
  transformer-engine>=1.7.0 supports MoE experts" and "MimoModelConfig is experimental" at
  import, torch's "'pin_memory' argument is set as true but no accelerator is found" and its
  deprecation of `all_gather_into_tensor`, which Megatron-Core calls.

The plugin (megatron_gbl) never imports it: in a training job, these messages are the user's.
"""

import logging
import warnings

_FALLBACK_WARNINGS = (r"Transformer Engine and Apex are not installed", r"Apex is not installed",
                      r"full scope is deprecated",
                      r"Only transformer-engine>=1.7.0 supports MoE experts",
                      r"MimoModelConfig is experimental",
                      r"'pin_memory' argument is set as true but no accelerator is found")
_DEPRECATIONS = (r"`torch.distributed.all_gather_into_tensor` is deprecated",)
_LOG_NOTICES = {"torch.utils.cpp_extension": "No CUDA runtime is found",
                "megatron.core.models.gpt.gpt_model": "GPTModel IS DEPRECATED"}

for _message in _FALLBACK_WARNINGS:
    warnings.filterwarnings("ignore", message=_message, category=UserWarning)
for _message in _DEPRECATIONS:
    warnings.filterwarnings("ignore", message=_message, category=FutureWarning)
for _logger, _notice in _LOG_NOTICES.items():
    logging.getLogger(_logger).addFilter(
        lambda record, notice=_notice: notice not in record.getMessage())
