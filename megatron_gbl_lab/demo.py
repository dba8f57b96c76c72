"""`megatron-gbl demo` and `megatron-gbl analyze`: run the rank bodies on gloo, write results.

`run_demo` trains and evaluates every run of --scopes from the same initial weights and data
order (train.py), then writes results.json (report.py), the figures (plots.py) and each run's
model (model.py); `analyze_model` reloads a saved model and collects its routing.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Optional

from megatron_gbl_lab import batches
from megatron_gbl_lab import harness, plots
from megatron_gbl_lab.evaluate import analyze_worker
from megatron_gbl_lab.model import read_checkpoint
from megatron_gbl_lab.report import summarize, write_json
from megatron_gbl_lab.runs import DemoSettings, ScopeSpec, seed_record_path
from megatron_gbl_lab.train import train_scopes

RUN_TIMEOUT_S = 1800  # one run of one seed: 30 min, several times the default's on 2 cores


def run_demo(settings: DemoSettings, scopes: list[ScopeSpec], seeds: list[int],
             corpus: batches.Corpus, out_dir: str, progress: bool = True,
             resume: bool = False) -> dict:
    """Train every run at every seed on `settings.ranks` gloo processes; write results.json and
    the PNGs into `out_dir` and each run's model into `runs.model_directory`. Returns the
    results: `per_seed[seed]["scopes"][label]` (one run), its `summary` and `paired`
    differences over the seeds (report.summarize).

    With several seeds each seed's runs are also written to `runs.seed_record_path` as soon as
    they end; `resume` takes the seeds found there instead of training them again."""
    os.makedirs(out_dir, exist_ok=True)
    started = time.perf_counter()
    common = {name: value for name, value in dataclasses.asdict(settings).items()
              if name != "seed"}
    identity = {"settings": common, "runs": [spec.label for spec in scopes],
                "corpus_sha256": corpus.sha256()}
    done = read_seed_records(out_dir, seeds, identity) if resume else {}
    todo = [seed for seed in seeds if seed not in done]
    job = {"settings": settings, "seeds": todo, "num_seeds": len(seeds), "scopes": scopes,
           "corpus": corpus, "out_dir": out_dir, "progress": progress,
           "record": identity if len(seeds) > 1 else None}
    trained = harness.run_gloo(train_scopes, settings.ranks, job,
                               timeout_s=RUN_TIMEOUT_S * len(todo) * len(scopes))[0] if todo else {}
    per_seed = {**done, **trained}
    results = {"settings": common, "seeds": seeds, "domains": corpus.domains,
               "corpus_sha256": identity["corpus_sha256"],
               "resumed_seeds": [seed for seed in seeds if seed in done],
               "wall_seconds": time.perf_counter() - started,
               "per_seed": {str(seed): {"scopes": per_seed[seed]} for seed in seeds}}
    results.update(summarize(results["per_seed"], seeds))
    results["files"] = plots.demo_figures(results, out_dir)
    write_json(os.path.join(out_dir, "results.json"), results)
    return results


def read_seed_records(out_dir: str, seeds: list[int], identity: dict) -> dict[int, dict]:
    """{seed: runs} of the seeds whose runs.json is in `out_dir` (`--resume`); a record of
    other settings, runs or text is an error, not a seed to train again silently."""
    done = {}
    for seed in seeds:
        path = seed_record_path(out_dir, seed)
        if not os.path.isfile(path):
            continue
        with open(path) as f:
            record = json.load(f)
        differing = [key for key, value in identity.items() if record.get(key) != value]
        if "settings" in differing:
            theirs = record.get("settings") or {}
            differing[differing.index("settings")] = "settings " + ", ".join(
                f"{name} ({theirs.get(name)} there, {value} here)"
                for name, value in identity["settings"].items() if theirs.get(name) != value)
        if differing:
            raise ValueError(
                f"--resume: {path} holds seed {seed} of another demo (its {' and '.join(differing)}"
                f" differ from this command's); pass the command that wrote it, another --out, "
                f"or drop --resume to train every seed again")
        done[seed] = record["scopes"]
    return done


def analyze_model(model_dir: str, records: list[dict], out_dir: str, max_sequences: int,
                  micro_batch_size: Optional[int]) -> dict:
    """`megatron-gbl analyze`: routing statistics of a saved demo model on labelled records,
    written as analysis.json and three PNGs (Fig. 1b, 4a, 4b) into `out_dir`."""
    checkpoint = read_checkpoint(model_dir)
    domains = sorted({record["domain"] for record in records})
    streams = batches.domain_streams(records, domains)
    short = [d for d, stream in zip(domains, streams) if len(stream) <= checkpoint["seq_length"]]
    if short:
        raise ValueError(f"--data: domain {short[0]!r} has fewer than "
                         f"{checkpoint['seq_length'] + 1} tokens, less than one sequence of the "
                         "model; add text for it")
    job = {"checkpoint": checkpoint, "streams": streams, "domains": domains,
           "max_sequences": max_sequences,
           "micro_batch_size": micro_batch_size or checkpoint["micro_batch_size"]}
    result = harness.run_gloo(analyze_worker, 1, job)[0]
    os.makedirs(out_dir, exist_ok=True)
    routing = result["routing"]
    label = checkpoint["scope"]
    files = {"heatmaps": "selection_frequency.png", "topk": "topk_score_sums.png",
             "overlap": "high_frequency_overlap.png"}
    plots.selection_heatmaps({label: routing["selection_frequency"]}, domains,
                             routing["uniform_frequency"], os.path.join(out_dir, files["heatmaps"]))
    plots.topk_score_sums({label: routing["topk_score_sum"]}, domains,
                          routing["uniform_topk_score_sum"], os.path.join(out_dir, files["topk"]))
    plots.overlap_heatmaps(routing["high_frequency_overlap"], domains,
                           routing["high_frequency_factor"],
                           os.path.join(out_dir, files["overlap"]))
    result.update(model=model_dir, scope=label, domains=domains,
                  files={name: os.path.join(out_dir, file) for name, file in files.items()})
    write_json(os.path.join(out_dir, "analysis.json"), result)
    return result
