#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Pre-train a Megatron-LM GPT-MoE on one node with global-batch load balancing: torchrun, one
# process per GPU, expert parallel 8, through `python -m megatron_gbl.launch pretrain_gpt.py`.
set -euo pipefail
prog=$(basename "$0")
# shellcheck source=lib/megatron_gbl_common.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib/megatron_gbl_common.sh"

usage() {
  cat <<EOF
Usage: ${prog} --megatron-lm PATH --config FILE (--data-path PREFIX | --mock-data)
       [--scope SCOPE] [--nproc N] [--ep N] [--dry-run] [-- MEGATRON-LM ARGS...]

Runs, on this node:
  torchrun --standalone --nproc-per-node N -m megatron_gbl.launch PATH/pretrain_gpt.py \\
      <FILE's arguments> <data> --expert-model-parallel-size N --moe-lbl-scope SCOPE <ARGS>
torchrun's Python needs megatron-gbl, megatron-core and Megatron-LM's dependencies (e.g. an
NGC PyTorch container plus 'pip install -e .' of this checkout); TORCHRUN overrides the
torchrun command.

$(common_options_help)

Examples:
  ${prog} --megatron-lm ~/Megatron-LM --config configs/moe_3.4a0.6b.args \\
      --data-path /data/corpus_text_document -- --save ckpt --tensorboard-dir tb
  ${prog} --megatron-lm ~/Megatron-LM --config configs/tiny_moe.args --mock-data
EOF
}

# What this node can run: expert parallel must divide the processes; more processes than GPUs
# is allowed (several per GPU, say), but said.
check_node_fits() {
  ((nproc % ep == 0)) || die "--ep ${ep} must divide the ${nproc} processes of this node" \
    "(--nproc); lower --ep or raise --nproc"
  local gpus
  if command -v nvidia-smi >/dev/null && gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU') \
    && ((nproc > gpus)); then
    echo "${prog}: warning: --nproc ${nproc} starts more processes than the ${gpus} GPU(s)" \
      "nvidia-smi shows on this node; pass --nproc ${gpus} (and an --ep dividing it)" >&2
  fi
}

parse_common_options "$@"
check_node_fits
build_megatron_args
build_env
run_or_print env "${run_env[@]}" "${TORCHRUN:-torchrun}" --standalone --nnodes 1 \
  --nproc-per-node "${nproc}" "${entry[@]}" "${megatron_args[@]}"
