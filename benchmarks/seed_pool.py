"""Pool the side-by-side runs of two FedMetaNAS variants over settings and seeds: the evidence a change of
default needs where one seed's spread is as large as the lever (docs/results.md, "The seed-1 grid replicate").

Reads the finished runs that `when_to_search.py` (`when_<setting>_<variant>`) or `off_grid.py`
(`off_<setting>_<variant>`) left in each `--runs` folder, pairs the candidate's run with the base's of the same
setting in the same folder (those scripts are run once per seed, each seed in its own folder), prints each
pair, then the pooled figures: wins and losses, the mean difference with its standard error, and the exact
two-sided sign test over the pairs that are not ties (how often a fair coin splits at least that unevenly).

    .venv/bin/python benchmarks/seed_pool.py --runs runs/when_s8 runs/when_s8_seed1 --base steps30 \\
        --candidate sgd_lr0.1_warm10

Reads logs only: it runs nothing and takes seconds.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import h5py
import yaml

TIE = 0.005  # accuracies are logged to 0.01 points: a smaller difference is a tie


@dataclass(frozen=True)
class Pair:
    """One setting of one folder: the base's and the candidate's final accuracy (%), and the runs' seed."""

    folder: str
    setting: str
    seed: int
    base: float
    candidate: float

    @property
    def difference(self) -> float:
        return self.candidate - self.base


@dataclass(frozen=True)
class Pooled:
    """The pooled figures of a list of pairs' differences (candidate minus base, points)."""

    n: int
    wins: int
    losses: int
    mean: float
    sem: float  # standard error of the mean (NaN for fewer than two pairs)
    sign_p: float  # exact two-sided sign test over the pairs that are not ties


def sign_test(wins: int, losses: int) -> float:
    """Exact two-sided sign test: the probability that a fair coin, tossed wins + losses times, comes up
    heads at most min(wins, losses) times or at least max(wins, losses) times. 1 when there is no toss."""
    n = wins + losses
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(wins, losses) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def pool(differences: Sequence[float]) -> Pooled:
    """Wins, losses, mean, its standard error and the sign test of `differences` (ties: |d| < TIE)."""
    n = len(differences)
    wins = sum(d >= TIE for d in differences)
    losses = sum(d <= -TIE for d in differences)
    mean = sum(differences) / n if n else math.nan
    sem = (math.sqrt(sum((d - mean) ** 2 for d in differences) / (n - 1) / n) if n > 1 else math.nan)
    return Pooled(n, wins, losses, mean, sem, sign_test(wins, losses))


def final_accuracy(run_dir: Path) -> float | None:
    """The run's final discrete accuracy (%), or None if the run has not finished (no /final group)."""
    path = run_dir / "trajectory.h5"
    if not path.is_file():
        return None
    with h5py.File(path, "r") as f:
        return 100 * float(f["final"].attrs["discrete_acc"]) if "final" in f else None


def run_seed(run_dir: Path) -> int:
    """`federated.seed` from the config the run wrote beside its log."""
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    return int(cfg["federated"]["seed"])


def pairs(folder: Path, base: str, candidate: str) -> list[Pair]:
    """Every setting of `folder` with a finished run of both variants, in name order. The run folders are
    `<prefix>_<setting>_<variant>`; a candidate folder whose base twin is missing or unfinished is skipped."""
    found = []
    for prefix in ("when", "off"):
        for cand_dir in sorted(folder.glob(f"{prefix}_*_{candidate}")):
            setting = cand_dir.name[len(prefix) + 1:-(len(candidate) + 1)]
            base_dir = folder / f"{prefix}_{setting}_{base}"
            a, b = final_accuracy(base_dir), final_accuracy(cand_dir)
            if a is not None and b is not None:
                found.append(Pair(folder.name, setting, run_seed(cand_dir), a, b))
    return found


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", nargs="+", type=Path, required=True, help="folders of side-by-side runs, one a seed")
    p.add_argument("--base", required=True, help="the variant name of the default, e.g. steps30")
    p.add_argument("--candidate", required=True, help="the variant name measured against it")
    args = p.parse_args(argv)
    found = [pair for folder in args.runs for pair in pairs(folder, args.base, args.candidate)]
    if not found:
        raise SystemExit(f"error: --runs: no setting has finished runs of both {args.base!r} and "
                         f"{args.candidate!r}; check the folders and the variant names")
    print(f"| folder | setting | seed | {args.base} % | {args.candidate} % | difference |")
    print("| --- | --- | --- | --- | --- | --- |")
    for pair in found:
        print(f"| {pair.folder} | {pair.setting} | {pair.seed} | {pair.base:.2f} | {pair.candidate:.2f} | "
              f"{pair.difference:+.2f} |")
    s = pool([pair.difference for pair in found])
    print(f"\n{s.n} pairs: {args.candidate} wins {s.wins}, loses {s.losses}; mean difference {s.mean:+.2f} "
          f"points (standard error {s.sem:.2f}); sign test p = {s.sign_p:.3f}")


if __name__ == "__main__":
    main()
