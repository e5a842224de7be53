"""Helpers for tests that run the launcher as a user would (plain python or under mpirun)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MPIRUN = REPO / "scripts" / "mpirun.sh"


def tiny_overrides(data_root: Path, out_dir: Path, name: str = "tiny") -> list[str]:
    """A search small enough for a test (seconds), on real Fashion-MNIST (`make data`)."""
    return [
        "data.name=fashion_mnist", f"data.root={data_root}", "data.partition=dirichlet", "data.dirichlet_alpha=0.5",
        "federated.num_clients=4", "federated.rounds=2", "federated.seed=3",
        "model.channels=4", "model.layers=2", "model.reduction_layers=[1]", "model.nodes=2", "model.stem_stride=2",
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


def start(args: list[str], np: int | None = None) -> subprocess.Popen:
    """Start launch/main.py (under `mpirun -np N` when `np` is given) in its own process group, not waiting."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    cmd = [sys.executable, str(REPO / "launch" / "main.py"), *args]
    if np is not None:
        cmd = [str(MPIRUN), "-np", str(np), *cmd]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    """Wait until `path` exists, failing if the run ends first or the time runs out."""
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.05)


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
