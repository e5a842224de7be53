"""FedMetaNAS vs FedNAS (search + retraining) vs FedAvg, side by side on the same data, partition,
engine and machine; writes the table and figures of docs/results.md.

Every run is a real `mpirun -np N launch/main.py` (configs/default.yaml, configs/fednas.yaml,
configs/fedavg.yaml); the figures come from the runs' HDF5 logs:

- final accuracy on the full test set (FedMetaNAS: its pruned discrete net, not retrained, and its soft
  supernet; FedNAS: the retrained net; FedAvg: its net), personalized accuracy (mean / worst 10%),
  wall time of search, retraining and in total, rounds, bytes a real deployment would move;
- time-to-accuracy: the wall time (evaluation excluded) each method needs before its per-round
  accuracy on the shared evaluation subset first reaches FedNAS's final accuracy on that subset,
  and the ratio FedMetaNAS / FedNAS;
- a Dirichlet-alpha sweep (accuracy vs alpha, accuracy vs wall time), the same comparison on MNIST,
  and FedNAS on the settings of the public FedNAS peer measurement (round time, step time, memory).

    .venv/bin/python benchmarks/compare.py [--np 2] [--out runs/compare] [--docs docs]
                                           [--parts main sweep mnist peer] [--quick]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

REPO = Path(__file__).resolve().parents[1]

from fedmetanas.launcher import launch
from fedmetanas.search.genotypes import Genotype

METHODS = ("fedmetanas", "fednas", "fedavg")
# The main comparison adds FedAvg on the FedAvg paper's CNN, and Per-FedAvg (FedMetaNAS's dual learner on
# DARTS_V2, no search): meta-learning without architecture search.
MAIN_METHODS = (*METHODS, "fedavg_cnn", "perfedavg")
CONFIGS = {"fedmetanas": "default.yaml", "fednas": "fednas.yaml", "fedavg": "fedavg.yaml", "fedavg_cnn": "fedavg.yaml",
           "perfedavg": "perfedavg.yaml"}
METHOD_OVERRIDES = {"fedavg_cnn": ["fedavg.architecture=cnn"]}
LABELS = {"fedmetanas": "FedMetaNAS", "fednas": "FedNAS", "fedavg": "FedAvg (DARTS_V2)", "fedavg_cnn": "FedAvg (CNN)",
          "perfedavg": "Per-FedAvg (DARTS_V2)"}
# What we tried when the claim did not hold (see docs/results.md): FedMetaNAS variants on the main setting.
ATTEMPTS = (("48 rounds (cosine over 48)", ["federated.rounds=48"]),)
# One change at a time from the old default (hard Gumbel, no warm-up, prune at once) on the hardest setting,
# Fashion-MNIST Dirichlet(0.1): what decides FedMetaNAS's accuracy (docs/results.md).
ABLATION_BASE = ["data.dirichlet_alpha=0.1", "search.gumbel=hard", "search.warmup_fraction=0",
                 "search.soft_topk=0", "search.hard_after_fraction=1", "search.prune_patience=1",
                 "search.prune_start_fraction=0"]
ABLATIONS = (
    ("old default: hard Gumbel", []),
    ("warm-up 25% (weights only, hard paths)", ["search.warmup_fraction=0.25"]),
    ("soft, top-2 ops per edge", ["search.gumbel=soft", "search.soft_topk=2"]),
    ("soft top-2, hard after 50%", ["search.gumbel=soft", "search.soft_topk=2", "search.hard_after_fraction=0.5"]),
    ("pruning patience 3 rounds", ["search.prune_patience=3"]),
    ("pruning from 50% of the rounds", ["search.prune_start_fraction=0.5"]),
    ("prune threshold 0.05", ["search.op_prune_threshold=0.05", "search.pair_prune_threshold=0.05"]),
    ("architecture lr x0.2 (0.01)", ["algorithm.inner_lr_alpha=0.01", "algorithm.meta_lr_alpha=0.01"]),
    ("meta SGD, momentum 0.9, lr 0.01", ["algorithm.meta_optimizer=sgd", "algorithm.meta_momentum=0.9",
                                         "algorithm.meta_lr_w=0.01"]),
    ("local steps x2 (30)", ["algorithm.local_steps=30"]),
    ("combined: warm-up 25%, soft top-2, hard after 75%, patience 2",
     ["search.warmup_fraction=0.25", "search.gumbel=soft", "search.soft_topk=2", "search.hard_after_fraction=0.75",
      "search.prune_patience=2"]),
)
# Meta-learning vs plain local training on the same fixed architecture (DARTS_V2), same setting and rounds.
METALEARNING = (("Per-FedAvg on DARTS_V2 (FedMetaNAS's dual learner, no search)", "perfedavg"),
                ("FedAvg on DARTS_V2 (local SGD)", "fedavg"))
# Second round, one change at a time from the best of the first (soft top-2, hard after 50%).
CANDIDATE_BASE = ABLATION_BASE + ["search.gumbel=soft", "search.soft_topk=2", "search.hard_after_fraction=0.5"]
CANDIDATES = (
    ("soft top-2, hard after 50%", []),
    ("+ server momentum 0.9 (lr 0.3)", ["federated.server_optimizer=momentum", "federated.server_momentum=0.9",
                                        "federated.server_lr=0.3"]),
    ("+ server Adam (lr 0.01)", ["federated.server_optimizer=adam", "federated.server_lr=0.01"]),
    ("+ warm-up 25% (hard paths)", ["search.warmup_fraction=0.25"]),
    ("+ local steps x2 (30)", ["algorithm.local_steps=30"]),
    ("+ prune threshold 0.05", ["search.op_prune_threshold=0.05", "search.pair_prune_threshold=0.05"]),
    ("hard throughout, local steps 30, prune threshold 0.05",
     ["search.gumbel=hard", "search.soft_topk=0", "search.hard_after_fraction=1", "algorithm.local_steps=30",
      "search.op_prune_threshold=0.05", "search.pair_prune_threshold=0.05"]),
)
SWEEP = (("0.1", ["data.dirichlet_alpha=0.1"]), ("0.5", []), ("1.0", ["data.dirichlet_alpha=1.0"]),
         ("IID", ["data.partition=iid"]))


@dataclass
class Run:
    """What the comparison reads from one run's log."""

    method: str
    path: Path
    final: dict = field(default_factory=dict)
    acc: np.ndarray = field(default_factory=lambda: np.zeros(0))  # per round, eval subset (NaN: not evaluated)
    train_time: np.ndarray = field(default_factory=lambda: np.zeros(0))  # cumulative wall time, evaluation excluded
    usable: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))  # rounds whose model is a final model
    search_s: float = 0.0
    total_s: float = 0.0
    rounds: int = 0
    bytes_clients: int = 0
    wall_s: float = math.nan  # the whole process, start-up included
    parts: dict = field(default_factory=dict)  # where the time went, per stage: local work, all-reduce, evaluation

    @classmethod
    def load(cls, method: str, path: Path, wall_s: float) -> "Run":
        with h5py.File(path / "trajectory.h5", "r") as f:
            final = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f["final"].attrs.items()}
            tables = [f[g] for g in ("rounds", "retrain") if g in f]
            acc = np.concatenate([t["discrete_acc"][()] for t in tables])
            wall = np.concatenate([t["wall_time"][()] for t in tables])
            t_eval = np.concatenate([t["time_eval"][()] for t in tables])
            usable = np.concatenate([np.full(t["round"].shape[0], t.name != "/rounds" or method != "fednas")
                                     for t in tables])
            nbytes = int(sum(int(t["bytes_clients"][()].sum()) for t in tables))
            parts = {("search" if t.name == "/rounds" and method in ("fedmetanas", "fednas") else "train"): {
                "rounds": int(t["round"].shape[0]), "local_s": float(t["time_local"][()].sum()),
                "allreduce_s": float(t["time_allreduce"][()].sum()), "eval_s": float(t["time_eval"][()].sum()),
                "memory_mib": float(t["memory_rank_mib"][-1].max())} for t in tables}
        train_time = wall - np.cumsum(t_eval)
        # Search time, evaluation excluded: FedNAS up to its last search row, FedMetaNAS all of it, FedAvg none.
        search_s = {"fednas": float(train_time[~usable][-1]) if (~usable).any() else 0.0,
                    "fedmetanas": float(train_time[-1])}.get(method, 0.0)
        return cls(method, path, final, acc, train_time, usable, search_s, float(train_time[-1]), len(acc), nbytes,
                   wall_s, parts)

    def time_to(self, target: float) -> float:
        """Training wall time until the first usable round whose accuracy reaches `target` (inf if never)."""
        hit = np.flatnonzero(self.usable & np.isfinite(self.acc) & (self.acc >= target - 1e-12))
        return float(self.train_time[hit[0]]) if hit.size else math.inf


