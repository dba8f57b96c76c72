"""The load-balancing scopes, as names only: importable without torch or Megatron-Core (the
lab's command line checks its arguments against them before anything heavy is imported)."""

SCOPES = ("micro", "seq", "dp", "global", "shuffle")
DP_SYNC_SCOPES = ("dp", "global")
# Scopes with a per-expert load statistic for the auxiliary-loss-free bias update.
BIAS_SCOPES = ("micro", "dp", "global")
# Scopes with a quantile for quantile balancing (megatron_gbl.quantile, Megatron-Core 0.19+).
QUANTILE_SCOPES = ("micro", "dp", "global")
