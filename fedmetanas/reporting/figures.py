"""Figures of a search, one function each, from the arrays of a trajectory log (docs/hdf5.md).

Every function takes already-read data and returns a matplotlib Figure, so the figures can be made
from a finished log, a running one or a killed one alike. Headless: the Agg backend.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from fedmetanas.search.genotypes import Genotype  # noqa: E402

CELL_KINDS = ("normal", "reduce")


@dataclass
class RunData:
    """What one log holds, cut to the rounds every dataset has (a killed run may be ragged)."""

    name: str
    rounds: dict[str, np.ndarray]
    attrs: dict[str, Any]
    partition: dict[str, np.ndarray]
    final: dict[str, Any] = field(default_factory=dict)
    primitives: list[str] = field(default_factory=list)
    nodes: int = 0

    @property
    def num_rounds(self) -> int:
        return int(len(self.rounds["round"])) if "round" in self.rounds else 0


def softmax_masked(logits: np.ndarray, mask: np.ndarray, tau: np.ndarray) -> np.ndarray:
    """softmax(logits / tau) over the kept entries of each row, per round; pruned entries get 0.

    logits, mask: (rounds, rows, k); tau: (rounds,).
    """
    z = logits / tau[:, None, None]
    z = np.where(mask > 0, z, -np.inf)
    z = z - np.max(z, axis=-1, keepdims=True)
    e = np.where(mask > 0, np.exp(z), 0.0)
    return e / np.maximum(e.sum(axis=-1, keepdims=True), 1e-30)


def _edge_labels(nodes: int) -> list[str]:
    names = ["c_{k-2}", "c_{k-1}"] + [str(j) for j in range(nodes)]
    return [f"{names[i]} -> {j}" for j in range(nodes) for i in range(j + 2)]


def op_heatmaps(run: RunData, kind: str) -> Figure:
    """Operation probabilities of every edge over rounds (one small heatmap per edge)."""
    alpha, mask = run.rounds[f"alpha_{kind}"], run.rounds[f"mask_alpha_{kind}"]
    probs = softmax_masked(alpha, mask, run.rounds["tau"])  # (R, E, O)
    edges = probs.shape[1]
    cols = min(edges, 4)
    rows = int(np.ceil(edges / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.9 * rows + 0.8), squeeze=False)
    fig.subplots_adjust(hspace=0.6, top=0.9)
    labels = _edge_labels(run.nodes)
    image = None
    for e, ax in enumerate(axes.flat):
        if e >= edges:
            ax.axis("off")
            continue
        image = ax.imshow(probs[:, e, :].T, aspect="auto", vmin=0, vmax=1, cmap="viridis", interpolation="nearest",
                          extent=(0.5, probs.shape[0] + 0.5, len(run.primitives) - 0.5, -0.5))
        ax.set_title(f"edge {labels[e]}", fontsize=9)
        ax.set_yticks(range(len(run.primitives)), run.primitives if e % cols == 0 else [], fontsize=7)
        ax.set_xlabel("round", fontsize=8)
        ax.tick_params(axis="x", labelsize=7)
    fig.suptitle(f"{run.name}: operation probabilities softmax(alpha/tau), {kind} cell", fontsize=11)
    if image is not None:
        fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8, label="probability")
    return fig


def pair_probabilities(run: RunData) -> Figure:
    """Input-pair probabilities per node over rounds, with the round at which each pair was pruned."""
    fig, axes = plt.subplots(2, run.nodes, figsize=(3.8 * run.nodes, 6), squeeze=False)
    tau = run.rounds["tau"]
    x = run.rounds["round"] + 1
    for row, kind in enumerate(CELL_KINDS):
        beta, mask = run.rounds[f"beta_{kind}"], run.rounds[f"mask_beta_{kind}"]
        probs = softmax_masked(beta, mask, tau)
        for j in range(run.nodes):
            ax = axes[row, j]
            pairs = list(itertools.combinations(range(j + 2), 2))
            for p, (a, b) in enumerate(pairs):
                (line,) = ax.plot(x, probs[:, j, p], label=f"({a},{b})")
                fell = np.flatnonzero(mask[:, j, p] == 0)
                if fell.size:
                    ax.axvline(x[fell[0]], color=line.get_color(), ls=":", lw=1)
            ax.set_title(f"{kind} node {j}: input pairs", fontsize=9)
            ax.set_ylim(-0.02, 1.02)
            ax.set_xlabel("round", fontsize=8)
            ax.legend(fontsize=6, ncol=2, title="pair (dotted: pruned)", title_fontsize=6)
    axes[0, 0].set_ylabel("probability")
    axes[1, 0].set_ylabel("probability")
    fig.suptitle(f"{run.name}: input-pair probabilities softmax(beta/tau)", fontsize=11)
    fig.tight_layout()
    return fig


def entropy_and_temperature(run: RunData) -> Figure:
    """Mean entropy of the architecture distributions and the temperature over rounds."""
    fig, ax = plt.subplots(figsize=(7, 4))
    x = run.rounds["round"] + 1
    for key in sorted(k for k in run.rounds if k.startswith("entropy_")):
        ax.plot(x, run.rounds[key].mean(axis=1), label=key.removeprefix("entropy_"))
    ax.set(xlabel="round", ylabel="mean entropy (nats)", title=f"{run.name}: architecture entropy and temperature")
    ax2 = ax.twinx()
    ax2.plot(x, run.rounds["tau"], "k--", label="tau")
    ax2.set_ylabel("temperature tau")
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def genotype_cells(genotype: Genotype, title: str) -> Figure:
    """The genotype's two cells drawn as DAGs: inputs left, nodes in the middle, output right."""
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    for ax, kind in zip(axes, CELL_KINDS):
        gene = getattr(genotype, kind)
        n = len(gene)
        pos = {0: (0.0, 0.75), 1: (0.0, 0.25)}
        for j in range(n):
            pos[j + 2] = (0.3 + 0.5 * j / max(n - 1, 1), 0.85 - 0.7 * j / max(n - 1, 1))
        out = (1.05, 0.5)
        names = {0: "c_{k-2}", 1: "c_{k-1}", **{j + 2: str(j) for j in range(n)}}
        for j, node in enumerate(gene):
            for op, i in node:
                (x0, y0), (x1, y1) = pos[i], pos[j + 2]
                ax.annotate("", xy=(x1, y1), xytext=(x0, y0),
                            arrowprops={"arrowstyle": "->", "color": "0.3", "shrinkA": 14, "shrinkB": 14})
                ax.text((x0 + x1) / 2, (y0 + y1) / 2, op, fontsize=7, ha="center", va="center",
                        bbox={"boxstyle": "round,pad=0.15", "fc": "lightyellow", "ec": "0.6"})
        for j in range(n):
            ax.annotate("", xy=out, xytext=pos[j + 2],
                        arrowprops={"arrowstyle": "->", "color": "0.75", "shrinkA": 14, "shrinkB": 16})
        for k, (x, y) in pos.items():
            color = "lightblue" if k < 2 else "lightgreen"
            ax.text(x, y, names[k], ha="center", va="center", fontsize=9,
                    bbox={"boxstyle": "circle,pad=0.4", "fc": color, "ec": "0.4"})
        ax.text(*out, "c_{k}\n(concat)", ha="center", va="center", fontsize=9,
                bbox={"boxstyle": "round,pad=0.4", "fc": "wheat", "ec": "0.4"})
        ax.set_xlim(-0.12, 1.2)
        ax.set_ylim(0.0, 1.0)
        ax.axis("off")
        ax.set_title(f"{kind} cell", fontsize=10)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig


