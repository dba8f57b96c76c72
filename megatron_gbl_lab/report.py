"""The demo's results as text: the printed table and results.json."""

from __future__ import annotations

import json
import math


def write_json(path: str, data) -> None:
    """Strict JSON: NaN (e.g. an overlap with no high-frequency experts) becomes null."""
    def clean(value):
        if isinstance(value, float) and math.isnan(value):
            return None
        if isinstance(value, dict):
            return {key: clean(item) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(item) for item in value]
        return value

    with open(path, "w") as f:
        json.dump(clean(data), f, indent=1, allow_nan=False)


def final_mean(curve: list) -> float:
    """Mean of a training curve over its last 10% of steps (at least one): where it ended,
    with less of a single step's noise."""
    tail = curve[-max(1, len(curve) // 10):]
    return sum(tail) / len(tail)


def format_table(results: dict) -> str:
    """One column per scope: the numbers the demo is about, as a Markdown table."""
    runs = results["scopes"]
    domains = results["domains"]
    first = next(iter(runs.values()))["routing"]

    def mean(values):
        return sum(values) / len(values)

    rows = [("balancing", [r["method"] for r in runs.values()]),
            ("Balance BSZ, sequences (tokens)",
             [f"{r['balance_bsz']['sequences']} ({r['balance_bsz']['tokens']})"
              for r in runs.values()])]
    rows += [(f"held-out loss, {domain}",
              [f"{r['heldout_loss'][domain]:.4f}" for r in runs.values()])
             for domain in domains]
    rows.append(("held-out loss, mean", [f"{r['heldout_loss_mean']:.4f}" for r in runs.values()]))
    rows.append((f"MI(domain; expert), bits (max {math.log2(len(domains)):.2f})",
                 [f"{mean(r['routing']['mutual_information_bits']):.3f}" for r in runs.values()]))
    rows += [(f"top-expert frequency, {domain} (uniform {first['uniform_frequency']:.3g})",
              [f"{mean([layer[d] for layer in r['routing']['top_expert_frequency']]):.3f}"
               for r in runs.values()])
             for d, domain in enumerate(domains)]
    rows.append(("LBL micro-batch, held-out (1 = balanced)",
                 [f"{mean(r['routing']['micro_lbl']):.3f}" for r in runs.values()]))
    rows.append(("LBL global-batch, held-out",
                 [f"{mean(r['routing']['global_lbl']):.3f}" for r in runs.values()]))
    rows += [(f"load violation, {batch}, training, last 10%{note}",
              [f"{final_mean(r['train_curves'][curve]):.3f}" for r in runs.values()])
             for batch, curve, note in (("micro-batch", "micro_load_violation", " (0 = balanced)"),
                                        ("global batch", "global_load_violation", ""))]
    rows.append(("seconds per step", [f"{r['seconds_per_step']:.3f}" for r in runs.values()]))
    header = ["", *runs]
    widths = [max(len(row[0]) for row in rows)] + [
        max(len(label), *(len(row[1][i]) for row in rows)) for i, label in enumerate(runs)]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    for name, values in rows:
        cells = [name.ljust(widths[0])] + [v.rjust(w) for v, w in zip(values, widths[1:])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
