"""Turn one or more trajectory logs into PNG figures and a static index.html (no server needed).

    python -m fedmetanas.report runs/demo/trajectory.h5 [runs/other/trajectory.h5 ...] --out report/

Reads only the documented layout (docs/hdf5.md), in SWMR mode, so it works on a finished log, on one
still being written (what has been flushed) and on one from a killed run (no /final; datasets cut
to the length they all have). A figure whose data the log lacks is left out and the page says why.
"""

from __future__ import annotations

import argparse
import html
import json
import logging
import math
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from fedmetanas.reporting import plots
from fedmetanas.reporting.hdf5 import READ_TIMEOUT_S, TornLogError, UnstartedLogError, read_log
from fedmetanas.search.genotypes import Genotype

log = logging.getLogger(__name__)

EXIT_BAD_INPUT = 2
CELLS = plots.CELLS
INDEX = "index.html"
SHARED = ("accuracy.png", "entropy.png", "pruning.png", "cost.png", "personalized.png")
PER_RUN = ("ops_normal.png", "ops_reduce.png", "pairs_normal.png", "pairs_reduce.png", "genotype.png",
           "partition.png", "time.png", "client_loss.png")


class ReportError(ValueError):
    """A file the report cannot read; the message names the file and what to pass instead."""


@dataclass
class RunData:
    """What one log holds: per-round arrays cut to a common length, static data, final results."""

    path: Path
    label: str
    attrs: dict[str, Any]
    primitives: list[str]
    nodes: int
    rounds: dict[str, np.ndarray]
    partition: dict[str, np.ndarray] = field(default_factory=dict)
    final: dict[str, Any] = field(default_factory=dict)
    personalized: np.ndarray | None = None  # (K,) per-client personalized accuracy, when logged
    retrain: dict[str, np.ndarray] = field(default_factory=dict)  # FedNAS's retraining rows (/retrain)
    notes: list[str] = field(default_factory=list)  # what could not be read
    # (K,) each client's accuracy before personalization (/personalization/acc_before), when logged
    personal_before: np.ndarray | None = None

    @property
    def num_rounds(self) -> int:
        return len(self.rounds["round"]) if "round" in self.rounds else 0

    @property
    def finished(self) -> bool:
        return bool(self.final)

    @property
    def genotype_text(self) -> str | None:
        """The final genotype, or for an unfinished run the one after its last logged round."""
        if self.final.get("genotype"):
            return str(self.final["genotype"])
        if self.num_rounds and "genotype" in self.rounds:
            return str(self.rounds["genotype"][-1])
        return None

    def series(self) -> dict[str, np.ndarray]:
        """The per-round arrays, for the figures that compare runs (FedNAS's retraining as `retrain/*`)."""
        if not self.retrain:
            return self.rounds
        return {**self.rounds, **{f"retrain/{k}": v for k, v in self.retrain.items()}}


def _text(value: Any) -> Any:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def _read_datasets(group: h5py.Group, where: str, notes: list[str]) -> dict[str, np.ndarray]:
    """Every dataset directly in `group` (strings decoded); one that cannot be read is noted, not fatal."""
    out = {}
    for name, obj in group.items():
        if not isinstance(obj, h5py.Dataset):
            continue
        try:
            value = obj[()]
        except (OSError, ValueError, TypeError) as err:
            notes.append(f"{where}/{name} could not be read ({err.__class__.__name__})")
            continue
        if isinstance(value, np.ndarray) and value.dtype == object:
            value = np.array([_text(v) for v in value.ravel()], dtype=object).reshape(value.shape)
        out[name] = np.asarray(value)
    return out


def _read_group(f: h5py.File, name: str, notes: list[str]) -> dict[str, np.ndarray]:
    group = f.get(name)
    return _read_datasets(group, f"/{name}", notes) if isinstance(group, h5py.Group) else {}


def _personalized(f: h5py.File, rounds: dict[str, np.ndarray]) -> np.ndarray | None:
    """Per-client personalized accuracy, where a log carries it.

    Our runs write `/personalization/acc_after` (after adaptation; docs/hdf5.md); other layouts are read
    too: the first dataset named like `*acc*` under /personalization (shape (K,), or (R, K): last row
    with a value), else a (R, K) `/rounds/*personal*acc*`.
    """
    found: list[Any] = []
    group = f.get("personalization")
    if isinstance(group, h5py.Group):
        names = sorted((n for n in group if "acc" in n and isinstance(group[n], h5py.Dataset)),
                       key=lambda n: (n != "acc_after", n))
        found += [group[n][()] for n in names]
    found += [v for k, v in sorted(rounds.items()) if "personal" in k and "acc" in k]
    for value in found:
        try:
            values = np.asarray(value, dtype=float)
        except (TypeError, ValueError):
            continue
        if values.ndim == 1 and np.isfinite(values).any():
            return values
        if values.ndim == 2:
            rows = [row for row in values if np.isfinite(row).any()]
            if rows:
                return rows[-1]
    return None


