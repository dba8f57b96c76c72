#!/usr/bin/env bash
# Both benchmarks on a CUDA machine: benchmarks/run_gpu.sh   (results in benchmarks/, or $BENCH_OUT)
#
# One process per GPU on NCCL. With a single GPU the end-to-end run puts $E2E_RANKS ranks
# (default 4) on it and syncs them over gloo, so the data-parallel all-reduces still happen.
# $ROUTER_ARGS and $E2E_ARGS add or override arguments of each benchmark. Each part stops after
# its share of $BUDGET_S seconds (default 480: a lease's 10-minute command, with room for the
# install), so one slow part cannot take the others' time; a stopped part says so and the
# script goes on.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
out=${BENCH_OUT:-benchmarks}
budget=${BUDGET_S:-480}
gpus=${NGPU:-$(nvidia-smi -L | wc -l)}
e2e_ranks=$gpus backend=nccl
if [ "$gpus" -eq 1 ]; then
    e2e_ranks=${E2E_RANKS:-4} backend=gloo
fi
start=$SECONDS
part() {  # part NAME SHARE_PERCENT COMMAND...: run COMMAND for at most SHARE_PERCENT of the budget
    local name=$1 limit=$(( budget * $2 / 100 ))
    shift 2
    echo "=== $name (at most ${limit} s; $(( SECONDS - start )) s into the run)"
    timeout --signal=INT --kill-after=20 "$limit" "$@"
    local rc=$?
    if [ "$rc" -eq 124 ]; then
        echo "=== $name: stopped after ${limit} s, results incomplete"
    elif [ "$rc" -ne 0 ]; then
        echo "=== $name: failed (exit $rc)"
    fi
}
part memory 10 python -m benchmarks.memory
# shellcheck disable=SC2086  # the *_ARGS are word lists
part "router benchmark" 30 torchrun --standalone --nproc-per-node "$gpus" -m benchmarks.router_bench \
    --device cuda --steps 10 --warmup 2 --out "$out" ${ROUTER_ARGS:-}
# About 46M parameters (4 MoE layers, hidden 512, 32 experts top-4), 2 x 1024 tokens per
# micro-batch. The earlier GPU run's model (8 layers, hidden 1024, 64 experts: about 640M
# parameters, 2 x 2048 tokens) did not finish in 300 s; why was not measured.
# shellcheck disable=SC2086
part "end-to-end benchmark" 60 torchrun --standalone --nproc-per-node "$e2e_ranks" \
    -m benchmarks.e2e_bench --device cuda --backend "$backend" --layers 4 --hidden 512 \
    --heads 8 --experts 32 --topk 4 --expert-hidden 256 --vocab 8192 --seq 1024 --mbs 2 \
    --jitter-ms 2 --steps 20 --warmup 2 --out "$out" ${E2E_ARGS:-}
echo "=== done in $(( SECONDS - start )) s"
