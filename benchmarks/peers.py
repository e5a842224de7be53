"""Our simulator side by side with Flower 1.42 (Ray simulation) and pfl-research 0.6 on one FedAvg workload.

The workload (`peers_workload.py`): the FedAvg paper's CNN on Fashion-MNIST, Dirichlet(0.5) over 100 or
1,000 clients, 10 sampled per round, 5 local SGD steps of batch 32 (lr, momentum, weight decay and clip
from configs/fedavg.yaml), 5 rounds, the global model evaluated on a fixed 2000-image test subset after
each round and on the full test set at the end. Every system trains the same clients on the same batches
from the same initial weights, so the final accuracies agree (a check that the work was the same).

Each run is a fresh process tree started from here and measured from outside (wall time from process
start to exit, start-up to the first round, peak RSS and PSS summed over every process of the run,
sampled from /proc) and inside (per-round timestamps: our HDF5 log, the peers' JSON line). Systems
alternate within each repetition; the table gives medians over the repetitions and the ratio to Flower.

The peers live in their own venv (default .venv-peers, made on first use or with --setup-venv from
benchmarks/requirements-peers.txt; installing is timed separately and never counted). They are never
dependencies of our package.

    .venv/bin/python benchmarks/peers.py --clients 100 1000 --reps 2 --json runs/peers.json
    .venv/bin/python benchmarks/peers.py --quick                       # smoke: 100 clients, 2 rounds, 1 rep
    .venv/bin/python benchmarks/peers.py --ours-extra runtime.client_batch=10   # an extra row of ours
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict
from pathlib import Path

import h5py
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling peers_* modules

from peers_memory import TreeSampler  # noqa: E402
from peers_stats import RunRecord, markdown_table, summarize  # noqa: E402
from peers_workload import REPO, Workload, min_samples_for, ours_overrides  # noqa: E402

RESULT_PREFIX = "PEERS_RESULT "
REQUIREMENTS = REPO / "benchmarks" / "requirements-peers.txt"
DEFAULT_VENV = REPO / ".venv-peers"
ORDER = ("ours-np2", "ours-np1", "flower", "pfl")


# ---------------------------------------------------------------------------------------------
# The peers' venv
def setup_venv(venv: Path) -> float:
    """Make a clean venv (no system site-packages) with the pinned peers and our package (editable, no
    dependencies: the peers' side imports our data, partition and model code). Returns the seconds taken."""
    t = time.time()
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    py = str(venv / "bin" / "python")
    subprocess.run([py, "-m", "pip", "install", "-q", "-r", str(REQUIREMENTS)], check=True)
    subprocess.run([py, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "-e", str(REPO)],
                   check=True)
    return time.time() - t


# ---------------------------------------------------------------------------------------------
# One measured run
class Measured:
    """A finished process tree: exit code, merged output lines with the time each arrived, times, memory."""

    def __init__(self, rc: int, lines: list[tuple[float, str]], t0: float, wall: float, sampler: TreeSampler,
                 leftovers: int) -> None:
        self.rc, self.lines, self.t0, self.wall, self.sampler, self.leftovers = rc, lines, t0, wall, sampler, leftovers

    def first(self, text: str) -> tuple[float, str] | None:
        """The first output line containing `text`, with its arrival time."""
        return next(((t, line) for t, line in self.lines if text in line), None)

    def error(self) -> str:
        """The run's own error line if it printed one, else the tail of its output."""
        errors = [line for _, line in self.lines if line.startswith("error:") or "Error:" in line]
        if errors:
            return errors[-1].strip()
        tail = " / ".join(line.strip() for _, line in self.lines[-3:])
        return f"exit code {self.rc}: {tail}"


def run_measured(cmd: list[str], env: dict[str, str], timeout: float) -> Measured:
    """Start `cmd` in its own session, sample its process tree's memory until it exits, end anything it
    left running (Ray daemons), and return what was seen."""
    lines: list[tuple[float, str]] = []
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, bufsize=1)
    sampler = TreeSampler(proc.pid, session=proc.pid)

    def read() -> None:
        for line in proc.stdout:
            lines.append((time.time(), line))

    reader = threading.Thread(target=read, daemon=True)
    with sampler:
        reader.start()
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # our own session: the run and all it started
            rc = proc.wait()
            lines.append((time.time(), f"error: timed out after {timeout:g} s"))
        wall = time.time() - t0
        reader.join(timeout=10)
    leftovers = end_leftovers(sampler)
    return Measured(rc, lines, t0, wall, sampler, leftovers)


def save_output(m: Measured, path: Path) -> None:
    """The run's output, each line stamped with its arrival in seconds after the process started."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{t - m.t0:9.3f} {line}" for t, line in m.lines))


def end_leftovers(sampler: TreeSampler, grace: float = 5.0) -> int:
    """Stop the run's processes still alive after it exited (TERM, then KILL); returns how many there were."""
    alive = sampler.alive()
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in alive:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + grace
        while time.time() < deadline and sampler.alive():
            time.sleep(0.1)
        if not sampler.alive():
            break
    return len(alive)


