"""Level-2 check: read back the TensorBoard events of a real Megatron-LM run (not run in CI).

    python check_tensorboard.py LOG_DIR SCOPE TOKENS_PER_STEP TOPK

SCOPE global with one micro-batch per rank: the logged load_balancing_loss (global f, local P,
averaged over DP) must equal global_batch_lbl. SCOPE micro: it must equal micro_batch_lbl.
Balance BSZ is TOKENS_PER_STEP for global; each histogram counts every expert choice.
Prints the scalars and one PASS/FAIL line per check; exits 1 if any failed.
"""

from __future__ import annotations

import math
import sys

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from megatron_gbl import metrics

NAMES = metrics.names(has_lbl=True, has_expert_bias=False)  # an LBL run, no expert bias


def main(log_dir: str, scope: str, tokens: int, topk: int) -> int:
    events = EventAccumulator(log_dir, size_guidance={"scalars": 0, "histograms": 0})
    events.Reload()
    scalars = {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    histograms = {tag: [e.histogram_value for e in events.Histograms(tag)]
                  for tag in events.Tags()["histograms"] if tag.startswith("moe/tokens_per")}
    for tag in ("lm loss", "load_balancing_loss", *NAMES):
        print(f"      {tag}: {[round(v, 6) for v in scalars.get(tag, [])]}")
    for tag, per_step in sorted(histograms.items()):
        print(f"      {tag}: {[list(h.bucket) for h in per_step]}")

    def close(a, b):
        return len(a) == len(b) > 0 and all(math.isclose(x, y, rel_tol=1e-5) for x, y in zip(a, b))

    lbl = scalars.get("load_balancing_loss", [])
    same_as = metrics.GLOBAL_LBL if scope == "global" else metrics.MICRO_LBL
    checks = [
        ("plugin scalars logged", all(scalars.get(name) for name in NAMES)),
        (f"load_balancing_loss == {same_as}", close(lbl, scalars.get(same_as, []))),
        ("histograms per MoE layer, every step", len(histograms) >= 1 and all(
            len(per_step) == len(lbl) for per_step in histograms.values())),
        (f"each histogram counts {tokens} tokens x top-{topk}", all(
            h.num == sum(h.bucket) == tokens * topk for s in histograms.values() for h in s)),
    ]
    if scope == "global":
        checks.append((f"balance_bsz_tokens == {tokens}",
                       scalars.get(metrics.BALANCE_BSZ) == [tokens] * len(lbl)))
    for name, ok in checks:
        print(f"{'PASS' if ok else 'FAIL'}  {scope}: {name}")
    return 0 if all(ok for _, ok in checks) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])))
