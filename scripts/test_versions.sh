#!/usr/bin/env bash
# Run the test suite against each supported megatron-core release, each in its own venv.
#   scripts/test_versions.sh                 # 0.12.3 0.14.0 0.16.1
#   scripts/test_versions.sh 0.14.0          # just one
# Venvs live in .venvs/mcore-<version> and are reused; torch is the CPU build 2.13.0.
# TESTS="tests/a.py tests/b.py" runs a subset; PYTEST_K="expression" selects tests within it.
set -euo pipefail
cd "$(dirname "$0")/.."
versions=("$@")
[ ${#versions[@]} -gt 0 ] || versions=(0.12.3 0.14.0 0.16.1)
python=${PYTHON:-python3}
status=0
summary=()
for version in "${versions[@]}"; do
  venv=".venvs/mcore-${version}"
  echo "=== megatron-core ${version} (${venv})"
  if [ ! -x "${venv}/bin/python" ]; then
    "${python}" -m venv "${venv}"
    "${venv}/bin/pip" install -q --upgrade pip
    "${venv}/bin/pip" install -q torch==2.13.0
  fi
  "${venv}/bin/pip" install -q "megatron-core==${version}" -e ".[test]"
  # shellcheck disable=SC2086  # TESTS is a list of paths
  if "${venv}/bin/python" -m pytest -q ${TESTS:-tests} ${PYTEST_K:+-k "${PYTEST_K}"}; then
    summary+=("megatron-core ${version}: passed")
  else
    summary+=("megatron-core ${version}: FAILED")
    status=1
  fi
done
printf '%s\n' "${summary[@]}"
exit "${status}"
