"""Helpers for tests that run the launcher as a user would (plain python or under mpirun)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MPIRUN = REPO / "scripts" / "mpirun.sh"


def tiny_overrides(data_root: Path, out_dir: Path, name: str = "tiny") -> list[str]:
    """A search small enough for a test (seconds), on real Fashion-MNIST (`make data`)."""
    return [
        "data.name=fashion_mnist", f"data.root={data_root}", "data.partition=dirichlet", "data.dirichlet_alpha=0.5",
        "federated.num_clients=4", "federated.rounds=2", "federated.seed=3",
        "model.channels=4", "model.layers=2", "model.nodes=2", "model.stem_stride=2",
        "algorithm.local_steps=2", "algorithm.inner_steps=1", "algorithm.batch_size=16",
        "algorithm.query_batch_size=16", "algorithm.inner_lr_alpha=0.05", "algorithm.meta_lr_alpha=0.05",
        "eval.subset=200", "eval.final_full=false",
        f"output.dir={out_dir}", f"output.name={name}",
    ]


def launch(args: list[str], np: int | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run launch/main.py as a user would: plain python, or under `mpirun -np N`."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    cmd = [sys.executable, str(REPO / "launch" / "main.py"), *args]
    if np is not None:
        cmd = [str(MPIRUN), "-np", str(np), *cmd]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
