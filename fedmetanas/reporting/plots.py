"""The report's figures, one function each, drawn from already-read arrays (no file access here).

Figures of one run take that run's arrays; figures that compare runs take `{label: per-round arrays}`
(the `/rounds` datasets of docs/hdf5.md, by name) and draw one colour per run, so a single run is
just the case of one. Every function returns a matplotlib Figure; the caller saves it.
Headless without touching the backend: figures are built with matplotlib's object API (`Figure`, never
pyplot), which renders with Agg and keeps no global state, so nothing needs a display or closing.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib
import matplotlib.ticker
import numpy as np
from matplotlib.axes import Axes
from matplotlib.colors import Colormap
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from fedmetanas.search.genotypes import Genotype

Series = Mapping[str, np.ndarray]  # one run's /rounds datasets by name
CELLS = ("normal", "reduce")
# Line styles tell apart what is plotted for one run; colours tell apart runs.
_STYLES = {"discrete": "-", "supernet": "--", "retrained": "-.", "alpha_normal": "-", "alpha_reduce": "--",
           "beta_normal": ":", "beta_reduce": "-."}
_PHASES = (("local search (slowest rank)", "#4c72b0"), ("all-reduce", "#dd8452"), ("evaluation", "#55a868"),
           ("server, logging", "#c7c7c7"))
MIB = 2.0**20


def state_names(nodes: int) -> list[str]:
    """Names of a cell's states: the two cell inputs, then the intermediate nodes."""
    return ["c_{k-2}", "c_{k-1}", *(str(j) for j in range(nodes))]


def _subplots(nrows: int = 1, ncols: int = 1, *, figsize: tuple[float, float], **kw: Any) -> tuple[Figure, Any]:
    """pyplot.subplots without pyplot: a Figure that no global figure manager holds on to."""
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(nrows, ncols, **kw)


def pair_slots(node: int) -> list[tuple[int, int]]:
    """The input pairs of intermediate node `node`, in the order of its beta slots (as search.supernet.input_pairs)."""
    return list(itertools.combinations(range(node + 2), 2))


def _colors(n: int) -> list:
    return [matplotlib.colormaps["tab10"](i % 10) for i in range(n)]


def _rounds_axis(ax: Axes, rounds: np.ndarray) -> None:
    """Integer round ticks (1-based, as the console prints them) spanning all of `rounds`."""
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True, nbins=8))
    if len(rounds):
        ax.set_xlim(float(np.min(rounds)) - 0.5, float(np.max(rounds)) + 0.5)
    ax.set_xlabel("round")


def _all_rounds(runs: Mapping[str, Series]) -> np.ndarray:
    """The 1-based rounds of every run, so that overlaid runs share one x range."""
    return np.concatenate([np.asarray(r[k]) + 1 for r in runs.values() for k in ("round", "retrain/round") if k in r]
                          or [np.zeros(0)])


def _two_legends(ax: Axes, labels: Sequence[str], styles: Mapping[str, str], **kw) -> None:
    """Compact legend for overlays: one entry per run (colour) plus one per line style (what is drawn)."""
    handles = [Line2D([], [], color=c, lw=2) for c in _colors(len(labels))]
    handles += [Line2D([], [], color="0.3", ls=ls) for ls in styles.values()]
    ax.legend(handles, [*labels, *styles], **kw)


def _grey_cmap() -> Colormap:
    return matplotlib.colormaps["viridis"].with_extremes(bad="#d9d9d9")  # grey: masked (pruned, or absent) cells


