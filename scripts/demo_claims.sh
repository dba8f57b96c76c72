#!/usr/bin/env bash
# The README's statements over seeds ("What the demo shows, over seeds"): every run at 5 seeds
# on the built-in corpus and on a corpus of real text (megatron_gbl_lab.text_corpus), then the
# summaries paired against other runs. 300 steps instead of the demo's 500, so that the 11 runs x
# 5 seeds x 2 corpora fit in about 80 minutes on 2 CPU cores; OUT (default out/claims) receives
# each corpus's results.json, figures and tables. RUNS (a --scopes list) and AGAINST (the runs
# the summaries pair against) replace the README's set, e.g. for docs/claims/quantile.md:
#   RUNS=qb-micro,qb-dp,qb-global,micro,global,auxfree-global \
#   AGAINST="qb-micro micro global auxfree-global" OUT=out/qb-claims scripts/demo_claims.sh
# shellcheck source-path=SCRIPTDIR
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=lib/venv.sh
. scripts/lib/venv.sh

ensure_venv .venv "${MEGATRON_CORE:-${NEWEST_MEGATRON_CORE}}" demo
out=${OUT:-out/claims}
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