REUSE = False  # --reuse: read finished runs' logs instead of running them again


def finished(run_dir: Path) -> bool:
    """Whether `run_dir` holds the log of a run that ended (its /final group is written last)."""
    if not (run_dir / "trajectory.h5").is_file():
        return False
    with h5py.File(run_dir / "trajectory.h5", "r") as f:
        return "final" in f


def run_method(method: str, name: str, out: Path, np_: int, extra: list[str]) -> Run:
    sidecar = out / name / "compare_wall.json"
    if REUSE and finished(out / name):
        wall = json.loads(sidecar.read_text())["wall_s"] if sidecar.is_file() else math.nan
        print(f"  {name}: reused", flush=True)
        return Run.load(method, out / name, wall)
    args = ["--config", str(REPO / "configs" / CONFIGS[method]), f"output.dir={out}", f"output.name={name}",
            "--overwrite", "checkpoint.every=0", *METHOD_OVERRIDES.get(method, []), *extra]
    t = time.perf_counter()
    proc = launch(args, np=np_, timeout=4 * 3600)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    print(f"  {name}: {wall:.0f} s", flush=True)
    sidecar.write_text(json.dumps({"wall_s": wall}))
    return Run.load(method, out / name, wall)


def compare(runs: dict[str, Run]) -> dict[str, dict[str, float]]:
    """The table's numbers per method; time-to-accuracy against FedNAS's final subset accuracy."""
    target = float(runs["fednas"].acc[np.isfinite(runs["fednas"].acc)][-1])
    rows = {}
    for m, r in runs.items():
        f = r.final
        rows[m] = {
            "acc": float(f["discrete_acc"]), "supernet_acc": float(f.get("supernet_acc", math.nan)),
            "personal_before_mean": float(f.get("personal_before_mean", math.nan)),
            "personal_after_mean": float(f.get("personal_after_mean", math.nan)),
            "personal_after_worst10": float(f.get("personal_after_worst10", math.nan)),
            "personal_after_std": float(f.get("personal_after_std", math.nan)),
            "search_s": r.search_s, "retrain_s": r.total_s - r.search_s if m == "fednas" else 0.0,
            "total_s": r.total_s, "rounds": r.rounds, "gigabytes": r.bytes_clients / 1e9,
            "time_to_target_s": r.time_to(target), "target": target, "wall_s": r.wall_s,
        }
    nas = rows["fednas"]["time_to_target_s"]
    for m in rows:
        rows[m]["tta_ratio"] = rows[m]["time_to_target_s"] / nas if math.isfinite(nas) and nas > 0 else math.nan
    return rows


