"""What the user asked for (`Settings`) and the checks that reject what cannot work."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

from megatron_gbl import compat
from megatron_gbl.scopes import BIAS_SCOPES, DP_SYNC_SCOPES, QUANTILE_SCOPES, SCOPES


@dataclass(frozen=True)
class Settings:
    """Where the load-balancing statistic (f_i, or the expert-bias load) comes from.

    scope:
        "micro"   counts of this micro-batch over TP x CP (Megatron's aux_loss).
        "seq"     counts per sequence (Megatron's seq_aux_loss).
        "dp"      counts all-reduced over TP x DP x CP for the current micro-batch ("LBL+sync").
        "global"  "dp" plus the gradient-accumulation buffer of Algorithm 1 ("LBL+buffer").
        "shuffle" counts of micro-batch-many tokens drawn at random from the micro-batch of
                  all data-parallel ranks (paper Tab. 2, "Shuffle LBL_micro").
        With expert bias on (aux-loss-free balancing), micro / dp / global also set the counts
        of the bias update: per micro-batch locally, per micro-batch over data parallel, or
        once per step over the global batch.
    sync_group_size:
        For "dp"/"global": sync only within blocks of this many consecutive data-parallel
        ranks (8 = one 8-GPU node). None syncs over the whole data-parallel group.
    micro_coeff:
        For "dp"/"global": weight of an extra micro-batch LBL added beside the scoped one
        (paper Tab. 5: 1% of the global weight). 0 adds none.
    blocking_sync:
        Wait for the count all-reduce in the forward pass, like upstream, instead of in the
        layer's backward (for comparison and debugging; the results are identical).
    switch_scope, switch_iteration:
        From training iteration `switch_iteration` on (0-based: after that many steps), use
        `switch_scope` instead of `scope` (paper Tab. 3). Options that only apply to dp/global
        act while the scope in force is dp or global.
    shuffle_seed:
        Seed of the "shuffle" draws (each data-parallel replica draws its own sample).
    device_coeff:
        Weight of a device-level LBL beside the scoped one, at every scope: DeepSeek-V2's
        device-level balance loss over `device_groups` groups of consecutive experts, with the
        counts of one all-to-all (this micro-batch over the layer's token group, see
        lbl.apply_scoped_lbl), never buffered. 0 adds none.
    device_groups:
        Number of groups of consecutive experts the device-level LBL and the logged
        micro_batch_device_load_violation balance; must divide the number of experts. None:
        the expert-parallel size (one group per expert-parallel rank, as Megatron places them).

    Error messages name the Python argument and the Megatron-LM flag (--moe-lbl-*).
    """

    scope: str
    sync_group_size: Optional[int] = None
    micro_coeff: float = 0.0
    blocking_sync: bool = False
    switch_scope: Optional[str] = None
    switch_iteration: Optional[int] = None
    shuffle_seed: int = 0
    device_coeff: float = 0.0
    device_groups: Optional[int] = None

    def __post_init__(self):
        for name, flag, scope, optional in (
                ("scope", "--moe-lbl-scope", self.scope, False),
                ("switch_scope", "--moe-lbl-switch-scope", self.switch_scope, True)):
            if not (isinstance(scope, str) and scope in SCOPES or optional and scope is None):
                raise ValueError(
                    f"megatron_gbl: unknown {name} ({flag}) {scope!r}; choose one of "
                    f"{', '.join(SCOPES)}"
                )
        self._check_switch()
        for name, flag, value, added in (
                ("micro_coeff", "--moe-lbl-micro-coeff", self.micro_coeff, "micro-batch LBL"),
                ("device_coeff", "--moe-lbl-device-coeff", self.device_coeff, "device-level LBL")):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(
                    f"megatron_gbl: {name} ({flag}) must be a number >= 0, got {value!r}; use 0 "
                    f"for no {added}"
                )
        dp_only = (("sync_group_size", "--moe-lbl-sync-group-size", self.sync_group_size),
                   ("micro_coeff", "--moe-lbl-micro-coeff", self.micro_coeff or None))
        for name, flag, value in dp_only:
            if value is not None and not any(s in DP_SYNC_SCOPES for s in self.scopes):
                raise ValueError(
                    f"megatron_gbl: {name} ({flag}) {value} only applies to scope 'dp' or "
                    f"'global', not {self.scope!r}; drop it or change the scope (--moe-lbl-scope)"
                )
        if not _int_at_least(self.shuffle_seed, 0):
            raise ValueError(
                f"megatron_gbl: shuffle_seed (Megatron-LM: --seed) must be an int >= 0, got "
                f"{self.shuffle_seed!r}"
            )
        if self.sync_group_size is not None and not _int_at_least(self.sync_group_size, 1):
            raise ValueError(
                f"megatron_gbl: sync_group_size (--moe-lbl-sync-group-size) must be a positive "
                f"int (data-parallel ranks per balance block), got {self.sync_group_size!r}"
            )
        if self.device_groups is not None and not _int_at_least(self.device_groups, 1):
            raise ValueError(
                f"megatron_gbl: device_groups (--moe-lbl-device-groups) must be an int >= 1 "
                f"(groups of consecutive experts, one per device), got {self.device_groups!r}; "
                "leave it unset for one group per expert-parallel rank"
            )

    def _check_switch(self) -> None:
        if (self.switch_scope is None) != (self.switch_iteration is None):
            raise ValueError(
                "megatron_gbl: switch_scope (--moe-lbl-switch-scope) and switch_iteration "
                "(--moe-lbl-switch-iteration) go together; give both, or neither"
            )
        if self.switch_scope is None:
            return
        if self.switch_scope == self.scope:
            raise ValueError(
                f"megatron_gbl: switch_scope (--moe-lbl-switch-scope) {self.switch_scope!r} is "
                "already the scope (--moe-lbl-scope); drop the switch or pick another scope"
            )
        if not _int_at_least(self.switch_iteration, 1):
            raise ValueError(
                f"megatron_gbl: switch_iteration (--moe-lbl-switch-iteration) must be an int >= 1 "
                f"(the number of iterations run at the first scope), got {self.switch_iteration!r}"
                "; to start at the second scope, make it the scope (--moe-lbl-scope)"
            )

    @property
    def scopes(self) -> tuple[str, ...]:
        """Every scope this run uses, in order."""
        return (self.scope,) if self.switch_scope is None else (self.scope, self.switch_scope)

    @property
    def uses_dp_sync(self) -> bool:
        return self.scope in DP_SYNC_SCOPES

    def at(self, iteration: int) -> "Settings":
        """The settings in force at training iteration `iteration` (0-based), switch applied."""
        scope = self.scope
        if self.switch_scope is not None and iteration >= self.switch_iteration:
            scope = self.switch_scope
        dp_sync = scope in DP_SYNC_SCOPES
        return dataclasses.replace(
            self, scope=scope, switch_scope=None, switch_iteration=None,
            sync_group_size=self.sync_group_size if dp_sync else None,
            micro_coeff=self.micro_coeff if dp_sync else 0.0)


def _int_at_least(value, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def device_groups(config, settings: Settings) -> int:
    """D, the number of expert groups of the device-level LBL and its metric, for a router
    config (a TransformerConfig or Megatron-LM's args): `settings.device_groups`, else the
    expert-parallel size. Raises ValueError naming the flag and the fix when D cannot apply."""
    num_experts = _num_experts(config)
    expert_parallel = compat.expert_parallel_size(config)
    groups = settings.device_groups or expert_parallel
    if num_experts and num_experts % groups:
        raise ValueError(
            f"megatron_gbl: device_groups (--moe-lbl-device-groups) {groups} must divide the "
            f"number of experts {num_experts} (num_moe_experts / --num-experts), so that every "
            f"group holds the same number of consecutive experts; pick a divisor of "
            f"{num_experts}, or leave it unset for the expert-parallel size"
        )
    if settings.device_coeff and groups == 1:
        one_group = (
            "device_groups (--moe-lbl-device-groups) is 1" if settings.device_groups else
            "device_groups (--moe-lbl-device-groups) is unset and the expert-parallel size "
            f"(expert_model_parallel_size / --expert-model-parallel-size) is {expert_parallel}")
        raise ValueError(
            f"megatron_gbl: device_coeff (--moe-lbl-device-coeff) {settings.device_coeff} balances "
            f"groups of experts against each other, but there is only one group: {one_group}, so "
            "the device-level loss is the constant 1. Set --moe-lbl-device-groups to a divisor > 1 "
            "of the number of experts, or use expert parallelism, or drop --moe-lbl-device-coeff"
        )
    return groups


def check_sync_group_size(sync_group_size: int, data_parallel_size: int) -> None:
    if data_parallel_size % sync_group_size:
        raise ValueError(
            f"megatron_gbl: sync_group_size (--moe-lbl-sync-group-size) {sync_group_size} must "
            f"divide the data-parallel size {data_parallel_size}; pick a divisor of "
            f"{data_parallel_size} (or leave it unset to sync over all data-parallel ranks)"
        )


@dataclass(frozen=True)
class Balancing:
    """What a router config balances with, that the plugin rescopes.

    lbl_type / coeff: the one upstream LBL type (aux_loss, seq_aux_loss, global_aux_loss) and its
        moe_aux_loss_coeff; None / 0.0 for auxiliary-loss-free balancing alone.
    bias_update_rate: moe_router_bias_update_rate when moe_router_enable_expert_bias is on
        (auxiliary-loss-free balancing, Wang et al. 2024), else None.
    quantile_ema: moe_router_quantile_balancing_ema with quantile balancing (Megatron-Core
        0.19+, megatron_gbl.quantile), else None.
    """

    lbl_type: Optional[str]
    coeff: float
    bias_update_rate: Optional[float]
    quantile_ema: Optional[float] = None


def router_balancing(config, settings: Optional[Settings] = None) -> Balancing:
    """The LBL and expert-bias update the plugin takes over for a router config.

    Raises ValueError naming the Megatron option (config field and --flag) and the fix when
    there is nothing to rescope, or when `settings` cannot apply to it. Works on a
    TransformerConfig and on Megatron-LM's args alike.
    """
    bias_update_rate = compat.expert_bias_update_rate(config)
    if bias_update_rate is not None and not bias_update_rate >= 0:
        raise ValueError(
            f"megatron_gbl: moe_router_bias_update_rate (--moe-router-bias-update-rate) must be "
            f">= 0, got {bias_update_rate}; Megatron's default is 1e-3 (0 freezes the bias)"
        )
    if bias_update_rate == 0:
        bias_update_rate = None  # a frozen bias: nothing to update, at any scope
    pairs = compat.lbl_types_and_coeffs(config)
    if any(lbl_type == "quantile_balancing" for lbl_type, _ in pairs):
        # Checked before expert bias drops coefficient-0 types: never left running unscoped.
        return _quantile_balancing(config, settings, pairs, bias_update_rate)
    if bias_update_rate is not None:
        # Beside expert bias, Megatron computes no LBL of type "none" or coefficient 0 (its
        # defaults): balancing is then auxiliary-loss-free alone.
        pairs = [(t, c) for t, c in pairs if t != "none" and c != 0]
    fix = (
        "set moe_router_load_balancing_type (--moe-router-load-balancing-type) to one of aux_loss, "
        "seq_aux_loss, global_aux_loss with moe_aux_loss_coeff (--moe-aux-loss-coeff) > 0 (the "
        "plugin keeps that coefficient), or turn on auxiliary-loss-free balancing "
        "(moe_router_enable_expert_bias / --moe-router-enable-expert-bias, with "
        "--moe-router-bias-update-rate > 0), or drop "
        "--moe-lbl-scope / call megatron_gbl.disable()"
    )
    unsupported = [t for t, _ in pairs if t not in compat.LBL_TYPES]
    if unsupported:
        raise ValueError(
            f"megatron_gbl: moe_router_load_balancing_type={unsupported[0]!r} has no "
            f"load-balancing loss to rescope; {fix}"
        )
    bad = [(t, c) for t, c in pairs if c <= 0]
    if bad:
        raise ValueError(
            f"megatron_gbl: moe_aux_loss_coeff={bad[0][1]} for {bad[0][0]} must be > 0 "
            f"when megatron_gbl is enabled; {fix}"
        )
    if len(pairs) > 1:
        raise ValueError(
            f"megatron_gbl: moe_router_load_balancing_type={[t for t, _ in pairs]} combines "
            f"several load-balancing losses; the plugin replaces exactly one (for a micro-batch LBL beside "
            f"the global one use micro_coeff / --moe-lbl-micro-coeff): {fix}"
        )
    if getattr(config, "moe_token_dispatcher_type", None) == "alltoall_seq":
        raise ValueError(
            "megatron_gbl: moe_token_dispatcher_type='alltoall_seq' (--moe-token-dispatcher-type) "
            "gathers router logits across tensor parallel ranks and is not supported; use "
            "'alltoall' or 'allgather'"
        )
    _check_cuda_graphs(config)
    lbl_type, coeff = pairs[0] if pairs else (None, 0.0)
    balancing = Balancing(lbl_type, coeff, bias_update_rate)
    if settings is None:
        return balancing
    for name, flag, value, added in (
            ("micro_coeff", "--moe-lbl-micro-coeff", settings.micro_coeff, "micro-batch LBL"),
            ("device_coeff", "--moe-lbl-device-coeff", settings.device_coeff,
             "device-level LBL")):
        if value and lbl_type is None:
            raise ValueError(
                f"megatron_gbl: {name} ({flag}) {value} adds a {added} beside the scoped LBL, "
                "but this model balances without an LBL (auxiliary-loss-free or quantile "
                "balancing); drop it, or "
                "add an LBL with --moe-router-load-balancing-type aux_loss and "
                "--moe-aux-loss-coeff > 0"
            )
    device_groups(config, settings)
    if bias_update_rate is not None:
        _check_bias_scopes(settings, config)
    return balancing


_QB_FIX = ("otherwise use another --moe-router-load-balancing-type, or drop --moe-lbl-scope / call "
           "megatron_gbl.disable()")


def _quantile_balancing(config, settings: Optional[Settings], pairs: list,
                        bias_update_rate: Optional[float]) -> Balancing:
    """Balancing of quantile balancing, after the checks that keep Megatron-Core 0.19's
    constraints (its router asserts them, or the plugin's switched-off aux loss would hide
    them) with a message that names the flag."""
    name = "moe_router_load_balancing_type='quantile_balancing' (--moe-router-load-balancing-type)"
    release = compat.megatron_core_release()
    if not compat.has_quantile_balancing() and compat.has_own_global_quantile_balancing():
        raise ValueError(
            f"megatron_gbl: {name}: this megatron-core ({release}) takes the quantile over the "
            "global batch itself (moe_router_quantile_balancing_estimation_scope / "
            "--moe-router-quantile-balancing-estimation-scope) with hooks the plugin does not "
            "rescope; use that option and drop --moe-lbl-scope / call megatron_gbl.disable()")
    if not compat.has_quantile_balancing():
        raise ValueError(
            f"megatron_gbl: {name} needs Megatron-Core 0.19 or later; this is megatron-core "
            f"{release}, which has no quantile balancing. Upgrade megatron-core, or balance with "
            "aux_loss, seq_aux_loss or global_aux_loss (--moe-aux-loss-coeff > 0) or "
            "auxiliary-loss-free balancing (--moe-router-enable-expert-bias) at the scope")
    if len(pairs) > 1 or not isinstance(config.moe_router_load_balancing_type, str):
        raise ValueError(
            "megatron_gbl: moe_router_load_balancing_type="
            f"{config.moe_router_load_balancing_type!r} (--moe-router-load-balancing-type): "
            "Megatron-Core balances by quantiles only when "
            "the type is the single string 'quantile_balancing', with no loss beside it; give "
            f"it alone; {_QB_FIX}")
    checks = (
        (pairs[0][1] != 0, "moe_aux_loss_coeff (--moe-aux-loss-coeff) must be 0 (quantile "
                           f"balancing has no auxiliary loss), got {pairs[0][1]}"),
        (bias_update_rate is not None or getattr(config, "moe_router_enable_expert_bias", False),
         "moe_router_enable_expert_bias (--moe-router-enable-expert-bias) adds a second "
         "per-expert bias; turn it off"),
        (getattr(config, "moe_router_fusion", False),
         "moe_router_fusion (--moe-router-fusion) is not supported by Megatron-Core's quantile "
         "balancing; turn it off"),
        (getattr(config, "moe_router_num_groups", None) is not None
         or getattr(config, "moe_router_group_topk", None) is not None,
         "group-limited routing (moe_router_num_groups / --moe-router-num-groups, "
         "moe_router_group_topk / --moe-router-group-topk) is not supported by Megatron-Core's "
         "quantile balancing; unset both"),
        (not 0 <= compat.quantile_balancing_ema(config) <= 1,
         "moe_router_quantile_balancing_ema (--moe-router-quantile-balancing-ema) must be in "
         f"[0, 1], got {compat.quantile_balancing_ema(config)}"),
    )
    for failed, problem in checks:
        if failed:
            raise ValueError(f"megatron_gbl: with {name}, {problem}; {_QB_FIX}")
    _check_cuda_graphs(config)
    tokens = _micro_batch_tokens(config)
    topk, num_experts = getattr(config, "moe_router_topk", 2), _num_experts(config)
    if tokens is not None and num_experts and tokens * topk % num_experts:
        raise ValueError(
            f"megatron_gbl: {name} gives each expert N K / E tokens of a micro-batch, but "
            f"N = {tokens} tokens (--micro-batch-size x --seq-length) times K = {topk} "
            f"(--moe-router-topk) is not a multiple of E = {num_experts} (--num-experts); "
            "change --micro-batch-size or --seq-length")
    if settings is not None:
        for scope in settings.scopes:
            if scope not in QUANTILE_SCOPES:
                raise ValueError(
                    f"megatron_gbl: scope (--moe-lbl-scope / --moe-lbl-switch-scope) {scope!r} "
                    f"has no quantile for {name}; use one of {', '.join(QUANTILE_SCOPES)}")
        for flag_name, flag, value in (
                ("micro_coeff", "--moe-lbl-micro-coeff", settings.micro_coeff),
                ("device_coeff", "--moe-lbl-device-coeff", settings.device_coeff)):
            if value:
                raise ValueError(
                    f"megatron_gbl: {flag_name} ({flag}) {value} adds a loss beside the scoped "
                    f"LBL, but with {name} there is no LBL; drop it; {_QB_FIX}")
    return Balancing(None, 0.0, None, compat.quantile_balancing_ema(config))


def _micro_batch_tokens(config) -> Optional[int]:
    """Tokens of one micro-batch over TP x CP (what upstream's quantile sees), from Megatron-LM's
    args; None for a TransformerConfig (the router checks each call's shape instead)."""
    micro_batch_size = getattr(config, "micro_batch_size", None)
    seq_length = getattr(config, "seq_length", None)
    if not micro_batch_size or not seq_length:
        return None
    return micro_batch_size * seq_length


def _num_experts(config) -> Optional[int]:
    return getattr(config, "num_moe_experts", None) or getattr(config, "num_experts", None)


def _check_bias_scopes(settings: Settings, config) -> None:
    for scope in settings.scopes:
        if scope not in BIAS_SCOPES:
            raise ValueError(
                f"megatron_gbl: scope (--moe-lbl-scope / --moe-lbl-switch-scope) {scope!r} has no "
                "per-expert load for the expert-bias update of auxiliary-loss-free balancing "
                "(moe_router_enable_expert_bias); use one of "
                f"{', '.join(BIAS_SCOPES)}, or turn expert bias off"
            )
    per_microbatch = [scope for scope in settings.scopes if scope != "global"]
    if per_microbatch and compat.pipeline_size(config) > 1 and compat.recomputes_router(config):
        raise ValueError(
            f"megatron_gbl: scope {per_microbatch[0]!r} updates the expert bias after every "
            "micro-batch, but with pipeline parallelism (--pipeline-model-parallel-size > 1) "
            "activation recompute (--recompute-granularity full / --recompute-modules moe) "
            "replays a router after later micro-batches changed its bias, so the replay would "
            "route differently from the forward; use scope 'global', or turn recompute of the "
            "MoE layers off"
        )


def _check_cuda_graphs(config) -> None:
    captured = compat.router_cuda_graphs(config)
    if captured is None:
        return
    impl, modules = captured
    if impl == "full_iteration" or "full_iteration" in modules:
        what = "the whole training iteration"
    elif modules:
        what = f"the modules {modules}"
        if impl == "local":
            what += " (Megatron's local implementation graphs whole layers for them)"
    else:
        what = "whole layers"
    raise ValueError(
        f"megatron_gbl: CUDA graphs of {what} with cuda_graph_impl={impl!r} capture the MoE "
        "router: a replayed router skips the plugin's per-call work (counting the micro-batch, "
        "issuing the expert-count all-reduce, buffering the counts), which would run only at "
        "capture. The options: --cuda-graph-impl / cuda_graph_impl (--enable-cuda-graph / "
        "--external-cuda-graph before Megatron-Core 0.15), --cuda-graph-scope / "
        "cuda_graph_scope (--cuda-graph-modules / cuda_graph_modules from 0.18). Leave the "
        "router out with --cuda-graph-impl transformer_engine --cuda-graph-scope attn (graphs "
        "attention only), or turn CUDA graphs off (--cuda-graph-impl none), or drop "
        "--moe-lbl-scope / call megatron_gbl.disable()"
    )
