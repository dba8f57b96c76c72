"""PNG figures of the demo and of `megatron-gbl analyze`, after the paper's Fig. 1b, 3 and 4.

Inputs are the nested lists of `RoutingStats.summary()` and the demo's training curves, keyed
by a run label (a scope such as "global", or a model directory).
"""

from __future__ import annotations

import math
import os
import textwrap

from megatron_gbl_lab.report import METRICS


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    return plt


MAX_HEATMAP_COLUMNS = 4  # runs side by side; more runs wrap onto further rows of the figure


def selection_heatmaps(frequency: dict, domains: list[str], uniform: float, path: str) -> None:
    """Fig. 1b: per run and MoE layer, each domain's selection frequency of every expert,
    frequency [L][D][E] per run, on one colour scale. Runs are columns, each with its layers
    stacked, at most MAX_HEATMAP_COLUMNS side by side and the rows of runs filled evenly."""
    plt = _pyplot()
    labels = list(frequency)
    layers = len(frequency[labels[0]])
    experts = len(frequency[labels[0]][0][0])
    peak = max(value for run in frequency.values() for layer in run for row in layer
               for value in row)
    blocks = math.ceil(len(labels) / MAX_HEATMAP_COLUMNS)
    columns = math.ceil(len(labels) / blocks)
    fig, axes = plt.subplots(blocks * layers, columns, squeeze=False, constrained_layout=True,
                             figsize=(2 + 0.45 * experts * columns,
                                      0.6 + (0.7 + 0.35 * len(domains)) * layers * blocks))
    for index in range(blocks * columns):
        block, column = divmod(index, columns)
        for layer in range(layers):
            ax = axes[block * layers + layer][column]
            if index >= len(labels):
                ax.set_visible(False)  # the last row of runs is not full
                continue
            label = labels[index]
            image = ax.imshow(frequency[label][layer], vmin=0, vmax=peak, cmap="Blues",
                              aspect="auto")
            # The run's label once, above its first layer: long labels fit the column width.
            ax.set_title(f"{label}\nlayer {layer + 1}" if layer == 0 else f"layer {layer + 1}",
                         fontsize=9)
            ax.set_yticks(range(len(domains)), domains if column == 0 else [""] * len(domains),
                          fontsize=8)
            ax.set_xticks(range(experts), range(experts), fontsize=7)
            if layer == layers - 1:
                ax.set_xlabel("expert", fontsize=8)
    fig.colorbar(image, ax=axes, shrink=0.8,
                 label=f"selection frequency (uniform {uniform:.3g})")
    fig.savefig(path, dpi=110)
    plt.close(fig)


# The batch a training curve counts over: its key prefix, line style and legend name.
BATCH_STYLES = (("global", "-", "global batch"), ("micro", "--", "micro-batch"),
                ("micro_device", ":", "micro-batch, over devices"))


def drawn_batch_styles(curves: dict, quantity: str) -> list[tuple[str, str, str]]:
    """The entries of BATCH_STYLES that some run of `curves` has a `quantity` curve for ("lbl":
    no run has a device LBL curve; aux-free runs have no LBL at all)."""
    return [entry for entry in BATCH_STYLES
            if any(f"{entry[0]}_{quantity}" in curve
                   for per_seed in curves.values() for curve in per_seed)]


