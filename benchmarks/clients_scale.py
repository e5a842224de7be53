"""100, 1,000 and 10,000 clients at 20 per round: is a round's cost flat in the total client count?

FedAvg on the FedAvg paper's CNN (configs/fedavg.yaml, fedavg.architecture=cnn) and FedMetaNAS
(configs/default.yaml), each as real `mpirun -np N` runs of launch/main.py that differ only in
`federated.num_clients`. Every run uses the same data settings at every size: IID clients (Dirichlet(0.5),
the configs' partition, has no working data.min_samples at 10,000 clients: every seeded draw leaves a client
empty; the largest value per size is printed), batches of 5 so that every client fills every batch at every
size (10,000 IID clients hold 6 samples: 5 to train, 1 to test), 8 rounds (FedAvg, 5 steps a client) or 5
(FedMetaNAS, 3 meta-steps, its soft top-2 relaxation throughout), personalization on (2 steps; at most
`personalize.max_clients`, default 100, clients). Each setting runs `--reps` times, interleaved with the
others (sizes in turn forwards and backwards); the table gives the medians. Per setting:

- set-up: process start -> first round starts (launcher, imports, data, partition, model, lanes; from the
  time rank 0 prints its first round line, less that round's `time_round`), and on its own, timed in this
  process with the run's code: partition, local splits, per-client index tensors, class counts, hash;
- round: median over the rounds after the first of `time_round - time_eval` (local work of the slowest rank,
  the all-reduce, averaging, the server step; not the evaluation), and of the wall time between consecutive
  rounds less `time_eval` (the same plus writing the round's log row and checkpoint);
- memory: per-rank peak RSS from the log (`memory_rank_mib`, last round) and from sampling /proc every 0.2 s
  over the whole run (also set-up and personalization), the largest rank process;
- the log's and the last checkpoint's size; and the ratios 1,000/100 and 10,000/100 of each.

    .venv/bin/python benchmarks/clients_scale.py [--np 2] [--sizes 100 1000 10000] [--out runs/clients_scale]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from statistics import median

import h5py
import numpy as np

REPO = Path(__file__).resolve().parents[1]

from fedmetanas.configure import load_config  # noqa: E402
from fedmetanas.data.client_data import build_clients  # noqa: E402
from fedmetanas.data.datasets import load_dataset  # noqa: E402
from fedmetanas.data.partition import (class_counts, largest_min_samples, make_partition,  # noqa: E402
                                       partition_hash, split_local)
from fedmetanas.launcher import command  # noqa: E402
from fedmetanas.seeding import Purpose, derive_seed  # noqa: E402

PER_ROUND = 20
COMMON = ["data.partition=iid", f"federated.clients_per_round={PER_ROUND}", "eval.subset=500",
          "eval.final_full=false", "personalize.steps=2", "checkpoint.every=1"]
ALGORITHMS = {
    "fedavg-cnn": ("fedavg.yaml", 8, ["fedavg.architecture=cnn", "fedavg.local_steps=5", "fedavg.batch_size=5",
                                      "personalize.batch_size=5"]),
    # Every round of the default's kind before its switch to hard sampling (soft, top-2 ops per edge), so
    # that the rounds after the first are alike.
    "fedmetanas": ("default.yaml", 5, ["algorithm.local_steps=3", "algorithm.batch_size=5",
                                       "algorithm.query_batch_size=5", "search.hard_after_fraction=1.0"]),
}


def setup_parts(clients: int, train_labels: np.ndarray, cfg_path: Path) -> dict[str, float]:
    """Seconds of each step of the run's partition set-up (`federated.setup.make_clients`), timed here."""
    cfg = load_config(cfg_path, [f"federated.num_clients={clients}", *COMMON])
    d, seed = cfg.data, cfg.federated.seed
    out: dict[str, float] = {}
    t = time.perf_counter()
    parts = make_partition(train_labels, d.partition, clients, derive_seed(seed, Purpose.PARTITION),
                           alpha=d.dirichlet_alpha, min_samples=d.min_samples)
    out["partition_s"] = time.perf_counter() - t
    t = time.perf_counter()
    splits = split_local(parts, d.local_test_fraction, derive_seed(seed, Purpose.PARTITION, 1))
    out["splits_s"] = time.perf_counter() - t
    t = time.perf_counter()
    build_clients(splits)
    out["clients_s"] = time.perf_counter() - t
    t = time.perf_counter()
    class_counts(train_labels, parts, 10)
    partition_hash(parts)
    out["counts_hash_s"] = time.perf_counter() - t
    out["setup_data_s"] = sum(out.values())
    t = time.perf_counter()
    out["dirichlet_largest_min_samples"] = largest_min_samples(
        train_labels, clients, 0.5, np.random.default_rng(derive_seed(seed, Purpose.PARTITION)))
    out["largest_min_samples_s"] = time.perf_counter() - t
    return out


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def _ranks(pids: list[int]) -> list[int]:
    """The python processes among `pids` that run launch/main.py (the ranks, not mpirun or its proxies)."""
    out = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                argv = fh.read().split(b"\0")
        except OSError:
            continue
        if b"python" in os.path.basename(argv[0]) and any(a.endswith(b"launch/main.py") for a in argv):
            out.append(pid)
    return out