def op_probabilities(rounds: np.ndarray, probs: np.ndarray, mask: np.ndarray, primitives: Sequence[str],
                     nodes: int, title: str) -> Figure:
    """Per edge, the op probabilities over rounds as a heatmap; grid rows = target node, columns = input.

    Args:
        rounds: (R,) 1-based round numbers.
        probs: (R, E, O) annealed op probabilities (0 where pruned).
        mask: (R, E, O) 1 = op kept; pruned cells are drawn grey.
        primitives: the O op names.
        nodes: intermediate nodes per cell (E = sum_j (j + 2)).
        title: figure title.
    """
    names = state_names(nodes)
    cols = nodes + 1
    fig, axes = _subplots(nodes, cols, figsize=(1.6 + 2.3 * cols, 0.9 + (0.22 * len(primitives) + 0.75) * nodes),
                             squeeze=False, sharey=True)
    cmap = _grey_cmap()
    image = None
    edge = 0
    for j in range(nodes):
        for i in range(cols):
            ax = axes[j, i]
            if i >= j + 2:
                ax.set_visible(False)
                continue
            data = np.ma.masked_array(probs[:, edge, :].T, mask=mask[:, edge, :].T == 0)
            image = ax.imshow(data, aspect="auto", vmin=0.0, vmax=1.0, cmap=cmap, interpolation="nearest",
                              extent=(rounds[0] - 0.5, rounds[-1] + 0.5, len(primitives) - 0.5, -0.5))
            ax.set_title(f"{names[i]} \u2192 node {j}", fontsize=8)
            ax.set_yticks(range(len(primitives)), primitives, fontsize=7)
            ax.tick_params(axis="x", labelsize=7)
            ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True, nbins=5))
            if j == nodes - 1:  # the bottom row holds every column: it carries the axis label
                ax.set_xlabel("round", fontsize=8)
            edge += 1
    fig.suptitle(f"{title}\noperation probabilities softmax(\u03b1/\u03c4) per edge over rounds (grey: pruned)",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0, 0.9, 1))
    if image is not None:
        cax = fig.add_axes((0.92, 0.15, 0.015, 0.7))
        fig.colorbar(image, cax=cax, label="probability")
    return fig


def pair_probabilities(rounds: np.ndarray, probs: np.ndarray, mask: np.ndarray, nodes: int, title: str) -> Figure:
    """Per node, the probability of each input pair over rounds, and the round at which its mask fell.

    Args:
        rounds: (R,) 1-based round numbers.
        probs: (R, N, P) annealed pair probabilities (0 where pruned or padding).
        mask: (R, N, P) 1 = pair kept (padding is 0 throughout).
        nodes: N.
        title: figure title.
    """
    names = state_names(nodes)
    fig, axes = _subplots(1, nodes, figsize=(1.0 + 3.6 * nodes, 3.9), squeeze=False, sharey=True)
    for j, ax in enumerate(axes[0]):
        pairs = pair_slots(j)
        colors = _colors(len(pairs))
        for p, (a, b) in enumerate(pairs):
            fell = np.flatnonzero(mask[:, j, p] == 0)
            label = f"{names[a]} + {names[b]}"
            if fell.size:
                label += f" (pruned r{int(rounds[fell[0]])})"
            y = probs[:, j, p].astype(float)
            if fell.size:  # a pruned pair stays at 0: end its line where it fell
                y[fell[0] + 1:] = np.nan
            ax.plot(rounds, y, color=colors[p], marker="." if len(rounds) < 30 else None, label=label)
            if fell.size:
                ax.axvline(rounds[fell[0]], color=colors[p], ls=":", lw=1.2)
                ax.plot(rounds[fell[0]], 0.0, marker="x", color=colors[p], ms=8, mew=2, clip_on=False)
        ax.set_title(f"node {j}: input pairs", fontsize=9)
        ax.set_ylim(-0.03, 1.03)
        _rounds_axis(ax, rounds)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6.5, loc="best", title="pair (\u00d7: mask fell)", title_fontsize=6.5)
    axes[0, 0].set_ylabel("probability")
    fig.suptitle(f"{title}\ninput-pair probabilities softmax(\u03b2/\u03c4) per node", fontsize=10)
    fig.tight_layout()
    return fig


