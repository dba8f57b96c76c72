"""The demo's figures say only what they draw: legend entries for drawn lines, a seeds note
only with several seeds."""

from megatron_gbl_lab import plots


def curve(*names):
    return {name: [1.0, 0.5, 0.25] for name in ("loss", *names)}


VIOLATIONS = ("micro_load_violation", "global_load_violation", "micro_device_load_violation")


def test_lbl_legend_lists_only_the_batches_a_run_draws(tmp_path):
    curves = {"micro": [curve("micro_lbl", "global_lbl", *VIOLATIONS)],
              "auxfree-global": [curve(*VIOLATIONS)]}
    names = lambda quantity: [name for _, _, name in plots.drawn_batch_styles(curves, quantity)]
    # No run logs a device LBL curve: the LBL panel has no "over devices" entry.
    assert names("lbl") == ["global batch", "micro-batch"]
    assert names("load_violation") == ["global batch", "micro-batch", "micro-batch, over devices"]
    assert plots.drawn_batch_styles({"auxfree-global": [curve(*VIOLATIONS)]}, "lbl") == []
    plots.training_curves(curves, str(tmp_path / "curves.png"))  # draws with those legends
    assert (tmp_path / "curves.png").stat().st_size > 0


def test_device_trade_mentions_seed_points_only_with_several_seeds():
    assert "small points" not in plots.device_trade_title(4, 1)
    assert plots.device_trade_title(4, 1).endswith("4 simulated devices, 1 seed")
    assert "small points: seeds" in plots.device_trade_title(4, 5)
