#!/usr/bin/env bash
# Run the test suite against megatron-core releases, each in its own venv (.venvs/mcore-<v>,
# kept between runs; 0.12-0.16 on Python 3.11, 0.17+ on 3.12):
#   scripts/test_versions.sh                 # every supported release but the newest
#   scripts/test_versions.sh 0.14.0 0.18.2   # just these
# TESTS="tests/a.py tests/b.py" runs a subset; PYTEST_K="expression" selects tests within it.
# shellcheck source-path=SCRIPTDIR
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=lib/venv.sh
. scripts/lib/venv.sh

versions=("$@")
[ ${#versions[@]} -gt 0 ] || versions=("${SUPPORTED_MEGATRON_CORE[@]:0:${#SUPPORTED_MEGATRON_CORE[@]}-1}")
status=0
summary=()
for version in "${versions[@]}"; do
  venv=".venvs/mcore-${version}"
  echo "=== megatron-core ${version} (${venv}, $(python_for "${version}"))"
  ensure_venv "${venv}" "${version}" test
  started=${SECONDS}
  # shellcheck disable=SC2086  # TESTS is a list of paths
  if "${venv}/bin/python" -m pytest -q ${TESTS:-tests} ${PYTEST_K:+-k "${PYTEST_K}"}; then
    summary+=("megatron-core ${version}: passed ($((SECONDS - started)) s)")
  else
    summary+=("megatron-core ${version}: FAILED")
    status=1
  fi
done
printf '%s\n' "${summary[@]}"
exit "${status}"
