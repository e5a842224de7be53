"""Start runs as a user would — `python launch/main.py ...`, plain or under `mpirun -np N` — from
benchmarks and tests, and a search small enough to take seconds.

The package is installed (editable) in the repository's venv, so the child process imports it like any
user's would; the launcher needs the repository itself only for `launch/main.py` and `scripts/mpirun.sh`
(OpenMPI's root and oversubscription flags).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MPIRUN = REPO / "scripts" / "mpirun.sh"


def tiny_overrides(data_root: Path | str, out_dir: Path | str, name: str = "tiny") -> list[str]:
    """A search small enough for a test or a fault-injection benchmark (seconds), on real Fashion-MNIST."""
    return [
        "data.name=fashion_mnist", f"data.root={data_root}", "data.partition=dirichlet", "data.dirichlet_alpha=0.5",
        "federated.num_clients=4", "federated.rounds=2", "federated.seed=3",
        "model.channels=4", "model.layers=2", "model.reduction_layers=[1]", "model.nodes=2", "model.stem_stride=2",
        "algorithm.local_steps=2", "algorithm.inner_steps=1", "algorithm.batch_size=16",
        "algorithm.query_batch_size=16", "algorithm.inner_lr_alpha=0.05", "algorithm.meta_lr_alpha=0.05",
        "eval.subset=200", "eval.final_full=false",
        f"output.dir={out_dir}", f"output.name={name}",
    ]


def command(args: list[str], np: int | None = None) -> list[str]:
    """The command line of a run: launch/main.py with `args`, under `mpirun -np N` when `np` is given."""
    cmd = [sys.executable, str(REPO / "launch" / "main.py"), *args]
    return cmd if np is None else [str(MPIRUN), "-np", str(np), *cmd]


def _env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1")


def launch(args: list[str], np: int | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run a whole run and wait for it (output captured)."""
    return subprocess.run(command(args, np), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)


def start(args: list[str], np: int | None = None) -> subprocess.Popen:
    """Start a run in its own process group, not waiting (for signals, kills, concurrent starts)."""
    return subprocess.Popen(command(args, np), cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    """Wait until `path` exists, failing if the run ends first or the time runs out."""
    deadline = time.time() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"the run ended before {path} appeared:\n{proc.communicate()[1][-2000:]}")
        if time.time() >= deadline:
            raise TimeoutError(f"{path} never appeared")
        time.sleep(0.05)
