"""When to search, and one more lever, at equal time on the grid's settings (issue 23, items 3 and 4).

    python benchmarks/when_to_search.py --settings fmnist_a0.5 fmnist_a1.0 mnist_a0.5 --fedavg
    python benchmarks/when_to_search.py --settings fmnist_a0.1 mnist_a0.1 --variants shipped combined

Per setting, in this order, each run on `--np` ranks:

1. FedMetaNAS, each `--variant`, under the grid's budget of the setting (`federated.time_budget_s` = 0.5x
   the setting's FedNAS training time), its rounds fitted to the variant's own measured cost per round so
   that its schedule (cosine rate, temperature, the switch to hard sampling) ends inside the budget, as
   `compare.py --parts grid` does. `shipped` is `configs/default.yaml` (30 meta-steps, hard sampling from
   half of the rounds); `steps30` is the same configuration pinned, and the variants measured against it
   keep it pinned, so that a later change of the default does not change what they mean. (`steps10_hard25`,
   10 meta-steps with hard sampling from 25%, was the default for part of 2026-12-06 and was undone:
   docs/results.md.) `combined` is `steps30` with hard sampling from 25%; `group_norm` it with GroupNorm in
   place of BatchNorm (`model.norm: group`); `server_lr` it with the server's step 1.5x the averaged update
   (FedAvgM with mu 0 and `server_lr` 1.5); `steps5*` / `steps10*` / `steps15_hard25` take other numbers of
   local meta-steps (their first estimate and their cap on the rounds scale with their forward-backward
   passes); `*warmup_soft` train the weights alone first; `*_slr` adds the server rate,
   `*_anneal60` slower annealing, `reptile*` Reptile.
   `--budget-fraction` sets another fraction of FedNAS's time (0.35: the issue's ambitious target).
   The cost per round is the mean over the variant's finished runs in `--out` (this invocation's and
   earlier ones'); before the first, the other variants' measured cost scaled by the passes (a machine
   slower today is seen), an estimate only before any. `--extra federated.seed=1` makes a replicate.
2. With `--fedavg`: FedAvg on DARTS_V2 with the first variant's measured training seconds as its budget
   (equal time; evaluation excluded on both sides) and as many rounds as fit at its own cost per round.

FedNAS's training time per setting is read from its grid run in `--grid-runs` when that is there, else the
figure its rerun with the code of 2026-12-05 measured on this machine (docs/results.md, "Against today's
FedNAS"): FedNAS itself is not rerun (two thirds of the grid's time). Every other number is measured by this run,
under the same conditions for every method. Prints a Markdown table; `--json` keeps the numbers.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
from pathlib import Path
from typing import Sequence

import h5py

import compare
from compare import GRID, LABELS, Run, _pct, finished, run_method
from fedmetanas.config import AlgorithmConfig
from fedmetanas.configure import load_config
from fedmetanas.launcher import REPO

# FedNAS's training seconds (evaluation excluded) and final accuracy per grid setting, from its rerun with
# the code of 2026-12-05 (`compare.run_method("fednas", ...)`, configs/fednas.yaml, mpirun -np 2, this 2-core
# machine; docs/results.md, "Against today's FedNAS"). Its accuracies are the 2026-11-30 grid's to the digit.
RECORDED_FEDNAS = {"fmnist_a0.1": (600.0, 75.67), "fmnist_a0.5": (594.0, 80.20), "mnist_a0.1": (345.0, 86.80),
                   "fmnist_iid": (535.0, 84.61), "fmnist_a1.0": (675.0, 82.75), "mnist_a0.5": (529.0, 96.78)}
# The shipped default, pinned: 30 meta-steps a round, hard sampling from half of the rounds (32 rounds). The
# variants measured against it keep it pinned, so that they stay what docs/results.md measured.
STEPS30 = ["algorithm.local_steps=30", "search.hard_after_fraction=0.5"]
# The meta learner of the defaults to 2026-12-07: Adam at 3e-3 for weights and logits alike. Every variant but
# `shipped` is run with it first, so that a variant means what it measured whatever configs/default.yaml says.
ADAM_META = ["algorithm.meta_optimizer=adam", "algorithm.meta_optimizer_alpha=same", "algorithm.meta_lr_w=0.003",
             "algorithm.meta_momentum=0", "algorithm.lr_warmup_fraction=0"]
DARTS_SGD = ["algorithm.meta_optimizer=sgd", "algorithm.meta_optimizer_alpha=adam", "algorithm.meta_lr_w=0.025",
             "algorithm.meta_momentum=0.9"]
VARIANTS = {"shipped": [], "steps30": STEPS30, "combined": STEPS30[:1], "group_norm": [*STEPS30, "model.norm=group"],
            "server_lr": [*STEPS30, "federated.server_optimizer=momentum", "federated.server_momentum=0",
                          "federated.server_lr=1.5"],
            # Cheaper rounds, more of them, under the same budget: FedAvg's 10 local steps (less drift on
            # clients of one or two classes), alone and with the combined variant's early hard sampling.
            # `steps10_hard25` was the shipped default for part of 2026-12-06; undone off the grid (off_grid.py).
            "steps10": ["algorithm.local_steps=10", "search.hard_after_fraction=0.5"],
            "steps10_hard25": ["algorithm.local_steps=10", "search.hard_after_fraction=0.25"],
            "steps15_hard25": ["algorithm.local_steps=15", "search.hard_after_fraction=0.25"],
            # Cheaper still: 5 meta-steps a round (10 passes, half the shipped round's), twice the rounds.
            "steps5_hard25": ["algorithm.local_steps=5", "search.hard_after_fraction=0.25"],
            # The cell decided later: temperature annealed over 60% of the rounds, not 30%, so the hard rounds
            # from 25% on still sample every op and the convolutions train before the ops are compared.
            "steps10_hard25_anneal60": ["algorithm.local_steps=10", "search.hard_after_fraction=0.25",
                                        "search.anneal_fraction=0.6"],
            # MetaNAS's meta update: Reptile, one task learner of 10 Adam steps a round (10 passes, no query
            # pass: half the 10-step variant's), weights taken as adapted, logits moved 0.6 of the way.
            "reptile10_hard25": ["algorithm.meta_update=reptile", "algorithm.local_steps=1",
                                 "algorithm.inner_steps=10", "search.hard_after_fraction=0.25"],
            "reptile20_hard25": ["algorithm.meta_update=reptile", "algorithm.local_steps=1",
                                 "algorithm.inner_steps=20", "search.hard_after_fraction=0.25"],
            # The three grid winners together: 10 steps, hard from 25%, and the server's rate 1.5.
            "steps10_hard25_slr": ["algorithm.local_steps=10", "search.hard_after_fraction=0.25",
                                   "federated.server_optimizer=momentum", "federated.server_momentum=0",
                                   "federated.server_lr=1.5"],
            # The convolutions learn before the ops are compared: the first 15% of the rounds train the
            # weights only, under the shipped sparse soft relaxation of frozen logits (two random ops per
            # edge), then annealing and pruning.
            "warmup_soft": [*STEPS30, "search.warmup_fraction=0.15", "search.warmup_gumbel=soft"],
            # Plain steps from half-way (the hard half): the meta optimizer on support batches at the client's
            # own parameters, the same passes a round, every pass a step of the weights (twice the updates).
            "plain50": [*STEPS30, "algorithm.plain_after_fraction=0.5"],
            # Each client keeps its meta Adam state between rounds (client state, all-reduced each round).
            "kept": [*STEPS30, "algorithm.meta_state=kept"],
            # DARTS's pair of optimizers in the meta learner: SGD with momentum 0.9 at DARTS's (and FedAvg's) rate
            # 0.025 for the weights, Adam for the logits as before; a fresh momentum buffer restarts gently
            # where a fresh Adam's first steps move every weight by about its rate. With 30 and with 10 steps.
            "sgd": [*STEPS30, *DARTS_SGD],
            "sgd_steps10_hard25": ["algorithm.local_steps=10", "search.hard_after_fraction=0.25", *DARTS_SGD],
            # the same at four times the weights' rate: at 0.025 the weights learn too slowly (client loss
            # 2.14 -> 2.06 over the first six 10-step rounds at MNIST Dirichlet 0.1)
            "sgd_lr0.1": [*STEPS30, *DARTS_SGD, "algorithm.meta_lr_w=0.1"],
            "sgd_lr0.2": [*STEPS30, *DARTS_SGD, "algorithm.meta_lr_w=0.2"],
            # Between 0.025 and 0.1; and 0.1 reached after a linear warm-up over the first 10% of the rounds (seed 1
            # at MNIST Dirichlet 0.1: at 0.1 from the first round the averaged net stayed at chance for 4 rounds).
            "sgd_lr0.05": [*STEPS30, *DARTS_SGD, "algorithm.meta_lr_w=0.05"],
            "sgd_lr0.1_warm10": [*STEPS30, *DARTS_SGD, "algorithm.meta_lr_w=0.1", "algorithm.lr_warmup_fraction=0.1"],
            "sgd_lr0.1_steps10_hard25": ["algorithm.local_steps=10", "search.hard_after_fraction=0.25", *DARTS_SGD,
                                         "algorithm.meta_lr_w=0.1"],
            "steps10_warmup_soft": ["algorithm.local_steps=10", "search.hard_after_fraction=0.5",
                                    "search.warmup_fraction=0.15", "search.warmup_gumbel=soft"]}
# Starting estimates of the training seconds per round (np 2, this machine), replaced by each method's own
# measurement once one of its runs has finished: FedMetaNAS's per forward-backward pass of a client's round
# (the 30-step default's grid runs: 12.1-13.0 s for 60 passes) and FedAvg's round on DARTS_V2 (1.6-1.9 s).
START_ROUND_S = {"fedmetanas": 12.6 / 60, "fedavg": 1.8}


def pinned(name: str) -> list[str]:
    """Variant `name`'s overrides of configs/default.yaml: `shipped` none, every other on the pinned meta learner."""
    return [] if name == "shipped" else [*ADAM_META, *VARIANTS[name]]


