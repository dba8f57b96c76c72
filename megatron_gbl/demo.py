"""The demo's training and evaluation: one tiny Megatron-Core GPT-MoE per load-balancing scope,
trained on CPU over gloo data-parallel ranks from the same initial weights and data order.

Per step, each of R ranks runs M micro-batches through Megatron-Core's schedule
(`get_forward_backward_func`) with the plugin at the scope under test, gradients are averaged
over the ranks with one all-reduce, and Adam steps. Every micro-batch holds one domain and each
global batch (R x M micro-batches) mixes domains: the setting of the paper's Sec. 2.2.
After training, every scope is evaluated on the same held-out sequences with
`analysis.RoutingCollector` and saved; `analyze_model` (`megatron-gbl analyze`) reloads one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from megatron_gbl import corpus as corpus_lib
from megatron_gbl import harness
from megatron_gbl.analysis import RoutingCollector
from megatron_gbl.config import SCOPES

MIN_RANKS = 4
MODEL_FILE = "model.pt"


@dataclass(frozen=True)
class DemoSettings:
    """Everything one demo run depends on (saved in results.json and with every model)."""

    steps: int = 500
    ranks: int = 4
    microbatches: int = 2        # per rank per step: gradient accumulation
    micro_batch_size: int = 4    # sequences per micro-batch
    seq_length: int = 64         # bytes per sequence
    num_layers: int = 2
    hidden_size: int = 64
    num_experts: int = 8
    topk: int = 2
    aux_loss_coeff: float = 1e-2  # Switch / ST-MoE's weight, which the paper follows
    lr: float = 3e-3             # peak: linear warm-up over 5% of the steps, cosine to 10%
    seed: int = 0
    eval_sequences: int = 128    # held-out sequences per domain

    def model_overrides(self) -> dict:
        """harness.moe_config keyword arguments of the demo model (saved with it)."""
        return dict(
            num_layers=self.num_layers, hidden_size=self.hidden_size, num_attention_heads=4,
            ffn_hidden_size=2 * self.hidden_size, moe_ffn_hidden_size=2 * self.hidden_size,
            num_moe_experts=self.num_experts, moe_router_topk=self.topk,
            moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=self.aux_loss_coeff,
        )


@dataclass(frozen=True)
class ScopeSpec:
    """One run of the demo: `label` as the user wrote it, the plugin arguments it means."""

    label: str
    scope: str
    sync_group_size: Optional[int] = None

    @property
    def dirname(self) -> str:
        return self.label.replace(":", "-")

    def enable_plugin(self, model) -> None:
        import megatron_gbl

        megatron_gbl.enable(self.scope, sync_group_size=self.sync_group_size, model=model)


def parse_scopes(text: str, ranks: int) -> list[ScopeSpec]:
    """`--scopes micro,dp:2,dp,global` -> specs; `dp:N` / `global:N` sync blocks of N ranks."""
    usage = ("use a comma-separated list of micro, seq, dp, global, dp:N, global:N (N dividing "
             f"--ranks {ranks}), e.g. --scopes micro,dp:2,dp,global")
    specs = []
    for label in (part.strip() for part in text.split(",")):
        name, _, size = label.partition(":")
        if name not in SCOPES:
            raise ValueError(f"--scopes: unknown scope {label!r}; {usage}")
        sync_group_size = None
        if size:
            if name not in ("dp", "global") or not size.isdigit() or int(size) < 1:
                raise ValueError(f"--scopes: {label!r} is not a scope; only dp and global take "
                                 f":N with N a positive integer; {usage}")
            sync_group_size = int(size)
            if ranks % sync_group_size:
                raise ValueError(f"--scopes: {label!r} syncs blocks of {sync_group_size} ranks, "
                                 f"which does not divide --ranks {ranks}; {usage}")
        specs.append(ScopeSpec(label, name, sync_group_size))
    labels = [spec.label for spec in specs]
    if len(set(labels)) != len(labels):
        raise ValueError(f"--scopes: {text!r} names a scope twice; {usage}")
    return specs


def check_settings(settings: DemoSettings) -> None:
    """Reject what cannot show the effect, naming the flag, before any process starts."""
    if settings.ranks < MIN_RANKS:
        raise ValueError(
            f"--ranks {settings.ranks}: the demo needs at least {MIN_RANKS} data-parallel ranks "
            f"so that a global batch mixes several single-domain micro-batches; use --ranks "
            f"{MIN_RANKS} or more (they are processes: CPU cores are shared)")
    for flag, value in (("--steps", settings.steps), ("--microbatches", settings.microbatches),
                        ("--micro-batch-size", settings.micro_batch_size),
                        ("--seq-length", settings.seq_length),
                        ("--eval-sequences", settings.eval_sequences)):
        if value < 1:
            raise ValueError(f"{flag} {value}: must be at least 1")


def train_scopes(rank: int, world_size: int, job: dict) -> dict:
    """Rank body (spawned by harness.run_gloo): train and evaluate every scope in turn."""
    harness.init_model_parallel()
    return {spec.label: _train_and_evaluate(rank, world_size, spec, job)
            for spec in job["scopes"]}


def _train_and_evaluate(rank: int, world_size: int, spec: ScopeSpec, job: dict) -> dict:
    import megatron_gbl
    from megatron.core.pipeline_parallel import get_forward_backward_func

    settings: DemoSettings = job["settings"]
    corpus: corpus_lib.Corpus = job["corpus"]
    model = build_model(settings.model_overrides(), settings.seq_length, settings.seed)
    spec.enable_plugin(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: learning_rate_factor(step, settings.steps))
    params = list(model.parameters())
    slots = settings.ranks * settings.microbatches
    curves = {"loss": [], "micro_lbl": [], "global_lbl": []}
    step_seconds = []
    progress = _progress(rank, job, spec, settings.steps)
    for step in range(settings.steps):
        started = time.perf_counter()
        domains = corpus_lib.step_domains(settings.seed, step, slots, len(corpus.domains))
        my_slots = [k * world_size + rank for k in range(settings.microbatches)]
        batches = [_train_batch(corpus, settings, step, slot, domains[slot]) for slot in my_slots]
        model.zero_grad(set_to_none=True)
        losses = get_forward_backward_func()(
            forward_step_func=_forward_step, data_iterator=iter(batches), model=model,
            num_microbatches=settings.microbatches, seq_length=settings.seq_length,
            micro_batch_size=settings.micro_batch_size, forward_only=False,
        )
        _average_gradients(params)
        optimizer.step()
        schedule.step()
        metrics = megatron_gbl.step_metrics(model)
        # LM loss and micro-batch LBL differ per rank: average them like Megatron's logging.
        loss, micro_lbl = _dp_average(torch.stack([entry["lm loss"] for entry in losses]).mean(),
                                      metrics.values["micro_batch_lbl"].mean())
        step_seconds.append(time.perf_counter() - started)
        curves["loss"].append(loss)
        curves["micro_lbl"].append(micro_lbl)
        curves["global_lbl"].append(float(metrics.values["global_batch_lbl"].mean()))
        if progress is not None:
            progress.set_postfix(loss=f"{loss:.3f}", refresh=False)
            progress.update()
    if progress is not None:
        progress.close()
    balance = next(iter(megatron_gbl.balance_bsz(model).values()))
    megatron_gbl.disable()
    heldout = evaluate(model, corpus.valid, settings.eval_sequences, settings.seq_length,
                       settings.micro_batch_size, corpus.domains)
    model_dir = os.path.join(job["out_dir"], spec.dirname)
    if rank == 0:
        save_model(model_dir, model, settings, corpus.domains, spec.label)
    return {
        "scope": spec.scope, "sync_group_size": spec.sync_group_size, "model_dir": model_dir,
        "balance_bsz": {"tokens": balance.tokens, "sequences": balance.sequences},
        "seconds_per_step": sum(step_seconds) / len(step_seconds),
        "train_curves": curves, **heldout,
    }


def learning_rate_factor(step: int, steps: int) -> float:
    """Warm-up then cosine decay to 10%: the end of training is not dominated by the noise
    of a large learning rate, so scopes are compared near where they converge."""
    warmup = max(1, steps // 20)
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.45 * (1 + math.cos(math.pi * progress))


def build_model(model_overrides: dict, seq_length: int, seed: int):
    """The demo GPT-MoE; the same `seed` gives the same initial weights for every scope."""
    config = harness.moe_config(**model_overrides)
    return harness.build_gpt_moe(config, vocab_size=corpus_lib.VOCAB_SIZE,
                                 max_sequence_length=seq_length, seed=seed)


def _train_batch(corpus, settings: DemoSettings, step: int, slot: int, domain: int):
    # Seeded by (seed, step, slot) only: every scope sees the same sequences in the same place.
    generator = torch.Generator().manual_seed((settings.seed * 1_000_003 + step) * 65_537 + slot)
    return corpus_lib.sample_windows(corpus.train[domain], settings.micro_batch_size,
                                     settings.seq_length + 1, generator)


def _forward_step(data_iterator, model):
    windows = next(data_iterator)
    tokens, labels = windows[:, :-1], windows[:, 1:]
    position_ids = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    output = model(tokens, position_ids, None, labels=labels)

    def loss_func(token_losses):
        loss = token_losses.float().mean()
        # clone: the schedule divides `loss` in place by the number of micro-batches.
        return loss, {"lm loss": loss.detach().clone()}

    return output, loss_func


def _average_gradients(params) -> None:
    """Data-parallel gradient averaging (what DDP does), one flat all-reduce."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch._utils._flatten_dense_tensors(grads)
    dist.all_reduce(flat, op=dist.ReduceOp.AVG)
    for param, grad in zip(params, torch._utils._unflatten_dense_tensors(flat, grads)):
        param.grad = grad


