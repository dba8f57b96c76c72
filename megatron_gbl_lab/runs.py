"""What the demo runs: its settings and the `--scopes` grammar (no torch import: the command
line checks its arguments before anything heavy is loaded).

A run is a load-balancing scope or one of the paper's ablations: aux-free balancing at a scope,
quantile balancing at a scope (Megatron-Core 0.19+), Shuffle LBL, a micro-batch LBL beside the
global one, a scope switch.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, replace
from typing import Optional

from megatron_gbl.scopes import BIAS_SCOPES, DP_SYNC_SCOPES, QUANTILE_SCOPES, SCOPES


MIN_RANKS = 4
MODEL_FILE = "model.pt"  # in each run's directory (ScopeSpec.dirname)
SEED_RECORD_FILE = "runs.json"  # in each seed's directory (seed_record_path)


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
    moe_ffn_hidden_size: int = 128  # each expert's FFN width
    aux_loss_coeff: float = 1e-2  # Switch / ST-MoE's weight, which the paper follows
    expert_bias_update_rate: float = 1e-3  # auxfree-* runs: u of Wang et al., Megatron's default
    lr: float = 3e-3             # peak: linear warm-up over 5% of the steps, cosine to 10%
    seed: int = 0
    eval_sequences: int = 128    # held-out sequences per domain
    eval_checkpoints: int = 1    # held-out loss: the mean over this many last checkpoints
    device_groups: int = 4       # simulated expert-parallel devices (harness: token groups)

    def model_overrides(self, aux_free: bool = False, bias_rate_factor: float = 1.0,
                        quantile: bool = False) -> dict:
        """harness.moe_config keyword arguments of the demo model (saved with it).

        LBL runs: softmax gating and the aux_loss LBL. `aux_free`: sigmoid gating with expert
        bias (rate expert_bias_update_rate x bias_rate_factor) and no LBL (auxiliary-loss-free
        balancing, Wang et al. 2024). `quantile`: softmax gating, quantile balancing (Megatron-
        Core 0.19's, EMA 0) and no LBL. All have the same parameters, so the same seed gives
        them the same initial weights.
        """
        if aux_free:
            balancing = dict(
                moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
                moe_router_bias_update_rate=self.expert_bias_update_rate * bias_rate_factor,
                moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0)
        elif quantile:
            balancing = dict(moe_router_load_balancing_type="quantile_balancing",
                             moe_aux_loss_coeff=0.0)
        else:
            balancing = dict(moe_router_load_balancing_type="aux_loss",
                             moe_aux_loss_coeff=self.aux_loss_coeff)
        return dict(
            num_layers=self.num_layers, hidden_size=self.hidden_size, num_attention_heads=4,
            ffn_hidden_size=2 * self.hidden_size, moe_ffn_hidden_size=self.moe_ffn_hidden_size,
            num_moe_experts=self.num_experts, moe_router_topk=self.topk, **balancing,
        )


# `megatron-gbl demo --preset NAME`: named settings; every flag given on the command line
# overrides its preset's value. How each was fixed (never by which scope wins): docs/demo.md "Seeds"
# for tiny, docs/claims/fine-grained.md for fine-grained.
PRESETS = {
    "tiny": DemoSettings(),
    # Closer to the paper's setting: twice the layers and the experts, each expert half as wide
    # against the hidden size (fine-grained), 4 micro-batches per step. The shape of the
    # reference point in issue 29.
    "fine-grained": DemoSettings(
        steps=200, microbatches=4, micro_batch_size=2, seq_length=128, num_layers=4,
        hidden_size=128, num_experts=16, topk=2, moe_ffn_hidden_size=128, lr=2e-3),
}
DEFAULT_PRESET = "tiny"
# Wall time of one run (one scope at one seed: 4 ranks training, then the held-out evaluation)
# on 2 idle CPU cores: tiny, the default demo's 2 runs in 170 s (docs/timings.json);
# fine-grained, 203 s (docs/claims/fine-grained.md, where runs under other work's load took
# 330-820 s).
PRESET_SECONDS_PER_RUN = {"tiny": 85, "fine-grained": 200}


def preset_settings(name: str, **flags) -> DemoSettings:
    """The settings of preset `name` with every flag that was given (not None) in its place."""
    if name not in PRESETS:
        raise ValueError(f"--preset {name!r}: unknown; use one of {', '.join(PRESETS)}")
    return replace(PRESETS[name], **{field: value for field, value in flags.items()
                                     if value is not None})


def describe_preset(name: str) -> str:
    """One line of `--help`: the preset's shape, batch, length and measured time per run."""
    s = PRESETS[name]
    return (f"{name}: {s.num_layers} layers, hidden {s.hidden_size}, {s.num_experts} experts "
            f"top-{s.topk}, expert FFN {s.moe_ffn_hidden_size}; {s.ranks} ranks x "
            f"{s.microbatches} micro-batches x {s.micro_batch_size} sequences of "
            f"{s.seq_length} bytes; {s.steps} steps, lr {s.lr:g}; about "
            f"{PRESET_SECONDS_PER_RUN[name]} s per run on 2 idle CPU cores")

AUX_FREE_PREFIX = "auxfree-"
QUANTILE_PREFIX = "qb-"
SWITCH_WORD = "-then-"
DEFAULT_MICRO_RATIO = 0.01  # paper Tab. 5: the micro-batch LBL at 1% of the main LBL's weight
DEFAULT_DEVICE_RATIO = 1.0  # +device: the device-level LBL at the main LBL's weight


@dataclass(frozen=True)
class ScopeSpec:
    """One run of the demo: `label` as the user wrote it, the model and plugin arguments it
    means. Specs that differ only in their label are the same run.

    aux_free: auxiliary-loss-free balancing (expert bias, no LBL) at `scope`, instead of an LBL.
    quantile: quantile balancing (its bias solved from the quantiles at `scope`, no LBL).
    micro_ratio: weight of an extra micro-batch LBL beside a dp/global one, as a fraction of
        the demo's aux_loss_coeff (0: none).
    switch_scope, switch_step: `switch_scope` takes over at training step `switch_step`
        (0-based: after that many steps at `scope`).
    matched_updates: aux-free at micro or dp: the bias rate divided by the micro-batches per
        step, so that its once-per-micro-batch updates move the bias at most as far per step
        as global's one update (the matched comparison isolates the scope of the load).
    device_ratio: weight of the device-level LBL (per micro-batch, over the simulated
        expert-parallel devices) as a fraction of the demo's aux_loss_coeff (0: none).
    """

    label: str = field(compare=False)
    scope: str
    sync_group_size: Optional[int] = None
    aux_free: bool = False
    micro_ratio: float = 0.0
    switch_scope: Optional[str] = None
    switch_step: Optional[int] = None
    matched_updates: bool = False
    device_ratio: float = 0.0
    quantile: bool = False

    @property
    def dirname(self) -> str:
        # ':' is the only character of the --scopes grammar that some file systems refuse.
        return self.label.replace(":", "-")

    @property
    def method(self) -> str:
        """The balancing method in words, e.g. "LBL + 1% micro", "aux-free, micro→global@250"."""
        if self.aux_free:
            method = "aux-free, rate u/M" if self.matched_updates else "aux-free"
        elif self.quantile:
            method = "quantile"
        elif self.scope == "shuffle" and self.switch_scope is None:
            method = "shuffle LBL"
        else:
            method = "LBL"
        if self.micro_ratio:
            method += f" + {100 * self.micro_ratio:g}% micro"
        if self.device_ratio:
            method += f" + {100 * self.device_ratio:g}% device"
        if self.switch_scope is not None:
            method += f", {self.scope}→{self.switch_scope}@{self.switch_step}"
        return method

    def model_overrides(self, settings: DemoSettings) -> dict:
        bias_rate_factor = 1 / settings.microbatches if self.matched_updates else 1.0
        return settings.model_overrides(self.aux_free, bias_rate_factor, self.quantile)

    def enable_arguments(self, settings: DemoSettings) -> dict:
        """megatron_gbl.enable's keyword arguments besides the scope and the model."""
        return dict(sync_group_size=self.sync_group_size,
                    micro_coeff=self.micro_ratio * settings.aux_loss_coeff,
                    switch_scope=self.switch_scope, switch_iteration=self.switch_step,
                    shuffle_seed=settings.seed,
                    device_coeff=self.device_ratio * settings.aux_loss_coeff,
                    device_groups=settings.device_groups)

    def enable_plugin(self, model, settings: DemoSettings) -> None:
        import megatron_gbl

        megatron_gbl.enable(self.scope, model=model, **self.enable_arguments(settings))


def scopes_usage(ranks: int) -> str:
    """The pointer every --scopes error ends with: one line; the whole grammar (the runs, :N,
    +micro, +device, +matched, A-then-B@S) is in docs/demo.md and `megatron-gbl demo --help`."""
    return (f"every run --scopes takes (N of :N dividing --ranks {ranks}): docs/demo.md or "
            "megatron-gbl demo --help; e.g. --scopes micro,global,auxfree-global,shuffle")


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
    if (first.aux_free, first.quantile) != (then.aux_free, then.quantile):
        raise ValueError(
            f"--scopes: {label!r} switches between balancing methods (LBL, auxfree-, qb-), which "
            "need different routers; give both halves the same method, e.g. "
            f"micro-then-global@{switch_step} or auxfree-micro-then-auxfree-global@{switch_step}; "
            f"{usage}")
    if first.matched_updates or then.matched_updates:
        raise ValueError(f"--scopes: {label!r}: +matched sets the model's bias rate, which one "
                         f"run cannot change half-way; drop +matched from the switch; {usage}")
    if first.device_ratio or then.device_ratio:
        raise ValueError(f"--scopes: {label!r}: +device is not switched with the scope; run it "
                         f"without a switch, e.g. global+device; {usage}")
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
                     dp_options.micro_ratio, then.scope, switch_step, quantile=first.quantile)