def load_run(path: str | Path, label: str | None = None, read_timeout_s: float = READ_TIMEOUT_S) -> RunData:
    """Read a trajectory log (finished, still running, or from a killed run).

    Args:
        path: a run's trajectory.h5.
        label: name of the run on the page (default: the run directory's name).
        read_timeout_s: the longest wait for a log still flagged as being written (see hdf5.read_log).

    Raises:
        ReportError: the file is missing, not HDF5, not a trajectory log, torn, or not readable now.
    """
    p = Path(path)
    if not p.exists():
        raise ReportError(f"{p}: no such file; pass a run's trajectory log (runs/<name>/trajectory.h5)")
    if p.is_dir():
        raise ReportError(f"{p}: is a directory; pass the trajectory.h5 inside it")
    try:
        is_hdf5 = h5py.is_hdf5(p)
    except OSError:
        is_hdf5 = False
    if not is_hdf5:
        raise ReportError(f"{p}: not an HDF5 file; pass a run's trajectory log (runs/<name>/trajectory.h5)")
    notes: list[str] = []

    def read(f: h5py.File) -> tuple[Any, ...]:
        attrs = {k: _text(v) for k, v in f.attrs.items()}
        if "format_version" not in attrs:
            raise ReportError(f"{p}: an HDF5 file but not a fedmetanas trajectory log (no format_version "
                              "attribute; see docs/hdf5.md)")
        raw = _read_group(f, "rounds", notes)
        part = _read_group(f, "partition", notes)
        final = {k: _text(v) for k, v in f["final"].attrs.items()} if "final" in f else {}
        # A writer killed mid-round may leave some datasets one row longer: keep the common rows.
        n = min((len(v) for v in raw.values() if v.ndim), default=0)
        rounds = {k: v[:n] for k, v in raw.items() if v.ndim}
        personalized = _personalized(f, rounds)
        group = f.get("personalization")
        before = (np.asarray(group["acc_before"][()], dtype=float) if isinstance(group, h5py.Group)
                  and isinstance(group.get("acc_before"), h5py.Dataset) else None)
        raw_retrain = _read_group(f, "retrain", notes)
        m = min((len(v) for v in raw_retrain.values() if v.ndim), default=0)
        retrain = {k: v[:m] for k, v in raw_retrain.items() if v.ndim}
        if retrain and not {"round", "wall_time", "discrete_acc", "discrete_loss"} <= set(retrain):
            notes.append("The /retrain table lacks round, wall_time or accuracy: the retrained net is not drawn.")
            retrain = {}
        return attrs, part, final, n, rounds, personalized, retrain, before

    try:
        attrs, part, final, n, rounds, personalized, retrain, before = read_log(p, read, read_timeout_s)
    except BlockingIOError:
        raise ReportError(f"{p}: open for writing and not readable yet (a run becomes readable after its first "
                          "round); try again in a moment") from None
    except UnstartedLogError as err:
        raise ReportError(f"{p}: {err}; there is nothing to report yet: continue the run with --resume (it starts "
                          "afresh and rewrites the log)") from None
    except TornLogError as err:
        raise ReportError(f"{p}: {err}; copy the complete file from the run directory (a killed run's log is "
                          "rebuilt by --resume)") from None
    except (OSError, RuntimeError) as err:
        raise ReportError(f"{p}: unreadable HDF5 file ({str(err).splitlines()[0][:120]}); pass a run's "
                          "trajectory log") from None
    if str(attrs["format_version"]) not in ("1", "2"):
        notes.append(f"The log has format_version {attrs['format_version']}; this report reads versions 1 and 2.")
    if "round" not in rounds and rounds:
        rounds["round"] = np.arange(n)
    try:
        primitives = [str(x) for x in json.loads(attrs.get("primitives", "[]"))]
    except (TypeError, ValueError):
        primitives = []
    if "alpha_normal" in rounds and len(primitives) != rounds["alpha_normal"].shape[-1]:
        primitives = [f"op{i}" for i in range(rounds["alpha_normal"].shape[-1])]
        notes.append("The primitives attribute does not match the alpha columns: ops are numbered.")
    nodes = int(attrs.get("nodes", 0))
    if "alpha_normal" in rounds and sum(j + 2 for j in range(nodes)) != rounds["alpha_normal"].shape[1]:
        edges = rounds["alpha_normal"].shape[1]
        nodes = next((m for m in range(1, 64) if sum(j + 2 for j in range(m)) == edges), 0)
    return RunData(p, label or p.parent.name or p.stem, attrs, primitives, nodes, rounds, part, final,
                   personalized, retrain, notes, before)