def entropy_and_temperature(runs: Mapping[str, Series], max_entropy: float | None = None) -> Figure:
    """Mean entropy (over edges / nodes) of each architecture distribution, and the temperature tau.

    Args:
        runs: label -> per-round arrays with `round`, `tau` and any `entropy_{alpha,beta}_{normal,reduce}`.
        max_entropy: ln(O), the entropy of a uniform op distribution, drawn as a reference when given.
    """
    fig, (ax, ax_tau) = _subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [2, 1]})
    many = len(runs) > 1
    for color, (label, r) in zip(_colors(len(runs)), runs.items()):
        x = r["round"] + 1
        keys = [k for k in _STYLES if f"entropy_{k}" in r]
        for n, key in enumerate(keys):
            what = key.replace("alpha_", "ops, ").replace("beta_", "pairs, ")
            c = color if many else _colors(4)[n]
            ax.plot(x, np.mean(r[f"entropy_{key}"], axis=1), _STYLES[key], color=c,
                    label=f"{label}: {what}" if many else what)
        ax_tau.plot(x, r["tau"], color=color if many else "black", label=label)
    _rounds_axis(ax, _all_rounds(runs))
    _rounds_axis(ax_tau, _all_rounds(runs))
    if max_entropy is not None:
        ax.axhline(max_entropy, color="0.5", lw=0.8, ls=(0, (4, 4)))
        ax.text(ax.get_xlim()[0], max_entropy, f" ln {np.exp(max_entropy):.0f}: uniform over the ops", fontsize=7,
                color="0.4", va="bottom")
    ax.set(ylabel="mean entropy (nats)", title="entropy of the architecture distribution (annealed, kept only)")
    ax.set_ylim(0, max(ax.get_ylim()[1], 1.1 * (max_entropy or 0.0)))
    ax_tau.set(ylabel="\u03c4", title="temperature \u03c4")
    ax_tau.set_ylim(bottom=0)
    for a in (ax, ax_tau):
        a.grid(alpha=0.3)
    if many:
        drawn = [k for k in _STYLES if any(f"entropy_{k}" in r for r in runs.values())]
        names = {k.replace("alpha_", "ops, ").replace("beta_", "pairs, "): _STYLES[k] for k in drawn}
        _two_legends(ax, list(runs), names, fontsize=7, ncol=2)
        ax_tau.legend(fontsize=7)
    else:
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def pruning(runs: Mapping[str, Series]) -> Figure:
    """How many candidate ops and input pairs the soft-pruning masks still keep, per cell, over rounds."""
    fig, axes = _subplots(1, 2, figsize=(12, 3.8))
    many = len(runs) > 1
    any_pairs = False
    for color, (label, r) in zip(_colors(len(runs)), runs.items()):
        x = r["round"] + 1
        for ax, kind in zip(axes, ("alpha", "beta")):
            for n, cell in enumerate(CELLS):
                key = f"mask_{kind}_{cell}"
                if key not in r:
                    continue
                any_pairs |= kind == "beta"
                kept = r[key].reshape(len(x), -1).sum(axis=1)
                ax.step(x, kept, where="mid", ls="-" if cell == "normal" else "--", lw=2.2 if cell == "normal" else 1.4,
                        color=color if many else _colors(2)[n], label=f"{label}: {cell}" if many else f"{cell} cell")
    for ax in axes:
        _rounds_axis(ax, _all_rounds(runs))
    axes[0].set(ylabel="kept (op, edge) candidates", title="ops kept by the masks")
    axes[1].set(ylabel="kept input pairs", title="input pairs kept by the masks")
    if not any_pairs:
        axes[1].text(0.5, 0.5, "no input-pair distributions\n(search.input_mode: all)", ha="center", va="center",
                     transform=axes[1].transAxes, color="0.4")
    return _finish_counts(fig, axes)


def _finish_counts(fig: Figure, axes: Any) -> Figure:
    """Grid, a zero baseline and a legend where there are labelled lines: the style of count plots."""
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.set_ylim(bottom=0)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _curve_point(p0: np.ndarray, p1: np.ndarray, rad: float, t: float) -> np.ndarray:
    """The point at parameter t of matplotlib's `arc3,rad=rad` curve from p0 to p1 (display coordinates)."""
    d = p1 - p0
    control = (p0 + p1) / 2 + rad * np.array([d[1], -d[0]])
    return (1 - t) ** 2 * p0 + 2 * (1 - t) * t * control + t**2 * p1