def _parse_phase(text: str, label: str, ranks: int, usage: str) -> ScopeSpec:
    """[auxfree-|qb-]SCOPE[:N][+micro[=R] | +device[=R] | +matched], the whole run `label` or
    one half of its switch."""
    base, plus, addition = text.partition("+")
    aux_free = base.startswith(AUX_FREE_PREFIX)
    quantile = base.startswith(QUANTILE_PREFIX)
    name, colon, size = base.removeprefix(AUX_FREE_PREFIX).removeprefix(
        QUANTILE_PREFIX).partition(":")
    if name not in SCOPES:
        where = "" if name == label else f" in {label!r}"
        raise ValueError(f"--scopes: unknown scope {name!r}{where}; {usage}")
    if quantile:
        if name not in QUANTILE_SCOPES:
            raise ValueError(
                f"--scopes: {label!r}: quantile balancing solves its bias from the quantiles of "
                f"a micro-batch, a data-parallel micro-batch or the global batch, which {name} is "
                f"not; use qb-micro, qb-dp or qb-global; {usage}")
        if plus:
            raise ValueError(f"--scopes: {label!r}: qb- runs take no additions (they have no "
                             f"LBL and no expert-bias rate); drop '+{addition}'; {usage}")
        sync_group_size = _sync_group_size(size, name, label, ranks, usage) if colon else None
        return ScopeSpec(label, name, sync_group_size, quantile=True)
    if aux_free and name not in BIAS_SCOPES:
        raise ValueError(
            f"--scopes: {label!r}: aux-free balancing updates the expert bias from the expert "
            f"load at its scope, which {name} does not count; use auxfree-micro, auxfree-dp or "
            f"auxfree-global; {usage}")
    sync_group_size = _sync_group_size(size, name, label, ranks, usage) if colon else None
    if addition == "matched":
        if not aux_free or name == "global":
            raise ValueError(
                f"--scopes: {label!r}: +matched divides the expert-bias rate of an aux-free run "
                f"that updates every micro-batch; use auxfree-micro+matched or "
                f"auxfree-dp+matched; {usage}")
        return ScopeSpec(label, name, sync_group_size, aux_free, matched_updates=True)
    if addition.partition("=")[0] == "device":
        device_ratio = _ratio(addition, DEFAULT_DEVICE_RATIO, label, usage)
        if aux_free:
            raise ValueError(f"--scopes: {label!r}: +device adds a device-level LBL, and auxfree- "
                             f"runs have no LBL; drop +device or auxfree-; {usage}")
        return ScopeSpec(label, name, sync_group_size, aux_free, device_ratio=device_ratio)
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
    word = addition.partition("=")[0]
    if word != "micro":
        raise ValueError(f"--scopes: {label!r}: '+{addition}' is unknown; the additions are "
                         f"+micro, +micro=R, +device, +device=R and +matched; {usage}")
    if aux_free:
        raise ValueError(f"--scopes: {label!r}: +micro adds a micro-batch LBL, and auxfree- runs "
                         f"have no LBL; drop +micro or auxfree-; {usage}")
    if name not in DP_SYNC_SCOPES:
        raise ValueError(f"--scopes: {label!r}: only dp and global (and dp:N, global:N) take "
                         f"+micro: it adds a micro-batch LBL beside their LBL over several "
                         f"micro-batches, which {name} does not have; use e.g. global+micro; "
                         f"{usage}")
    return _ratio(addition, DEFAULT_MICRO_RATIO, label, usage)