def annealed_probabilities(logits: np.ndarray, mask: np.ndarray, tau: np.ndarray) -> np.ndarray:
    """softmax(logits / tau) over the kept entries of each row, per round (pruned entries: 0).

    Args:
        logits: (R, rows, k) alphas or betas.
        mask: (R, rows, k) 1 = kept.
        tau: (R,) the temperature of each round.
    """
    keep = mask > 0
    z = np.where(keep, logits.astype(np.float64) / tau.astype(np.float64)[:, None, None], -np.inf)
    top = np.max(z, axis=-1, keepdims=True)
    e = np.where(keep, np.exp(z - np.where(np.isfinite(top), top, 0.0)), 0.0)
    return e / np.maximum(e.sum(axis=-1, keepdims=True), 1e-300)


# -- what the page shows --------------------------------------------------------------------------

@dataclass
class Planned:
    """A figure to draw: its file, a caption for the page, and how to draw it."""

    file: str
    caption: str
    draw: Callable[[], Any]  # -> a Figure, or DOT source text for Graphviz to render


@dataclass
class Section:
    """A part of the page: its figures (planned, then those drawn) and notes on what is left out and why."""

    title: str
    planned: list[Planned] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    texts: dict[str, str] = field(default_factory=dict)  # extra text files to write and link (DOT sources)
    tables: list[tuple[str, list[dict[str, str]]]] = field(default_factory=list)  # (caption, rows)
    shown: list[Planned] = field(default_factory=list)


def _missing(run: RunData, *keys: str) -> list[str]:
    return [k for k in keys if k not in run.rounds]


def _shared_section(runs: list[RunData]) -> Section:
    """Figures with one line per run: accuracy, entropy and tau, pruning, cost, personalized accuracy."""
    many = len(runs) > 1
    section = Section("All runs overlaid" if many else "Over rounds")
    live = [r for r in runs if r.num_rounds]
    for run in runs:
        if not run.num_rounds:
            section.notes.append(f"{run.label}: no round logged yet, so it is absent from the curves below.")

    def with_keys(*keys: str) -> dict[str, dict[str, np.ndarray]]:
        return {r.label: r.series() for r in live if not _missing(r, *keys)}

    acc = with_keys("round", "wall_time")
    if acc:
        section.planned.append(Planned(
            "accuracy.png", "Global test accuracy and loss over rounds and over wall time: the discrete network of "
            "the round's genotype (pruned, not retrained; solid) and the soft supernet (dashed). Rounds without "
            "evaluation (eval.every) are skipped.", lambda: plots.accuracy_and_loss(acc)))
    ent = with_keys("round", "tau")
    if ent:
        sizes = {len(r.primitives) for r in live if r.primitives}
        max_h = math.log(sizes.pop()) if len(sizes) == 1 else None
        section.planned.append(Planned(
            "entropy.png", "Left: mean entropy of the annealed architecture distributions softmax(\u00b7/\u03c4) over "
            "the kept candidates (ops per edge, input pairs per node). Right: the temperature \u03c4.",
            lambda: plots.entropy_and_temperature(ent, max_h)))
    masks = with_keys("round", "mask_alpha_normal")
    if masks:
        section.planned.append(Planned(
            "pruning.png", "Soft pruning: how many (op, edge) candidates and input pairs the masks still keep.",
            lambda: plots.pruning(masks)))
    spent = with_keys("round", "wall_time")
    if spent:
        section.planned.append(Planned(
            "cost.png", "Wall time since the start and cumulative bytes each rank contributed to the all-reduce.",
            lambda: plots.cost(spent)))
    dists = {r.label: r.personalized for r in runs if r.personalized is not None}
    if dists:
        section.planned.append(Planned(
            "personalized.png", "Personalized test accuracy across clients (box: quartiles, triangle: mean).",
            lambda: plots.personalized_accuracy(dists)))
    without = [r.label for r in runs if r.personalized is None]
    if without:
        section.notes.append("Personalized accuracy: not in the log of " + ", ".join(without) + ".")
    return section