def cell_layout(gene: Sequence[Sequence[tuple[str, int]]]) -> dict[int, tuple[float, float]]:
    """Positions of a cell's states, layered as Graphviz would: a node's column is one past its deepest input.

    States 0, 1 are the cell inputs, 2.. the intermediate nodes; the key -1 is the concat output.
    """
    depth = {0: 0, 1: 0}
    for j, node in enumerate(gene):
        depth[j + 2] = 1 + max((depth[i] for _, i in node), default=0)
    depth[-1] = max(depth.values()) + 1
    pos = {}
    for d in range(depth[-1] + 1):
        members = [k for k in depth if depth[k] == d]
        for rank, k in enumerate(sorted(members, key=lambda k: (k < 0, k))):
            pos[k] = (2.0 * d, 0.0 if len(members) == 1 else 1.0 - 2.0 * rank / (len(members) - 1))
    return pos


def _draw_cell(ax: Axes, gene: list[list[tuple[str, int]]], concat: Sequence[int], title: str) -> None:
    """One cell as a DAG, left to right: inputs, intermediate nodes by depth, the concat output."""
    names = state_names(len(gene))
    pos = cell_layout(gene)
    xs, ys = zip(*pos.values())
    ax.set_xlim(min(xs) - 0.6, max(xs) + 0.7)
    ax.set_ylim(min(ys) - 0.45, max(ys) + 0.45)
    ax.axis("off")
    to_display, to_data = ax.transData.transform, ax.transData.inverted().transform
    # Label centres and half-widths in display coordinates; the states themselves come first.
    placed: list[tuple[np.ndarray, float]] = [(to_display(xy), 30.0 if k < 2 else 14.0) for k, xy in pos.items()]
    for j in concat:
        skips = pos[-1][0] - pos[j][0] > 2.01 and abs(pos[j][1] - pos[-1][1]) < 0.3  # would run through a node
        ax.annotate("", xy=pos[-1], xytext=pos[j], arrowprops={
            "arrowstyle": "-|>", "color": "0.7", "ls": "--", "shrinkA": 14, "shrinkB": 22,
            "connectionstyle": f"arc3,rad={0.3 if skips else 0.0}"})
    for j, node in enumerate(gene):
        for op, i in node:
            src, dst = np.array(pos[i]), np.array(pos[j + 2])
            # Edges that skip a column bend away from the middle so they pass around the nodes between.
            span = round((dst[0] - src[0]) / 2.0)
            rad = 0.0 if span <= 1 else min(0.45, 0.18 * span) * (-1 if src[1] + dst[1] >= 0 else 1)
            ax.annotate("", xy=dst, xytext=src, arrowprops={
                "arrowstyle": "-|>", "color": "0.3", "lw": 1.2, "shrinkA": 16, "shrinkB": 16,
                "connectionstyle": f"arc3,rad={rad}"})
            # The label sits nearer the target (the two inputs of a node then rarely share a spot),
            # else slides along its edge to the first place no earlier label covers.
            half = 3.3 * len(op) + 6

            def clashes(spot: np.ndarray, half: float = half) -> int:
                return sum(abs(spot[0] - c[0]) < half + h and abs(spot[1] - c[1]) < 15 for c, h in placed)

            spots = [_curve_point(to_display(src), to_display(dst), rad, t) for t in (0.7, 0.55, 0.4, 0.62, 0.48, 0.3)]
            spot = min(spots, key=clashes)  # the first of the least covered places
            placed.append((spot, half))
            ax.text(*to_data(spot), op, fontsize=7.5, ha="center", va="center", zorder=4,
                    bbox={"boxstyle": "round,pad=0.2", "fc": "#fff7d6", "ec": "#b8a25a", "lw": 0.6})
    for k, xy in pos.items():
        if k < 0:
            ax.text(*xy, "c_{k}\nconcat", ha="center", va="center", fontsize=9, zorder=5,
                    bbox={"boxstyle": "round,pad=0.4", "fc": "#fdbf6f", "ec": "0.3"})
        elif k < 2:
            ax.text(*xy, names[k], ha="center", va="center", fontsize=9, zorder=5,
                    bbox={"boxstyle": "round,pad=0.4", "fc": "#a6cee3", "ec": "0.3"})
        else:
            ax.text(*xy, names[k], ha="center", va="center", fontsize=10, zorder=5,
                    bbox={"boxstyle": "circle,pad=0.45", "fc": "#b2df8a", "ec": "0.3"})
    ax.set_title(title, fontsize=10)


