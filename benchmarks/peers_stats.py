"""The peer benchmark's arithmetic and its table: pure functions over the runs' raw numbers.

A run's record (`RunRecord`) holds what was measured once; `summarize` takes the median over the
repetitions of each system; `markdown_table` prints one table per client count with every system's
value and, beside it, the ratio to Flower's (below 1: less time or memory than Flower).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

REFERENCE = "flower"  # the system every ratio is taken against


def steady(values: Sequence[float]) -> float:
    """The steady-state value of per-round times: the median of rounds 2..N (the first round pays
    one-off costs: lazy imports, first-touch allocation, a peer's worker start). One round: that round."""
    if not values:
        return math.nan
    return float(statistics.median(values[1:] if len(values) > 1 else values))


def periods(starts: Sequence[float]) -> list[float]:
    """Seconds between consecutive round starts: a round's whole cost, evaluation and logging included."""
    return [b - a for a, b in zip(starts, starts[1:])]


def median_or_nan(values: Sequence[float]) -> float:
    """The median of the finite values (NaN if none): a repetition that could not measure a field
    does not pull the others'."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return float(statistics.median(finite)) if finite else math.nan


@dataclass
class RunRecord:
    """One run of one system as measured from outside (wall, start-up, memory) and inside (rounds)."""

    system: str  # e.g. "ours-np2", "flower", "pfl", "ours-np2 runtime.client_batch=10"
    clients: int
    rep: int
    ok: bool = True
    error: str = ""
    round_s: list[float] = field(default_factory=list)  # per round: training + aggregation, no evaluation
    eval_s: list[float] = field(default_factory=list)  # per round: evaluation of the global model
    round_start_s: list[float] = field(default_factory=list)  # per round: start, seconds after process start
    startup_s: float = math.nan  # process start -> first round start
    wall_s: float = math.nan  # process start -> exit
    peak_rss_mib: float = math.nan  # peak over time of the RSS summed over the run's processes
    peak_pss_mib: float = math.nan
    peak_procs: int = 0
    final_acc: float = math.nan  # full test set
    round_acc: list[float] = field(default_factory=list)  # evaluation subset, per round
    notes: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


METRICS: tuple[tuple[str, str, str], ...] = (
    # (key, column title, format)
    ("steady_s", "steady s/round", "{:.3f}"),
    ("period_s", "round period s", "{:.3f}"),
    ("first_s", "1st round s", "{:.3f}"),
    ("eval_s", "eval s/round", "{:.3f}"),
    ("startup_s", "start-up s", "{:.2f}"),
    ("wall_s", "wall s", "{:.2f}"),
    ("rss_mib", "peak RSS MiB", "{:.0f}"),
    ("pss_mib", "peak PSS MiB", "{:.0f}"),
    ("acc", "final acc", "{:.4f}"),
)
NO_RATIO = {"acc"}  # accuracies are compared by eye, not as a ratio


def summarize(records: Sequence[RunRecord]) -> dict[tuple[int, str], dict[str, Any]]:
    """Per (clients, system): the median over the successful repetitions of each metric, the number of
    repetitions, and the first error of a failed one."""
    groups: dict[tuple[int, str], list[RunRecord]] = {}
    for r in records:
        groups.setdefault((r.clients, r.system), []).append(r)
    out = {}
    for key, runs in groups.items():
        good = [r for r in runs if r.ok]
        row: dict[str, Any] = {"reps": len(good), "failed": len(runs) - len(good),
                               "error": next((r.error for r in runs if not r.ok), "")}
        row["steady_s"] = median_or_nan([steady(r.round_s) for r in good])
        row["period_s"] = median_or_nan([steady(periods(r.round_start_s)) if len(r.round_start_s) > 1 else math.nan
                                         for r in good])
        row["first_s"] = median_or_nan([r.round_s[0] if r.round_s else math.nan for r in good])
        row["eval_s"] = median_or_nan([statistics.median(r.eval_s) if r.eval_s else math.nan for r in good])
        row["startup_s"] = median_or_nan([r.startup_s for r in good])
        row["wall_s"] = median_or_nan([r.wall_s for r in good])
        row["rss_mib"] = median_or_nan([r.peak_rss_mib for r in good])
        row["pss_mib"] = median_or_nan([r.peak_pss_mib for r in good])
        row["acc"] = median_or_nan([r.final_acc for r in good])
        row["procs"] = max((r.peak_procs for r in good), default=0)
        out[key] = row
    return out


def cell(value: float, fmt: str, ref: float | None) -> str:
    """A table cell: the value, and its ratio to the reference's beside it when there is one."""
    if value is None or not math.isfinite(value):
        return "n/a"
    text = fmt.format(value)
    if ref is not None and math.isfinite(ref) and ref > 0:
        text += f" ({value / ref:.2f}×)"
    return text


def markdown_table(summary: dict[tuple[int, str], dict[str, Any]], order: Sequence[str] = ()) -> str:
    """One markdown table per client count: a row per system, each cell `value (ratio to Flower)`."""
    lines: list[str] = []
    for clients in sorted({c for c, _ in summary}):
        systems = [s for c, s in summary if c == clients]
        systems.sort(key=lambda s: (order.index(s) if s in order else len(order), s))
        ref = summary.get((clients, REFERENCE))
        lines.append(f"**{clients} clients** (median of the repetitions; in brackets: ratio to Flower)")
        lines.append("")
        lines.append("| system | reps | " + " | ".join(title for _, title, _ in METRICS) + " |")
        lines.append("|---|---|" + "---|" * len(METRICS))
        for system in systems:
            row = summary[(clients, system)]
            if row["reps"] == 0:
                lines.append(f"| {system} | 0 | failed: {_one_line(row['error'])} |" + " |" * (len(METRICS) - 1))
                continue
            cells = []
            for key, _, fmt in METRICS:
                use_ref = ref is not None and system != REFERENCE and key not in NO_RATIO and ref["reps"] > 0
                cells.append(cell(row[key], fmt, ref[key] if use_ref else None))
            reps = f"{row['reps']}" + (f" ({row['failed']} failed)" if row["failed"] else "")
            lines.append(f"| {system} | {reps} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _one_line(text: str, limit: int = 160) -> str:
    """An error as one short table-safe line."""
    flat = " ".join(str(text).split()).replace("|", "/")
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"