def _ratio(addition: str, default: float, label: str, usage: str) -> float:
    """R of +WORD=R (`default` for +WORD): a decimal number > 0, a weight as a fraction of the
    LBL's."""
    word, equals, ratio = addition.partition("=")
    if not equals:
        return default
    if not re.fullmatch(r"[0-9]*\.?[0-9]+", ratio) or float(ratio) == 0:
        raise ValueError(f"--scopes: {label!r}: R in +{word}=R must be a decimal number > 0 (the "
                         f"added LBL's weight as a fraction of the main LBL's), e.g. "
                         f"+{word}=0.1; {usage}")
    return float(ratio)


def parse_seeds(text: str) -> list[int]:
    """`--seeds 0,1,2` -> [0, 1, 2]: distinct integers >= 0, in the order given."""
    seeds = [_digits(part.strip()) for part in text.split(",")]
    if None in seeds:
        raise ValueError(f"--seeds {text!r}: give a comma-separated list of integers >= 0, e.g. "
                         "--seeds 0,1,2,3,4")
    if len(set(seeds)) < len(seeds):
        raise ValueError(f"--seeds {text!r} names a seed twice; each seed is one repetition of "
                         "every run, drop the repeat")
    return seeds


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
                        ("--eval-sequences", settings.eval_sequences),
                        ("--eval-checkpoints", settings.eval_checkpoints),
                        ("--device-groups", settings.device_groups)):
        if value < 1:
            raise ValueError(f"{flag} {value}: must be at least 1")
    if not settings.lr > 0:
        raise ValueError(f"--lr {settings.lr}: must be a number > 0")
    if settings.ranks % settings.device_groups or settings.num_experts % settings.device_groups:
        raise ValueError(
            f"--device-groups {settings.device_groups}: the simulated expert-parallel size must "
            f"divide --ranks {settings.ranks} (one all-to-all exchanges the tokens of that many "
            f"consecutive ranks) and the {settings.num_experts} experts; pick a divisor of both")


def seed_record_path(out_dir: str, seed: int) -> str:
    """OUT/seed<seed>/runs.json: one seed's runs of a demo over several seeds, written as soon
    as they end (what `--resume` reads back)."""
    return os.path.join(out_dir, f"seed{seed}", SEED_RECORD_FILE)


def model_directory(out_dir: str, spec: ScopeSpec, seed: int, num_seeds: int) -> str:
    """Where a run's model is saved: OUT/<run>, or OUT/seed<seed>/<run> with several seeds."""
    if num_seeds == 1:
        return os.path.join(out_dir, spec.dirname)
    return os.path.join(out_dir, f"seed{seed}", spec.dirname)


def checkpoint_path(model_dir: str) -> str:
    """The model file of a run directory the demo wrote (`--model` of `megatron-gbl analyze`)."""
    path = os.path.join(model_dir, MODEL_FILE)
    if not os.path.isfile(path):
        raise ValueError(f"--model {model_dir}: no {MODEL_FILE} there; pass a scope directory "
                         f"written by `megatron-gbl demo`, e.g. out/demo/global")
    return path