def genotype_cells(genotype: Genotype, title: str) -> Figure:
    """The genotype's cells (normal and reduction, or the one its network has) drawn as DAGs, edges
    labelled with their ops."""
    cells = genotype.cells or CELLS
    layouts = [cell_layout(getattr(genotype, cell)) for cell in cells]
    width = max(max(x for x, _ in p.values()) for p in layouts) / 2.0 + 1  # columns
    fig, axes = _subplots(1, len(cells), figsize=(min(20.0, len(cells) * (1.0 + 1.6 * width)), 4.0), squeeze=False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.95))  # fix the axes before arrows are placed in display coordinates
    for ax, cell in zip(axes[0], cells):
        _draw_cell(ax, getattr(genotype, cell), getattr(genotype, f"{cell}_concat"), f"{cell} cell")
    return fig


def genotype_dot(genotype: Genotype, cell: str) -> str:
    """One cell of the genotype as Graphviz DOT source (rendered with `dot -Tpng` where installed)."""
    gene = getattr(genotype, cell)
    names = state_names(len(gene))
    lines = [f'digraph "{cell}" {{', "  rankdir=LR;", '  node [style=filled, fontname="Helvetica"];',
             '  edge [fontname="Helvetica", fontsize=11];']
    lines += [f'  "{names[i]}" [fillcolor="#a6cee3", shape=box];' for i in (0, 1)]
    lines += [f'  "{names[j + 2]}" [fillcolor="#b2df8a", shape=circle];' for j in range(len(gene))]
    lines.append('  "c_{k}" [fillcolor="#fdbf6f", shape=box];')
    for j, node in enumerate(gene):
        lines += [f'  "{names[i]}" -> "{names[j + 2]}" [label="{op}"];' for op, i in node]
    lines += [f'  "{names[j]}" -> "c_{{k}}" [color=gray, style=dashed];' for j in getattr(genotype, f"{cell}_concat")]
    lines.append("}")
    return "\n".join(lines) + "\n"


def accuracy_and_loss(runs: Mapping[str, Series]) -> Figure:
    """Test accuracy and loss of the discrete net and the soft supernet, over rounds and over wall time.

    Args:
        runs: label -> per-round arrays `round`, `wall_time`, `{discrete,supernet}_{acc,loss}` (NaN
            where a round was not evaluated; those rounds are left out of the lines).
    """
    fig, axes = _subplots(2, 2, figsize=(12, 7.5))
    many = len(runs) > 1
    for color, (label, r) in zip(_colors(len(runs)), runs.items()):
        x, t = r["round"] + 1, r["wall_time"]
        for net in ("discrete", "supernet"):
            name = {"discrete": "discrete net (pruned, not retrained)", "supernet": "soft supernet"}[net]
            for row, metric in enumerate(("acc", "loss")):
                key = f"{net}_{metric}"
                if key not in r:
                    continue
                y = r[key]
                ok = np.isfinite(y)
                kw = {"ls": _STYLES[net], "color": color if many else _colors(2)[net == "supernet"],
                      "marker": "." if ok.sum() < 40 else None, "label": f"{label}: {name}" if many else name}
                axes[row, 0].plot(x[ok], y[ok], **kw)
                axes[row, 1].plot(t[ok], y[ok], **kw)
        if "retrain/round" in r:  # FedNAS: the searched genotype retrained from scratch (its second stage)
            xr, tr = r["retrain/round"] + 1, r["retrain/wall_time"]
            for row, metric in enumerate(("acc", "loss")):
                y = r[f"retrain/discrete_{metric}"]
                ok = np.isfinite(y)
                kw = {"ls": _STYLES["retrained"], "color": color if many else "tab:red",
                      "marker": "." if ok.sum() < 40 else None,
                      "label": f"{label}: retrained net" if many else "retrained net (FedNAS's second stage)"}
                axes[row, 0].plot(xr[ok], y[ok], **kw)
                axes[row, 1].plot(tr[ok], y[ok], **kw)
    for row in range(2):
        _rounds_axis(axes[row, 0], _all_rounds(runs))
    for row, what in enumerate(("test accuracy", "test loss (cross-entropy)")):
        axes[row, 0].set(ylabel=what, title=f"{what} over rounds")
        axes[row, 1].set(xlabel="wall time (s)", ylabel=what, title=f"{what} over wall time")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    if many:
        styles = {"discrete net (pruned, not retrained)": _STYLES["discrete"], "soft supernet": _STYLES["supernet"]}
        if any("retrain/round" in r for r in runs.values()):
            styles["retrained net"] = _STYLES["retrained"]
        _two_legends(axes[0, 0], list(runs), styles, fontsize=7)
    else:
        axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def personalized_accuracy(dists: Mapping[str, np.ndarray]) -> Figure:
    """Distribution over clients of the personalized test accuracy (one box and the points per run).

    Args:
        dists: label -> (K,) per-client accuracies (NaN for clients without a result).
    """
    fig, ax = _subplots(figsize=(max(5.0, 1.6 + 1.6 * len(dists)), 4.2))
    data = [v[np.isfinite(v)] for v in dists.values()]
    ax.boxplot(data, tick_labels=list(dists), widths=0.5, showmeans=True)
    rng = np.random.default_rng(0)  # fixed jitter: the same figure every time
    for pos, values in enumerate(data, start=1):
        ax.scatter(pos + rng.uniform(-0.12, 0.12, len(values)), values, s=12, alpha=0.6, color="#4c72b0", zorder=3)
    ax.set(ylabel="personalized test accuracy", title="personalized accuracy across clients")
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return fig


