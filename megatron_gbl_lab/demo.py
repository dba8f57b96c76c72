"""The demo's training and evaluation: one tiny Megatron-Core GPT-MoE per run of --scopes (a
load-balancing scope, or an ablation: aux-free balancing at a scope, Shuffle LBL, a micro-batch
LBL beside the global one, a scope switch), trained on CPU over gloo data-parallel ranks from the
same initial weights and data order.

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
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist

from megatron_gbl_lab import corpus as corpus_lib
from megatron_gbl import metrics
from megatron_gbl_lab import harness
from megatron_gbl.analysis import RoutingCollector
from megatron_gbl.config import BIAS_SCOPES, DP_SYNC_SCOPES, SCOPES

MIN_RANKS = 4
MODEL_FILE = "model.pt"
# Training curves besides the LM loss, by the megatron_gbl.step_metrics value they record.
CURVE_METRICS = {"micro_lbl": metrics.MICRO_LBL, "global_lbl": metrics.GLOBAL_LBL,
                 "micro_load_violation": metrics.MICRO_LOAD_VIOLATION,
                 "global_load_violation": metrics.GLOBAL_LOAD_VIOLATION}


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
    expert_bias_update_rate: float = 1e-3  # auxfree-* runs: u of Wang et al., Megatron's default
    lr: float = 3e-3             # peak: linear warm-up over 5% of the steps, cosine to 10%
    seed: int = 0
    eval_sequences: int = 128    # held-out sequences per domain

    def model_overrides(self, aux_free: bool = False) -> dict:
        """harness.moe_config keyword arguments of the demo model (saved with it).

        LBL runs: softmax gating and the aux_loss LBL. `aux_free`: sigmoid gating with expert
        bias and no LBL (auxiliary-loss-free balancing, Wang et al. 2024). Both have the same
        parameters, so the same seed gives them the same initial weights.
        """
        balancing = (
            dict(moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
                 moe_router_bias_update_rate=self.expert_bias_update_rate,
                 moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0)
            if aux_free else
            dict(moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=self.aux_loss_coeff))
        return dict(
            num_layers=self.num_layers, hidden_size=self.hidden_size, num_attention_heads=4,
            ffn_hidden_size=2 * self.hidden_size, moe_ffn_hidden_size=2 * self.hidden_size,
            num_moe_experts=self.num_experts, moe_router_topk=self.topk, **balancing,
        )


AUX_FREE_PREFIX = "auxfree-"
SWITCH_WORD = "-then-"
DEFAULT_MICRO_RATIO = 0.01  # paper Tab. 5: the micro-batch LBL at 1% of the main LBL's weight


@dataclass(frozen=True)
class ScopeSpec:
    """One run of the demo: `label` as the user wrote it, the model and plugin arguments it
    means. Specs that differ only in their label are the same run.

    aux_free: auxiliary-loss-free balancing (expert bias, no LBL) at `scope`, instead of an LBL.
    micro_ratio: weight of an extra micro-batch LBL beside a dp/global one, as a fraction of
        the demo's aux_loss_coeff (0: none).
    switch_scope, switch_step: `switch_scope` takes over at training step `switch_step`
        (0-based: after that many steps at `scope`).
    """

    label: str = field(compare=False)
    scope: str
    sync_group_size: Optional[int] = None
    aux_free: bool = False
    micro_ratio: float = 0.0
    switch_scope: Optional[str] = None
    switch_step: Optional[int] = None

    @property
    def dirname(self) -> str:
        # ':' is the only character of the --scopes grammar that some file systems refuse.
        return self.label.replace(":", "-")

    @property
    def method(self) -> str:
        """The balancing method in words, e.g. "LBL + 1% micro", "aux-free, micro→global@250"."""
        if self.aux_free:
            method = "aux-free"
        elif self.scope == "shuffle" and self.switch_scope is None:
            method = "shuffle LBL"
        else:
            method = "LBL"
        if self.micro_ratio:
            method += f" + {100 * self.micro_ratio:g}% micro"
        if self.switch_scope is not None:
            method += f", {self.scope}→{self.switch_scope}@{self.switch_step}"
        return method

    def model_overrides(self, settings: DemoSettings) -> dict:
        return settings.model_overrides(self.aux_free)

    def enable_arguments(self, settings: DemoSettings) -> dict:
        """megatron_gbl.enable's keyword arguments besides the scope and the model."""
        return dict(sync_group_size=self.sync_group_size,
                    micro_coeff=self.micro_ratio * settings.aux_loss_coeff,
                    switch_scope=self.switch_scope, switch_iteration=self.switch_step,
                    shuffle_seed=settings.seed)

    def enable_plugin(self, model, settings: DemoSettings) -> None:
        import megatron_gbl

        megatron_gbl.enable(self.scope, model=model, **self.enable_arguments(settings))