def _run_section(run: RunData, prefix: str) -> Section:
    """The figures of one run: op and pair probabilities, genotype, partition, phase times, client losses."""
    state = "finished" if run.finished else f"unfinished, {run.num_rounds} round(s) logged"
    section = Section(f"{run.label} ({state})", notes=list(run.notes))
    r = run.rounds
    if not run.num_rounds:
        section.notes.append("No round logged yet (the run has just started): only the partition is shown.")
    x = r["round"] + 1 if run.num_rounds else np.zeros(0)
    cells = _cells_of(run)
    for cell in cells:
        need = _missing(run, "tau", f"alpha_{cell}", f"mask_alpha_{cell}")
        if run.num_rounds and not need:
            section.planned.append(Planned(
                f"{prefix}ops_{cell}.png", f"{cell.capitalize()} cell: probability of each operation on each edge "
                f"(row: target node, column: input state) over rounds; grey once the op is pruned.",
                lambda cell=cell: plots.op_probabilities(
                    x, annealed_probabilities(r[f"alpha_{cell}"], r[f"mask_alpha_{cell}"], r["tau"]),
                    r[f"mask_alpha_{cell}"], run.primitives, run.nodes, f"{run.label}: {cell} cell")))
        elif run.num_rounds:
            section.notes.append(f"Op probabilities, {cell} cell: the log lacks {', '.join(need)}.")
    for cell in cells:
        if run.num_rounds and not _missing(run, "tau", f"beta_{cell}", f"mask_beta_{cell}"):
            section.planned.append(Planned(
                f"{prefix}pairs_{cell}.png", f"{cell.capitalize()} cell: probability of each input pair of each node "
                "over rounds; a dotted line and \u00d7 mark the round at which a pair's mask fell.",
                lambda cell=cell: plots.pair_probabilities(
                    x, annealed_probabilities(r[f"beta_{cell}"], r[f"mask_beta_{cell}"], r["tau"]),
                    r[f"mask_beta_{cell}"], run.nodes, f"{run.label}: {cell} cell")))
    if run.num_rounds and "beta_normal" not in r:
        section.notes.append("Input-pair probabilities: this search has no pair logits (search.input_mode: all).")
    text = run.genotype_text
    if text:
        try:
            genotype = Genotype.from_string(text)
        except (ValueError, SyntaxError, KeyError, TypeError):
            section.notes.append("Genotype: the logged genotype string could not be parsed.")
        else:
            when = "final genotype" if run.final.get("genotype") else f"genotype after round {run.num_rounds}"
            section.planned.append(Planned(
                f"{prefix}genotype.png", f"The {when} as cell diagrams: each intermediate node takes two inputs "
                "through the labelled ops; the cell output concatenates the nodes.",
                lambda: plots.genotype_cells(genotype, f"{run.label}: {when}")))
            section.planned += _graphviz(genotype, prefix, section)
    if "class_counts" in run.partition:
        counts = run.partition["class_counts"]
        title = f"{run.label}: {counts.shape[0]} clients \u00d7 {counts.shape[1]} classes"
        section.planned.append(Planned(
            f"{prefix}partition.png", "The partition: training samples of each class held by each client.",
            lambda: plots.partition(counts, title)))
    else:
        section.notes.append("Partition: the log has no /partition/class_counts.")
    need = _missing(run, "time_local", "time_allreduce", "time_eval", "time_round")
    if run.num_rounds and not need:
        section.planned.append(Planned(
            f"{prefix}time.png", "Wall time per phase per round (local search of the slowest rank, all-reduce, "
            "evaluation, the rest), and the bytes each rank contributed to the round's all-reduce.",
            lambda: plots.phase_times(x, r["time_local"], r["time_allreduce"], r["time_eval"], r["time_round"],
                                      r.get("bytes_allreduced"), f"{run.label}: where the time goes")))
    elif run.num_rounds:
        section.notes.append(f"Phase times: the log lacks {', '.join(need)}.")
    if run.num_rounds and "client_loss" in r:
        section.planned.append(Planned(
            f"{prefix}client_loss.png", "Each client's mean training loss per round (grey: it did not take part).",
            lambda: plots.client_loss(x, r["client_loss"], r.get("excluded"), run.label, r.get("clients"))))
    if run.personal_before is not None and run.personalized is not None:
        rows, worst = personalization_table(run.personal_before, run.personalized,
                                            run.partition.get("class_counts"))
        if rows:
            section.tables.append(("Personalization per client: accuracy on its local test split before and "
                                   f"after adapting the final model on its local train split. {worst}", rows))
    return section


