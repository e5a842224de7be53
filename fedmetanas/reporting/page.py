"""Turn one or more trajectory logs into PNG figures and a static index.html.

    python -m fedmetanas.report runs/demo/trajectory.h5 [runs/other/trajectory.h5 ...] --out report/

Works on a finished log, on one still being written (SWMR read of what is flushed) and on one from a
killed run (no /final group; rounds cut to the length every dataset has).
"""

from __future__ import annotations

import argparse
import html
import json
import logging
import sys
from pathlib import Path
from typing import Callable, Sequence

import h5py
import matplotlib.pyplot as plt
import numpy as np

from fedmetanas.reporting import figures
from fedmetanas.reporting.figures import CELL_KINDS, RunData
from fedmetanas.search.genotypes import Genotype

log = logging.getLogger(__name__)


class ReportError(ValueError):
    """A file cannot be reported on; the message names it and the fix."""


def load_run(path: str | Path, name: str | None = None) -> RunData:
    """Read a log (finished, running or killed) into a RunData."""
    p = Path(path)
    if not p.is_file():
        raise ReportError(f"{p}: no such file; pass the trajectory.h5 of a run (runs/<name>/trajectory.h5)")
    try:
        with h5py.File(p, "r", swmr=True) as f:
            if "format_version" not in f.attrs:
                raise ReportError(f"{p}: not a fedmetanas trajectory log (no format_version attribute)")
            rounds = {}
            if "rounds" in f:
                for key, ds in f["rounds"].items():
                    ds.refresh() if hasattr(ds, "refresh") else None
                    rounds[key] = ds[()]
            attrs = dict(f.attrs)
            part = {k: v[()] for k, v in f["partition"].items()} if "partition" in f else {}
            final = dict(f["final"].attrs) if "final" in f else {}
    except OSError as err:
        raise ReportError(f"{p}: not a readable HDF5 file ({err.__class__.__name__}); pass a run's trajectory.h5") from None
    n = min((len(v) for v in rounds.values()), default=0)
    rounds = {k: v[:n] for k, v in rounds.items()}
    for k, v in rounds.items():
        if v.dtype == object:
            rounds[k] = np.array([x.decode() if isinstance(x, bytes) else x for x in v], dtype=object)
    primitives = json.loads(attrs.get("primitives", "[]"))
    return RunData(name or p.parent.name or p.stem, rounds, attrs, part, final, primitives, int(attrs.get("nodes", 0)))


def _genotype(run: RunData) -> Genotype | None:
    text = run.final.get("genotype") or (run.rounds["genotype"][-1] if run.num_rounds else None)
    if isinstance(text, bytes):
        text = text.decode()
    return Genotype.from_string(text) if text else None


def _save(fig: plt.Figure, out: Path, name: str) -> str:
    fig.savefig(out / name, dpi=100)
    plt.close(fig)
    return name


def _figures_of(run: RunData, prefix: str) -> list[tuple[str, Callable[[], plt.Figure]]]:
    """The figures one run supports (a missing dataset skips its figure)."""
    r = run.rounds
    todo: list[tuple[str, Callable[[], plt.Figure]]] = []
    if run.num_rounds == 0:
        return todo
    for kind in CELL_KINDS:
        if f"alpha_{kind}" in r:
            todo.append((f"{prefix}ops_{kind}.png", lambda kind=kind: figures.op_heatmaps(run, kind)))
    if "beta_normal" in r:
        todo.append((f"{prefix}pairs.png", lambda: figures.pair_probabilities(run)))
    if any(k.startswith("entropy_") for k in r):
        todo.append((f"{prefix}entropy.png", lambda: figures.entropy_and_temperature(run)))
    geno = _genotype(run)
    if geno is not None:
        todo.append((f"{prefix}genotype.png", lambda: figures.genotype_cells(geno, f"{run.name}: final genotype")))
    todo.append((f"{prefix}accuracy.png", lambda: figures.accuracy([run])))
    if "class_counts" in run.partition:
        todo.append((f"{prefix}partition.png", lambda: figures.partition(run)))
    todo.append((f"{prefix}time.png", lambda: figures.phase_times(run)))
    if "client_loss" in r:
        todo.append((f"{prefix}client_loss.png", lambda: figures.client_losses(run)))
    return todo


