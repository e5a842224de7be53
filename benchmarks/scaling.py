"""Scaling study: the same search at several rank counts; speed-up, efficiency, and where the time goes.

Strong scaling keeps the clients fixed; weak scaling gives every rank the same number of clients.
Each point is a real `mpirun -np N` run of launch/main.py; the figures come from its HDF5 log:
per rank, compute = its local-search seconds, idle = the slowest rank's local seconds minus its own
(load imbalance: time spent waiting at the all-reduce), communication = rank 0's all-reduce seconds
minus its idle. The first round is dropped (warm-up). Writes scaling.csv, scaling.h5 and scaling.png.

    .venv/bin/python benchmarks/scaling.py --out docs/scaling [--ranks 1 2 4 8] [--mode strong weak]
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import h5py
import numpy as np

REPO = Path(__file__).resolve().parents[1]

from fedmetanas.launcher import launch


def run_point(mode: str, np_: int, clients_per_rank: int, strong_clients: int, rounds: int, out: Path,
              extra: list[str]) -> dict[str, float]:
    clients = strong_clients if mode == "strong" else clients_per_rank * np_
    name = f"{mode}-np{np_}"
    args = ["--config", str(REPO / "configs" / "default.yaml"), f"output.dir={out / 'runs'}", f"output.name={name}",
            "--overwrite", f"federated.num_clients={clients}", f"federated.rounds={rounds}",
            "federated.participation=1.0", "eval.every=1000000", "eval.subset=200", "eval.final_full=false",
            "checkpoint.every=0", *extra]
    t = time.perf_counter()
    proc = launch(args, np=np_, timeout=3600)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"np {np_} failed:\n{proc.stderr[-2000:]}")
    with h5py.File(out / "runs" / name / "trajectory.h5", "r") as f:
        r = {k: f["rounds"][k][()] for k in ("time_local_rank", "time_allreduce", "time_round", "time_eval",
                                             "memory_rank_mib")}
    keep = slice(1, None) if len(r["time_round"]) > 1 else slice(None)
    local = r["time_local_rank"][keep]  # (rounds, ranks)
    idle = local.max(axis=1, keepdims=True) - local
    comm = np.maximum(r["time_allreduce"][keep] - idle[:, 0], 0.0)
    return {"mode": mode, "ranks": np_, "clients": clients, "round_s": float(np.mean(r["time_round"][keep] - r["time_eval"][keep])),
            "compute_s": float(local.mean()), "idle_s": float(idle.mean()), "comm_s": float(comm.mean()),
            "imbalance": float(local.max(axis=1).mean() / max(local.mean(), 1e-12)),
            "peak_mib_per_rank": float(r["memory_rank_mib"][-1].max()), "wall_s": wall}


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for mode in sorted({r["mode"] for r in rows}):
        pts = [r for r in rows if r["mode"] == mode]
        n = np.array([r["ranks"] for r in pts])
        base = pts[0]["round_s"]
        speedup = base / np.array([r["round_s"] for r in pts]) if mode == "strong" else \
            n * base / np.array([r["round_s"] for r in pts])
        axes[0].plot(n, speedup, "o-", label=f"{mode} (measured)")
        axes[1].plot(n, speedup / n, "o-", label=mode)
    n_all = sorted({r["ranks"] for r in rows})
    axes[0].plot(n_all, n_all, "k--", lw=0.8, label="ideal")
    axes[0].set(xlabel="ranks", ylabel="speed-up (weak: scaled)", title="Speed-up", xscale="log", yscale="log")
    axes[1].set(xlabel="ranks", ylabel="parallel efficiency", title="Efficiency", xscale="log", ylim=(0, 1.1))
    strong = [r for r in rows if r["mode"] == rows[0]["mode"]]
    x = np.arange(len(strong))
    bottom = np.zeros(len(strong))
    for key, label in (("compute_s", "compute"), ("comm_s", "communication"), ("idle_s", "idle (imbalance)")):
        vals = np.array([r[key] for r in strong])
        axes[2].bar(x, vals, bottom=bottom, label=label)
        bottom += vals
    axes[2].set(xticks=x, xticklabels=[str(r["ranks"]) for r in strong], xlabel="ranks",
                ylabel="seconds per round and rank", title=f"Where the time goes ({strong[0]['mode']})")
    for ax in axes[:2]:
        ax.set_xticks(n_all, [str(n) for n in n_all])
        ax.minorticks_off()
    axes[0].set_yticks(n_all, [str(n) for n in n_all])
    for ax in axes:
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="scaling-out")
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--mode", nargs="+", default=["strong", "weak"], choices=["strong", "weak"])
    p.add_argument("--clients", type=int, default=8, help="strong scaling: total clients")
    p.add_argument("--clients-per-rank", type=int, default=2, help="weak scaling: clients per rank")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("overrides", nargs="*", help="extra section.key=value for every run")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for mode in args.mode:
        for np_ in args.ranks:
            row = run_point(mode, np_, args.clients_per_rank, args.clients, args.rounds, out, args.overrides)
            rows.append(row)
            print(f"{mode:6s} np {np_}: {row['clients']:3d} clients  round {row['round_s']:6.2f} s  "
                  f"compute {row['compute_s']:6.2f}  comm {row['comm_s']:6.3f}  idle {row['idle_s']:6.2f}  "
                  f"peak {row['peak_mib_per_rank']:6.0f} MiB/rank", flush=True)
    for mode in args.mode:
        pts = [r for r in rows if r["mode"] == mode]
        for r in pts:
            ratio = pts[0]["round_s"] / r["round_s"]
            r["speedup"] = ratio if mode == "strong" else ratio * r["ranks"] / pts[0]["ranks"]
            r["efficiency"] = r["speedup"] / (r["ranks"] / pts[0]["ranks"])
    with open(out / "scaling.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with h5py.File(out / "scaling.h5", "w") as f:
        for key in rows[0]:
            values = [r[key] for r in rows]
            f.create_dataset(key, data=np.array(values, dtype=object if isinstance(values[0], str) else None),
                             dtype=h5py.string_dtype() if isinstance(values[0], str) else None)
    plot(rows, out / "scaling.png")
    print("\nmode   ranks clients  s/round  speed-up  efficiency")
    for r in rows:
        print(f"{r['mode']:6s} {r['ranks']:5d} {r['clients']:7d} {r['round_s']:8.2f} {r['speedup']:9.2f} {r['efficiency']:11.2f}")
    print(f"\nwrote {out / 'scaling.csv'}, {out / 'scaling.h5'}, {out / 'scaling.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
