#!/usr/bin/env bash
# Check `python -m megatron_gbl.launch pretrain_gpt.py ... --moe-lbl-scope=...` against real
# Megatron-LM release trees, on CPU with gloo (not part of CI: it needs a Megatron-LM clone).
#   scripts/check_megatron_lm.sh MEGATRON_LM [TAG ...]   # default: core_v0.12.3 .. core_v0.16.1
# MEGATRON_LM is a Megatron-LM git dir or checkout. Per tag core_vX.Y.Z:
#   tree   $CHECK_DIR/<tag>: the tag's megatron/ and top-level *.py, without megatron/core
#          (megatron-core comes from the X.Y.Z wheel, so the plugin is checked against it)
#   venv   .venvs/mcore-X.Y.Z (as scripts/test_versions.sh makes it) + megatron.training's deps
#   level1 tests/real_megatron_lm/check_args.py: hook points, real parse_args + validate_args
#   level2 real pretrain_gpt.py --mock-data, 2 gloo ranks, 3 iterations, through the launcher
#          (tests/real_megatron_lm/cpu_launch.py); TensorBoard events read back for scope
#          global (1 micro-batch per rank) and micro (2 per rank)
set -euo pipefail
[ $# -ge 1 ] || { sed -n '2,12p' "$0"; exit 2; }
source_repo=$(cd "$1" && pwd)
shift
tags=("$@")
[ ${#tags[@]} -gt 0 ] || tags=(core_v0.12.3 core_v0.13.1 core_v0.14.0 core_v0.15.3 core_v0.16.1)
cd "$(dirname "$0")/.."
root=$(pwd)
check_dir=${CHECK_DIR:-${TMPDIR:-/tmp}/megatron-lm-check}
python=${PYTHON:-python3}
export OMP_NUM_THREADS=1
# Imported by megatron.training / pretrain_gpt.py at some tag: six, regex, pyyaml (all),
# einops (0.12), triton and pydantic (0.16).
extra_deps=(six regex pyyaml einops pydantic triton)
# CPU-only choices: --disable-bias-linear (local experts' bias add fails at TP 1 on 0.16),
# --clip-grad 0 (clip_grads asserts torch.cuda.FloatTensor grads), --vocab-size 8192 (0.12's mock
# data draws ids up to 4096), --no-persist-layer-norm (torch LayerNorm without Apex).
model=(--num-layers 2 --hidden-size 64 --num-attention-heads 4 --seq-length 128
  --max-position-embeddings 128 --micro-batch-size 1 --num-experts 8 --moe-router-topk 2
  --moe-aux-loss-coeff 1e-2 --moe-token-dispatcher-type allgather --disable-bias-linear
  --tokenizer-type NullTokenizer --vocab-size 8192 --mock-data --num-workers 0
  --train-iters 3 --lr 1e-4 --clip-grad 0 --eval-iters 0 --eval-interval 1000 --log-interval 1
  --distributed-backend gloo --transformer-impl local --use-cpu-initialization
  --no-gradient-accumulation-fusion --no-masked-softmax-fusion --no-bias-gelu-fusion
  --no-bias-dropout-fusion --no-rope-fusion --no-persist-layer-norm
  --moe-lbl-histogram-interval 1)

level1() {  # real parse_args + validate_args and the hook points
  local log="${check_dir}/${tag}-level1.log" ok=0
  (cd "${tree}" && "${venv}/bin/python" "${root}/tests/real_megatron_lm/check_args.py") \
    > "${log}" 2>&1 || ok=1
  grep -E '^(PASS|FAIL)' "${log}" >&2 || echo "FAIL  level 1, see ${log}" >&2
  return "${ok}"
}

level2() {  # SCOPE GLOBAL_BATCH_SIZE: train through the launcher, read the events back
  local scope=$1 batch=$2 log_dir="${check_dir}/${tag}-tb-$1" ok=0
  rm -rf "${log_dir}"
  if ! (cd "${tree}" && timeout 600 "${venv}/bin/python" -m torch.distributed.run --standalone \
      --nproc-per-node 2 "${root}/tests/real_megatron_lm/cpu_launch.py" pretrain_gpt.py \
      "${model[@]}" --global-batch-size "${batch}" --tensorboard-dir "${log_dir}" \
      --moe-lbl-scope "${scope}") > "${log_dir}.log" 2>&1; then
    echo "FAIL  ${scope}: training failed, see ${log_dir}.log" >&2
    return 1
  fi
  "${venv}/bin/python" tests/real_megatron_lm/check_tensorboard.py "${log_dir}" "${scope}" \
    $((batch * 128)) 2 > "${log_dir}.check" 2>&1 || ok=1
  grep -E '^(PASS|FAIL)' "${log_dir}.check" >&2
  return "${ok}"
}

table=()
status=0
for tag in "${tags[@]}"; do
  version=${tag#core_v}
  tree="${check_dir}/${tag}"
  venv="${root}/.venvs/mcore-${version}"
  echo "=== ${tag}: tree ${tree}, venv ${venv}"
  rm -rf "${tree}" && mkdir -p "${tree}"
  git -C "${source_repo}" archive "${tag}" -- megatron ':(glob)*.py' \
    | tar -x -C "${tree}" --exclude=megatron/core
  if [ ! -x "${venv}/bin/python" ]; then
    "${python}" -m venv "${venv}"
    "${venv}/bin/pip" install -q torch==2.13.0
  fi
  "${venv}/bin/pip" install -q "megatron-core==${version}" -e ".[test]" "${extra_deps[@]}"
  l1=PASS l2g=PASS l2m=PASS
  level1 || l1=FAIL
  level2 global 2 || l2g=FAIL
  level2 micro 4 || l2m=FAIL
  [ "${l1}${l2g}${l2m}" = PASSPASSPASS ] || status=1
  table+=("$(printf '%-14s %-8s %-14s %-14s' "${tag}" "${l1}" "${l2g}" "${l2m}")")
done
printf '%-14s %-8s %-14s %-14s\n' tag level1 level2-global level2-micro
printf '%s\n' "${table[@]}"
echo "logs: ${check_dir}/<tag>-level1.log, ${check_dir}/<tag>-tb-{global,micro}.{log,check}"
exit "${status}"