def accuracy(runs: list[RunData]) -> Figure:
    """Test accuracy and loss of the soft supernet and the discrete net, over rounds and over wall time."""
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    for run in runs:
        r = run.rounds
        x, t = r["round"] + 1, r["wall_time"]
        for key, style in (("discrete", "-"), ("supernet", "--")):
            acc, loss = r[f"{key}_acc"], r[f"{key}_loss"]
            ok = np.isfinite(acc)
            label = f"{run.name} {key}" if len(runs) > 1 else key
            axes[0].plot(x[ok], acc[ok], style, marker=".", label=label)
            axes[1].plot(t[ok], acc[ok], style, marker=".", label=label)
            axes[2].plot(x[ok], loss[ok], style, marker=".", label=label)
    axes[0].set(xlabel="round", ylabel="test accuracy", title="Accuracy over rounds")
    axes[1].set(xlabel="wall time (s)", ylabel="test accuracy", title="Accuracy over wall time")
    axes[2].set(xlabel="round", ylabel="test loss", title="Test loss (discrete: pruned, not retrained)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def partition(run: RunData) -> Figure:
    """Client x class training-sample counts of the partition."""
    counts = run.partition["class_counts"]
    fig, ax = plt.subplots(figsize=(max(5.0, 0.45 * counts.shape[1] + 2), max(3.0, 0.3 * counts.shape[0] + 1.5)))
    image = ax.imshow(counts, aspect="auto", cmap="magma", interpolation="nearest")
    ax.set(xlabel="class", ylabel="client", title=f"{run.name}: samples per client and class")
    ax.set_xticks(range(counts.shape[1]))
    if counts.shape[0] <= 40:
        ax.set_yticks(range(counts.shape[0]))
    fig.colorbar(image, ax=ax, label="training samples")
    fig.tight_layout()
    return fig


def phase_times(run: RunData) -> Figure:
    """Wall time per phase per round (stacked) and bytes all-reduced per round."""
    r = run.rounds
    x = r["round"] + 1
    fig, ax = plt.subplots(figsize=(8, 4))
    local, comm, ev = r["time_local"], r["time_allreduce"], r["time_eval"]
    other = np.maximum(r["time_round"] - local - comm - ev, 0.0)
    bottom = np.zeros_like(local)
    for values, label in ((local, "local search (slowest rank)"), (comm, "all-reduce"), (ev, "evaluation"),
                          (other, "server and logging")):
        ax.bar(x, values, bottom=bottom, label=label)
        bottom += values
    ax.set(xlabel="round", ylabel="seconds", title=f"{run.name}: wall time per phase")
    ax2 = ax.twinx()
    ax2.plot(x, r["bytes_allreduced"] / 2**20, "k.-", label="MiB all-reduced per rank")
    ax2.set_ylabel("MiB all-reduced per rank")
    ax2.set_ylim(0, max(float(np.max(r["bytes_allreduced"])) / 2**20 * 1.3, 1e-3))
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=7, loc="upper right")
    fig.tight_layout()
    return fig


def client_losses(run: RunData) -> Figure:
    """Each participating client's training loss per round (NaN = absent or excluded)."""
    loss = run.rounds["client_loss"]
    fig, ax = plt.subplots(figsize=(8, 4))
    image = ax.imshow(loss.T, aspect="auto", cmap="viridis", interpolation="nearest",
                      extent=(0.5, loss.shape[0] + 0.5, loss.shape[1] - 0.5, -0.5))
    ax.set(xlabel="round", ylabel="client", title=f"{run.name}: client training loss (blank: did not take part)")
    fig.colorbar(image, ax=ax, label="loss")
    fig.tight_layout()
    return fig
