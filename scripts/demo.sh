#!/usr/bin/env bash
# Set everything up (once; later runs reuse it) and run the demo:
#   scripts/demo.sh                                  # micro vs global, about 3 min on 2 cores
#   scripts/demo.sh --scopes micro,global --seeds 0,1,2,3,4
# Arguments go to `megatron-gbl demo` (see --help). MEGATRON_CORE=0.16.1 picks another
# release (0.12-0.16 use Python 3.11, 0.17+ 3.12).
# shellcheck source-path=SCRIPTDIR
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=lib/venv.sh
. scripts/lib/venv.sh

ensure_venv .venv "${MEGATRON_CORE:-${NEWEST_MEGATRON_CORE}}" demo
exec .venv/bin/megatron-gbl demo "$@"
