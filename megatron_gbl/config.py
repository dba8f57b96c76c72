"""What the user asked for (`Settings`) and the checks that reject what cannot work."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megatron_gbl import compat

SCOPES = ("micro", "seq", "dp", "global")


@dataclass(frozen=True)
class Settings:
    """Where the load-balancing statistic f_i comes from.

    scope:
        "micro"  counts of this micro-batch over TP x CP (Megatron's aux_loss).
        "seq"    counts per sequence (Megatron's seq_aux_loss).
        "dp"     counts all-reduced over TP x DP x CP for the current micro-batch ("LBL+sync").
        "global" "dp" plus the gradient-accumulation buffer of Algorithm 1 ("LBL+buffer").
    sync_group_size:
        For "dp"/"global": sync only within blocks of this many consecutive data-parallel
        ranks (8 = one 8-GPU node). None syncs over the whole data-parallel group.
    micro_coeff:
        For "dp"/"global": weight of an extra micro-batch LBL added beside the scoped one
        (paper Tab. 5: 1% of the global weight). 0 adds none.
    blocking_sync:
        Wait for the count all-reduce in the forward pass, like upstream, instead of in the
        layer's backward (for comparison and debugging; the results are identical).

    Error messages name the Python argument and the Megatron-LM flag (--moe-lbl-*).
    """

    scope: str
    sync_group_size: Optional[int] = None
    micro_coeff: float = 0.0
    blocking_sync: bool = False

    def __post_init__(self):
        if self.scope not in SCOPES:
            raise ValueError(
                f"megatron_gbl: unknown scope (--moe-lbl-scope) {self.scope!r}; choose one of "
                f"{', '.join(SCOPES)}"
            )
        if isinstance(self.micro_coeff, bool) or not isinstance(self.micro_coeff, (int, float)) \
                or not self.micro_coeff >= 0:
            raise ValueError(
                f"megatron_gbl: micro_coeff (--moe-lbl-micro-coeff) must be a number >= 0, got "
                f"{self.micro_coeff!r}; use 0 for no extra micro-batch LBL"
            )
        dp_only = (("sync_group_size", "--moe-lbl-sync-group-size", self.sync_group_size),
                   ("micro_coeff", "--moe-lbl-micro-coeff", self.micro_coeff or None))
        for name, flag, value in dp_only:
            if value is not None and not self.uses_dp_sync:
                raise ValueError(
                    f"megatron_gbl: {name} ({flag}) {value} only applies to scope 'dp' or "
                    f"'global', not {self.scope!r}; drop it or change the scope (--moe-lbl-scope)"
                )
        if self.sync_group_size is None:
            return
        if isinstance(self.sync_group_size, bool) or not isinstance(self.sync_group_size, int) \
                or self.sync_group_size < 1:
            raise ValueError(
                f"megatron_gbl: sync_group_size (--moe-lbl-sync-group-size) must be a positive "
                f"int (data-parallel ranks per balance block), got {self.sync_group_size!r}"
            )

    @property
    def uses_dp_sync(self) -> bool:
        return self.scope in ("dp", "global")


def check_sync_group_size(sync_group_size: int, data_parallel_size: int) -> None:
    if data_parallel_size % sync_group_size:
        raise ValueError(
            f"megatron_gbl: sync_group_size (--moe-lbl-sync-group-size) {sync_group_size} must "
            f"divide the data-parallel size {data_parallel_size}; pick a divisor of "
            f"{data_parallel_size} (or leave it unset to sync over all data-parallel ranks)"
        )


def router_lbl(config) -> tuple[str, float]:
    """The single (upstream LBL type, coefficient) the plugin takes over for a router config.

    Raises ValueError naming the Megatron option (config field and --flag) and the fix when
    no LBL can be computed. Works on a TransformerConfig and on Megatron-LM's args alike.
    """
    pairs = compat.lbl_types_and_coeffs(config)
    fix = (
        "set moe_router_load_balancing_type (--moe-router-load-balancing-type) to one of aux_loss, "
        "seq_aux_loss, global_aux_loss with moe_aux_loss_coeff (--moe-aux-loss-coeff) > 0 (the "
        "plugin keeps that coefficient), or drop --moe-lbl-scope / call megatron_gbl.disable()"
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
    if len(pairs) != 1:
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
    return pairs[0]
