#!/usr/bin/env bash
# Check that every patches/<ref>.patch applies to its Megatron-LM release tag or branch.
#   scripts/check_patches.sh MEGATRON_LM_GIT_DIR [PATCH ...]    (default: patches/*.patch)
# MEGATRON_LM_GIT_DIR is a Megatron-LM clone or bare mirror with the tags and the branches main
# and dev (a clone's origin/main, origin/dev do). Per patch, the ref's
# megatron/training/arguments.py is exported into a temporary directory, then: `git apply
# --check`, `patch --dry-run -p1 --fuzz=0` (no fuzz: context must match exactly), and the
# patched file must still compile. Prints one ok/FAIL line per ref (main and dev move on).
set -euo pipefail
if [ $# -lt 1 ] || [ "$1" = -h ] || [ "$1" = --help ]; then
  sed -n '2,8p' "$0"
  [ $# -ge 1 ] && exit 0 || exit 2
fi
git_dir=$1
shift
git -C "${git_dir}" rev-parse --git-dir >/dev/null 2>&1 \
  || { echo "check_patches.sh: '${git_dir}' is not a git repository" >&2; exit 2; }
root=$(cd "$(dirname "$0")/.." && pwd)
patches=("$@")
[ ${#patches[@]} -gt 0 ] || patches=("${root}"/patches/*.patch)
work=$(mktemp -d)
trap 'rm -rf "${work}"' EXIT

status=0
for patch_file in "${patches[@]}"; do
  patch_file=$(cd "$(dirname "${patch_file}")" && pwd)/$(basename "${patch_file}")
  tag=$(basename "${patch_file}" .patch)
  ref=${tag}
  git -C "${git_dir}" rev-parse -q --verify "${ref}^{commit}" >/dev/null \
    || ref=origin/${tag}  # a clone's remote branch
  tree=${work}/${tag}
  # Its own repository, so git apply works from the tree's root even if TMPDIR is in a repo.
  mkdir -p "${tree}" && git init -q "${tree}"
  log=${tree}.log
  if ! git -C "${git_dir}" archive "${ref}" -- megatron/training/arguments.py 2>"${log}" \
      | tar -x -C "${tree}" 2>>"${log}"; then
    result="FAIL (ref not found: $(head -n 1 "${log}"))"
  elif ! (cd "${tree}" && git apply --check "${patch_file}") >"${log}" 2>&1; then
    result="FAIL (git apply --check: $(head -n 1 "${log}"))"
  elif ! (cd "${tree}" && patch --dry-run -p1 --fuzz=0 <"${patch_file}") >"${log}" 2>&1; then
    result="FAIL (patch --dry-run: $(grep -m 1 -i -E 'fail|error' "${log}"))"
  elif ! (cd "${tree}" && git apply "${patch_file}" \
      && python3 -m py_compile megatron/training/arguments.py) >"${log}" 2>&1; then
    result="FAIL (patched file: $(tail -n 1 "${log}"))"
  else
    result="ok   (git apply --check, patch --dry-run, compiles)"
  fi
  [[ ${result} == ok* ]] || status=1
  printf '%-14s %s\n' "${tag}" "${result}"
done
exit "${status}"