def base_record(system: str, clients: int, rep: int, m: Measured) -> RunRecord:
    """What every system's record has: outside measurements and, if it failed, why."""
    r = RunRecord(system, clients, rep, ok=m.rc == 0, wall_s=m.wall, peak_rss_mib=m.sampler.peak_rss_mib,
                  peak_pss_mib=m.sampler.peak_pss_mib, peak_procs=m.sampler.peak_procs)
    r.notes.update(samples=m.sampler.samples, pss_samples=m.sampler.pss_samples,
                   sampler_cpu_s=round(m.sampler.cpu_seconds, 3), leftovers=m.leftovers,
                   peak_pss_mib_by_process={k: round(v / 1024, 1) for k, v in
                                            sorted(m.sampler.peak_pss_by_name.items(), key=lambda kv: -kv[1])})
    if m.rc != 0:
        r.error = m.error()
    return r


# ---------------------------------------------------------------------------------------------
# The systems
def run_ours(w: Workload, np_: int, extra: list[str], out: Path, system: str, rep: int, timeout: float) -> RunRecord:
    """Our simulator: `scripts/mpirun.sh -np N python launch/main.py --config configs/fedavg.yaml ...`."""
    name = f"{system.replace(' ', '_').replace('=', '-')}-c{w.clients}-r{rep}"
    cmd = [str(REPO / "scripts" / "mpirun.sh"), "-np", str(np_), sys.executable, str(REPO / "launch" / "main.py"),
           "--config", str(REPO / "configs" / "fedavg.yaml"), *ours_overrides(w), f"output.dir={out}",
           f"output.name={name}", "--overwrite", *extra]
    m = run_measured(cmd, _env(REPO), timeout)
    save_output(m, out / f"{name}.log")
    r = base_record(system, w.clients, rep, m)
    r.notes["command"] = " ".join(cmd)
    if not r.ok:
        return r
    started = m.first("run directory ")  # logged by rank 0 just before the first round
    with h5py.File(out / name / "trajectory.h5", "r") as f:
        rounds = {k: f["rounds"][k][()] for k in ("time_round", "time_eval", "wall_time", "discrete_acc",
                                                  "discrete_loss")}
        r.final_acc = float(f["final"].attrs["discrete_acc"])
    rel = rounds["wall_time"] - rounds["time_round"]  # each round's start, seconds after the loop began
    r.round_s = [float(x) for x in rounds["time_round"] - rounds["time_eval"]]
    r.eval_s = [float(x) for x in rounds["time_eval"]]
    r.round_acc = [float(x) for x in rounds["discrete_acc"]]
    r.notes["round_loss"] = [float(x) for x in rounds["discrete_loss"]]
    if started is not None:
        first = started[0] - m.t0
        r.startup_s = first
        r.round_start_s = [float(first + x - rel[0]) for x in rel]
    return r


def run_peer(kind: str, w: Workload, venv: Path, workers: int, rep: int, timeout: float, out: Path) -> RunRecord:
    """Flower (`peers_flower.py`, Ray with `workers` one-CPU actors) or pfl (`peers_pfl.py`, `workers`
    processes under torchrun), run by the peers venv's python."""
    py = venv / "bin" / "python"
    script = REPO / "benchmarks" / f"peers_{kind}.py"
    spec = json.dumps({**asdict(w), "workers": workers})
    if kind == "pfl" and workers > 1:
        cmd = [str(py), "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={workers}", str(script), spec]
    else:
        cmd = [str(py), str(script), spec]
    if not py.exists():
        return RunRecord(kind, w.clients, rep, ok=False, error=f"no peers venv at {venv} (run with --setup-venv)")
    m = run_measured(cmd, _env(REPO, REPO / "benchmarks"), timeout)
    save_output(m, out / f"{kind}-c{w.clients}-r{rep}.log")
    r = base_record(kind, w.clients, rep, m)
    r.notes["command"] = " ".join(cmd[:-1]) + f" '{spec}'"
    found = next((line for _, line in m.lines if line.startswith(RESULT_PREFIX)), None)
    if found is None:
        r.ok, r.error = False, r.error or m.error()
        return r
    res = json.loads(found[len(RESULT_PREFIX):])
    r.round_start_s = [s - m.t0 for s in res["round_start"]]
    r.round_s = [e - s for s, e in zip(res["round_start"], res["round_end"])]
    r.eval_s, r.round_acc, r.final_acc = res["eval_s"], res["round_acc"], res["final_acc"]
    r.startup_s = r.round_start_s[0] if r.round_start_s else math.nan
    r.notes.update(workers=res.get("workers"), round_loss=res.get("round_loss"))
    return r