def held_classes(counts: np.ndarray, min_share: float = 0.05) -> str:
    """The classes a client holds, largest share first, as `class:share%` (those under `min_share` left out)."""
    total = float(counts.sum())
    if total <= 0:
        return "\u2013"
    order = np.argsort(-counts, kind="stable")
    return " ".join(f"{c}:{100 * counts[c] / total:.0f}%" for c in order if counts[c] / total >= min_share)


def personalization_table(before: np.ndarray, after: np.ndarray,
                          class_counts: np.ndarray | None = None) -> tuple[list[dict[str, str]], str]:
    """Each measured client's accuracy before and after personalization (and the classes it holds), and a
    line naming the worst client: the lowest personalized accuracy, and the largest drop if any client lost.

    The mean hides what issue 23 was about: a few clients that personalization made nearly useless.
    """
    measured = np.flatnonzero(np.isfinite(before) & np.isfinite(after))
    rows = []
    for k in measured:
        row = {"client": str(k)}
        if class_counts is not None and k < len(class_counts):
            row["classes held (train)"] = held_classes(np.asarray(class_counts[k], dtype=float))
        change = 100 * (after[k] - before[k])
        rows.append({**row, "before %": f"{100 * before[k]:.2f}", "after %": f"{100 * after[k]:.2f}",
                     "change (points)": f"{change:+.2f}"})
    if not measured.size:
        return rows, ""
    worst = measured[np.argmin(after[measured])]
    drop = before[measured] - after[measured]
    line = f"Worst client: {worst} ({100 * after[worst]:.2f}% after personalization, {100 * before[worst]:.2f}% before)"
    if drop.max() > 0:
        k = measured[np.argmax(drop)]
        line += f"; largest drop: client {k}, {100 * drop.max():.2f} points ({100 * before[k]:.2f}% \u2192 " \
                f"{100 * after[k]:.2f}%)"
    else:
        line += "; no client lost accuracy"
    return rows, line + "."


def _cells_of(run: RunData) -> tuple[str, ...]:
    """The cell kinds the run's network has, as its genotype tells (a 1-layer net has no reduce cell)."""
    try:
        return Genotype.from_string(run.genotype_text or "").cells or CELLS
    except (ValueError, SyntaxError, KeyError, TypeError):
        return CELLS


def _graphviz(genotype: Genotype, prefix: str, section: Section) -> list[Planned]:
    """DOT sources of the genotype's cells (always written, as links), and their Graphviz renderings where
    `dot` exists."""
    planned = []
    for cell in genotype.cells:
        source = plots.genotype_dot(genotype, cell)
        section.texts[f"{prefix}genotype_{cell}.dot"] = source
        if shutil.which("dot"):
            planned.append(Planned(f"{prefix}genotype_{cell}_graphviz.png", f"{cell.capitalize()} cell, drawn by "
                                   "Graphviz.", lambda source=source: source))
    return planned


def _draw(item: Planned, out: Path) -> str | None:
    """Write one figure; return None, or a note saying why it could not be drawn."""
    target = out / item.file
    try:
        result = item.draw()
        if isinstance(result, str):  # DOT source: render with Graphviz
            subprocess.run(["dot", "-Tpng", "-Gdpi=90", "-o", str(target)], input=result, text=True,
                           check=True, capture_output=True, timeout=60)
        else:
            result.savefig(target, dpi=100)
    # A report must survive odd logs (a later layout, a torn run): say what failed and draw the rest.
    except Exception as err:  # noqa: BLE001
        log.warning("could not draw %s: %s", item.file, err)
        return f"{item.file}: could not be drawn ({err.__class__.__name__}: {str(err)[:200]})."
    log.debug("wrote %s", target)
    return None


def _fmt(value: Any, digits: int = 4) -> str:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return "\u2013"
    return f"{v:.{digits}f}" if math.isfinite(v) else "\u2013"