def _dp_average(*values: torch.Tensor) -> list[float]:
    packed = torch.stack([value.double() for value in values])
    dist.all_reduce(packed, op=dist.ReduceOp.AVG)
    return packed.tolist()


def evaluate(model, valid_streams, max_sequences: int, seq_length: int, micro_batch_size: int,
             domains: list[str]) -> dict:
    """Held-out loss per domain and routing statistics, sharded over the ranks and summed.

    Each domain's first `max_sequences` windows, in single-domain micro-batches of
    `micro_batch_size` (so `micro_lbl` is the LBL of micro-batches shaped like training's).
    """
    rank, world_size = dist.get_rank(), dist.get_world_size()
    batches = [(d, windows[i:i + micro_batch_size])
               for d, stream in enumerate(valid_streams)
               for windows in [corpus_lib.heldout_windows(stream, max_sequences, seq_length + 1)]
               for i in range(0, len(windows), micro_batch_size)]
    loss_sums = torch.zeros(len(domains), dtype=torch.float64)
    token_counts = torch.zeros(len(domains), dtype=torch.float64)
    model.eval()
    with torch.no_grad(), RoutingCollector(model, domains) as collector:
        for domain, windows in batches[rank::world_size]:
            collector.domain = domain
            tokens, labels = windows[:, :-1], windows[:, 1:]
            position_ids = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
            token_losses = model(tokens, position_ids, None, labels=labels)
            loss_sums[domain] += token_losses.double().sum()
            token_counts[domain] += token_losses.numel()
    stats = collector.stats()
    stats.all_reduce()
    dist.all_reduce(loss_sums)
    dist.all_reduce(token_counts)
    losses = (loss_sums / token_counts).tolist()
    return {"heldout_loss": dict(zip(domains, losses)),
            "heldout_loss_mean": sum(losses) / len(losses),
            "routing": stats.summary()}