def training_curves(curves: dict, path: str) -> None:
    """Fig. 3 style, moving averages per step, one colour per run (one line per seed): LM loss,
    the micro- and global-batch LBL (runs with an LBL: aux-free runs have none) and the micro-
    and global-batch load violation max_i c_i / mean_i c_i - 1 (every run), also over devices.
    curves: run label -> one dict per seed of per-step lists "loss", "micro_load_violation",
    "global_load_violation", "micro_device_load_violation", and with an LBL "micro_lbl",
    "global_lbl"."""
    plt = _pyplot()
    from matplotlib.lines import Line2D

    fig, (loss_ax, lbl_ax, violation_ax) = plt.subplots(1, 3, figsize=(15, 4.2),
                                                        constrained_layout=True)
    colors = _run_colors(len(curves))
    for color, (label, per_seed) in zip(colors, curves.items()):
        width = 1.5 if len(per_seed) == 1 else 0.8
        for index, curve in enumerate(per_seed):
            window = max(1, len(curve["loss"]) // 20)
            loss_ax.plot(_moving_average(curve["loss"], window), color=color, linewidth=width,
                         label=label if index == 0 else None)
            for ax, quantity in ((lbl_ax, "lbl"), (violation_ax, "load_violation")):
                for batch, style, _ in BATCH_STYLES:
                    name = f"{batch}_{quantity}"
                    if name in curve:  # an LBL curve exists only for runs with an LBL
                        ax.plot(_moving_average(curve[name], window), color=color,
                                linestyle=style, linewidth=width)
    loss_ax.set(xlabel="step", ylabel="training LM loss (nats/byte)", yscale="log",
                title="LM loss, moving average (log scale)")
    lbl_ax.axhline(1.0, color="gray", linestyle=":", linewidth=1)
    lbl_ax.set(xlabel="step", ylabel="LBL (1 = balanced)",
               title="load-balancing loss (eq. 2), runs with an LBL")
    if not any("global_lbl" in per_seed[0] for per_seed in curves.values()):
        lbl_ax.text(0.5, 0.5, "no run has an LBL", transform=lbl_ax.transAxes, ha="center")
    violation_ax.set(xlabel="step", ylabel="max load / mean load - 1 (0 = balanced)",
                     title="expert load violation, every run")
    for ax, quantity in ((lbl_ax, "lbl"), (violation_ax, "load_violation")):
        drawn = drawn_batch_styles(curves, quantity)  # no legend entry for a line not drawn
        if drawn:
            ax.legend(handles=[Line2D([], [], color="black", linestyle=style, label=name)
                               for _, style, name in drawn], fontsize=8)
    legend_rows = math.ceil(len(curves) / 8)  # 8 run labels fit the figure's width
    fig.legend(*loss_ax.get_legend_handles_labels(), loc="outside lower center",
               ncol=math.ceil(len(curves) / legend_rows), fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def topk_score_sums(scores: dict, domains: list[str], uniform: float, path: str) -> None:
    """Fig. 4a: mean top-K score sum per layer and domain, scores [L][D] per run; colour =
    domain, line style and marker = run; the gray dashed line is the value when every expert
    gets the same score (K / E)."""
    plt = _pyplot()
    from matplotlib.lines import Line2D

    fig, ax = plt.subplots(figsize=(6.5, 3.8), constrained_layout=True)
    styles = [(line, marker) for marker in "os^Dv" for line in ("-", "--", ":", "-.")]
    run_styles = [styles[index % len(styles)] for index in range(len(scores))]
    for (line, marker), per_layer in zip(run_styles, scores.values()):
        layers = range(1, len(per_layer) + 1)
        for d in range(len(domains)):
            ax.plot(layers, [layer[d] for layer in per_layer], marker=marker, color=f"C{d}",
                    linestyle=line)
    ax.axhline(uniform, color="gray", linestyle="--")
    ax.set(xlabel="MoE layer", ylabel="mean top-K score sum", title="router confidence")
    ax.set_xticks(list(layers))
    handles = ([Line2D([], [], color=f"C{d}", label=domain) for d, domain in enumerate(domains)]
               + [Line2D([], [], color="black", linestyle=line, marker=marker, markersize=4,
                         label=label)
                  for (line, marker), label in zip(run_styles, scores)]
               + [Line2D([], [], color="gray", linestyle="--", label="uniform scores")])
    ax.legend(handles=handles, fontsize=7, ncol=2, handlelength=4)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def overlap_heatmaps(overlap: list, domains: list[str], high_factor: float, path: str) -> None:
    """Fig. 4b: per layer, the Jaccard overlap of two domains' high-frequency experts,
    overlap [L][D][D] (NaN where neither domain has one: such a cell says "none", and the
    caption says what that means)."""
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
                blank = math.isnan(value)
                ax.text(j, i, "none" if blank else f"{value:.2f}", ha="center", va="center",
                        fontsize=6 if blank else 7, style="italic" if blank else "normal",
                        color="grey" if blank else "white" if value > 0.5 else "black")
        ax.set_title(f"layer {layer + 1}", fontsize=9)
        ax.set_xticks(range(len(domains)), domains, rotation=90, fontsize=7)
        ax.set_yticks(range(len(domains)), domains if layer == 0 else [""] * len(domains),
                      fontsize=7)
    fig.colorbar(image, ax=axes, shrink=0.8, label="high-frequency expert overlap (Jaccard)")
    fig.supxlabel(f"none: neither domain has a high-frequency expert (one chosen by at least "
                  f"{high_factor:g}K/E of its tokens), so there is nothing to overlap", fontsize=7)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _run_colors(runs: int) -> list:
    """One distinct colour per run: the default ten, or twenty for more runs."""
    import matplotlib

    palette = matplotlib.colormaps["tab10" if runs <= 10 else "tab20"]
    return [palette(index % palette.N) for index in range(runs)]


def _moving_average(values: list, window: int) -> list:
    sums, averaged = 0.0, []
    for i, value in enumerate(values):
        sums += value - (values[i - window] if i >= window else 0.0)
        averaged.append(sums / min(i + 1, window))
    return averaged


def demo_figures(results: dict, out_dir: str) -> dict:
    """The demo's PNGs from its results: Fig. 1b heatmaps and Fig. 4a of the first seed, every
    seed's training curves, and with several seeds one point per seed of the summary's numbers."""
    seeds = results["seeds"]
    first_seed = results["per_seed"][str(seeds[0])]["scopes"]
    routing = {label: run["routing"] for label, run in first_seed.items()}
    first = next(iter(routing.values()))
    files = {name: os.path.join(out_dir, file) for name, file in (
        ("heatmaps", "selection_heatmaps.png"), ("curves", "training_curves.png"),
        ("topk", "topk_score_sums.png"), ("trade", "device_trade.png"))}
    seed_note = f" (seed {seeds[0]})" if len(seeds) > 1 else ""
    selection_heatmaps({label + seed_note: r["selection_frequency"]
                        for label, r in routing.items()},
                       results["domains"], first["uniform_frequency"], files["heatmaps"])
    training_curves({label: [results["per_seed"][str(seed)]["scopes"][label]["train_curves"]
                             for seed in seeds]
                     for label in first_seed}, files["curves"])
    topk_score_sums({label + seed_note: r["topk_score_sum"] for label, r in routing.items()},
                    results["domains"], first["uniform_topk_score_sum"], files["topk"])
    device_trade(results, files["trade"])
    if len(seeds) > 1:
        files["seeds"] = os.path.join(out_dir, "seeds.png")
        seed_points(results, SEED_POINT_METRICS, files["seeds"])
    return files


def device_trade_title(device_groups: int, seeds: int) -> str:
    """device_trade.png's title: the small points (one per seed) exist with several seeds only."""
    per_seed = f"{seeds} seeds; small points: seeds, large: their mean" if seeds > 1 else "1 seed"
    return f"specialisation vs device load, {device_groups} simulated devices, {per_seed}"


def device_trade(results: dict, path: str) -> None:
    """Specialisation against what an all-to-all waits on: per run, MI(domain; expert) over the
    micro-batch device load violation (training, last 10%), one small point per seed and a large
    one at the mean over seeds; the legend gives each run's mean held-out loss. With a device or
    micro-batch term among the runs, only the trade's runs are drawn (micro, global and those)."""
    plt = _pyplot()
    metric = {metric.name: metric for metric in METRICS}
    x_metric, y_metric = metric["micro_device_load_violation"], metric["mi_bits"]
    labels = list(results["summary"])
    trade = [label for label in labels
             if label in ("micro", "global") or "+device" in label or "+micro" in label]
    if len(trade) > 2:
        labels = trade
    several_seeds = len(results["seeds"]) > 1
    fig, ax = plt.subplots(figsize=(7.5, 5.0), constrained_layout=True)
    for color, label in zip(_run_colors(len(labels)), labels):
        runs = [results["per_seed"][str(seed)]["scopes"][label] for seed in results["seeds"]]
        if several_seeds:  # with one seed the seed's point is the mean
            ax.scatter([x_metric.value(run) for run in runs],
                       [y_metric.value(run) for run in runs], color=color, s=12, alpha=0.6)
        summary = results["summary"][label]
        ax.scatter([summary[x_metric.name]["mean"]], [summary[y_metric.name]["mean"]],
                   color=color, s=70, edgecolors="black", zorder=3,
                   label=f"{label}: loss {summary['heldout_loss_mean']['mean']:.4f}")
    ax.legend(fontsize=7, title="run: mean held-out loss", title_fontsize=7)
    ax.set(xlabel=f"{x_metric.title} (0 = balanced devices)", ylabel=y_metric.title,
           title=device_trade_title(results["settings"]["device_groups"], len(results["seeds"])))
    fig.savefig(path, dpi=110)
    plt.close(fig)


# The summary's numbers drawn one point per seed (report.METRICS names).
SEED_POINT_METRICS = ("heldout_loss_mean", "mi_bits", "micro_load_violation",
                      "global_load_violation", "micro_device_load_violation")


def seed_points(results: dict, metric_names: tuple, path: str) -> None:
    """One panel per metric: every run's value at every seed (a point; a faint line joins one
    seed's runs, the pairing of the paired differences) and its mean over seeds (a bar)."""
    plt = _pyplot()
    metrics = [metric for metric in METRICS if metric.name in metric_names]
    seeds = results["seeds"]
    labels = list(results["summary"])
    # Panels wide enough for every run's name; three to a row at most, so many runs stay legible.
    columns = min(3, len(metrics))
    rows = -(-len(metrics) // columns)
    fig, axes = plt.subplots(rows, columns, squeeze=False, constrained_layout=True,
                             figsize=(1.2 + max(2.6, 0.9 + 0.55 * len(labels)) * columns,
                                      4.4 * rows))
    for ax in axes.flat[len(metrics):]:
        ax.set_visible(False)
    colors = _run_colors(len(seeds))
    positions = range(len(labels))
    for ax, metric in zip(axes.flat, metrics):
        for color, seed in zip(colors, seeds):
            runs = results["per_seed"][str(seed)]["scopes"]
            values = [metric.value(runs[label]) for label in labels]
            ax.plot(positions, values, color=color, alpha=0.35, linewidth=0.8)
            ax.scatter(positions, values, color=color, s=14, label=f"seed {seed}", zorder=3)
        means = [results["summary"][label][metric.name]["mean"] for label in labels]
        ax.scatter(positions, means, marker="_", s=400, color="black", zorder=4, label="mean")
        ax.set_xticks(list(positions), labels, rotation=45, ha="right", fontsize=8)
        ax.set_title("\n".join(textwrap.wrap(metric.title, 28)), fontsize=8)
    axes[0][0].legend(fontsize=7)
    fig.savefig(path, dpi=110)
    plt.close(fig)
