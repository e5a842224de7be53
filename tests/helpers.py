"""Helpers for tests that run the launcher as a user would (plain python or under mpirun): the package's
own launcher (`fedmetanas.launcher`, shared with the benchmarks) and what only tests need."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from fedmetanas.launcher import MPIRUN, REPO, launch, start, tiny_overrides, wait_for  # noqa: F401 - re-exported


def rank_pid(marker: str, rank: int) -> int:
    """PID of one rank of a run (by its MPI rank variable), as a user would find it with ps.

    `marker` must be unique to this run's command line (e.g. f"output.dir={tmp_path}"): other runs of the
    same test may be going on at the same machine."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes()
            env = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"launch/main.py" in cmd and marker.encode() in cmd.split(b"\0") and f"PMI_RANK={rank}".encode() in env:
            return int(proc.name)
    raise AssertionError(f"rank {rank} of the run with {marker} not found")


def launch_all(data_root: Path, out: Path, plans: dict[str, tuple[list[str], int]], common: list[str]) -> dict[str, Path]:
    """Run each plan (name -> (overrides beside `common`, ranks)) to completion; their run directories."""
    for name, (extra, np) in plans.items():
        proc = launch(tiny_overrides(data_root, out, name) + common + extra, np=np)
        assert proc.returncode == 0, f"{name}: {proc.stderr[-3000:]}"
    return {name: out / name for name in plans}


def saved_model(run_dir: Path, file: str = "model.pt") -> dict[str, Any]:
    """The state dict a finished run saved."""
    return torch.load(run_dir / file, weights_only=False)["state_dict"]