def partition(counts: np.ndarray, title: str) -> Figure:
    """The partition: training samples of each class held by each client, as a heatmap."""
    k, classes = counts.shape
    fig, ax = _subplots(figsize=(min(16.0, 2.5 + 0.5 * classes), min(14.0, 1.6 + 0.32 * k)))
    image = ax.imshow(counts, aspect="auto", cmap="Blues", interpolation="nearest")
    if k * classes <= 400:  # numbers stay legible up to about 20 x 20 cells
        top = counts.max() if counts.size else 0
        for (c, j), v in np.ndenumerate(counts):
            ax.text(j, c, str(v), ha="center", va="center", fontsize=6.5,
                    color="white" if v > 0.6 * top else "black")
    ax.set_xticks(range(classes))
    if k <= 40:
        ax.set_yticks(range(k))
    ax.tick_params(labelsize=7)
    ax.set(xlabel="class", ylabel="client", title=title)
    fig.colorbar(image, ax=ax, label="training samples")
    fig.tight_layout()
    return fig


def phase_times(rounds: np.ndarray, local: np.ndarray, allreduce: np.ndarray, evaluation: np.ndarray,
                total: np.ndarray, bytes_allreduced: np.ndarray | None, title: str) -> Figure:
    """Per round, wall time per phase (stacked) and the bytes each rank contributed to the all-reduce.

    Args:
        rounds: (R,) 1-based round numbers.
        local, allreduce, evaluation, total: (R,) seconds (local = the slowest rank; total = the round).
        bytes_allreduced: (R,) bytes per rank, or None when the log lacks it.
        title: figure title.
    """
    fig, (ax, ax_bytes) = _subplots(1, 2, figsize=(12, 4.0), gridspec_kw={"width_ratios": [3, 2]})
    other = np.maximum(total - local - allreduce - evaluation, 0.0)
    bottom = np.zeros(len(rounds))
    for values, (label, color) in zip((local, allreduce, evaluation, other), _PHASES):
        ax.bar(rounds, values, bottom=bottom, label=label, color=color, width=0.8)
        bottom += values
    ax.set(ylabel="seconds", title="wall time per phase per round")
    _rounds_axis(ax, rounds)
    ax.set_ylim(0, max(float(bottom.max(initial=0.0)), 1e-3) * 1.3)  # headroom for the legend
    ax.legend(fontsize=7, ncol=2, loc="upper left")
    ax.grid(alpha=0.3, axis="y")
    if bytes_allreduced is None:
        ax_bytes.text(0.5, 0.5, "bytes not in this log", ha="center", va="center", transform=ax_bytes.transAxes)
        ax_bytes.axis("off")
    else:
        mib = bytes_allreduced / MIB
        ax_bytes.bar(rounds, mib, color="#8172b3", width=0.8, label="per round")
        ax_bytes.set(ylabel="MiB per rank per round", title="bytes all-reduced (each rank's buffer)")
        ax_bytes.set_ylim(0, max(float(mib.max(initial=0.0)), 1e-6) * 1.3)
        _rounds_axis(ax_bytes, rounds)
        twin = ax_bytes.twinx()
        twin.plot(rounds, np.cumsum(mib), "k.-", label="cumulative")
        twin.set_ylabel("cumulative MiB per rank")
        twin.set_ylim(0, max(float(np.sum(mib)), 1e-6) * 1.3)
        h1, l1 = ax_bytes.get_legend_handles_labels()
        h2, l2 = twin.get_legend_handles_labels()
        ax_bytes.legend(h1 + h2, l1 + l2, fontsize=7, loc="upper left")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def cost(runs: Mapping[str, Series]) -> Figure:
    """What the runs cost: elapsed wall time and cumulative bytes all-reduced per rank, over rounds."""
    fig, (ax_t, ax_b) = _subplots(1, 2, figsize=(12, 3.8))
    for color, (label, r) in zip(_colors(len(runs)), runs.items()):
        x = r["round"] + 1
        ax_t.plot(x, r["wall_time"], ".-", color=color, label=label)
        if "bytes_allreduced" in r:
            ax_b.plot(x, np.cumsum(r["bytes_allreduced"]) / MIB, ".-", color=color, label=label)
    _rounds_axis(ax_t, _all_rounds(runs))
    _rounds_axis(ax_b, _all_rounds(runs))
    ax_t.set(ylabel="seconds since start", title="wall time")
    ax_b.set(ylabel="cumulative MiB all-reduced per rank", title="communication")
    return _finish_counts(fig, (ax_t, ax_b))


