"""Fingerprints of small reference runs: one hash per HDF5 dataset, timings and memory left out.

A refactor that must not change any number (the round loop, the algorithm seam) runs this before and
after and compares the two files: every dataset of every run must hash the same. Results are
deterministic per machine, not across machines, so compare fingerprints taken on one machine.

    python scripts/fingerprint.py --data data --out /tmp/before.json
    ... change the code ...
    python scripts/fingerprint.py --data data --out /tmp/after.json --compare /tmp/before.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path

import h5py
import numpy as np

from fedmetanas.launcher import launch, tiny_overrides

# Values that measure the machine, not the run (they differ between any two runs).
_MACHINE = ("time", "wall", "seconds", "memory", "mib")

_FEDNAS = ["algorithm.name=fednas", "model.primitives=darts", "search.input_mode=all", "fednas.local_steps=2",
           "fednas.batch_size=16", "fednas.retrain_rounds=2", "fedavg.local_steps=2", "fedavg.batch_size=16",
           "fedavg.channels=4"]
_FIXED = ["fedavg.architecture=cnn", "fedavg.local_steps=3", "fedavg.batch_size=16", "perfedavg.architecture=cnn",
          "personalize.steps=2"]
RUNS: dict[str, tuple[list[str], int | None]] = {
    "fedmetanas": (["federated.rounds=3", "personalize.steps=2"], None),
    "fedmetanas-np2": (["federated.rounds=3"], 2),
    "fedmetanas-adam": (["federated.rounds=3", "federated.server_optimizer=adam", "federated.server_lr=0.1"], None),
    "fedmetanas-momentum": (["federated.rounds=3", "federated.server_optimizer=momentum",
                             "federated.server_lr=0.5"], None),
    "fedmetanas-batched": (["federated.rounds=3", "runtime.client_batch=2"], None),
    "fedmetanas-hard": (["federated.rounds=4", "search.hard_after_fraction=0.5", "search.prune_start_fraction=0"],
                        None),
    "fednas": (_FEDNAS, None),
    "fedavg": (["algorithm.name=fedavg", "federated.rounds=3", *_FIXED], None),
    "fedavg-batched": (["algorithm.name=fedavg", "federated.rounds=3", "runtime.client_batch=4", *_FIXED], None),
    "perfedavg": (["algorithm.name=perfedavg", "federated.rounds=3", *_FIXED], None),
}


def _digest(value: np.ndarray) -> str:
    arr = np.asarray(value)
    if arr.dtype.kind == "O":
        arr = np.array([x.decode() if isinstance(x, bytes) else str(x) for x in arr.ravel()])
    return hashlib.sha256(arr.tobytes() + str(arr.dtype).encode() + str(arr.shape).encode()).hexdigest()[:16]


def fingerprint(log: Path) -> dict[str, str]:
    """{dataset path: hash} of every dataset of an HDF5 log but the machine's measurements."""
    out: dict[str, str] = {}

    def visit(name: str, obj: object) -> None:
        if isinstance(obj, h5py.Dataset) and not any(m in name.split("/")[-1] for m in _MACHINE):
            out[name] = _digest(obj[()])

    with h5py.File(log, "r") as f:
        f.visititems(visit)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="data", help="data.root of the runs")
    p.add_argument("--out", required=True, help="where to write the fingerprints (JSON)")
    p.add_argument("--compare", help="an earlier fingerprint file: report every dataset that differs")
    p.add_argument("--only", nargs="*", help="run only these reference runs")
    args = p.parse_args()
    prints: dict[str, dict[str, str]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (extra, np_) in RUNS.items():
            if args.only and name not in args.only:
                continue
            proc = launch(tiny_overrides(Path(args.data).resolve(), tmp, name) + extra, np=np_, timeout=900)
            if proc.returncode != 0:
                print(f"error: reference run {name} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
                return 1
            prints[name] = fingerprint(Path(tmp) / name / "trajectory.h5")
            print(f"{name}: {len(prints[name])} datasets", flush=True)
    Path(args.out).write_text(json.dumps(prints, indent=1, sort_keys=True))
    if not args.compare:
        return 0
    before = json.loads(Path(args.compare).read_text())
    differ = [f"{run}:{key}" for run, keys in prints.items() for key in sorted(set(keys) | set(before.get(run, {})))
              if keys.get(key) != before.get(run, {}).get(key)]
    print("identical" if not differ else "differ: " + ", ".join(differ))
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
