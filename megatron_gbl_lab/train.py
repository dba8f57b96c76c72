"""The demo's rank body: train one tiny Megatron-Core GPT-MoE per run on gloo ranks, evaluate it.

Per step, each of R ranks runs M micro-batches through Megatron-Core's schedule
(`get_forward_backward_func`) with the plugin at the run's scope, gradients are averaged over
the ranks with one all-reduce, and Adam steps. Every micro-batch holds one domain and each
global batch (R x M micro-batches) mixes domains: the setting of the paper's Sec. 2.2.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time

import torch
import torch.distributed as dist

from megatron_gbl import metrics
from megatron_gbl_lab import batches
from megatron_gbl_lab import harness
from megatron_gbl_lab.evaluate import evaluate
from megatron_gbl_lab.model import build_model, save_model
from megatron_gbl_lab.report import write_json
from megatron_gbl_lab.runs import DemoSettings, ScopeSpec, model_directory, seed_record_path


# Training curves besides the LM loss, by the megatron_gbl.step_metrics value they record.
CURVE_METRICS = {"micro_lbl": metrics.MICRO_LBL, "global_lbl": metrics.GLOBAL_LBL,
                 "micro_load_violation": metrics.MICRO_LOAD_VIOLATION,
                 "global_load_violation": metrics.GLOBAL_LOAD_VIOLATION,
                 "micro_device_load_violation": metrics.MICRO_DEVICE_LOAD_VIOLATION}


def train_scopes(rank: int, world_size: int, job: dict) -> dict:
    """Rank body (spawned by harness.run_gloo): train and evaluate every scope at every seed,
    seed by seed. Returns {seed: {label: run}}."""
    harness.init_model_parallel()
    harness.simulate_expert_parallel_token_groups(job["settings"].device_groups)
    per_seed = {}
    for seed in job["seeds"]:
        per_seed[seed] = {spec.label: _train_and_evaluate(rank, world_size, spec, seed, job)
                          for spec in job["scopes"]}
        if rank == 0 and job["record"] is not None:
            # At once, so that a stopped run over many seeds keeps its finished ones (--resume).
            write_json(seed_record_path(job["out_dir"], seed),
                       {**job["record"], "seed": seed, "scopes": per_seed[seed]})
    return per_seed


def _train_and_evaluate(rank: int, world_size: int, spec: ScopeSpec, seed: int,
                        job: dict) -> dict:
    import megatron_gbl
    from megatron.core.pipeline_parallel import get_forward_backward_func

    run_started = time.perf_counter()
    settings: DemoSettings = dataclasses.replace(job["settings"], seed=seed)
    corpus: batches.Corpus = job["corpus"]
    model = build_model(spec.model_overrides(settings), settings.seq_length, settings.seed)
    spec.enable_plugin(model, settings)
    # fused: one kernel per step for all parameters (the per-parameter loop was 7% of a step).
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.lr, fused=True)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: learning_rate_factor(step, settings.steps))
    params = list(model.parameters())
    slots = settings.ranks * settings.microbatches
    recorded = curve_metrics(spec)
    curves = {"loss": [], **{curve: [] for curve in recorded}}
    step_seconds = []
    checkpoints = evaluation_steps(settings.steps, settings.eval_checkpoints)
    heldout = []
    progress = _progress(rank, job, spec, seed, settings.steps)
    for step in range(settings.steps):
        started = time.perf_counter()
        domains = batches.step_domains(settings.seed, step, slots, len(corpus.domains))
        my_slots = [k * world_size + rank for k in range(settings.microbatches)]
        windows = [_train_batch(corpus, settings, step, slot, domains[slot]) for slot in my_slots]
        model.zero_grad(set_to_none=True)
        losses = get_forward_backward_func()(
            forward_step_func=_forward_step, data_iterator=iter(windows), model=model,
            num_microbatches=settings.microbatches, seq_length=settings.seq_length,
            micro_batch_size=settings.micro_batch_size, forward_only=False,
        )
        values = megatron_gbl.step_metrics(model).values
        step_values = _average_gradients_and_values(params, {
            "loss": torch.stack([entry["lm loss"] for entry in losses]).mean(),
            **{curve: values[metric].mean() for curve, metric in recorded.items()}})
        optimizer.step()
        schedule.step()
        step_seconds.append(time.perf_counter() - started)
        for curve, value in step_values.items():
            curves[curve].append(value)
        if step + 1 in checkpoints[:-1]:  # the last one after training, with routing
            heldout.append(dict(evaluate(model, corpus.valid, settings.eval_sequences,
                                         settings.seq_length, settings.micro_batch_size,
                                         corpus.domains, routing=False), step=step + 1))
            model.train()
        if progress is not None:
            progress.set_postfix(loss=f"{step_values['loss']:.3f}", refresh=False)
            progress.update()
    if progress is not None:
        progress.close()
    balance = next(iter(megatron_gbl.balance_bsz(model).values()))
    megatron_gbl.disable()
    final = evaluate(model, corpus.valid, settings.eval_sequences, settings.seq_length,
                     settings.micro_batch_size, corpus.domains)
    heldout.append(dict(final, step=settings.steps))
    model_dir = model_directory(job["out_dir"], spec, seed, job["num_seeds"])
    if rank == 0:
        save_model(model_dir, model, settings, spec, corpus.domains)
    return {
        "method": spec.method, "scope": spec.scope,
        "enable_arguments": spec.enable_arguments(settings), "model_dir": model_dir,
        "balance_bsz": {"tokens": balance.tokens, "sequences": balance.sequences},
        "seconds_per_step": sum(step_seconds) / len(step_seconds),
        # Training and the held-out evaluations (not the start of the processes).
        "run_seconds": time.perf_counter() - run_started,
        "train_curves": curves, "routing": final["routing"],
        **checkpoint_average(heldout, corpus.domains),
    }


def evaluation_steps(steps: int, checkpoints: int) -> list[int]:
    """The steps after which the held-out loss is measured: the last `checkpoints`, 5% of
    training apart (at least one step), ending with the last step."""
    gap = max(1, steps // 20)
    return sorted({max(1, steps - index * gap) for index in range(checkpoints)})


def checkpoint_average(heldout: list[dict], domains: list[str]) -> dict:
    """The held-out loss per domain and its mean, averaged over the evaluated checkpoints (the
    end of training is noisy step to step), and each checkpoint's values."""
    losses = {domain: sum(entry["heldout_loss"][domain] for entry in heldout) / len(heldout)
              for domain in domains}
    return {"heldout_loss": losses, "heldout_loss_mean": sum(losses.values()) / len(losses),
            "heldout_checkpoints": [{name: entry[name] for name in (
                "step", "heldout_loss", "heldout_loss_mean", "heldout_loss_halves")}
                for entry in heldout]}