def fednas_seconds(key: str, grid_runs: Path) -> tuple[float, float, str]:
    """FedNAS's training seconds and final accuracy (%) on setting `key`, and where they come from."""
    path = grid_runs / f"grid_{key}_fednas"
    if (path / "trajectory.h5").is_file():
        run = Run.load("fednas", path, math.nan)
        return run.total_s, 100 * float(run.final["discrete_acc"]), str(path)
    seconds, acc = RECORDED_FEDNAS[key]
    return seconds, acc, "recorded 2026-12-05"


def measured_round_s(out: Path, name: str, method: str) -> list[float]:
    """Training seconds per round of run `name`'s finished runs already in `out` (any setting), so that a
    later invocation fits its first setting's rounds to measured costs as the first one did to estimates."""
    runs = [Run.load(method, path, math.nan) for path in sorted(out.glob(f"when_*_{name}")) if finished(path)]
    return [run.total_s / run.rounds for run in runs]


def personalization(run: Run) -> dict[str, float]:
    """The run's personalized mean and worst 10% (%), and the most a client lost to it (points; <= 0: none)."""
    with h5py.File(run.path / "trajectory.h5", "r") as f:
        if "personalization" not in f:
            return {}
        before, after = f["personalization/acc_before"][()], f["personalization/acc_after"][()]
    return {"personal_mean": 100 * float(run.final["personal_after_mean"]),
            "personal_worst10": 100 * float(run.final["personal_after_worst10"]),
            "largest_drop": 100 * float((before - after).max())}


