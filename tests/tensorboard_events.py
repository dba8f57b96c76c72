"""Read back the TensorBoard events a Megatron-style logger wrote (the launcher tests)."""

from __future__ import annotations

from pathlib import Path


def tensorboard_scalars(log_dir: Path) -> tuple[dict, dict]:
    """(scalars: tag -> values by step, histograms: tag -> HistogramValue protos by step)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "histograms": 0})
    events.Reload()
    scalars = {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    histograms = {tag: [e.histogram_value for e in events.Histograms(tag)]
                  for tag in events.Tags()["histograms"]}
    return scalars, histograms