def _env(*paths: Path) -> dict[str, str]:
    """One thread per process, unbuffered output, and this checkout's code first on the path."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([*map(str, paths), *filter(None, [os.environ.get("PYTHONPATH")])])
    return env


# ---------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, nargs="+", default=None, help="client counts (default: 100 1000)")
    p.add_argument("--reps", type=int, default=None, help="repetitions per system (default 2)")
    p.add_argument("--rounds", type=int, default=None, help="rounds per run (default 5)")
    p.add_argument("--systems", nargs="+", default=list(ORDER), choices=list(ORDER))
    p.add_argument("--ours-extra", action="append", nargs="+", default=[], metavar="KEY=VALUE",
                   help="an extra row of ours at np 2 with these overrides appended (repeatable)")
    p.add_argument("--quick", action="store_true", help="smoke test: 100 clients, 2 rounds, 1 repetition")
    p.add_argument("--venv", type=Path, default=DEFAULT_VENV, help="the peers' venv (default .venv-peers)")
    p.add_argument("--setup-venv", action="store_true", help="(re)create the peers' venv first")
    p.add_argument("--workers", type=int, default=2, help="Flower's Ray workers and pfl's processes (default 2)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds before a run is killed")
    p.add_argument("--out", type=Path, default=None, help="where our runs write (default: a temporary folder)")
    p.add_argument("--json", type=Path, default=None, help="save every run's raw numbers and the summary here")
    args = p.parse_args(argv)
    args.clients = args.clients or ([100] if args.quick else [100, 1000])
    args.reps = args.reps or (1 if args.quick else 2)
    args.rounds = args.rounds or (2 if args.quick else 5)
    return args


def plan(args: argparse.Namespace) -> list[str]:
    """The systems of one repetition, ours and the peers alternating; extras (ours with overrides) last."""
    chosen = [s for s in ("ours-np2", "flower", "ours-np1", "pfl") if s in args.systems]
    extras = ["ours-np2 " + " ".join(extra) for extra in args.ours_extra]
    return chosen + extras


def run_one(system: str, w: Workload, args: argparse.Namespace, out: Path, rep: int) -> RunRecord:
    if system.startswith("ours-"):
        np_ = int(system.split()[0].removeprefix("ours-np"))
        extra = system.split()[1:]
        return run_ours(w, np_, extra, out, system, rep, args.timeout)
    return run_peer(system, w, args.venv, args.workers, rep, args.timeout, out)


def describe(r: RunRecord) -> str:
    if not r.ok:
        return f"FAILED: {r.error}"
    steady = np.median(r.round_s[1:]) if len(r.round_s) > 1 else (r.round_s[0] if r.round_s else math.nan)
    return (f"steady {steady:.3f} s/round, start-up {r.startup_s:.1f} s, wall {r.wall_s:.1f} s, "
            f"PSS {r.peak_pss_mib:.0f} MiB ({r.peak_procs} procs), acc {r.final_acc:.4f}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t_start = time.time()
    peers = [s for s in args.systems if s in ("flower", "pfl")]
    setup_s = None
    if peers and (args.setup_venv or not (args.venv / "bin" / "python").exists()):
        print(f"setting up the peers venv at {args.venv} (not counted in any measurement)", flush=True)
        setup_s = setup_venv(args.venv)
        print(f"peers venv ready in {setup_s:.0f} s", flush=True)
    out = args.out or Path(tempfile.mkdtemp(prefix="peers-runs-"))
    records: list[RunRecord] = []
    systems = plan(args)
    for clients in args.clients:
        w = Workload(clients=clients, rounds=args.rounds, min_samples=min_samples_for(clients))
        for rep in range(args.reps):
            order = systems if rep % 2 == 0 else systems[::-1]  # alternate who goes first
            for system in order:
                r = run_one(system, w, args, out, rep)
                records.append(r)
                print(f"[{clients} clients, rep {rep + 1}/{args.reps}] {system}: {describe(r)}", flush=True)
    summary = summarize(records)
    table = markdown_table(summary, order=systems)
    duration = time.time() - t_start
    print()
    print(table)
    print(f"machine: {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}; "
          f"{args.rounds} rounds, {args.reps} repetition(s); benchmark took {duration:.0f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "duration_s": duration, "venv_setup_s": setup_s, "cpus": os.cpu_count(),
            "runs": [r.to_json() for r in records],
            "summary": [{"clients": c, "system": s, **row} for (c, s), row in summary.items()],
            "table": table}, indent=1, default=float))
        print(f"raw numbers: {args.json}")
    return 0 if all(r.ok for r in records if not r.system.startswith("ours-np2 ")) else 1


if __name__ == "__main__":
    sys.exit(main())