@functools.cache
def _default_algorithm() -> AlgorithmConfig:
    """configs/default.yaml's algorithm section, read once: `passes` asks for it for every fitted run."""
    return load_config(REPO / "configs" / "default.yaml").algorithm


def row_of(run: Run) -> dict:
    """The figures of one finished FedMetaNAS run: final accuracy (%), training seconds, rounds, what stopped
    it, personalization."""
    return {"acc": 100 * float(run.final["discrete_acc"]), "s": run.total_s, "rounds": run.rounds,
            "stopped_by": str(run.final.get("stopped_by", "rounds")), **personalization(run)}


def passes(method: str, overrides: Sequence[str]) -> int:
    """A FedMetaNAS variant's forward-backward passes per client and round (meta-steps x (support steps + one
    query pass), configs/default.yaml's unless overridden): nearly all of a round's cost is these passes, so
    its starting cost estimate scales by them, and its cap on the rounds by their inverse (the same local
    work as the shipped default's rounds). Reptile takes no query pass. Other methods: 1."""
    if method != "fedmetanas":
        return 1
    a = _default_algorithm()
    values = {"algorithm.local_steps": str(a.local_steps), "algorithm.inner_steps": str(a.inner_steps),
              "algorithm.meta_update": a.meta_update}
    for o in overrides:
        key, _, value = o.partition("=")
        if key in values:
            values[key] = value
    return int(values["algorithm.local_steps"]) * (int(values["algorithm.inner_steps"])
                                                   + (values["algorithm.meta_update"] == "fomaml"))


def per_pass_s(per_round: dict[str, list[float]]) -> list[float]:
    """Every FedMetaNAS variant's measured seconds per round over its passes (`passes`): what a variant not yet
    measured costs per pass on this machine today."""
    return [t / passes("fedmetanas", VARIANTS[name]) for name in VARIANTS for t in per_round[name]]


