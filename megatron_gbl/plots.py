"""PNG figures of the demo and of `megatron-gbl analyze`, after the paper's Fig. 1b, 3 and 4.

Inputs are the nested lists of `RoutingStats.summary()` and the demo's training curves, keyed
by a run label (a scope such as "global", or a model directory).
"""

from __future__ import annotations

import math


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    return plt


def selection_heatmaps(frequency: dict, domains: list[str], uniform: float, path: str) -> None:
    """Fig. 1b: per run (column) and MoE layer (row), each domain's selection frequency of
    every expert, frequency [L][D][E] per run, on one colour scale."""
    plt = _pyplot()
    labels = list(frequency)
    layers = len(frequency[labels[0]])
    experts = len(frequency[labels[0]][0][0])
    peak = max(value for run in frequency.values() for layer in run for row in layer
               for value in row)
    fig, axes = plt.subplots(layers, len(labels), squeeze=False, constrained_layout=True,
                             figsize=(2 + 0.45 * experts * len(labels),
                                      0.6 + (0.5 + 0.35 * len(domains)) * layers))
    for column, label in enumerate(labels):
        for layer in range(layers):
            ax = axes[layer][column]
            image = ax.imshow(frequency[label][layer], vmin=0, vmax=peak, cmap="Blues",
                              aspect="auto")
            ax.set_title(f"{label}, layer {layer + 1}", fontsize=9)
            ax.set_yticks(range(len(domains)), domains if column == 0 else [""] * len(domains),
                          fontsize=8)
            ax.set_xticks(range(experts), range(experts), fontsize=7)
            if layer == layers - 1:
                ax.set_xlabel("expert", fontsize=8)
    fig.colorbar(image, ax=axes, shrink=0.8,
                 label=f"selection frequency (uniform {uniform:.3g})")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def training_curves(curves: dict, path: str) -> None:
    """Fig. 3 style: LM loss (moving average) and micro/global-batch LBL per step, per run."""
    plt = _pyplot()
    fig, (loss_ax, lbl_ax) = plt.subplots(1, 2, figsize=(11, 3.8), constrained_layout=True)
    for index, (label, curve) in enumerate(curves.items()):
        color = f"C{index}"
        window = max(1, len(curve["loss"]) // 20)
        loss_ax.plot(_moving_average(curve["loss"], window), color=color, label=label)
        lbl_ax.plot(_moving_average(curve["global_lbl"], window), color=color,
                    label=f"{label}: global-batch LBL")
        lbl_ax.plot(_moving_average(curve["micro_lbl"], window), color=color, linestyle="--",
                    label=f"{label}: micro-batch LBL")
    loss_ax.set(xlabel="step", ylabel="training LM loss (nats/byte)", yscale="log",
                title="LM loss, moving average (log scale)")
    lbl_ax.axhline(1.0, color="gray", linestyle=":", linewidth=1)
    lbl_ax.set(xlabel="step", ylabel="LBL (1 = balanced)", title="load-balancing loss (eq. 2)")
    loss_ax.legend(fontsize=8)
    lbl_ax.legend(fontsize=7)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def topk_score_sums(scores: dict, domains: list[str], uniform: float, path: str) -> None:
    """Fig. 4a: mean top-K score sum per layer and domain, scores [L][D] per run; the gray
    dashed line is the value when every expert gets the same score (K / E)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 3.8), constrained_layout=True)
    styles = ["-", "--", ":", "-."]
    for index, (label, per_layer) in enumerate(scores.items()):
        layers = range(1, len(per_layer) + 1)
        for d, domain in enumerate(domains):
            ax.plot(layers, [layer[d] for layer in per_layer], marker="o", color=f"C{d}",
                    linestyle=styles[index % len(styles)], label=f"{label}: {domain}")
    ax.axhline(uniform, color="gray", linestyle="--", label="uniform scores")
    ax.set(xlabel="MoE layer", ylabel="mean top-K score sum", title="router confidence")
    ax.set_xticks(list(layers))
    ax.legend(fontsize=7, ncol=2)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def overlap_heatmaps(overlap: list, domains: list[str], path: str) -> None:
    """Fig. 4b: per layer, the Jaccard overlap of two domains' high-frequency experts,
    overlap [L][D][D] (NaN, shown blank, where neither domain has one)."""
    plt = _pyplot()
    layers = len(overlap)
    fig, axes = plt.subplots(1, layers, squeeze=False, constrained_layout=True,
                             figsize=(1.5 + (1.0 + 0.55 * len(domains)) * layers,
                                      1.2 + 0.55 * len(domains)))
    for layer in range(layers):
        ax = axes[0][layer]
        image = ax.imshow(overlap[layer], vmin=0, vmax=1, cmap="Greens")
        for i in range(len(domains)):
            for j in range(len(domains)):
                value = overlap[layer][i][j]
                if not math.isnan(value):
                    ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if value > 0.5 else "black")
        ax.set_title(f"layer {layer + 1}", fontsize=9)
        ax.set_xticks(range(len(domains)), domains, rotation=90, fontsize=7)
        ax.set_yticks(range(len(domains)), domains if layer == 0 else [""] * len(domains),
                      fontsize=7)
    fig.colorbar(image, ax=axes, shrink=0.8, label="high-frequency expert overlap (Jaccard)")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _moving_average(values: list, window: int) -> list:
    sums, averaged = 0.0, []
    for i, value in enumerate(values):
        sums += value - (values[i - window] if i >= window else 0.0)
        averaged.append(sums / min(i + 1, window))
    return averaged
