#!/usr/bin/env bash
# The statements over seeds of docs/claims.md (and of the README's table of them).
#
#   scripts/demo_claims.sh                        # the tiny demo's claims (below)
#   scripts/demo_claims.sh --preset fine-grained  # the fine-grained rows (further below)
#
# Without --preset: every run at 5 seeds on the built-in corpus and on a corpus of real text
# (megatron_gbl_lab.text_corpus), then the summaries paired against other runs. 300 steps
# instead of the demo's 500, so that the 11 runs x 5 seeds x 2 corpora fit in two hours (they
# took about 2 hours on 2 cores: docs/timings.json); OUT (default out/claims) receives each
# corpus's results.json, figures and tables. RUNS (a --scopes list) and AGAINST (the runs the
# summaries pair against) replace the README's set, e.g. for docs/claims/quantile.md:
#   RUNS=qb-micro,qb-dp,qb-global,micro,global,auxfree-global \
#   AGAINST="qb-micro micro global auxfree-global" OUT=out/qb-claims scripts/demo_claims.sh
#
# --preset fine-grained: `megatron-gbl demo --preset fine-grained` on the text corpus of five
# genres (`python -m megatron_gbl_lab.text_corpus --domains genres`), micro and
# global at seeds 0-7, auxfree-micro+matched and auxfree-global at seeds 0-4 (26 runs, about 3
# hours on 2 cores), into OUT/fine-grained; the summaries paired against micro and against
# auxfree-micro+matched go to docs/claims/fine-grained-text.md. Each seed's runs are kept as
# soon as they end, and a second call resumes from the seeds already in OUT/fine-grained.
# shellcheck source-path=SCRIPTDIR
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=lib/venv.sh
. scripts/lib/venv.sh

preset=
if [ "${1:-}" = --preset ]; then
  preset=${2:-}
  shift 2 || true
fi
if [ $# -gt 0 ] || { [ -n "${preset}" ] && [ "${preset}" != fine-grained ]; }; then
  echo "error: scripts/demo_claims.sh takes no arguments or --preset fine-grained (got:" \
    "${preset:+--preset ${preset} }$*)" >&2
  exit 2
fi

ensure_venv .venv "${MEGATRON_CORE:-${NEWEST_MEGATRON_CORE}}" demo
out=${OUT:-out/claims}

if [ "${preset}" = fine-grained ]; then
  out=${out}/fine-grained
  # Five domains that differ in kind (the default four do not specialise at this shape). The
  # same packages give the same text; a resumed demo refuses seeds of other text.
  .venv/bin/python -m megatron_gbl_lab.text_corpus "${out}/text-corpus" --domains genres \
    >/dev/null
  data=(--train-data "${out}/text-corpus/train.jsonl"
    --valid-data "${out}/text-corpus/valid.jsonl")
  .venv/bin/megatron-gbl demo --preset fine-grained --scopes micro,global \
    --seeds 0,1,2,3,4,5,6,7 --resume "${data[@]}" --out "${out}/text-lbl"
  .venv/bin/megatron-gbl demo --preset fine-grained --scopes auxfree-micro+matched,auxfree-global \
    --seeds 0,1,2,3,4 --resume "${data[@]}" --out "${out}/text-auxfree"
  summary=docs/claims/fine-grained-text.md
  {
    echo "# scripts/demo_claims.sh --preset fine-grained, text corpus: the summary over seeds"
    printf '\nmicro and global (%s/text-lbl/results.json), paired against micro:\n\n' "${out}"
    .venv/bin/megatron-gbl compare "${out}/text-lbl/results.json" --against micro
    printf '\nauxfree-micro+matched and auxfree-global (%s/text-auxfree/results.json),' "${out}"
    printf ' paired against auxfree-micro+matched:\n\n'
    .venv/bin/megatron-gbl compare "${out}/text-auxfree/results.json" \
      --against auxfree-micro+matched
  } >"${summary}"
  echo "Results: ${out}/text-{lbl,auxfree}/results.json; the summaries: ${summary}"
  exit 0
fi

runs="micro,global,dp,shuffle,global+micro,micro-then-global@150,auxfree-micro"
runs+=",auxfree-micro+matched,auxfree-global,global+device=0.3,global+device=1"
runs=${RUNS:-${runs}}
against=${AGAINST:-micro global auxfree-global}
seeds=0,1,2,3,4
steps=300

.venv/bin/megatron-gbl demo --scopes "${runs}" --seeds "${seeds}" --steps "${steps}" \
  --out "${out}/builtin"
.venv/bin/python -m megatron_gbl_lab.text_corpus "${out}/text-corpus"
.venv/bin/megatron-gbl demo --scopes "${runs}" --seeds "${seeds}" --steps "${steps}" \
  --train-data "${out}/text-corpus/train.jsonl" --valid-data "${out}/text-corpus/valid.jsonl" \
  --out "${out}/text"
# One file per corpus with the summary paired against each run the README compares with
# (docs/claims/<corpus>.md is this file of the README's run).
for corpus in builtin text; do
  {
    echo "# scripts/demo_claims.sh, ${corpus} corpus: the summary over seeds"
    for run in ${against}; do
      printf '\nPaired against %s:\n\n' "${run}"
      .venv/bin/megatron-gbl compare "${out}/${corpus}/results.json" --against "${run}"
    done
  } >"${out}/${corpus}/summary.md"
done
echo "Results: ${out}/{builtin,text}/results.json, the summaries paired against ${against}:"
echo "${out}/{builtin,text}/summary.md"