def scopes_usage(ranks: int) -> str:
    """What --scopes accepts, for its errors."""
    return (
        "use a comma-separated list of runs, each one of: micro, seq, dp, global, shuffle, dp:N, "
        f"global:N (LBL scopes; N ranks per balance block, dividing --ranks {ranks}); "
        "auxfree-micro, auxfree-dp, auxfree-global, auxfree-dp:N, auxfree-global:N "
        "(auxiliary-loss-free balancing at that scope, no LBL); dp, global, dp:N or global:N "
        "followed by +micro or +micro=R (plus a micro-batch LBL at R times the LBL weight, "
        f"default {DEFAULT_MICRO_RATIO:g}); A-then-B@S (A for the first S steps, 1 <= S < "
        "--steps, then B; both LBL runs or both auxfree-), e.g. --scopes "
        "micro,global,auxfree-global,shuffle,global+micro,micro-then-global@250"
    )


def parse_scopes(text: str, settings: DemoSettings) -> list[ScopeSpec]:
    """`--scopes micro,dp:2,global,auxfree-global,global+micro,micro-then-global@250` -> specs
    (grammar in `scopes_usage`); --ranks bounds the N of :N, --steps the S of A-then-B@S."""
    usage = scopes_usage(settings.ranks)
    specs = [_parse_run(label, settings, usage) for label in (p.strip() for p in text.split(","))]
    for index, spec in enumerate(specs):
        twin = next((other for other in specs[:index] if other == spec), None)
        if twin is not None:
            raise ValueError(f"--scopes: {text!r} names the same run twice ({twin.label!r} and "
                             f"{spec.label!r}); drop one; {usage}")
    return specs


def _parse_run(label: str, settings: DemoSettings, usage: str) -> ScopeSpec:
    """One entry of --scopes: a single scope, or A-then-B@S."""
    if not label:
        raise ValueError(f"--scopes: an entry is empty; {usage}")
    if SWITCH_WORD not in label and "@" not in label:
        return _parse_phase(label, label, settings.ranks, usage)
    phases_text, at, step_text = label.rpartition("@")
    phases = phases_text.split(SWITCH_WORD)
    if not at or len(phases) != 2:
        raise ValueError(f"--scopes: {label!r} is not a scope switch; write one switch as "
                         f"A-then-B@S, e.g. micro-then-global@250; {usage}")
    first, then = (_parse_phase(phase, label, settings.ranks, usage) for phase in phases)
    switch_step = _digits(step_text)
    if switch_step is None or not 1 <= switch_step < settings.steps:
        raise ValueError(f"--scopes: {label!r} switches at step {step_text!r}; S in A-then-B@S "
                         f"is the number of steps run with A, an integer with 1 <= S < --steps "
                         f"{settings.steps}; {usage}")
    return _switch(first, then, switch_step, label, usage)