def save_model(model_dir: str, model, settings: DemoSettings, domains: list[str],
               scope_label: str) -> None:
    """`model.pt`: the state dict plus what `analyze_worker` needs to rebuild the model."""
    os.makedirs(model_dir, exist_ok=True)
    torch.save({"state_dict": model.state_dict(), "model_overrides": settings.model_overrides(),
                "seq_length": settings.seq_length, "micro_batch_size": settings.micro_batch_size,
                "domains": domains, "scope": scope_label,
                "settings": dataclasses.asdict(settings)},
               os.path.join(model_dir, MODEL_FILE))


def checkpoint_path(model_dir: str) -> str:
    path = os.path.join(model_dir, MODEL_FILE)
    if not os.path.isfile(path):
        raise ValueError(f"--model {model_dir}: no {MODEL_FILE} there; pass a scope directory "
                         f"written by `megatron-gbl demo`, e.g. out/demo/global")
    return path


def read_checkpoint(model_dir: str) -> dict:
    return torch.load(checkpoint_path(model_dir), weights_only=False)


def analyze_worker(rank: int, world_size: int, job: dict) -> dict:
    """Rank body for `megatron-gbl analyze`: rebuild a saved model and collect its routing."""
    harness.init_model_parallel()
    checkpoint = job["checkpoint"]
    model = build_model(checkpoint["model_overrides"], checkpoint["seq_length"], seed=0)
    model.load_state_dict(checkpoint["state_dict"])
    return evaluate(model, job["streams"], job["max_sequences"], checkpoint["seq_length"],
                    job["micro_batch_size"], job["domains"])