def _last_evaluated(run: RunData, key: str) -> tuple[str, int | None]:
    if key not in run.rounds:
        return "\u2013", None
    ok = np.flatnonzero(np.isfinite(run.rounds[key].astype(float)))
    return (_fmt(run.rounds[key][ok[-1]]), int(ok[-1]) + 1) if ok.size else ("\u2013", None)


def describe_genotype(text: str) -> str:
    """A genotype as one readable line per cell: `node = op(input) + op(input)`."""
    try:
        genotype = Genotype.from_string(text)
    except (ValueError, SyntaxError, KeyError, TypeError):
        return text
    lines = []
    for cell in genotype.cells:
        gene = getattr(genotype, cell)
        names = plots.state_names(len(gene))
        nodes = "; ".join(f"{j} = " + " + ".join(f"{op}({names[i]})" for op, i in node) for j, node in enumerate(gene))
        lines.append(f"{cell}: {nodes}")
    return "\n".join(lines)


def summary_row(run: RunData) -> dict[str, str]:
    """The run's line in the summary table (plain text; the page escapes it)."""
    r, f = run.rounds, run.final
    if run.finished:
        status = "finished"
        disc, sup = _fmt(f.get("discrete_acc")), _fmt(f.get("supernet_acc"))
        where = f"final, {int(f['eval_count'])} test images" if "eval_count" in f else "final"
    else:
        status = "unfinished (running or killed)"
        disc, rnd = _last_evaluated(run, "discrete_acc")
        sup, _ = _last_evaluated(run, "supernet_acc")
        where = f"round {rnd} (last evaluated)" if rnd else "\u2013"
    seconds = f.get("seconds", r["wall_time"][-1] if run.num_rounds and "wall_time" in r else float("nan"))
    mib = float(np.sum(r["bytes_allreduced"])) / plots.MIB if "bytes_allreduced" in r else float("nan")
    clients = run.partition["class_counts"].shape[0] if "class_counts" in run.partition else "\u2013"
    return {"run": run.label, "status": status, "algorithm": str(run.attrs.get("algorithm", "\u2013")),
            "rounds": str(run.num_rounds), "clients": str(clients), "ranks": str(run.attrs.get("world_size", "\u2013")),
            "discrete acc": disc, "supernet acc": sup, "measured on": where, "time (s)": _fmt(seconds, 1),
            "MiB all-reduced per rank": _fmt(mib, 2), "genotype": run.genotype_text or "\u2013"}


