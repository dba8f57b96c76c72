#!/usr/bin/env bash
# Set everything up (once; later runs reuse it) and run the test suite:
#   scripts/test.sh                  # the whole suite on the newest megatron-core (.venv)
#   scripts/test.sh -k bias          # pytest arguments after the options
#   scripts/test.sh --all-versions   # then the version-sensitive tests on every other
#                                    # supported release (what CI runs, .ci/run)
#   scripts/test.sh --bridge         # the Megatron-Bridge tests, in .venvs/bridge (Python 3.12,
#                                    # the newest megatron-core, megatron-bridge; CI runs it too)
# MEGATRON_CORE=0.16.1 picks the release of .venv (0.12-0.16 use Python 3.11, 0.17+ 3.12);
# PYTHON312 / PYTHON311 name the interpreters.
# shellcheck source-path=SCRIPTDIR
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=lib/venv.sh
. scripts/lib/venv.sh

if [ "${1:-}" = --bridge ]; then
  shift
  ensure_bridge_venv .venvs/bridge
  exec .venvs/bridge/bin/python -m pytest -q tests/test_bridge.py "$@"
fi

all_versions=0
if [ "${1:-}" = --all-versions ]; then
  all_versions=1
  shift
fi
version=${MEGATRON_CORE:-${NEWEST_MEGATRON_CORE}}
ensure_venv .venv "${version}" test
.venv/bin/python -m pytest -q tests "$@"
.venv/bin/megatron-gbl --help >/dev/null  # the console script is installed

if [ "${all_versions}" = 1 ]; then
  others=()
  for release in "${SUPPORTED_MEGATRON_CORE[@]}"; do
    [ "${release}" = "${version}" ] || others+=("${release}")
  done
  # Everything that touches Megatron-Core's router, schedules, parallel layouts, tracker,
  # expert bias, model features and Megatron-LM's training code; left out: the demo, scripts,
  # pure math, the catalog, and two launcher tests whose paths do not depend on the release
  # (they run on the newest above).
  TESTS="${VERSION_SENSITIVE_TESTS:-tests/test_router_dist.py tests/test_model_dist.py
         tests/test_parallel_layouts.py tests/test_model_features.py tests/test_device_balance.py
         tests/test_graphs_streams.py tests/test_megatron_lm.py tests/test_api.py
         tests/test_expert_bias.py tests/test_ablations.py tests/test_reliability.py
         tests/test_step_metrics.py tests/test_compat.py}" \
  PYTEST_K="${VERSION_SENSITIVE_K:-not (aux_free_and_scope_switch or errors_before_training)}" \
    scripts/test_versions.sh "${others[@]}"
fi