def fitted(budget: float, per_round: list[float], method: str, cap: int, overrides: Sequence[str] = (),
           unit_s: Sequence[float] = ()) -> int:
    """Rounds whose schedule ends inside `budget` at the variant's measured cost per round; before it has one,
    at its passes (`passes`) times the seconds per pass other variants measured in this folder (`unit_s`: a
    slower or faster machine today), else times the recorded estimate. At most `cap` rounds of the shipped
    default's local work."""
    n = passes(method, overrides)
    unit = sum(unit_s) / len(unit_s) if unit_s else START_ROUND_S[method]
    cost = sum(per_round) / len(per_round) if per_round else unit * n
    return max(2, min(int(cap * passes(method, ()) / n), int(0.95 * budget / cost)))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--settings", nargs="+", required=True, choices=[key for _, key, _ in GRID])
    p.add_argument("--variants", nargs="+", default=["shipped"], choices=sorted(VARIANTS))
    p.add_argument("--fedavg", action="store_true", help="FedAvg on DARTS_V2 at the first variant's time")
    p.add_argument("--np", type=int, default=2)
    p.add_argument("--out", type=Path, default=REPO / "runs" / "when")
    p.add_argument("--grid-runs", type=Path, default=REPO / "runs" / "grid")
    p.add_argument("--data-root", default="data")
    p.add_argument("--mnist-root", default="data")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--reuse", action="store_true", help="read the logs of finished runs in --out instead of rerunning")
    p.add_argument("--extra", nargs="*", default=[], metavar="SECTION.KEY=VALUE",
                   help="overrides for every run, e.g. federated.seed=1 for a replicate (FedNAS's time still sets the budget)")
    p.add_argument("--budget-fraction", type=float, default=0.5,
                   help="each FedMetaNAS run's budget as a fraction of FedNAS's training time: 0.5 the claim's, "
                        "0.35 the issue's ambitious target")
    args = p.parse_args(argv)
    if not 0 < args.budget_fraction <= 1:
        p.error(f"--budget-fraction must be in (0, 1], got {args.budget_fraction}: 0.5 is the claim's budget")
    compare.REUSE = args.reuse
    # The runs start in the repository (the launcher's working folder): every path given here is absolute.
    args.out, args.grid_runs = args.out.resolve(), args.grid_runs.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    meta_cap = load_config(REPO / "configs" / "default.yaml").federated.rounds
    avg_cap = 10_000  # FedAvg's rounds are set by its time alone
    per_round = {name: measured_round_s(args.out, name, "fedavg" if name == "fedavg" else "fedmetanas")
                 for name in [*VARIANTS, "fedavg"]}
    rows = []
    for label, key, over in (g for g in GRID if g[1] in args.settings):
        root = args.mnist_root if "data.name=mnist" in over else args.data_root
        base = [f"data.root={root}", *over, *args.extra]
        nas_s, nas_acc, source = fednas_seconds(key, args.grid_runs)
        budget = args.budget_fraction * nas_s
        row = {"setting": label, "key": key, "fednas_s": nas_s, "fednas_acc": nas_acc, "fednas_from": source,
               "budget_s": budget}
        if (args.grid_runs / f"grid_{key}_fednas" / "trajectory.h5").is_file():
            row["fednas_personal"] = personalization(Run.load("fednas", args.grid_runs / f"grid_{key}_fednas",
                                                              math.nan))
        first: Run | None = None
        for name in args.variants:
            rounds = fitted(budget, per_round[name], "fedmetanas", meta_cap, VARIANTS[name], per_pass_s(per_round))
            run = run_method("fedmetanas", f"when_{key}_{name}", args.out, args.np,
                             base + pinned(name) + [f"federated.rounds={rounds}",
                                                      f"federated.time_budget_s={budget:.1f}"])
            per_round[name].append(run.total_s / run.rounds)
            row[name] = row_of(run)
            first = first or run
        if args.fedavg and first is not None:
            rounds = fitted(first.total_s, per_round["fedavg"], "fedavg", avg_cap)
            avg = run_method("fedavg", f"when_{key}_fedavg", args.out, args.np,
                             base + [f"federated.rounds={rounds}", f"federated.time_budget_s={first.total_s:.1f}"])
            per_round["fedavg"].append(avg.total_s / avg.rounds)
            row["fedavg"] = {"acc": 100 * float(avg.final["discrete_acc"]), "s": avg.total_s, "rounds": avg.rounds,
                             "stopped_by": str(avg.final.get("stopped_by", "rounds"))}
        rows.append(row)
        print(json.dumps(row), flush=True)
    names = [*args.variants, *(["fedavg"] if args.fedavg else [])]
    heads = [LABELS["fedavg"] if n == "fedavg" else f"FedMetaNAS {n}" for n in names]
    print("\n| setting | FedNAS % (budget s) | " + " | ".join(f"{h} % (rounds, s)" for h in heads) + " |")
    print("| --- | --- | " + " | ".join("---" for _ in heads) + " |")
    for r in rows:
        cells = [f"{_pct(r[n]['acc'] / 100)} ({r[n]['rounds']}, {r[n]['s']:.0f})" for n in names]
        print(f"| {r['setting']} | {r['fednas_acc']:.2f} ({r['budget_s']:.0f}) | " + " | ".join(cells) + " |")
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
