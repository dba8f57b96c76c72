# Shared by scripts/pretrain_moe_gbl.sh (one node) and scripts/pretrain_moe_gbl.sbatch (Slurm):
# option parsing, the config file, the Megatron-LM arguments, the environment, and printing or
# running the command. Sourced, not run; the caller sets `set -euo pipefail` and `prog`.
# shellcheck shell=bash disable=SC2034  # sets variables that the sourcing script reads

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)

common_options_help() {
  cat <<'EOF'
Options (each also read from the environment variable in brackets):
  --megatron-lm PATH   Megatron-LM checkout holding pretrain_gpt.py          [MEGATRON_LM]
  --config FILE        Megatron-LM arguments, one per line, '#' comments     [CONFIG]
                       (configs/*.args; a relative path is tried in the current
                       directory, then in the megatron-gbl checkout). A line
                       '# megatron-gbl: --nproc N --ep N' sets this script's
                       defaults for the config (e.g. tiny_moe.args: one GPU)
  --data-path PREFIX   indexed dataset prefix(es) from Megatron's preprocess_data.py;
                       "W1 P1 W2 P2" for a weighted blend                    [DATA_PATH]
  --mock-data          Megatron's synthetic data instead of --data-path      [MOCK_DATA=1]
  --scope SCOPE        --moe-lbl-scope: micro, seq, dp, global, shuffle, or none
                       for Megatron's own load balancing (default global)    [MOE_LBL_SCOPE]
  --nproc N            GPUs (processes) per node (default: the config's,     [NPROC_PER_NODE]
                       else 8)
  --ep N               --expert-model-parallel-size (default: the config's,  [EXPERT_PARALLEL]
                       else 8)
  --dry-run            print the command instead of running it
  -h, --help           this help
  -- ARGS...           further Megatron-LM arguments (--save, --load, --tensorboard-dir,
                       --moe-lbl-sync-group-size, ...); they come last, so they override
                       the config
EOF
}

die() {
  echo "${prog:-$(basename "$0")}: error: $*" >&2
  echo "Try '${prog:-$(basename "$0")} --help'." >&2
  exit 2
}

parse_common_options() {
  megatron_lm=${MEGATRON_LM:-}
  config=${CONFIG:-}
  data_path=${DATA_PATH:-}
  mock_data=${MOCK_DATA:-0}
  scope=${MOE_LBL_SCOPE:-global}
  nproc=${NPROC_PER_NODE:-}  # empty: the config's default, else 8
  ep=${EXPERT_PARALLEL:-}
  dry_run=0
  extra_args=()
  local opt
  while [ $# -gt 0 ]; do
    opt=$1
    shift
    case ${opt} in
      --*=*) set -- "${opt#*=}" "$@"; opt=${opt%%=*} ;;  # --opt=value as --opt value
    esac
    case ${opt} in
      --megatron-lm | --config | --data-path | --scope | --nproc | --ep)
        # A missing value must not silently swallow the next option.
        { [ $# -gt 0 ] && [[ $1 != --* ]]; } || die "${opt} needs a value"
        case ${opt} in
          --megatron-lm) megatron_lm=$1 ;;
          --config) config=$1 ;;
          --data-path) data_path=$1 ;;
          --scope) scope=$1 ;;
          --nproc) nproc=$1 ;;
          --ep) ep=$1 ;;
        esac
        shift
        ;;
      --mock-data) mock_data=1 ;;
      --dry-run) dry_run=1 ;;
      -h | --help) usage; exit 0 ;;
      --) extra_args=("$@"); break ;;
      *) die "unknown option '${opt}' (Megatron-LM arguments go after '--')" ;;
    esac
  done
  check_common_options
}

# megatron_gbl.scopes.SCOPES (tests/test_scripts.py keeps the two lists equal).
SCOPES="micro seq dp global shuffle"

check_common_options() {
  [[ " ${SCOPES} none " == *" ${scope} "* ]] \
    || die "--scope must be one of ${SCOPES// /, }, none; got '${scope}'"
  [ -n "${megatron_lm}" ] \
    || die "no Megatron-LM checkout: pass --megatron-lm PATH or set MEGATRON_LM"
  [ -f "${megatron_lm}/pretrain_gpt.py" ] \
    || die "no pretrain_gpt.py in '${megatron_lm}': --megatron-lm must be a Megatron-LM checkout"
  [ -n "${config}" ] \
    || die "no config: pass --config FILE (e.g. configs/tiny_moe.args) or set CONFIG"
  if [ ! -f "${config}" ] && [[ ${config} != /* ]] && [ -f "${repo_root}/${config}" ]; then
    config=${repo_root}/${config}
  fi
  [ -f "${config}" ] || die "config file '${config}' not found"
  read_config_defaults
  [[ ${nproc} =~ ^[1-9][0-9]*$ ]] || die "--nproc must be a positive integer, got '${nproc}'"
  [[ ${ep} =~ ^[1-9][0-9]*$ ]] || die "--ep must be a positive integer, got '${ep}'"
  if [ "${mock_data}" = 1 ] && [ -n "${data_path}" ]; then
    die "give either --data-path or --mock-data, not both"
  fi
  [ "${mock_data}" = 1 ] || [ -n "${data_path}" ] \
    || die "no data: pass --data-path PREFIX (or set DATA_PATH), or --mock-data"
}

# The config's own --nproc / --ep ('# megatron-gbl: --nproc N --ep N'), where neither the
# command line nor the environment gave one; then the built-in defaults.
read_config_defaults() {
  local words i
  read -r -a words <<<"$(sed -n 's/^# *megatron-gbl: *//p' "${config}" | tr '\n' ' ')"
  for ((i = 0; i < ${#words[@]}; i += 2)); do
    case ${words[i]} in
      --nproc) nproc=${nproc:-${words[i + 1]:-}} ;;
      --ep) ep=${ep:-${words[i + 1]:-}} ;;
      *) die "${config}: '# megatron-gbl:' takes --nproc N and --ep N, got '${words[i]}'" ;;
    esac
  done
  nproc=${nproc:-8}
  ep=${ep:-8}
}

# Appends the config's arguments to megatron_args. Words split on whitespace (no quoting), so
# values cannot contain spaces or '#'; every line must start with a --flag.
read_config() {
  local line number=0 words
  while IFS= read -r line || [ -n "${line}" ]; do
    number=$((number + 1))
    read -r -a words <<<"${line%%#*}"
    [ ${#words[@]} -gt 0 ] || continue
    [[ ${words[0]} == --?* ]] \
      || die "${config}:${number}: expected '--flag [value ...]', got '${line}'"
    megatron_args+=("${words[@]}")
  done <"${config}"
}

# What torchrun runs (entry) and its arguments (megatron_args): config, data, parallelism and
# scope, then extra_args.
build_megatron_args() {
  # A fork patched with patches/*.patch has the flags itself: run pretrain_gpt.py directly (the
  # launcher would add them a second time). Otherwise the launcher adds them.
  if grep -qs 'megatron_gbl.megatron_lm' "${megatron_lm}/megatron/training/arguments.py"; then
    entry=("${megatron_lm}/pretrain_gpt.py")
  else
    entry=(-m megatron_gbl.launch "${megatron_lm}/pretrain_gpt.py")
  fi
  megatron_args=()
  read_config
  if [ "${mock_data}" = 1 ]; then
    megatron_args+=(--mock-data)
  else
    local prefixes
    read -r -a prefixes <<<"${data_path}"
    megatron_args+=(--data-path "${prefixes[@]}")
  fi
  megatron_args+=(--expert-model-parallel-size "${ep}")
  [ "${scope}" = none ] || megatron_args+=(--moe-lbl-scope "${scope}")
  megatron_args+=("${extra_args[@]}")
}

# Environment for every node; a value already set in the environment wins.
build_env() {
  run_env=(
    # One CUDA work queue, so kernels run in launch order: Megatron relies on that to overlap
    # its tensor/sequence/expert-parallel communication with computation.
    "CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}"
    # NCCL problems only; NCCL_DEBUG=INFO shows the topology and transports NCCL picked.
    "NCCL_DEBUG=${NCCL_DEBUG:-WARN}"
    # Free tensors of asynchronous collectives without CUDA recordStream: lower peak memory
    # with the distributed optimizer's overlapped gradient reduce / parameter gather.
    "TORCH_NCCL_AVOID_RECORD_STREAMS=${TORCH_NCCL_AVOID_RECORD_STREAMS:-1}"
  )
}

# Prints "$@" as one command a shell can run. A new line before each option, `-m`, NAME=value
# and program (srun, torchrun, the entry script), so the command reads like the config file.
print_command() {
  local word out="" break_before safe='^[A-Za-z0-9_./:=@%+,^-]+$'
  break_before='^(--|-m$|[A-Z_][A-Z0-9_]*=|srun$|(.*/)?torchrun$|.*/pretrain_gpt\.py$)'
  for word in "$@"; do
    if [ -n "${out}" ] && [[ ${word} =~ ${break_before} ]]; then
      out+=$' \\\n   '
    fi
    if [[ ${word} =~ ${safe} ]]; then
      out+=" ${word}"
    else  # single-quoted, with each ' as '\''
      out+=" '${word//\'/\'\\\'\'}'"
    fi
  done
  printf '%s\n' "${out# }"
}

run_or_print() {
  if [ "${dry_run}" = 1 ]; then
    print_command "$@"
  else
    exec "$@"
  fi
}