def by_client(clients: np.ndarray, values: np.ndarray, fill: float) -> tuple[np.ndarray, np.ndarray]:
    """(ids, matrix): per-participant columns (`clients[r, j]` is the client of `values[r, j]`, as the log
    keeps them) spread over one column per client that ever took part (ascending id), `fill` elsewhere."""
    ids = np.unique(clients)
    out = np.full((values.shape[0], ids.size), fill, dtype=float)
    np.put_along_axis(out, np.searchsorted(ids, clients), values.astype(float), axis=1)
    return ids, out


def client_loss(rounds: np.ndarray, loss: np.ndarray, excluded: np.ndarray | None, title: str,
                clients: np.ndarray | None = None) -> Figure:
    """Each client's training loss per round (grey: did not take part; x: update excluded as non-finite).

    `loss` and `excluded` are (rounds, clients) or, with `clients` (the log's /rounds/clients, format 2),
    (rounds, participants): then one row per client that ever took part, labelled with its id."""
    ids = None
    if clients is not None:
        ids, loss = by_client(clients, loss, np.nan)
        excluded = None if excluded is None else by_client(clients, excluded, 0.0)[1] > 0
    k = loss.shape[1]
    fig, ax = _subplots(figsize=(9, min(12.0, 1.8 + 0.28 * k)))
    image = ax.imshow(np.ma.masked_invalid(loss.T), aspect="auto", cmap=_grey_cmap(), interpolation="nearest",
                      extent=(rounds[0] - 0.5, rounds[-1] + 0.5, k - 0.5, -0.5))
    if excluded is not None and excluded.any():
        r_idx, c_idx = np.nonzero(excluded)
        ax.scatter(rounds[r_idx], c_idx, marker="x", color="red", s=30, label="excluded (NaN/Inf)")
        ax.legend(fontsize=7, loc="upper right")
    if k <= 40:
        ax.set_yticks(range(k), labels=None if ids is None else [str(i) for i in ids])
    ax.tick_params(labelsize=7)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True, nbins=8))
    ax.set(xlabel="round", ylabel="client" if ids is None else "client (those that took part)",
           title=f"{title}: client training loss (grey: did not take part)")
    fig.colorbar(image, ax=ax, label="mean training loss")
    fig.tight_layout()
    return fig
