"""Do the defaults hold beyond the six grid settings they were chosen on? FedMetaNAS candidates side by side
with FedAvg on DARTS_V2, on partition families the grid does not contain.

Per setting, one after the other, each on `--np` ranks (this machine, nothing else should run):

1. Each `--variants` candidate, pinned (not read from configs/default.yaml, so a name keeps its meaning):
   `steps30` (30 meta-steps, hard sampling from half of the rounds, 32 rounds: the shipped default),
   `steps10_hard25` (10 meta-steps, hard from 25%, 96 rounds: the default for part of 2026-12-06), and each of
   the two changes between them alone, `steps10_hard50` and `steps30_hard25`. All do the same local work,
   1,920 forward-backward passes per client, with no time budget; their measured training seconds are
   printed beside them.
2. Unless `--no-fedavg`: FedAvg on DARTS_V2 (configs/fedavg.yaml) under a time budget equal to the first
   candidate's training seconds (evaluation excluded), its rounds fitted to its measured cost per round; and
   how long FedAvg took to first reach that candidate's final accuracy on the evaluation subset.
3. With `--fednas`: FedNAS (configs/fednas.yaml: its search, then the retraining of its genotype), and for each
   candidate whether the paper's claim holds against it: at least FedNAS's accuracy in at most half its
   training seconds.

The settings are Fashion-MNIST and MNIST split by label shards (McMahan et al.: the training set sorted by
label, cut into 20 shards, 2 per client: most clients hold two classes), and Fashion-MNIST at Dirichlet 0.05,
stronger skew than the grid's 0.1. None took part in choosing a default.

    .venv/bin/python benchmarks/off_grid.py --settings fmnist_shards2 [--variants steps10_hard25 steps30 ...] \
        [--mnist-root <mnist>] [--out runs/off_grid] [--no-fedavg] [--extra federated.seed=1]

Prints a Markdown table; `--json` keeps the numbers.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np

import compare
from compare import _pct, _sec, run_method
from fedmetanas.launcher import REPO
from when_to_search import ADAM_META, DARTS_SGD, STEPS30, fitted, row_of

SETTINGS = {"fmnist_shards2": ("Fashion-MNIST, 2 label shards per client",
                               ["data.partition=shards", "data.shards_per_client=2"]),
            "mnist_shards2": ("MNIST, 2 label shards per client",
                              ["data.name=mnist", "data.partition=shards", "data.shards_per_client=2"]),
            "fmnist_a0.05": ("Fashion-MNIST, Dirichlet 0.05", ["data.dirichlet_alpha=0.05"])}
# Every candidate pinned, so a later change of configs/default.yaml does not change what a name means. The four
# do the same local work, 1,920 forward-backward passes per client; they differ in the two changes between the
# default to 2026-12-06 (`steps30`) and the 10-step default (`steps10_hard25`), each alone and both.
STEPS10 = ["algorithm.local_steps=10", "federated.rounds=96"]
VARIANTS = {"steps10_hard25": [*STEPS10, "search.hard_after_fraction=0.25"],
            "steps30": [*STEPS30, "federated.rounds=32"],
            "steps10_hard50": [*STEPS10, "search.hard_after_fraction=0.5"],
            "steps30_hard25": ["algorithm.local_steps=30", "search.hard_after_fraction=0.25", "federated.rounds=32"],
            # Each client keeps its meta Adam state from round to round (`algorithm.meta_state: kept`): is the
            # 10-step rounds' collapse under label shards Adam restarting every round?
            "steps10_hard25_kept": [*STEPS10, "search.hard_after_fraction=0.25", "algorithm.meta_state=kept"],
            "steps30_kept": [*STEPS30, "federated.rounds=32", "algorithm.meta_state=kept"],
            # SGD with momentum 0.9 at rate 0.1 for the weights in the meta learner, Adam for the logits
            # (when_to_search.DARTS_SGD at four times DARTS's rate). Does a gently restarting optimizer keep short
            # rounds from collapsing?
            "steps30_sgd01": [*STEPS30, "federated.rounds=32", *DARTS_SGD, "algorithm.meta_lr_w=0.1"],
            "steps10_hard25_sgd01": [*STEPS10, "search.hard_after_fraction=0.25", *DARTS_SGD,
                                     "algorithm.meta_lr_w=0.1"],
            # the same 30-step rounds with the weights' rates ramped up over the first 10% of the rounds
            "steps30_sgd01_warm10": [*STEPS30, "federated.rounds=32", *DARTS_SGD, "algorithm.meta_lr_w=0.1",
                                     "algorithm.lr_warmup_fraction=0.1"]}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--settings", nargs="+", required=True, choices=sorted(SETTINGS))
    p.add_argument("--variants", nargs="+", default=["steps10_hard25", "steps30"], choices=list(VARIANTS),
                   help="FedMetaNAS candidates, run in this order; FedAvg's budget is the first one's time")
    p.add_argument("--no-fedavg", dest="fedavg", action="store_false", help="leave FedAvg on DARTS_V2 out")
    p.add_argument("--fednas", action="store_true", help="FedNAS too, and the claim against it per candidate")
    p.add_argument("--np", type=int, default=2)
    p.add_argument("--out", type=Path, default=REPO / "runs" / "off_grid")
    p.add_argument("--data-root", default="data")
    p.add_argument("--mnist-root", default="data")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--extra", nargs="*", default=[], help="overrides for every run, e.g. federated.seed=1 (a "
                   "replicate: give it its own --out)")
    p.add_argument("--reuse", action="store_true", help="read the logs of finished runs in --out instead of rerunning")
    args = p.parse_args(argv)
    compare.REUSE = args.reuse
    args.out = args.out.resolve()  # the runs start in the repository: every path given here is absolute
    args.out.mkdir(parents=True, exist_ok=True)
    first = args.variants[0]
    rows, avg_round_s = [], []
    for key in args.settings:
        label, over = SETTINGS[key]
        base = [f"data.root={args.mnist_root if 'data.name=mnist' in over else args.data_root}", *over, *args.extra]
        row: dict = {"setting": label, "key": key}
        runs = {name: run_method("fedmetanas", f"off_{key}_{name}", args.out, args.np,
                                 base + ADAM_META + VARIANTS[name]) for name in args.variants}
        row.update({name: row_of(run) for name, run in runs.items()})
        if args.fedavg:
            budget = runs[first].total_s
            rounds = fitted(budget, avg_round_s, "fedavg", 10_000)
            avg = run_method("fedavg", f"off_{key}_fedavg", args.out, args.np,
                             base + [f"federated.rounds={rounds}", f"federated.time_budget_s={budget:.1f}"])
            avg_round_s.append(avg.total_s / avg.rounds)
            measured = runs[first].acc[np.isfinite(runs[first].acc)]  # the rounds that were evaluated
            target = float(measured[-1]) if measured.size else math.nan
            row["fedavg"] = {**row_of(avg), "s_to_first": avg.time_to(target)}
        if args.fednas:
            nas = row["fednas"] = row_of(run_method("fednas", f"off_{key}_fednas", args.out, args.np, base))
            for name in args.variants:
                row[name]["claim"] = claim_holds(row[name], nas)
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("\n| setting | method | final % (rounds, s) | personalized mean / worst 10% | most a client lost |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        for name in [*args.variants, "fedavg", "fednas"]:
            if name not in r:
                continue
            a = r[name]
            what = (f"FedAvg DARTS_V2 at {first}'s time (reached its accuracy in {_sec(a['s_to_first'])} s)"
                    if name == "fedavg" else "FedNAS (search and retraining)" if name == "fednas"
                    else name + (f" (claim vs FedNAS: {a['claim']})" if "claim" in a else ""))
            print(f"| {r['setting']} | {what} | {_pct(a['acc'] / 100)} ({a['rounds']}, {a['s']:.0f}) | "
                  f"{a['personal_mean']:.1f} / {a['personal_worst10']:.1f} | {max(0.0, a['largest_drop']):.2f} |")
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=1))


def claim_holds(row: dict, fednas: dict) -> str:
    """The paper's claim for one candidate's row against FedNAS's: its accuracy at least FedNAS's, in at most
    half of FedNAS's training seconds; said with the time ratio."""
    ratio = row["s"] / fednas["s"]
    held = row["acc"] >= fednas["acc"] and ratio <= 0.5
    return f"{'holds' if held else 'fails'}, {ratio:.2f}x"


if __name__ == "__main__":
    main()