def time_table(runs: dict[str, Run]) -> str:
    """Where each method's time went, per stage (sums over rounds; local = the slowest rank's)."""
    lines = ["| method | stage | rounds | local work s (per round) | all-reduce s | evaluation s | peak MiB per rank |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for m, r in runs.items():
        for stage, p in r.parts.items():
            lines.append(f"| {LABELS[m]} | {stage} | {p['rounds']} | {p['local_s']:.0f} ({p['local_s'] / p['rounds']:.1f}) | "
                         f"{p['allreduce_s']:.1f} | {p['eval_s']:.0f} | {p['memory_mib']:.0f} |")
    return "\n".join(lines) + "\n"


def _ratio(ratio: float, seconds: float) -> str:
    return "FedNAS's accuracy not reached" if seconds == math.inf else f"{ratio:.2f}"


def _pct(v: float) -> str:
    return "—" if not math.isfinite(v) else f"{100 * v:.2f}"


def _sec(v: float) -> str:
    return "not reached" if v == math.inf else ("—" if not math.isfinite(v) else f"{v:.0f}")


def table(rows: dict[str, dict[str, float]]) -> str:
    """The comparison as a Markdown table."""
    head = ("| method | final acc % | soft supernet % (gap) | personalized % mean (before → after) / worst 10% "
            "| search s | retrain s | total s | rounds | GB moved | time to FedNAS's acc, s | ratio to FedNAS |\n"
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n")
    lines = []
    for m, r in rows.items():
        gap = (f"{_pct(r['supernet_acc'])} ({100 * (r['supernet_acc'] - r['acc']):+.2f})"
               if math.isfinite(r["supernet_acc"]) and m == "fedmetanas" else "—")
        ratio = f"{r['tta_ratio']:.2f}" if math.isfinite(r["tta_ratio"]) else "—"
        retrain = _sec(r["retrain_s"]) if m == "fednas" else "—"
        lines.append(
            f"| {LABELS[m]} | {_pct(r['acc'])} | {gap} | {_pct(r['personal_before_mean'])} → "
            f"{_pct(r['personal_after_mean'])} / {_pct(r['personal_after_worst10'])} | {_sec(r['search_s'])} | "
            f"{retrain} | {_sec(r['total_s'])} | {r['rounds']} | {r['gigabytes']:.2f} | "
            f"{_sec(r['time_to_target_s'])} | {ratio} |")
    return head + "\n".join(lines) + "\n"


def parametric_ops(genotype: str) -> int:
    """How many of the normal cell's chosen ops have weights (convolutions): 0 is DARTS's collapse."""
    return sum(op not in ("skip_connect", "max_pool_3x3", "avg_pool_3x3", "none")
               for node in Genotype.from_string(genotype).normal for op, _ in node)


# ---------------------------------------------------------------------------------------------
# The grid: the fair, budget-matched protocol on every non-IID setting
GRID = (("Fashion-MNIST α=0.1", "fmnist_a0.1", ["data.dirichlet_alpha=0.1"]),
        ("Fashion-MNIST α=0.5", "fmnist_a0.5", ["data.dirichlet_alpha=0.5"]),
        ("MNIST α=0.1", "mnist_a0.1", ["data.name=mnist", "data.dirichlet_alpha=0.1"]),
        ("Fashion-MNIST IID", "fmnist_iid", ["data.partition=iid"]),
        ("Fashion-MNIST α=1.0", "fmnist_a1.0", ["data.dirichlet_alpha=1.0"]),
        ("MNIST α=0.5", "mnist_a0.5", ["data.name=mnist", "data.dirichlet_alpha=0.5"]))
META_ROUND_S: list[float] = []  # FedMetaNAS's training seconds per round on the grid settings run so far
GRID_METHODS = ("fednas", "fedmetanas", "fedavg")


def grid_setting(key: str, over: list[str], out: Path, np_: int, base: list[str], quick: bool) -> dict[str, Run]:
    """One grid setting under the protocol (docs/results.md, "Protocol"):

    1. FedNAS searches until its genotype is unchanged for `fednas.stable_rounds` rounds (or its cap,
       `federated.rounds` of configs/fednas.yaml), then retrains; its training time T_nas is measured.
    2. FedMetaNAS runs configs/default.yaml as shipped, with `federated.time_budget_s` = 0.5 x T_nas as a
       cap (the log's `stopped_by` says whether the budget or its rounds ended it); where its default
       rounds would not fit that budget at the per-round cost measured on the settings before, it runs
       the rounds that do (so its annealing and schedules complete instead of being cut).
    3. FedAvg (DARTS_V2) gets FedMetaNAS's measured training time: its rounds are that time over the
       per-round time of FedNAS's retraining (the same FedAvg work on a same-sized cell), and the time is
       also its budget.
    """
    nas = run_method("fednas", f"grid_{key}_fednas", out, np_, base + over)
    budget = 0.5 * nas.total_s
    meta_over = [] if quick else [f"federated.time_budget_s={budget:.1f}"]
    if META_ROUND_S and not quick:  # rounds that fit the budget at the cost measured so far: schedules complete
        from fedmetanas.configure import load_config

        default_rounds = load_config(REPO / "configs" / CONFIGS["fedmetanas"]).federated.rounds
        fit = int(0.95 * budget / (sum(META_ROUND_S) / len(META_ROUND_S)))
        if fit < default_rounds:
            meta_over.append(f"federated.rounds={max(2, fit)}")
    meta = run_method("fedmetanas", f"grid_{key}_fedmetanas", out, np_, base + over + meta_over)
    META_ROUND_S.append(meta.total_s / meta.rounds)
    retrain = nas.parts.get("train", {})
    per_round = (retrain.get("local_s", 0.0) + retrain.get("allreduce_s", 0.0)) / max(retrain.get("rounds", 1), 1)
    rounds = 2 if quick else max(2, int(meta.total_s / per_round)) if per_round > 0 else 32
    avg_budget = [] if quick else [f"federated.time_budget_s={meta.total_s:.1f}"]
    avg = run_method("fedavg", f"grid_{key}_fedavg", out, np_, base + over + [f"federated.rounds={rounds}", *avg_budget])
    return {"fednas": nas, "fedmetanas": meta, "fedavg": avg}


# Defaults chosen on the grid: the FedMetaNAS runs of the grid (the default they ran) against one-change candidates, each under the grid's
# budget of its setting (0.5 x that setting's FedNAS time, rounds fitted to the candidate's own measured
# per-round cost), on every setting whose FedNAS run is in --out. The winner of a setting is the higher
# final accuracy within the budget.
# Candidates that keep the default's cost per round (the cap on the rounds and the first cost estimate are the
# default's); candidates with other numbers of meta-steps need their rounds scaled: benchmarks/when_to_search.py.
GRID_CANDIDATES = (("hard from 25% of the rounds", ["search.hard_after_fraction=0.25"]),
                   ("server rate 1.5 (FedAvgM, mu 0)", ["federated.server_optimizer=momentum",
                                                         "federated.server_momentum=0", "federated.server_lr=1.5"]))

GRID_DEFAULT = "the grid's FedMetaNAS"


def grid_candidate(key: str, over: list[str], out: Path, np_: int, base: list[str], index: int,
                   extra: list[str], round_s: list[float]) -> tuple[Run, Run, Run]:
    """Candidate `index` on one grid setting: (its run, the setting's FedNAS run, the grid's FedMetaNAS run),
    the last two read from the grid's runs in `out`."""
    nas, default = (Run.load(m, out / f"grid_{key}_{m}", math.nan) for m in ("fednas", "fedmetanas"))
    budget = 0.5 * nas.total_s
    from fedmetanas.configure import load_config

    rounds = load_config(REPO / "configs" / CONFIGS["fedmetanas"]).federated.rounds
    if not round_s:  # the candidate's own per-round cost from its finished runs on other settings, if any
        for path in sorted(out.glob(f"gridcand{index}_*")):
            if path.name != f"gridcand{index}_{key}" and finished(path):
                done = Run.load("fedmetanas", path, math.nan)
                round_s.append(done.total_s / done.rounds)
    per_round = (sum(round_s) / len(round_s)) if round_s else default.total_s / default.rounds
    fit = int(0.95 * budget / per_round)
    meta_over = [f"federated.time_budget_s={budget:.1f}"] + ([f"federated.rounds={max(2, fit)}"] if fit < rounds else [])
    run = run_method("fedmetanas", f"gridcand{index}_{key}", out, np_, base + over + extra + meta_over)
    round_s.append(run.total_s / run.rounds)
    return run, nas, default


def grid_table(runs: dict[str, Run]) -> tuple[str, bool]:
    """One setting's table and whether the claim holds there."""
    nas, meta = runs["fednas"], runs["fedmetanas"]
    acc_nas = float(nas.final["discrete_acc"])
    target = float(nas.acc[np.isfinite(nas.acc)][-1])
    lines = ["| method | final acc % | soft supernet % (gap) | personalized % mean / worst 10% | training s | "
             "time ratio to FedNAS | rounds (stopped by) | time to FedNAS's acc, s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for m, r in runs.items():
        f = r.final
        sup = float(f.get("supernet_acc", math.nan))
        gap = f"{_pct(sup)} ({100 * (sup - float(f['discrete_acc'])):+.2f})" if m == "fedmetanas" else "—"
        stop = str(f.get("stopped_by", "rounds"))
        if m == "fednas":
            stop = f"{int(f.get('search_rounds', 0))} search ({f.get('search_stopped_by', '?')}) + retrain"
        lines.append(f"| {LABELS[m]} | {_pct(float(f['discrete_acc']))} | {gap} | "
                     f"{_pct(float(f.get('personal_after_mean', math.nan)))} / "
                     f"{_pct(float(f.get('personal_after_worst10', math.nan)))} | {r.total_s:.0f} | "
                     f"{r.total_s / nas.total_s:.2f} | {r.rounds} ({stop}) | {_sec(r.time_to(target))} |")
    ratio = meta.total_s / nas.total_s
    holds = float(meta.final["discrete_acc"]) >= acc_nas and ratio <= 0.5
    personal = all(float(meta.final.get(k, -1)) >= float(nas.final.get(k, math.inf))
                   for k in ("personal_after_mean", "personal_after_worst10"))
    verdict = (f"\nClaim (FedMetaNAS's pruned, not retrained net ≥ FedNAS's retrained net in ≤ 0.5× its time): "
               f"**{'holds' if holds else 'does not hold'}** ({100 * float(meta.final['discrete_acc']):.2f}% vs "
               f"{100 * acc_nas:.2f}% at {ratio:.2f}× the time). Personalized mean and worst 10% ≥ FedNAS's: "
               f"**{'yes' if personal else 'no'}**.\n")
    return "\n".join(lines) + "\n" + verdict, holds


def figure_grid(grid: dict[str, dict[str, Run]], path: Path) -> None:
    plt = _plt()
    n = len(grid)
    cols = min(3, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.3 * cols, 3.5 * rows), squeeze=False)
    for ax, (label, runs) in zip(axes.flat, grid.items()):
        nas = runs["fednas"]
        plot_time(ax, runs, float(nas.acc[np.isfinite(nas.acc)][-1]))
        ax.set_title(label, fontsize=10)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# FedNAS on the public code's peer settings
PEER = ["data.name=fashion_mnist", "federated.num_clients=4", "federated.rounds=2", "fednas.retrain_rounds=1",
        "fednas.local_steps=10", "fednas.batch_size=32", "model.primitives=darts", "model.channels=8",
        "model.layers=3", "model.nodes=4", "model.stem_stride=1", "search.input_mode=all", "personalize.steps=0",
        "eval.every=1", "eval.subset=2000", "eval.final_full=false"]


def peer_step_seconds(data_root: str, steps: int = 10) -> float:
    """Seconds per MiLeNAS step, one process on one thread (the peer figure's setting)."""
    import torch

    from fedmetanas.algorithms.common import LocalContext
    from fedmetanas.algorithms.fednas import MiLeNAS
    from fedmetanas.configure import load_config
    from fedmetanas.data.datasets import load_dataset
    from fedmetanas.algorithms.phases import build_supernet

    torch.set_num_threads(1)
    cfg = load_config(REPO / "configs" / "fednas.yaml", [*PEER, f"fednas.local_steps={steps}", f"data.root={data_root}"])
    train, _ = load_dataset("fashion_mnist", data_root, False)
    net = build_supernet(cfg, 1, 10).to(memory_format=torch.channels_last)
    ctx = LocalContext(train, torch.arange(6000), net.initial_masks(), 1.0, "expected",
                       torch.Generator().manual_seed(0), torch.Generator().manual_seed(1), channels_last=True)
    algo = MiLeNAS(cfg.fednas)
    warm = MiLeNAS(load_config(REPO / "configs" / "fednas.yaml", [*PEER, "fednas.local_steps=1"]).fednas)
    warm.local_update(net, net, ctx)
    t = time.perf_counter()
    algo.local_update(net, net, ctx)
    return (time.perf_counter() - t) / steps


def peer(out: Path, np_: int, data_root: str, quick: bool = False) -> dict[str, float]:
    """Our FedNAS on the peer settings: local-search seconds per round (the second: the first warms up),
    evaluation seconds, memory per rank and per simulated client, and one step on one thread."""
    name = "peer_fednas"
    t = time.perf_counter()
    extra = ["fednas.local_steps=1"] if quick else []
    log = out / name / "trajectory.h5"
    if not (REUSE and log.is_file()):
        proc = launch(["--config", str(REPO / "configs" / "fednas.yaml"), f"output.dir={out}", f"output.name={name}",
                       "--overwrite", "checkpoint.every=0", f"data.root={data_root}", *PEER, *extra], np=np_,
                      timeout=3600)
        if proc.returncode != 0:
            raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
    wall = time.perf_counter() - t
    with h5py.File(out / name / "trajectory.h5", "r") as f:
        r = {k: f["rounds"][k][()] for k in ("time_local", "time_eval", "memory_rank_mib", "time_round")}
    keep = slice(1, None)  # the first round warms up
    clients_per_rank = 4 / np_
    return {"ranks": np_, "round_local_s": float(r["time_local"][keep].mean()),
            "round_eval_s": float(r["time_eval"][keep].mean()), "round_s": float(r["time_round"][keep].mean()),
            "rank_peak_mib": float(r["memory_rank_mib"][-1].max()),
            "mib_per_client": float(r["memory_rank_mib"][-1].max() / clients_per_rank),
            "step_s_one_thread": peer_step_seconds(data_root, 1 if quick else 5), "wall_s": wall}


# ---------------------------------------------------------------------------------------------
# Figures
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


COLORS = {"fedmetanas": "tab:blue", "fednas": "tab:red", "fedavg": "tab:green", "fedavg_cnn": "tab:olive",
          "perfedavg": "tab:purple"}


def plot_time(ax, runs: dict[str, Run], target: float | None) -> None:
    for m, r in runs.items():
        ok = np.isfinite(r.acc)
        ax.plot(r.train_time[ok & r.usable], 100 * r.acc[ok & r.usable], "-", color=COLORS[m], label=LABELS[m])
        if (~r.usable).any():  # FedNAS's search: the searched genotype with the supernet's weights (not a final model)
            ax.plot(r.train_time[ok & ~r.usable], 100 * r.acc[ok & ~r.usable], ":", color=COLORS[m],
                    label="FedNAS search (not retrained)")
            ax.axvline(r.search_s, color=COLORS[m], lw=0.6, alpha=0.5)
    if target is not None:
        ax.axhline(100 * target, color="gray", lw=0.6, ls="--", label="FedNAS final (eval subset)")
    ax.set_xlabel("wall time, evaluation excluded (s)")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)


def figure_main(runs: dict[str, Run], target: float, path: Path, title: str) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    plot_time(ax, runs, target)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def figure_sweep(sweep: dict[str, dict[str, Run]], path_alpha: Path, path_time: Path) -> None:
    plt = _plt()
    labels = list(sweep)
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for m in METHODS:
        ax.plot(labels, [100 * float(sweep[a][m].final["discrete_acc"]) for a in labels], "o-", color=COLORS[m],
                label=f"{LABELS[m]} global")
        ax.plot(labels, [100 * float(sweep[a][m].final.get("personal_after_mean", math.nan)) for a in labels], "s--",
                color=COLORS[m], alpha=0.6, label=f"{LABELS[m]} personalized")
    ax.set_xlabel("Dirichlet alpha (smaller: more non-IID)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Fashion-MNIST: accuracy vs non-IID-ness")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path_alpha, dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(labels), figsize=(3.6 * len(labels), 3.6), sharey=True)
    for ax, a in zip(np.atleast_1d(axes), labels):
        plot_time(ax, sweep[a], None)
        ax.set_title(f"alpha = {a}" if a != "IID" else "IID")
    np.atleast_1d(axes)[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path_time, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
START, END = "<!-- compare.py:start -->", "<!-- compare.py:end -->"


def write_docs(path: Path, generated: str) -> None:
    """Replace the generated part of docs/results.md, keeping the hand-written text around it."""
    text = path.read_text() if path.exists() else f"# Results\n\n{START}\n{END}\n"
    if START not in text:
        text += f"\n{START}\n{END}\n"
    before, rest = text.split(START, 1)
    after = rest.split(END, 1)[1] if END in rest else ""
    path.write_text(f"{before}{START}\n{generated}{END}{after}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--np", type=int, default=2, help="MPI ranks per run")
    p.add_argument("--out", default="runs/compare", help="where the runs go")
    p.add_argument("--docs", default="docs", help="where results.md and its figures go")
    p.add_argument("--parts", nargs="+", default=["main", "sweep", "mnist", "peer"],
                   choices=["main", "sweep", "mnist", "peer", "attempts", "ablations", "candidates", "grid",
                            "grid_candidates"],
                   help="attempts (not in the default): FedMetaNAS variants against the main comparison's FedNAS")
    p.add_argument("--data-root", default="data")
    p.add_argument("--quick", action="store_true", help="2 rounds per stage: checks the harness, measures nothing")
    p.add_argument("--reuse", action="store_true", help="read the logs of finished runs in --out instead of rerunning")
    p.add_argument("--mnist-root", default="data", help="data.root holding MNIST (python -m fedmetanas.data.fetch)")
    p.add_argument("--settings", nargs="*", default=[], help="grid: only these settings (keys, e.g. fmnist_a0.1)")
    p.add_argument("--ablation-rounds", type=int, default=16, help="rounds of each ablation run")
    p.add_argument("--sweep-rounds", type=float, default=0.4,
                   help="the sweep's and MNIST's rounds as a fraction of the main comparison's (time budget)")
    args = p.parse_args(argv)
    global REUSE
    REUSE = args.reuse
    out, docs = (REPO / args.out).resolve(), (REPO / args.docs).resolve()
    out.mkdir(parents=True, exist_ok=True)
    (docs / "img").mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    base = [f"data.root={args.data_root}"]
    if args.quick:
        base += ["federated.rounds=2", "fednas.retrain_rounds=2", "federated.num_clients=4", "eval.subset=200",
                 "eval.final_full=false", "fednas.local_steps=2", "algorithm.local_steps=2", "fedavg.local_steps=2"]

    def scaled(fraction: float) -> list[str]:
        """Every method's rounds times `fraction` (its config's own round counts as the base)."""
        if args.quick or fraction == 1.0:
            return []
        from fedmetanas.configure import load_config

        extra = {}
        for m in METHODS:
            cfg = load_config(REPO / "configs" / CONFIGS[m])
            extra[m] = [f"federated.rounds={max(2, round(cfg.federated.rounds * fraction))}"]
            if m == "fednas":
                extra[m].append(f"fednas.retrain_rounds={max(2, round(cfg.fednas.retrain_rounds * fraction))}")
        return extra

    sections: dict[str, str] = {}
    results: dict = {"np": args.np, "quick": args.quick}
    cmd = "python benchmarks/compare.py " + " ".join(argv if argv is not None else sys.argv[1:])
    main_runs: dict[str, Run] | None = None
    if "main" in args.parts:
        print("main comparison: Fashion-MNIST, Dirichlet(0.5)", flush=True)
        main_runs = {m: run_method(m, f"main_{m}", out, args.np, base) for m in MAIN_METHODS}
        rows = compare(main_runs)
        results["main"] = rows
        target = rows["fednas"]["target"]
        figure_main(main_runs, target, docs / "img" / "results_time.png",
                    "Fashion-MNIST, Dirichlet(0.5), 10 clients")
        m_nas, m_meta = rows["fednas"], rows["fedmetanas"]
        holds = (m_meta["tta_ratio"] <= 0.5) and (m_meta["acc"] >= m_nas["acc"])
        sections["main"] = (
            "### Fashion-MNIST, Dirichlet(0.5), 10 clients (the offline default)\n\n" + table(rows) +
            f"\nTarget for time-to-accuracy: FedNAS's final accuracy on the shared evaluation subset, "
            f"{100 * target:.2f}%. Claim (FedMetaNAS reaches it in ≤ 0.5× FedNAS's time, with final accuracy ≥ "
            f"FedNAS's): **{'holds' if holds else 'does not hold'}** "
            f"(time ratio {_ratio(m_meta['tta_ratio'], m_meta['time_to_target_s'])}, accuracy {100 * m_meta['acc']:.2f}% vs {100 * m_nas['acc']:.2f}%).\n\n"
            "![accuracy vs wall time](img/results_time.png)\n\nWhere the time went (evaluation is excluded from the "
            "times above):\n\n" + time_table(main_runs))
    if "sweep" in args.parts:
        extra = scaled(args.sweep_rounds)
        sweep: dict[str, dict[str, Run]] = {}
        for label, over in SWEEP:
            print(f"sweep: {label}", flush=True)
            sweep[label] = {m: run_method(m, f"sweep_{label}_{m}", out, args.np,
                                          base + over + (extra[m] if extra else [])) for m in METHODS}
        figure_sweep(sweep, docs / "img" / "results_alpha.png", docs / "img" / "results_alpha_time.png")
        results["sweep"] = {a: compare(r) for a, r in sweep.items()}
        lines = ["| Dirichlet alpha | " + " | ".join(f"{LABELS[m]} global / personalized %" for m in METHODS) +
                 " | FedMetaNAS time ratio to FedNAS |", "| --- |" + " --- |" * (len(METHODS) + 1)]
        for a, rows in results["sweep"].items():
            cells = [f"{_pct(rows[m]['acc'])} / {_pct(rows[m]['personal_after_mean'])}" for m in METHODS]
            ratio = rows["fedmetanas"]["tta_ratio"]
            lines.append(f"| {a} | " + " | ".join(cells) + f" | {'—' if not math.isfinite(ratio) else f'{ratio:.2f}'} |")
        frac = "" if args.sweep_rounds == 1.0 else f" Rounds: {args.sweep_rounds:g}× the main comparison's."
        sections["sweep"] = ("### Non-IID sweep, Fashion-MNIST\n\n" + "\n".join(lines) +
                        f"\n\n{frac}\n\n![accuracy vs alpha](img/results_alpha.png)\n\n"
                        "![accuracy vs wall time per alpha](img/results_alpha_time.png)\n")
    if "mnist" in args.parts:
        print("MNIST, Dirichlet(0.5)", flush=True)
        extra = scaled(args.sweep_rounds)
        mn = {m: run_method(m, f"mnist_{m}", out, args.np, base + ["data.name=mnist"] + (extra[m] if extra else []))
              for m in METHODS}
        rows = compare(mn)
        results["mnist"] = rows
        figure_main(mn, rows["fednas"]["target"], docs / "img" / "results_mnist_time.png", "MNIST, Dirichlet(0.5)")
        sections["mnist"] = ("### MNIST, Dirichlet(0.5), 10 clients\n\n" + table(rows) +
                        "\n![MNIST accuracy vs wall time](img/results_mnist_time.png)\n")
    if "attempts" in args.parts:
        print("attempts: FedMetaNAS variants on the main setting", flush=True)
        nas = run_method("fednas", "main_fednas", out, args.np, base)  # reused when --reuse finds it
        lines = ["| FedMetaNAS variant | final acc % | total s | time to FedNAS's acc, s | ratio to FedNAS |",
                 "| --- | --- | --- | --- | --- |"]
        results["attempts"] = {}
        images: list[str] = []
        for i, (label, over) in enumerate(ATTEMPTS):
            run = run_method("fedmetanas", f"attempt{i}_fedmetanas", out, args.np, base + over)
            rows = compare({"fedmetanas": run, "fednas": nas})
            r = rows["fedmetanas"]
            results["attempts"][label] = r
            lines.append(f"| {label} | {_pct(r['acc'])} | {_sec(r['total_s'])} | {_sec(r['time_to_target_s'])} | "
                         f"{_ratio(r['tta_ratio'], r['time_to_target_s'])} |")
            figure_main({"fedmetanas": run, "fednas": nas}, rows["fednas"]["target"],
                        docs / "img" / f"results_attempt{i}.png", f"FedMetaNAS {label} vs FedNAS")
            images.append(f"![FedMetaNAS {label} vs FedNAS](img/results_attempt{i}.png)\n")
        sections["attempts"] = ("### What we tried: FedMetaNAS variants (Fashion-MNIST, Dirichlet(0.5))\n\n" +
                                "\n".join(lines) + "\n\n" + "\n".join(images))
    if "grid" in args.parts:
        grid: dict[str, dict[str, Run]] = {}
        texts, held = [], 0
        settings = GRID[:1] if args.quick else [g for g in GRID if not args.settings or g[1] in args.settings]
        for label, key, over in settings:
            print(f"grid: {label}", flush=True)
            root = [f"data.root={args.mnist_root}"] if "data.name=mnist" in over else []
            grid[label] = grid_setting(key, over + root, out, args.np, base, args.quick)
            text, holds = grid_table(grid[label])
            held += holds
            texts.append(f"#### {label}\n\n{text}")
        figure_grid(grid, docs / "img" / "results_grid.png")
        results["grid"] = {label: {m: {"acc": float(r.final["discrete_acc"]), "total_s": r.total_s}
                                   for m, r in runs.items()} for label, runs in grid.items()}
        sections["grid"] = ("### The grid: FedMetaNAS (default config) vs FedNAS vs FedAvg, budget-matched\n\n"
                            f"The claim holds on **{held} of {len(grid)}** settings.\n\n" + "\n".join(texts) +
                            "\n![accuracy vs wall time per setting](img/results_grid.png)\n")
    if "grid_candidates" in args.parts:
        settings = [g for g in GRID if (not args.settings or g[1] in args.settings)
                    and (out / f"grid_{g[1]}_fednas" / "trajectory.h5").is_file()]
        lines = ["| setting | FedNAS % (budget s) | the grid's FedMetaNAS % (rounds, s) | " +
                 " | ".join(f"{label} % (rounds, s)" for label, _ in GRID_CANDIDATES) + " | best |",
                 "| --- | --- | --- | " + " | ".join("---" for _ in GRID_CANDIDATES) + " | --- |"]
        wins = {GRID_DEFAULT: 0, **{label: 0 for label, _ in GRID_CANDIDATES}}
        round_s: list[list[float]] = [[] for _ in GRID_CANDIDATES]
        results["grid_candidates"] = {}
        for label, key, over in settings:
            print(f"grid candidates: {label}", flush=True)
            root = [f"data.root={args.mnist_root}"] if "data.name=mnist" in over else []
            cells, accs = [], {}
            for i, (cand, extra) in enumerate(GRID_CANDIDATES):
                run, nas, default = grid_candidate(key, over + root, out, args.np, base, i, extra, round_s[i])
                accs[cand] = float(run.final["discrete_acc"])
                cells.append(f"{_pct(accs[cand])} ({run.rounds}, {run.total_s:.0f})")
            accs[GRID_DEFAULT] = float(default.final["discrete_acc"])
            best = max(accs, key=accs.get)
            wins[best] += 1
            results["grid_candidates"][label] = accs
            lines.append(f"| {label} | {_pct(float(nas.final['discrete_acc']))} ({0.5 * nas.total_s:.0f}) | "
                         f"{_pct(accs[GRID_DEFAULT])} ({default.rounds}, {default.total_s:.0f}) | " +
                         " | ".join(cells) + f" | {best} |")
        sections["grid_candidates"] = (
            "### Defaults on the grid: the grid's FedMetaNAS (the default it ran) vs one-change candidates, each "
            "within 0.5× FedNAS's time\n\n"
            + "\n".join(lines) + "\n\nSettings won (highest final accuracy within the budget): " +
            ", ".join(f"{k} {v}" for k, v in wins.items()) + ".\n")
    for part, table_rows, base_over, title in (
            ("ablations", ABLATIONS, ABLATION_BASE, "one change from the old default"),
            ("candidates", CANDIDATES, CANDIDATE_BASE, "one change from soft top-2, hard after 50%")):
        if part not in args.parts:
            continue
        rounds = 2 if args.quick else args.ablation_rounds
        print(f"{part}: FedMetaNAS on Fashion-MNIST Dirichlet(0.1), {rounds} rounds", flush=True)
        abl = table_rows[:2] if args.quick else table_rows
        lines = [f"| FedMetaNAS variant ({title}) | discrete net, not retrained % | "
                 "soft supernet % | parametric ops in the normal cell | training s | s per round |",
                 "| --- | --- | --- | --- | --- | --- |"]
        results[part] = {}
        for i, (label, over) in enumerate(abl):
            run = run_method("fedmetanas", f"{part[:-1]}{i}", out, args.np,
                             base + base_over + [f"federated.rounds={rounds}", *over])
            f = run.final
            convs = parametric_ops(str(f["genotype"]))
            results[part][label] = {"acc": float(f["discrete_acc"]), "supernet_acc": float(f["supernet_acc"]),
                                           "total_s": run.total_s, "normal_parametric_ops": convs}
            lines.append(f"| {label} | {_pct(float(f['discrete_acc']))} | {_pct(float(f['supernet_acc']))} | "
                         f"{convs} of {len(Genotype.from_string(str(f['genotype'])).normal) * 2} | "
                         f"{run.total_s:.0f} | {run.total_s / run.rounds:.1f} |")
        if part == "ablations":
            lines += ["", "| same setting and rounds, fixed architecture | final acc % | personalized % mean / worst 10% "
                      "| training s | s per round |", "| --- | --- | --- | --- | --- |"]
            for i, (label, method) in enumerate(METALEARNING[:1] if args.quick else METALEARNING):
                run = run_method(method, f"ablation_fixed{i}", out, args.np,
                                 base + ["data.dirichlet_alpha=0.1", f"federated.rounds={rounds}"])
                f = run.final
                lines.append(f"| {label} | {_pct(float(f['discrete_acc']))} | "
                             f"{_pct(float(f.get('personal_after_mean', math.nan)))} / "
                             f"{_pct(float(f.get('personal_after_worst10', math.nan)))} | {run.total_s:.0f} | "
                             f"{run.total_s / run.rounds:.1f} |")
        sections[part] = (f"### {'What decides FedMetaNAS accuracy' if part == 'ablations' else 'Second round'}: "
                          f"{title} (Fashion-MNIST, Dirichlet(0.1), {rounds} rounds)\n\n" + "\n".join(lines) + "\n")
    if "peer" in args.parts:
        print("FedNAS on the public code's peer settings", flush=True)
        pr = peer(out, args.np, args.data_root, args.quick)
        results["peer"] = pr
        sections["peer"] = (
            "### FedNAS on the peer settings of the public FedNAS code\n\n"
            "4 clients, Fashion-MNIST 28×28, batch 32, 1 normal + 2 reduction cells, 4 nodes, DARTS's 8 ops, C=8, "
            f"10 batches per client per round; ours on `mpirun -np {pr['ranks']}` (the public code: `-np 5`).\n\n"
            "| | public FedNAS (measured here) | ours |\n| --- | --- | --- |\n"
            f"| local search per round | ~79 s | {pr['round_local_s']:.1f} s |\n"
            f"| server evaluation per round | 127–183 s (whole supernet, full test set) | {pr['round_eval_s']:.1f} s "
            "(soft supernet + discrete net, 2000-image subset) |\n"
            f"| one MiLeNAS step, one process, one thread | ~3.4 s | {pr['step_s_one_thread']:.2f} s |\n"
            f"| memory | ~2 GB per client process | {pr['rank_peak_mib']:.0f} MiB per rank = "
            f"{pr['mib_per_client']:.0f} MiB per simulated client ({4 // pr['ranks']} per rank) |\n")
    total = time.perf_counter() - t0
    results["benchmark_seconds"] = total
    (out / f"results_{'_'.join(args.parts)}.json").write_text(json.dumps(results, indent=1, default=float))
    print("\n".join(sections.values()))
    if args.quick:
        return 0
    # Each part's section is kept in docs/results_data/sections.json (whatever --out the part's runs are in),
    # so a partial rerun updates only its parts.
    store = docs / "results_data" / "sections.json"
    store.parent.mkdir(parents=True, exist_ok=True)
    saved = json.loads(store.read_text()) if store.is_file() else {}
    stamp = (f"`{cmd.strip()}` on {time.strftime('%Y-%m-%d %H:%M')}, `mpirun -np {args.np}`, "
             f"{total / 60:.1f} min" + (" (re-reading the finished runs' logs: their times are their own)"
                                        if args.reuse else ""))
    for part, text in sections.items():
        saved[part] = {"text": text, "by": stamp}
    store.write_text(json.dumps(saved, indent=1))
    order = ["grid", "grid_candidates", "ablations", "candidates", "main", "sweep", "mnist", "attempts", "peer"]
    generated = ("Measured on this 2-core CPU machine (one thread per rank) by `benchmarks/compare.py`; each "
                 "section says which command measured it.\n\n" +
                 "\n".join(f"{saved[k]['text']}\n*Measured by {saved[k]['by']}.*\n" for k in order if k in saved))
    write_docs(docs / "results.md", generated)
    return 0


if __name__ == "__main__":
    sys.exit(main())