_CSS = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1300px;padding:0 1em;color:#222}
table{border-collapse:collapse;font-size:85%;margin:1em 0}
td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top;text-align:left}th{background:#f3f3f3}
code{font-size:85%;word-break:break-all}figure{margin:1.5em 0}img{max-width:100%;border:1px solid #e3e3e3}
figcaption{color:#444;font-size:90%;max-width:900px}.geno{font-size:80%;max-width:30em}
.note{color:#7a5a00;background:#fff8e1;padding:4px 8px;margin:4px 0}.meta{color:#666;font-size:85%}"""

# Lets a headless browser (the page test) report how many images decoded: on load, the body carries
# data-images-ok (images with a natural width) and data-images-total.
_SCRIPT = """window.addEventListener("load", function () {
  var imgs = Array.prototype.slice.call(document.images);
  document.body.dataset.imagesOk = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  document.body.dataset.imagesTotal = imgs.length;
});"""


def render_page(runs: Sequence[RunData], sections: Sequence[Section]) -> str:
    """The static page: a summary table, then each section's figures (relative links) and notes."""
    e = html.escape
    rows = [summary_row(r) for r in runs]

    def cell(key: str, value: str, run: RunData) -> str:
        if key == "run":
            return f"<td><b>{e(value)}</b><br><span class='meta'>{e(str(run.path))}</span></td>"
        if key == "genotype" and run.genotype_text:
            return (f"<td class='geno'>{e(describe_genotype(value)).replace(chr(10), '<br>')}<details><summary>as "
                    f"logged</summary><code>{e(value)}</code></details></td>")
        return f"<td>{e(value)}</td>"

    head = "".join(f"<th>{e(k)}</th>" for k in rows[0])
    body = "".join("<tr>" + "".join(cell(k, v, run) for k, v in row.items()) + "</tr>" for row, run in zip(rows, runs))
    written = datetime.now().isoformat(timespec="seconds")
    intro = (f"<h1>FedMetaNAS search report</h1><p class='meta'>{len(runs)} run(s); written {e(written)}. "
             "Run the report again to see the new rounds of a running search.</p>")
    parts = [intro, f"<table><tr>{head}</tr>{body}</table>"]
    for s in sections:
        parts.append(f"<h2>{e(s.title)}</h2>")
        parts += [f"<p class='note'>{e(n)}</p>" for n in s.notes]
        for item in s.shown:
            parts.append(f"<figure><img src='{e(item.file)}' alt='{e(item.file)}'><figcaption>{e(item.caption)} "
                         f"<span class='meta'>({e(item.file)})</span></figcaption></figure>")
        for caption, rows in s.tables:
            head = "".join(f"<th>{e(k)}</th>" for k in rows[0])
            body = "".join("<tr>" + "".join(f"<td>{e(v)}</td>" for v in row.values()) + "</tr>" for row in rows)
            parts.append(f"<p>{e(caption)}</p><table><tr>{head}</tr>{body}</table>")
        if s.texts:
            parts.append("<p class='meta'>Graphviz sources of the genotype: "
                         + ", ".join(f"<a href='{e(name)}'>{e(name)}</a>" for name in s.texts) + "</p>")
    return (f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'><title>FedMetaNAS report: "
            f"{e(', '.join(r.label for r in runs))}</title>\n<style>{_CSS}</style>\n<script>{_SCRIPT}</script>\n"
            f"</head><body>\n" + "\n".join(parts) + "\n</body></html>\n")


def _unique_labels(paths: Sequence[Path], labels: Sequence[str] | None) -> list[str]:
    base = list(labels) if labels else [p.parent.name or p.stem for p in paths]
    seen: dict[str, int] = {}
    out = []
    for name in base:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name} ({seen[name]})")
    return out


def write_report(paths: Sequence[str | Path], out: str | Path, labels: Sequence[str] | None = None,
                 read_timeout_s: float = READ_TIMEOUT_S) -> Path:
    """Read the logs, write the figures and index.html into `out` (created), return the page's path.

    Only the report's own file names are written in `out` (existing ones are overwritten). With
    several logs, per-run files are prefixed `run1_`, `run2_`, ... and the shared figures overlay them.
    """
    paths = [Path(p) for p in paths]
    if labels is not None and len(labels) != len(paths):
        raise ReportError(f"--label: {len(labels)} label(s) for {len(paths)} log(s); give one per log or none")
    runs = [load_run(p, name, read_timeout_s)  # all read before writing
            for p, name in zip(paths, _unique_labels(paths, labels))]
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ReportError(f"--out {out}: cannot create the folder ({err.strerror}); pass a writable folder") from None
    sections = [_shared_section(runs)]
    sections += [_run_section(run, f"run{i}_" if len(runs) > 1 else "") for i, run in enumerate(runs, start=1)]
    for section in sections:
        for item in section.planned:
            note = _draw(item, out)
            (section.notes if note else section.shown).append(note or item)
        for name, text in section.texts.items():
            (out / name).write_text(text, encoding="utf-8")
    index = out / INDEX
    index.write_text(render_page(runs, sections), encoding="utf-8")
    log.info("report of %d run(s): %d figures in %s", len(runs), sum(len(s.shown) for s in sections), out)
    return index


def main(argv: Sequence[str] | None = None) -> int:
    """`fedmetanas-report RUN.h5 [RUN2.h5 ...] --out DIR`: exit 0, or 2 with one `error:` line."""
    p = argparse.ArgumentParser(prog="fedmetanas-report",
                                description="Figures and a static HTML page from FedMetaNAS trajectory logs.")
    p.add_argument("logs", nargs="+", metavar="RUN.h5", help="trajectory logs (several: overlaid to compare)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the PNGs and index.html (created)")
    p.add_argument("--label", action="append", metavar="NAME",
                   help="name of a run on the page, once per log in order (default: its run directory)")
    p.add_argument("--log-level", default="WARNING", help="logging level (DEBUG, INFO, WARNING)")
    p.add_argument("--read-timeout", type=float, default=READ_TIMEOUT_S, metavar="SECONDS",
                   help="longest wait for a log that is still being written (a torn one never finishes)")
    args = p.parse_args(argv)
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.WARNING),
                        format="%(message)s", stream=sys.stderr)
    try:
        index = write_report(args.logs, args.out, args.label, args.read_timeout)
    except ReportError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"report: {index.resolve()}")
    return 0