def _rss_mib(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:")) / 1024.0
    except (OSError, StopIteration, ValueError):
        return 0.0


def run_setting(algo: str, clients: int, np_: int, out: Path) -> dict[str, float]:
    """One run; its figures from the log, the files, its console lines and /proc."""
    config, rounds, extra = ALGORITHMS[algo]
    name = f"{algo}-{clients}"
    args = ["--config", str(REPO / "configs" / config), f"output.dir={out}", f"output.name={name}", "--overwrite",
            f"federated.num_clients={clients}", f"federated.rounds={rounds}", *COMMON, *extra]
    lines: list[tuple[float, str]] = []
    t0 = time.perf_counter()
    proc = subprocess.Popen(command(args, np_), cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def read() -> None:
        for line in proc.stderr:
            lines.append((time.perf_counter(), line.rstrip()))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    peak, ranks = 0.0, []
    while proc.poll() is None:  # light sampling: the ranks share the cores with this process
        if len(ranks) < np_:
            ranks = _ranks(_descendants(proc.pid))
        peak = max([peak, *(_rss_mib(pid) for pid in ranks)])
        time.sleep(0.2)
    reader.join()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n" + "\n".join(text for _, text in lines[-30:]))
    run_dir = out / name
    with h5py.File(run_dir / "trajectory.h5", "r") as f:
        r = {k: f["rounds"][k][()] for k in ("time_round", "time_eval", "wall_time", "memory_rank_mib",
                                             "time_allreduce", "bytes_allreduced")}
        personal_clients = int(f["final"].attrs.get("personal_clients", -1))
    first = next(t for t, text in lines if text.lstrip().startswith("round") and "/" in text)
    later = slice(1, None)
    checkpoints = sorted((run_dir / "checkpoints").glob("round-*.pt"))
    return {"setup_s": first - t0 - float(r["time_round"][0]),
            "round_s": median((r["time_round"] - r["time_eval"])[later]),
            "round_with_io_s": median((np.diff(r["wall_time"]) - r["time_eval"][1:]).tolist()),
            "allreduce_s": median(r["time_allreduce"][later]), "allreduce_mib": float(r["bytes_allreduced"][0]) / 2**20,
            "log_rss_mib": float(r["memory_rank_mib"][-1].max()), "proc_rss_mib": peak,
            "log_kib": (run_dir / "trajectory.h5").stat().st_size / 1024,
            "checkpoint_kib": checkpoints[-1].stat().st_size / 1024 if checkpoints else float("nan"),
            "personal_clients": personal_clients, "wall_s": wall}


COLUMNS = [("setup_s", "set-up s", "{:.2f}"), ("setup_data_s", "partition+splits s", "{:.3f}"),
           ("round_s", "round s", "{:.3f}"), ("round_with_io_s", "round+log+ckpt s", "{:.3f}"),
           ("allreduce_s", "all-reduce s", "{:.4f}"), ("allreduce_mib", "all-reduce MiB", "{:.2f}"),
           ("log_rss_mib", "peak RSS/rank (log) MiB", "{:.0f}"),
           ("proc_rss_mib", "peak RSS/rank (/proc) MiB", "{:.0f}"),
           ("log_kib", "log KiB", "{:.0f}"), ("checkpoint_kib", "checkpoint KiB", "{:.0f}"),
           ("personal_clients", "personalized", "{:.0f}"), ("wall_s", "whole run s", "{:.1f}")]
RATIOS = ("setup_s", "setup_data_s", "round_s", "round_with_io_s", "log_rss_mib", "proc_rss_mib", "log_kib",
          "checkpoint_kib")


def table(rows: list[dict]) -> str:
    head = "| algorithm | clients | " + " | ".join(label for _, label, _ in COLUMNS) + " |"
    lines = [head, "|" + " --- |" * (len(COLUMNS) + 2)]
    for row in rows:
        cells = [fmt.format(row[key]) for key, _, fmt in COLUMNS]
        lines.append(f"| {row['algorithm']} | {row['clients']:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ratios(rows: list[dict], sizes: list[int]) -> str:
    base = sizes[0]
    head = "| algorithm | ratio | " + " | ".join(label for key, label, _ in COLUMNS if key in RATIOS) + " |"
    lines = [head, "|" + " --- |" * (len(RATIOS) + 2)]
    for algo in ALGORITHMS:
        by = {r["clients"]: r for r in rows if r["algorithm"] == algo}
        for size in sizes[1:]:
            if base not in by or size not in by:
                continue
            cells = [f"{by[size][key] / by[base][key]:.2f}" for key, _, _ in COLUMNS if key in RATIOS]
            lines.append(f"| {algo} | {size:,}/{base:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--np", type=int, default=2, help="MPI ranks per run")
    p.add_argument("--sizes", type=int, nargs="+", default=[100, 1000, 10000], help="total clients (first: base)")
    p.add_argument("--algorithms", nargs="+", default=list(ALGORITHMS), choices=list(ALGORITHMS))
    p.add_argument("--reps", type=int, default=3, help="runs per setting, interleaved; figures are their medians")
    p.add_argument("--out", type=Path, default=REPO / "runs" / "clients_scale")
    args = p.parse_args(argv)
    train, _ = load_dataset("fashion_mnist", str(REPO / "data"), False)
    labels = train.labels.numpy()
    setup = {k: setup_parts(k, labels, REPO / "configs" / "fedavg.yaml") for k in args.sizes}
    for k, s in setup.items():
        print(f"{k:>6} clients: partition {s['partition_s']:.3f} s, splits {s['splits_s']:.3f} s, index tensors "
              f"{s['clients_s']:.3f} s, class counts + hash {s['counts_hash_s']:.3f} s; Dirichlet(0.5)'s largest "
              f"working data.min_samples {s['dirichlet_largest_min_samples']} (found in "
              f"{s['largest_min_samples_s']:.2f} s)", flush=True)
    runs: dict[tuple[str, int], list[dict[str, float]]] = {}
    for rep in range(args.reps):
        for algo in args.algorithms:
            for k in (args.sizes if rep % 2 == 0 else args.sizes[::-1]):  # no size always first (warm caches)
                figures = run_setting(algo, k, args.np, args.out)
                print(json.dumps({"algorithm": algo, "clients": k, "rep": rep, **figures}), flush=True)
                runs.setdefault((algo, k), []).append(figures)
    rows = [{"algorithm": algo, "clients": k, "setup_data_s": setup[k]["setup_data_s"],
             **{key: median(r[key] for r in found) for key in found[0]}} for (algo, k), found in runs.items()]
    print()
    print(table(rows))
    print()
    print(ratios(rows, args.sizes))
    (args.out / "clients_scale.json").write_text(json.dumps({"setup": setup, "rows": rows,
                                                             "runs": [[a, k, v] for (a, k), v in runs.items()]},
                                                            indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
