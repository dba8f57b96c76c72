#!/usr/bin/env bash
# Megatron-LM's real training loop on CPU, with the plugin: the megatron.training that the
# installed megatron-core wheel ships (0.17 on), on 2 gloo ranks, a few iterations of
# configs/tiny_moe_cpu.args at --moe-lbl-scope=global; prints the LBL Megatron-LM logged.
#   scripts/try_megatron_lm.sh                        # set up .venv (once), then run
#   scripts/try_megatron_lm.sh --moe-lbl-scope dp     # arguments go to pretrain_gpt.py last
# The entry script is tests/megatron_lm_entry/pretrain_gpt.py (the shape of Megatron-LM's own, on
# the wheel's megatron.training, mock data); tests/real_megatron_lm/cpu_launch.py installs the
# lab's CPU shims, then runs `python -m megatron_gbl.launch`. On a GPU, run Megatron-LM's own
# pretrain_gpt.py through the launcher instead (README, "Megatron-LM"; docs/megatron_lm.md).
# NPROC sets the ranks (default 2); PYTHON an environment that has megatron-gbl[test] (default:
# set up .venv, which CI's .ci/run runs this in).
# shellcheck source-path=SCRIPTDIR
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
  # shellcheck source=lib/venv.sh
  . scripts/lib/venv.sh
  ensure_venv .venv "${MEGATRON_CORE:-${NEWEST_MEGATRON_CORE}}" test
  PYTHON=.venv/bin/python
fi
log=$(mktemp -d)/megatron_lm.log
mapfile -t config < <(sed 's/#.*//' configs/tiny_moe_cpu.args | tr -s ' \t' '\n' | grep -v '^$')
status=0
OMP_NUM_THREADS=1 "${PYTHON}" -m torch.distributed.run --standalone \
  --nproc-per-node "${NPROC:-2}" tests/real_megatron_lm/cpu_launch.py \
  tests/megatron_lm_entry/pretrain_gpt.py "${config[@]}" --moe-lbl-scope=global "$@" \
  >"${log}" 2>&1 || status=$?
if [ "${status}" != 0 ]; then
  tail -n 40 "${log}" >&2
  echo "try_megatron_lm: the run failed (exit ${status}); whole log: ${log}" >&2
  exit "${status}"
fi
# Megatron-LM's own iteration lines: the loss and the LBL it logged, with the plugin's metrics.
logged=$(grep -E ' iteration +[0-9]+/' "${log}" | tr '|' '\n' | awk '
  / iteration +[0-9]+\// { sub(/^.*iteration +/, ""); gsub(/ /, ""); line = "iteration " $0 }
  /lm loss|load_balancing_loss|micro_batch_lbl|global_batch_lbl|balance_bsz_tokens/ {
    gsub(/^ +| +$/, ""); line = line " | " $0 }
  /number of nan iterations/ { print line }')
echo "${logged}"
# Every iteration must have logged the plugin's metrics: a run that trained without them fails.
iterations=$(grep -cE ' iteration +[0-9]+/' "${log}" || true)
with_metrics=$(grep -c 'load_balancing_loss: .*global_batch_lbl: ' <<<"${logged}" || true)
if [ "${iterations}" = 0 ] || [ "${with_metrics}" != "${iterations}" ]; then
  echo "try_megatron_lm: ${with_metrics} of ${iterations} iterations logged the LBL and the" \
    "plugin's metrics; whole log: ${log}" >&2
  exit 1
fi
echo "try_megatron_lm: Megatron-LM's training loop ran with --moe-lbl-scope=global; log: ${log}"