def _summary_row(run: RunData) -> str:
    f = run.final
    status = "finished" if f else f"unfinished ({run.num_rounds} rounds so far)"
    acc = f"{f['discrete_acc']:.4f}" if "discrete_acc" in f else (
        f"{np.nanmax(run.rounds['discrete_acc']):.4f} (best so far)" if run.num_rounds else "-")
    sup = f"{f['supernet_acc']:.4f}" if "supernet_acc" in f else "-"
    secs = f.get("seconds", run.rounds["wall_time"][-1] if run.num_rounds else 0.0)
    mib = float(np.sum(run.rounds.get("bytes_allreduced", np.zeros(1)))) / 2**20
    geno = html.escape(str(f.get("genotype", run.rounds["genotype"][-1] if run.num_rounds else "-")))
    return (f"<tr><td>{html.escape(run.name)}</td><td>{status}</td><td>{run.num_rounds}</td><td>{acc}</td>"
            f"<td>{sup}</td><td>{float(secs):.1f}</td><td>{mib:.1f}</td><td><code>{geno}</code></td></tr>")


def write_report(paths: Sequence[str | Path], out: str | Path) -> Path:
    """Write the figures and index.html for the given logs into `out`; return the page's path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names: list[str] = []
    runs = []
    for path in paths:
        p = Path(path)
        base = p.parent.name or p.stem
        name = base if base not in names else f"{base}-{len(names)}"
        names.append(name)
        runs.append(load_run(p, name))
    sections = []
    if len(runs) > 1:
        overlay = _save(figures.accuracy([r for r in runs if r.num_rounds]), out, "overlay_accuracy.png")
        sections.append(f"<h2>All runs overlaid</h2><img src='{overlay}' alt='overlay'>")
    for i, run in enumerate(runs):
        prefix = f"run{i}_" if len(runs) > 1 else ""
        imgs = [_save(make(), out, fname) for fname, make in _figures_of(run, prefix)]
        missing = []
        if "personalization" not in run.attrs and not any(k.startswith("personal") for k in run.rounds):
            missing.append("personalized accuracy (this log has no personalization results)")
        body = "".join(f"<figure><img src='{html.escape(s)}' alt='{html.escape(s)}'></figure>" for s in imgs)
        note = "".join(f"<p class='note'>Not shown: {html.escape(m)}.</p>" for m in missing)
        sections.append(f"<h2>{html.escape(run.name)}</h2>{note}{body}")
    table = ("<table><tr><th>run</th><th>status</th><th>rounds</th><th>discrete acc (pruned, not retrained)</th>"
             "<th>supernet acc</th><th>seconds</th><th>MiB all-reduced per rank</th><th>genotype</th></tr>"
             + "".join(_summary_row(r) for r in runs) + "</table>")
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>fedmetanas report</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1400px}} img{{max-width:100%;border:1px solid #ddd;margin:.5em 0}}
table{{border-collapse:collapse;font-size:90%}} td,th{{border:1px solid #ccc;padding:4px 8px;vertical-align:top}}
code{{font-size:80%;word-break:break-all}} .note{{color:#666}}</style>
<script>window.addEventListener('load',function(){{var im=document.images,ok=0;
for(var i=0;i<im.length;i++){{if(im[i].complete&&im[i].naturalWidth>0)ok++;}}
document.body.dataset.imagesOk=ok;document.body.dataset.imagesTotal=im.length;}});</script>
</head><body><h1>fedmetanas report</h1>{table}{''.join(sections)}</body></html>
"""
    index = out / "index.html"
    index.write_text(page)
    return index


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fedmetanas-report", description="Figures and an HTML page from trajectory logs.")
    p.add_argument("logs", nargs="+", help="trajectory.h5 files (several to compare)")
    p.add_argument("--out", required=True, help="directory for the PNGs and index.html")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        index = write_report(args.logs, args.out)
    except ReportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"report: {index}")
    return 0
