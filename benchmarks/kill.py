"""Kill-and-resume trials: SIGKILL a 2-rank search at random points, resume it, compare with an uninterrupted run.

Each trial starts the same tiny search on real Fashion-MNIST (`make data`) under mpirun, kills one random rank (or the whole
job) with SIGKILL at a uniformly random time within the run's expected duration, checks whether the HDF5
log left behind is still readable, then runs `--resume` (repeatedly, if needed) until the run finishes
and compares its final weights, alphas and genotype bit for bit with an uninterrupted reference.

    .venv/bin/python benchmarks/kill.py [--trials 20] [--data-root data]
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import torch

REPO = Path(__file__).resolve().parents[1]

from fedmetanas.launcher import command, launch, tiny_overrides


def rank_pids(run_name: str) -> list[int]:
    """PIDs of the rank processes of a run (found by its unique name on the command line)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(b"launch/main.py" in c for c in cmd) and any(run_name.encode() in c for c in cmd) \
                and not any(b"mpirun" in c or b"mpiexec" in c for c in cmd[:1]):
            pids.append(int(proc.name))
    return pids


def final_state(run_dir: Path) -> tuple[dict[str, torch.Tensor], str]:
    saved = torch.load(run_dir / "supernet.pt", map_location="cpu", weights_only=False)  # a GPU run's file too
    return saved["state_dict"], (run_dir / "genotype.txt").read_text()


def readable(log: Path) -> bool:
    if not log.exists():
        return True  # nothing written yet: nothing lost
    try:
        with h5py.File(log, "r", swmr=True) as f:
            if "rounds" in f:
                _ = {k: v[()] for k, v in f["rounds"].items()}
        return True
    except Exception:  # noqa: BLE001 - any failure to read counts as unreadable
        return False


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=20)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--data-root", default=str(REPO / "data"), help="Fashion-MNIST as `make data` writes it")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="killbench-"))
    root = Path(args.data_root).resolve()

    def overrides(name: str) -> list[str]:
        return tiny_overrides(root, work / "runs", name) + [f"federated.rounds={args.rounds}"]

    t = time.perf_counter()
    ref = launch(overrides("reference"), np=2)
    duration = time.perf_counter() - t
    assert ref.returncode == 0, ref.stderr[-2000:]
    ref_state, ref_genotype = final_state(work / "runs" / "reference")

    identical = unreadable = 0
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for trial in range(args.trials):
        name = f"trial{trial:02d}"
        job = subprocess.Popen(command(overrides(name), np=2), cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
        delay = rng.uniform(0.1, duration)
        target = rng.choice(["rank0", "rank1", "job"])
        time.sleep(delay)
        if target == "job":
            os.killpg(job.pid, signal.SIGKILL)
        else:
            pids = sorted(rank_pids(name))
            if pids:
                os.kill(pids[min(int(target[-1]), len(pids) - 1)], signal.SIGKILL)
        try:
            job.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
        run_dir = work / "runs" / name
        ok_log = readable(run_dir / "trajectory.h5")
        unreadable += not ok_log
        resumes = 0
        while not (run_dir / "genotype.txt").exists() and resumes < 3:
            resumes += 1
            res = launch(overrides(name) + ["--resume"], np=2)
            if res.returncode != 0:
                print(f"  resume failed: {res.stderr.strip().splitlines()[-1:]}")
        same = False
        if (run_dir / "genotype.txt").exists():
            state, genotype = final_state(run_dir)
            same = genotype == ref_genotype and all(torch.equal(state[k], ref_state[k]) for k in ref_state)
        identical += same
        print(f"trial {trial + 1:2d}: SIGKILL {target:5s} at {delay:5.1f}s of ~{duration:.0f}s; "
              f"log readable after kill: {ok_log}; resumed {resumes}x; bit-identical: {same}", flush=True)
    print(f"\n{identical}/{args.trials} resumed runs bit-identical to the uninterrupted one; "
          f"{unreadable}/{args.trials} HDF5 logs unreadable right after the kill")
    return 0 if identical == args.trials else 1


if __name__ == "__main__":
    sys.exit(main())