def _switch(first: ScopeSpec, then: ScopeSpec, switch_step: int, label: str,
            usage: str) -> ScopeSpec:
    """A-then-B@S as one spec: the plugin keeps one :N and one +micro for both halves, in force
    while the scope is dp or global."""
    if first.aux_free != then.aux_free:
        raise ValueError(
            f"--scopes: {label!r} switches between an LBL and aux-free balancing, which need "
            "different routers; make both halves LBL scopes or both auxfree- scopes, e.g. "
            f"micro-then-global@{switch_step} or auxfree-micro-then-auxfree-global@{switch_step}; "
            f"{usage}")
    if first.scope == then.scope:
        raise ValueError(f"--scopes: {label!r} switches from {first.scope} to {then.scope}; "
                         f"switch to another scope, or drop the switch; {usage}")
    synced = [phase for phase in (first, then) if phase.scope in DP_SYNC_SCOPES]
    if len({(phase.sync_group_size, phase.micro_ratio) for phase in synced}) > 1:
        raise ValueError(
            f"--scopes: {label!r}: both halves sync over data parallel, and one switched run "
            f"has a single :N and +micro for both; give them the same :N and +micro; {usage}")
    dp_options = synced[0] if synced else first
    return ScopeSpec(label, first.scope, dp_options.sync_group_size, first.aux_free,
                     dp_options.micro_ratio, then.scope, switch_step)


def _parse_phase(text: str, label: str, ranks: int, usage: str) -> ScopeSpec:
    """[auxfree-]SCOPE[:N][+micro[=R]], the whole run `label` or one half of its switch."""
    base, plus, addition = text.partition("+")
    aux_free = base.startswith(AUX_FREE_PREFIX)
    name, colon, size = base.removeprefix(AUX_FREE_PREFIX).partition(":")
    if name not in SCOPES:
        where = "" if name == label else f" in {label!r}"
        raise ValueError(f"--scopes: unknown scope {name!r}{where}; {usage}")
    if aux_free and name not in BIAS_SCOPES:
        raise ValueError(
            f"--scopes: {label!r}: aux-free balancing updates the expert bias from the expert "
            f"load at its scope, which {name} does not count; use auxfree-micro, auxfree-dp or "
            f"auxfree-global; {usage}")
    sync_group_size = _sync_group_size(size, name, label, ranks, usage) if colon else None
    micro_ratio = _micro_ratio(addition, name, aux_free, label, usage) if plus else 0.0
    return ScopeSpec(label, name, sync_group_size, aux_free, micro_ratio)


def _sync_group_size(size: str, name: str, label: str, ranks: int, usage: str) -> int:
    """N of SCOPE:N: ranks per balance block, only for dp and global, dividing --ranks."""
    sync_group_size = _digits(size)
    if name not in DP_SYNC_SCOPES or sync_group_size is None or sync_group_size < 1:
        raise ValueError(f"--scopes: {label!r} is not a scope; only dp and global take :N with "
                         f"N a positive integer; {usage}")
    if ranks % sync_group_size:
        raise ValueError(f"--scopes: {label!r} syncs blocks of {sync_group_size} ranks, "
                         f"which does not divide --ranks {ranks}; {usage}")
    return sync_group_size


def _micro_ratio(addition: str, name: str, aux_free: bool, label: str, usage: str) -> float:
    """R of SCOPE+micro=R (DEFAULT_MICRO_RATIO for +micro): only beside a dp or global LBL."""
    word, equals, ratio = addition.partition("=")
    if word != "micro":
        raise ValueError(f"--scopes: {label!r}: '+{addition}' is unknown; the only addition is "
                         f"+micro or +micro=R; {usage}")
    if aux_free:
        raise ValueError(f"--scopes: {label!r}: +micro adds a micro-batch LBL, and auxfree- runs "
                         f"have no LBL; drop +micro or auxfree-; {usage}")
    if name not in DP_SYNC_SCOPES:
        raise ValueError(f"--scopes: {label!r}: only dp and global (and dp:N, global:N) take "
                         f"+micro: it adds a micro-batch LBL beside their LBL over several "
                         f"micro-batches, which {name} does not have; use e.g. global+micro; "
                         f"{usage}")
    if not equals:
        return DEFAULT_MICRO_RATIO
    if not re.fullmatch(r"[0-9]*\.?[0-9]+", ratio) or float(ratio) == 0:
        raise ValueError(f"--scopes: {label!r}: R in +micro=R must be a decimal number > 0 (the "
                         f"micro-batch LBL's weight as a fraction of the {name} LBL's), e.g. "
                         f"{name}+micro=0.1; {usage}")
    return float(ratio)


