#!/usr/bin/env bash
# Both benchmarks on a CUDA machine: benchmarks/run_gpu.sh   (results in benchmarks/, or $BENCH_OUT)
#
# One process per GPU on NCCL. With a single GPU the end-to-end run puts $E2E_RANKS ranks
# (default 4) on it and syncs them over gloo, so the data-parallel all-reduces still happen.
# $ROUTER_ARGS and $E2E_ARGS add or override arguments of each benchmark.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${BENCH_OUT:-benchmarks}
gpus=${NGPU:-$(nvidia-smi -L | wc -l)}
e2e_ranks=$gpus backend=nccl
if [ "$gpus" -eq 1 ]; then
    e2e_ranks=${E2E_RANKS:-4} backend=gloo
fi
python -m benchmarks.memory
# shellcheck disable=SC2086  # the *_ARGS are word lists
torchrun --standalone --nproc-per-node "$gpus" -m benchmarks.router_bench --device cuda \
    --steps 10 --warmup 2 --out "$out" ${ROUTER_ARGS:-}
# A GPU-sized model: 8 MoE layers, hidden 1024, 64 experts top-4, 2 x 2048 tokens per micro-batch.
# shellcheck disable=SC2086
torchrun --standalone --nproc-per-node "$e2e_ranks" -m benchmarks.e2e_bench --device cuda \
    --backend "$backend" --layers 8 --hidden 1024 --heads 8 --experts 64 --topk 4 \
    --expert-hidden 512 --vocab 32000 --seq 2048 --mbs 2 --jitter-ms 2 \
    --steps 30 --warmup 3 --out "$out" ${E2E_ARGS:-}