def _progress(rank: int, job: dict, spec: ScopeSpec, steps: int):
    if rank != 0 or not job.get("progress", True):
        return None
    from tqdm import tqdm

    position = [s.label for s in job["scopes"]].index(spec.label) + 1
    return tqdm(total=steps, desc=f"[{position}/{len(job['scopes'])}] {spec.label}",
                unit="step", file=sys.stderr, dynamic_ncols=True)


def run_demo(settings: DemoSettings, scopes: list[ScopeSpec], corpus: corpus_lib.Corpus,
             out_dir: str, progress: bool = True) -> dict:
    """Train every scope on `settings.ranks` gloo processes; write results.json and the PNGs
    into `out_dir` and each scope's model into `out_dir/<scope>`. Returns the results."""
    os.makedirs(out_dir, exist_ok=True)
    started = time.perf_counter()
    job = {"settings": settings, "scopes": scopes, "corpus": corpus, "out_dir": out_dir,
           "progress": progress}
    runs = harness.run_gloo(train_scopes, settings.ranks, job, timeout_s=3600)[0]
    results = {"settings": dataclasses.asdict(settings), "domains": corpus.domains,
               "wall_seconds": time.perf_counter() - started, "scopes": runs}
    results["files"] = write_figures(results, out_dir)
    write_json(os.path.join(out_dir, "results.json"), results)
    return results


def write_figures(results: dict, out_dir: str) -> dict:
    """The demo's PNGs from its results: Fig. 1b heatmaps, training curves, Fig. 4a."""
    from megatron_gbl import plots

    runs = results["scopes"]
    routing = {label: run["routing"] for label, run in runs.items()}
    first = next(iter(routing.values()))
    files = {name: os.path.join(out_dir, file) for name, file in (
        ("heatmaps", "selection_heatmaps.png"), ("curves", "training_curves.png"),
        ("topk", "topk_score_sums.png"))}
    plots.selection_heatmaps({label: r["selection_frequency"] for label, r in routing.items()},
                             results["domains"], first["uniform_frequency"], files["heatmaps"])
    plots.training_curves({label: run["train_curves"] for label, run in runs.items()},
                          files["curves"])
    plots.topk_score_sums({label: r["topk_score_sum"] for label, r in routing.items()},
                          results["domains"], first["uniform_topk_score_sum"], files["topk"])
    return files


def analyze_model(model_dir: str, records: list[dict], out_dir: str, max_sequences: int,
                  micro_batch_size: Optional[int]) -> dict:
    """`megatron-gbl analyze`: routing statistics of a saved demo model on labelled records,
    written as analysis.json and three PNGs (Fig. 1b, 4a, 4b) into `out_dir`."""
    from megatron_gbl import plots

    checkpoint = read_checkpoint(model_dir)
    domains = sorted({record["domain"] for record in records})
    streams = corpus_lib.domain_streams(records, domains)
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
                           os.path.join(out_dir, files["overlap"]))
    result.update(model=model_dir, scope=label, domains=domains,
                  files={name: os.path.join(out_dir, file) for name, file in files.items()})
    write_json(os.path.join(out_dir, "analysis.json"), result)
    return result


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


def format_table(results: dict) -> str:
    """One column per scope: the numbers the demo is about, as a Markdown table."""
    runs = results["scopes"]
    domains = results["domains"]
    first = next(iter(runs.values()))["routing"]

    def mean(values):
        return sum(values) / len(values)

    rows = [("Balance BSZ, sequences (tokens)",
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