def _digits(text: str) -> Optional[int]:
    """The value of a string of ASCII digits; None for anything else."""
    return int(text) if re.fullmatch(r"[0-9]+", text) else None


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
    model = build_model(spec.model_overrides(settings), settings.seq_length, settings.seed)
    spec.enable_plugin(model, settings)
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: learning_rate_factor(step, settings.steps))
    params = list(model.parameters())
    slots = settings.ranks * settings.microbatches
    recorded = curve_metrics(spec)
    curves = {"loss": [], **{curve: [] for curve in recorded}}
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
        values = megatron_gbl.step_metrics(model).values
        # LM loss and micro-batch values differ per rank: average them like Megatron's logging
        # (global-batch values are the same on every rank: averaged along, in one collective).
        step_values = _dp_average({
            "loss": torch.stack([entry["lm loss"] for entry in losses]).mean(),
            **{curve: values[metric].mean() for curve, metric in recorded.items()}})
        step_seconds.append(time.perf_counter() - started)
        for curve, value in step_values.items():
            curves[curve].append(value)
        if progress is not None:
            progress.set_postfix(loss=f"{step_values['loss']:.3f}", refresh=False)
            progress.update()
    if progress is not None:
        progress.close()
    balance = next(iter(megatron_gbl.balance_bsz(model).values()))
    megatron_gbl.disable()
    heldout = evaluate(model, corpus.valid, settings.eval_sequences, settings.seq_length,
                       settings.micro_batch_size, corpus.domains)
    model_dir = os.path.join(job["out_dir"], spec.dirname)
    if rank == 0:
        save_model(model_dir, model, settings, spec, corpus.domains)
    return {
        "method": spec.method, "scope": spec.scope,
        "enable_arguments": spec.enable_arguments(settings), "model_dir": model_dir,
        "balance_bsz": {"tokens": balance.tokens, "sequences": balance.sequences},
        "seconds_per_step": sum(step_seconds) / len(step_seconds),
        "train_curves": curves, **heldout,
    }


def curve_metrics(spec: ScopeSpec) -> dict:
    """Training curve -> step_metrics name, for the values the run's routers have: the load
    violations always, the micro/global-batch LBL only with an LBL (not aux-free)."""
    present = metrics.names(has_lbl=not spec.aux_free, has_expert_bias=spec.aux_free)
    return {curve: metric for curve, metric in CURVE_METRICS.items() if metric in present}


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


def _dp_average(values: dict[str, torch.Tensor]) -> dict[str, float]:
    packed = torch.stack([value.double() for value in values.values()])
    dist.all_reduce(packed, op=dist.ReduceOp.AVG)
    return dict(zip(values, packed.tolist()))


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


def save_model(model_dir: str, model, settings: DemoSettings, spec: ScopeSpec,
               domains: list[str]) -> None:
    """`model.pt`: the state dict plus what `analyze_worker` needs to rebuild the model."""
    os.makedirs(model_dir, exist_ok=True)
    torch.save({"state_dict": model.state_dict(),
                "model_overrides": spec.model_overrides(settings),
                "seq_length": settings.seq_length, "micro_batch_size": settings.micro_batch_size,
                "domains": domains, "scope": spec.label,
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
    from megatron_gbl_lab import plots

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
    from megatron_gbl_lab import plots

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
