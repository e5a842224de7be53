"""Memory per rank against clients per rank: client state between rounds is only data indices.

Runs the default search for one short round on one rank with 8 and with 64 clients and prints the
peak resident memory of each (from the run's HDF5 log) and their ratio (target <= 1.3).

    .venv/bin/python benchmarks/memory.py [--small 8] [--large 64]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import h5py

REPO = Path(__file__).resolve().parents[1]

from fedmetanas.launcher import launch


def peak_mib(clients: int, out: Path) -> float:
    name = f"clients{clients}"
    proc = launch(["--config", str(REPO / "configs" / "default.yaml"), f"output.dir={out}", f"output.name={name}",
                   f"federated.num_clients={clients}", "federated.rounds=1", "algorithm.local_steps=1",
                   "data.min_samples=10", "eval.subset=200", "eval.final_full=false"], timeout=3600)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-2000:])
    with h5py.File(out / name / "trajectory.h5", "r") as f:
        return float(f["rounds/memory_rank_mib"][-1].max())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--small", type=int, default=8)
    p.add_argument("--large", type=int, default=64)
    args = p.parse_args(argv)
    out = Path(tempfile.mkdtemp(prefix="memory-"))
    small, large = peak_mib(args.small, out), peak_mib(args.large, out)
    print(f"peak memory of one rank: {args.small} clients {small:.0f} MiB, {args.large} clients {large:.0f} MiB; "
          f"ratio {large / small:.3f} (target <= 1.3)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
