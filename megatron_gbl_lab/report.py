"""The demo's results as text: the printed tables, results.json and its summary over seeds."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Optional

from megatron_gbl_lab import stats


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
    """The printed table: one seed's numbers per run (`format_seed_table`), or with several
    seeds their summary and paired differences (`format_seeds_table`)."""
    if len(results["seeds"]) == 1:
        return format_seed_table(results, results["seeds"][0])
    return format_seeds_table(results)


def format_seed_table(results: dict, seed: int) -> str:
    """One column per run: the numbers of one seed (METRICS and their per-domain parts), as a
    Markdown table."""
    runs = results["per_seed"][str(seed)]["scopes"]
    domains = results["domains"]
    uniform = next(iter(runs.values()))["routing"]["uniform_frequency"]
    rows = [("balancing", [r["method"] for r in runs.values()]),
            ("Balance BSZ, sequences (tokens)",
             [f"{r['balance_bsz']['sequences']} ({r['balance_bsz']['tokens']})"
              for r in runs.values()])]
    rows += [(f"held-out loss, {domain}",
              [f"{r['heldout_loss'][domain]:.4f}" for r in runs.values()])
             for domain in domains]
    rows += [(f"top-expert frequency, {domain} (uniform {uniform:.3g})",
              [f"{_mean([layer[d] for layer in r['routing']['top_expert_frequency']]):.3f}"
               for r in runs.values()])
             for d, domain in enumerate(domains)]
    rows += [(metric.title, [f"{metric.value(r):.{metric.digits}f}" for r in runs.values()])
             for metric in METRICS]
    return _markdown(list(runs), rows)


@dataclass(frozen=True)
class Metric:
    """A number per run that the summary over seeds reports: how to read it from a run's
    results, and which direction counts as a win in a paired comparison."""

    name: str
    title: str
    digits: int
    lower_is_better: bool

    def value(self, run: dict) -> float:
        return METRIC_VALUES[self.name](run)


def _mean(values) -> float:
    return sum(values) / len(values)


METRIC_VALUES = {
    "heldout_loss_mean": lambda run: run["heldout_loss_mean"],
    "mi_bits": lambda run: _mean(run["routing"]["mutual_information_bits"]),
    "top_expert_frequency": lambda run: _mean(
        [_mean(layer) for layer in run["routing"]["top_expert_frequency"]]),
    "micro_lbl": lambda run: _mean(run["routing"]["micro_lbl"]),
    "global_lbl": lambda run: _mean(run["routing"]["global_lbl"]),
    "micro_load_violation": lambda run: final_mean(run["train_curves"]["micro_load_violation"]),
    "global_load_violation": lambda run: final_mean(run["train_curves"]["global_load_violation"]),
    "micro_device_load_violation": lambda run: final_mean(
        run["train_curves"]["micro_device_load_violation"]),
    "seconds_per_step": lambda run: run["seconds_per_step"],
}
METRICS = (
    Metric("heldout_loss_mean", "held-out loss, mean of domains (nats/byte)", 4, True),
    Metric("mi_bits", "MI(domain; expert), bits, mean of layers (max: log2 domains)", 3, False),
    Metric("top_expert_frequency", "top-expert frequency, mean of domains and layers", 3, False),
    Metric("micro_lbl", "LBL micro-batch, held-out (1 = balanced)", 3, True),
    Metric("global_lbl", "LBL global-batch, held-out", 3, True),
    Metric("micro_load_violation", "load violation, micro-batch, training, last 10%", 3, True),
    Metric("global_load_violation", "load violation, global batch, training, last 10%", 3, True),
    Metric("micro_device_load_violation",
           "device load violation, micro-batch, training, last 10%", 3, True),
    Metric("seconds_per_step", "seconds per step", 3, True),
)


def summarize(per_seed: dict, seeds: list[int], baseline: Optional[str] = None) -> dict:
    """results.json's `summary`, `paired` and `noise` from `per_seed` (docs/demo.md, "Seeds"):

        summary[label][metric] = {mean, sd, n}                     over the seeds
        paired[label][metric]  = {mean_diff, ci95, wins, n}        label minus the baseline
                                                                   (default: the first label),
                                                                   seed by seed (stats.py)

    Every metric of METRICS; `summary` lists the baseline first, `paired` every other label.
    """
    labels = list(per_seed[str(seeds[0])]["scopes"])
    if baseline is not None:
        if baseline not in labels:
            raise ValueError(f"--against {baseline!r}: not a run of these results; one of "
                             f"{', '.join(labels)}")
        labels.remove(baseline)
        labels.insert(0, baseline)
    values = {label: {metric.name: [metric.value(per_seed[str(seed)]["scopes"][label])
                                    for seed in seeds]
                      for metric in METRICS}
              for label in labels}
    summary = {}
    for label in labels:
        summary[label] = {}
        for metric in METRICS:
            mean, sd = stats.mean_and_sd(values[label][metric.name])
            summary[label][metric.name] = {"mean": mean, "sd": sd, "n": len(seeds)}
    first = labels[0]
    paired = {label: {metric.name: stats.paired_difference(
                          values[label][metric.name], values[first][metric.name],
                          metric.lower_is_better)
                      for metric in METRICS}
              for label in labels[1:]}
    return {"summary": summary, "paired": paired,
            "noise": loss_noise(per_seed, seeds, labels, values)}


def loss_noise(per_seed: dict, seeds: list[int], labels: list[str], values: dict) -> dict:
    """Where the spread of the paired held-out-loss differences comes from, as standard
    deviations (RMS over the runs compared with the first one, and over seeds):

        evaluation  from which held-out windows were evaluated: with the difference d_A, d_B
                    on two halves of the windows, var(mean) = var(d_A - d_B) / 4, so
                    |d_A - d_B| / 2 at each checkpoint
        end         between the last checkpoints of one seed (5% of training apart): the
                    noise of the end of training
        seed        over seeds (what the paired intervals are made of)
        level       over seeds, of one run's own loss (without the pairing)

    None where there is nothing to measure (one checkpoint, one seed, one run).
    """
    def rms(values):
        values = [value for value in values if value is not None and not math.isnan(value)]
        return math.sqrt(sum(value * value for value in values) / len(values)) if values else None

    first, others = labels[0], labels[1:]
    evaluation, end = [], []
    for seed in seeds:
        runs = per_seed[str(seed)]["scopes"]
        base = runs[first]["heldout_checkpoints"]
        for label in others:
            checkpoints = runs[label]["heldout_checkpoints"]
            evaluation += [abs((a - a0) - (b - b0)) / 2
                           for entry, entry0 in zip(checkpoints, base)
                           for (a, b), (a0, b0) in [(entry["heldout_loss_halves"],
                                                     entry0["heldout_loss_halves"])]
                           if None not in (a, b, a0, b0)]  # a half without windows: None
            end.append(stats.mean_and_sd([entry["heldout_loss_mean"] - entry0["heldout_loss_mean"]
                                          for entry, entry0 in zip(checkpoints, base)])[1])
    losses = {label: values[label]["heldout_loss_mean"] for label in labels}
    seed_sd = [stats.mean_and_sd([x - y for x, y in zip(losses[label], losses[first])])[1]
               for label in others]
    level = [stats.mean_and_sd(losses[label])[1] for label in labels]
    return {"evaluation": rms(evaluation), "end": rms(end), "seed": rms(seed_sd),
            "level": rms(level)}


def format_seeds_table(results: dict) -> str:
    """Per metric, mean ± sd over the seeds of every run, and each run's paired difference
    against the first run with its 95% interval and the seeds it wins."""
    seeds = results["seeds"]
    labels = list(results["summary"])
    first = labels[0]
    methods = results["per_seed"][str(seeds[0])]["scopes"]
    rows = [("balancing", [methods[label]["method"] for label in labels])]
    for metric in METRICS:
        digits = metric.digits
        rows.append((metric.title, [
            _mean_sd(results["summary"][label][metric.name], digits) for label in labels]))
        if metric.name == "seconds_per_step":
            continue
        direction = "lower" if metric.lower_is_better else "higher"
        rows.append((f"  Δ vs {first}, 95% CI, seeds {direction}", ["—"] + [
            _paired_cell(results["paired"][label][metric.name], digits, direction)
            for label in labels[1:]]))
    seconds = {label: [results["per_seed"][str(seed)]["scopes"][label].get("run_seconds")
                       for seed in seeds] for label in labels}
    if all(None not in values for values in seconds.values()):  # older results lack them
        rows.append(("seconds per run (training, held-out evaluation)", [
            _mean_sd(dict(zip(("mean", "sd"), stats.mean_and_sd(seconds[label]))), 0)
            for label in labels]))
    note = (f"Seeds {', '.join(map(str, seeds))} (n = {len(seeds)}): mean ± sd over seeds. Δ: "
            f"the run minus {first} at the same seed (same initial weights and data order), "
            "mean with its 95% Student-t interval, and in how many seeds the run is lower / "
            "higher; 'resolved': the interval excludes 0.")
    noise = results["noise"]
    parts = [f"{name} {noise[key]:.4f}" for key, name in (
        ("evaluation", "the held-out sample"), ("end", "the end of training"),
        ("seed", "seed to seed")) if noise[key] is not None]
    if parts:
        note += (f" Spread (sd) of the held-out-loss differences against {first} from "
                 + ", ".join(parts) + f"; of one run's own loss over seeds {noise['level']:.4f}"
                 " (results.json: noise).")
    return note + "\n\n" + _markdown(labels, rows)


def _mean_sd(entry: dict, digits: int) -> str:
    if entry["sd"] is None:
        return f"{entry['mean']:.{digits}f}"
    return f"{entry['mean']:.{digits}f} ± {entry['sd']:.{digits}f}"


def _paired_cell(entry: dict, digits: int, direction: str) -> str:
    text = f"{entry['mean_diff']:+.{digits}f}"
    if entry["ci95"] is not None:
        low, high = entry["ci95"]
        text += f" [{low:+.{digits}f}, {high:+.{digits}f}]"
    text += f" {direction} {entry['wins']}/{entry['n']}"
    return text + (", resolved" if stats.resolved(entry) else "")


def _markdown(labels: list[str], rows: list[tuple[str, list[str]]]) -> str:
    header = ["", *labels]
    widths = [max(len(row[0]) for row in rows)] + [
        max(len(label), *(len(row[1][i]) for row in rows)) for i, label in enumerate(labels)]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    for name, values in rows:
        cells = [name.ljust(widths[0])] + [v.rjust(w) for v, w in zip(values, widths[1:])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