def curve_metrics(spec: ScopeSpec) -> dict:
    """Training curve -> step_metrics name, for the values the run's routers have: the load
    violations always, the micro/global-batch LBL only with an LBL (not aux-free or qb-)."""
    present = metrics.names(has_lbl=not (spec.aux_free or spec.quantile),
                            has_expert_bias=spec.aux_free)
    return {curve: metric for curve, metric in CURVE_METRICS.items() if metric in present}


def learning_rate_factor(step: int, steps: int) -> float:
    """Warm-up then cosine decay to 10%: the end of training is not dominated by the noise
    of a large learning rate, so scopes are compared near where they converge."""
    warmup = max(1, steps // 20)
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.45 * (1 + math.cos(math.pi * progress))


def _train_batch(corpus, settings: DemoSettings, step: int, slot: int, domain: int):
    # Seeded by (seed, step, slot) only: every scope sees the same sequences in the same place.
    generator = torch.Generator().manual_seed((settings.seed * 1_000_003 + step) * 65_537 + slot)
    return batches.sample_windows(corpus.train[domain], settings.micro_batch_size,
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


def _average_gradients_and_values(params, values: dict[str, torch.Tensor]) -> dict[str, float]:
    """Data-parallel averaging in one flat all-reduce: the gradients (what DDP does) and the
    step's logged values (the LM loss and micro-batch values differ per rank: averaged like
    Megatron's logging does; global-batch values are the same on every rank and stay so)."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    tensors = grads + [torch.stack([value.float() for value in values.values()])]
    flat = torch._utils._flatten_dense_tensors(tensors)
    dist.all_reduce(flat, op=dist.ReduceOp.AVG)
    *averaged, logged = torch._utils._unflatten_dense_tensors(flat, tensors)
    for param, grad in zip(params, averaged):
        param.grad = grad
    return dict(zip(values, logged.tolist()))


def _progress(rank: int, job: dict, spec: ScopeSpec, seed: int, steps: int):
    if rank != 0 or not job.get("progress", True):
        return None
    from tqdm import tqdm

    runs = [(s, other.label) for s in job["seeds"] for other in job["scopes"]]
    position = runs.index((seed, spec.label)) + 1
    seed_text = f" seed {seed}" if len(job["seeds"]) > 1 else ""
    return tqdm(total=steps, desc=f"[{position}/{len(runs)}] {spec.label}{seed_text}",
                unit="step", file=sys.stderr, dynamic_ncols=True)
