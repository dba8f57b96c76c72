# Virtual environments for the tests, the demo and the version matrix: one per megatron-core
# release, each with torch 2.13.0 and this checkout installed editable. Sourced by
# scripts/test.sh, scripts/demo.sh and scripts/test_versions.sh; the caller sets
# `set -euo pipefail` and runs from the checkout's root.
# shellcheck shell=bash disable=SC2034  # sets variables that the sourcing script reads

NEWEST_MEGATRON_CORE=0.19.2
# The newest patch release of every supported minor release, oldest first.
SUPPORTED_MEGATRON_CORE=(0.12.3 0.13.1 0.14.0 0.15.3 0.16.1 0.17.1 0.18.2 0.19.2)
TORCH_VERSION=2.13.0
# Megatron-Bridge for `scripts/test.sh --bridge` (Python 3.12, the newest megatron-core).
BRIDGE_VERSION=0.6.2

# The Python a megatron-core release is tested with (0.17 and later need Python >= 3.12): $PYTHON312 /
# $PYTHON311 if set, else pythonX.Y if it runs, else pyenv's newest X.Y.
python_for() {
  local minor override candidate pyenv_root
  case $1 in
    0.1[2-6].*) minor=3.11 override=${PYTHON311:-} ;;
    *) minor=3.12 override=${PYTHON312:-} ;;
  esac
  if [ -n "${override}" ]; then
    echo "${override}"
    return
  fi
  pyenv_root=$(pyenv root 2>/dev/null || echo "${HOME}/.pyenv")
  for candidate in "python${minor}" \
    $(printf '%s\n' "${pyenv_root}/versions/${minor}".*/bin/python | sort -V -r); do
    if "${candidate}" -c "" 2>/dev/null; then
      echo "${candidate}"
      return
    fi
  done
  echo "python${minor}"  # not found: ensure_venv says so
}

# ensure_venv DIR MEGATRON_CORE_VERSION EXTRA: create DIR (once) and install what is missing.
# A stamp of what was installed makes a second call with the same inputs return at once. Its
# second line lists the extras DIR has, with those they bring (test brings demo), so one .venv
# serves scripts/demo.sh, scripts/test.sh and scripts/try_megatron_lm.sh: a call whose EXTRA is
# among them returns at once, one whose EXTRA is not installs it beside them.
ensure_venv() {
  local dir=$1 version=$2 extra=$3 python stamp installed_extras=""
  python=$(python_for "${version}")
  stamp="megatron-core==${version} torch==${TORCH_VERSION} $(sha256sum pyproject.toml)"
  if [ -f "${dir}/.installed" ] && [ "$(head -n 1 "${dir}/.installed")" = "${stamp}" ]; then
    installed_extras=$(sed -n 2p "${dir}/.installed")
    case " ${installed_extras} " in *" ${extra} "*) return ;; esac
  fi
  "${python}" -c "" 2>/dev/null || {
    echo "error: megatron-core ${version} is tested with ${python}, which does not run." \
      "Install it (e.g. 'pyenv install 3.12'), point PYTHON312 / PYTHON311 at one, or pick" \
      "another release with MEGATRON_CORE=<version> (0.12-0.16: Python 3.11)" >&2
    exit 2
  }
  echo "--- setting up ${dir}: ${python}, megatron-core ${version}, torch ${TORCH_VERSION}" >&2
  if [ -x "${dir}/bin/python" ] && [ "$("${dir}/bin/python" -c 'import sys; print(sys.version)')" \
    != "$("${python}" -c 'import sys; print(sys.version)')" ]; then
    echo "--- ${dir} was made with another Python: making it anew" >&2
    rm -rf "${dir}"
  fi
  [ -x "${dir}/bin/python" ] || "${python}" -m venv "${dir}"
  "${dir}/bin/python" -m pip install -q --upgrade pip
  # torch first and pinned: on Python 3.11 here this is a CPU build from local disk; elsewhere
  # (and on 3.12) the registry's default build, which also runs on CPU.
  "${dir}/bin/python" -m pip install -q "torch==${TORCH_VERSION}"
  local extras
  extras=$(echo "${installed_extras} ${extra}" | xargs | tr ' ' ',')
  "${dir}/bin/python" -m pip install -q "megatron-core==${version}" -e ".[${extras}]"
  printf '%s\n%s\n' "${stamp}" "$(extras_with_their_own "${dir}/bin/python" "${extras}")" \
    >"${dir}/.installed"
}

# extras_with_their_own PYTHON EXTRA,EXTRA...: those extras and every extra they bring through a
# "megatron-gbl[...]" requirement in pyproject.toml, space-separated.
extras_with_their_own() {
  "$1" - "$2" <<'PY'
import re, sys, tomllib
with open("pyproject.toml", "rb") as file:
    optional = tomllib.load(file)["project"]["optional-dependencies"]
todo, found = sys.argv[1].split(","), set()
while todo:
    extra = todo.pop()
    if extra not in found:
        found.add(extra)
        for requirement in optional.get(extra, []):
            brought = re.fullmatch(r"megatron-gbl\[(.+)\]", requirement.strip())
            todo += brought.group(1).split(",") if brought else []
print(" ".join(sorted(found)))
PY
}

# ensure_bridge_venv DIR: ensure_venv with the newest megatron-core, then Megatron-Bridge without
# its dependencies and the pure-Python packages its training path imports
# (scripts/bridge-cpu-requirements.txt says why), torch and megatron-core held where they are.
ensure_bridge_venv() {
  local dir=$1 stamp
  ensure_venv "${dir}" "${NEWEST_MEGATRON_CORE}" test
  stamp="megatron-bridge==${BRIDGE_VERSION} $(sha256sum scripts/bridge-cpu-requirements.txt)"
  if [ -f "${dir}/.bridge-installed" ] && [ "$(cat "${dir}/.bridge-installed")" = "${stamp}" ]; then
    return
  fi
  echo "--- adding megatron-bridge ${BRIDGE_VERSION} to ${dir}" >&2
  "${dir}/bin/python" -m pip install -q -r scripts/bridge-cpu-requirements.txt \
    -c <(printf 'torch==%s\nmegatron-core==%s\n' "${TORCH_VERSION}" "${NEWEST_MEGATRON_CORE}")
  "${dir}/bin/python" -m pip install -q --no-deps "megatron-bridge==${BRIDGE_VERSION}"
  echo "${stamp}" >"${dir}/.bridge-installed"
}
