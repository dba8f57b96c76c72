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
    """

    scope: str
    sync_group_size: Optional[int] = None

    def __post_init__(self):
        if self.scope not in SCOPES:
            raise ValueError(
                f"megatron_gbl: unknown scope={self.scope!r}; choose one of {', '.join(SCOPES)}"
            )
        if self.sync_group_size is None:
            return
        if self.scope not in ("dp", "global"):
            raise ValueError(
                f"megatron_gbl: sync_group_size={self.sync_group_size} only applies to scope "
                f"'dp' or 'global', not {self.scope!r}; drop sync_group_size or change the scope"
            )
        if isinstance(self.sync_group_size, bool) or not isinstance(self.sync_group_size, int) \
                or self.sync_group_size < 1:
            raise ValueError(
                f"megatron_gbl: sync_group_size must be a positive int (data-parallel ranks per "
                f"balance block), got {self.sync_group_size!r}"
            )

    @property
    def uses_dp_sync(self) -> bool:
        return self.scope in ("dp", "global")


def check_sync_group_size(sync_group_size: int, data_parallel_size: int) -> None:
    if data_parallel_size % sync_group_size:
        raise ValueError(
            f"megatron_gbl: sync_group_size={sync_group_size} must divide the data-parallel "
            f"size {data_parallel_size}; pick a divisor of {data_parallel_size} "
            f"(or None to sync over all data-parallel ranks)"
        )


def router_lbl(config) -> tuple[str, float]:
    """The single (upstream LBL type, coefficient) the plugin takes over for a router config.

    Raises ValueError naming the Megatron option and the fix when no LBL can be computed.
    """
    pairs = compat.lbl_types_and_coeffs(config)
    fix = (
        "set moe_router_load_balancing_type to one of aux_loss, seq_aux_loss, global_aux_loss "
        "with moe_aux_loss_coeff > 0 (the plugin keeps that coefficient), or call "
        "megatron_gbl.disable()"
    )
    unsupported = [t for t, _ in pairs if t not in compat.LBL_TYPES]
    if unsupported:
        raise ValueError(
            f"megatron_gbl: moe_router_load_balancing_type={unsupported[0]!r} has no load-balancing "
            f"loss to rescope; {fix}"
        )
    bad = [(t, c) for t, c in pairs if c <= 0]
    if bad:
        raise ValueError(
            f"megatron_gbl: moe_aux_loss_coeff={bad[0][1]} for {bad[0][0]} must be > 0 "
            f"when megatron_gbl is enabled; {fix}"
        )
    if len(pairs) != 1:
        raise ValueError(
            f"megatron_gbl: moe_router_load_balancing_type={[t for t, _ in pairs]} combines several "
            f"load-balancing losses; the plugin replaces exactly one: {fix}"
        )
    if getattr(config, "moe_token_dispatcher_type", None) == "alltoall_seq":
        raise ValueError(
            "megatron_gbl: moe_token_dispatcher_type='alltoall_seq' gathers router logits across "
            "tensor parallel ranks and is not supported; use 'alltoall' or 'allgather'"
        )
    return pairs[0]
