"""gpu_check's sections that run the simulator itself (the code path of launch/main.py, in a subprocess):
resume across a SIGKILL, two ranks sharing one GPU, lanes end to end, and the default search's s/round
sequential vs batched vs captured. Runs read the Fashion-MNIST that `make data` leaves in data/.

    python benchmarks/gpu_runs.py one-run ARGS    # a subprocess body: fedmetanas.cli.main, then its peak memory
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from gpu_common import REPO, Bounded, Deadline, SectionContext, SectionTimeout, child_env, run_bounded

MPIRUN = REPO / "scripts" / "mpirun.sh"
DEFAULT_CONFIG = REPO / "configs" / "default.yaml"
# The model and local work of the small runs: tiny for the correctness runs (resume, shared: the code path
# matters, not the size), small (C8, 5 cells) for the lanes' s/round.
SIZES = {
    "tiny": ["model.channels=4", "model.layers=2", "model.nodes=2", "model.stem_stride=2",
             "algorithm.local_steps=2", "algorithm.batch_size=16", "algorithm.query_batch_size=16", "eval.subset=200"],
    "small": ["model.channels=8", "model.layers=5", "model.nodes=4", "model.stem_stride=1",
              "algorithm.local_steps=5", "algorithm.batch_size=64", "algorithm.query_batch_size=64",
              "eval.subset=2000"],
}
# The default search (configs/default.yaml) for 3 rounds: its schedule (hard from half the rounds) makes
# rounds 1-2 sparse soft top-2 and round 3 hard, so round 2 and round 3 are one warm round of each half.
DEFAULT_ROUNDS = 3
# The captured variant: `runtime.capture` (being added on another branch) on top of the batched one.
CAPTURE_OVERRIDES = ["runtime.capture=compile", "runtime.client_batch=10"]
CONSOLE_ROUND = re.compile(r"round\s+(\d+)/\d+ .*local ([0-9.]+)s comm ([0-9.]+)s eval ([0-9.]+)s")


class RunTimeout(SectionTimeout):
    """A run killed at the section's deadline, with the rounds its console had reported."""

    def __init__(self, rounds: list[dict[str, float]]) -> None:
        super().__init__(f"a run outlived the budget after {len(rounds)} round(s)")
        self.rounds = rounds


def run_overrides(device: str, size: str, out_dir: Path, name: str, rounds: int = 3) -> list[str]:
    """A FedMetaNAS search on Fashion-MNIST, 8 clients, `rounds` rounds, deterministic, in out_dir/name."""
    return ["data.name=fashion_mnist", f"data.root={REPO / 'data'}", "federated.num_clients=8",
            f"federated.rounds={rounds}", "federated.seed=5", *SIZES[size], "algorithm.inner_steps=1",
            "eval.final_full=false", "personalize.steps=0", f"runtime.device={device}", "runtime.deterministic=true",
            f"output.dir={out_dir}", f"output.name={name}", "--overwrite"]


def launch(args: list[str], deadline: Deadline, ranks: int = 1) -> Bounded:
    """`gpu_runs.py one-run ARGS` under mpirun if ranks > 1, bounded by the section's deadline; a run that
    fails raises RuntimeError with its last words, one that outlives the deadline SectionTimeout."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "one-run", *args]
    if ranks > 1:
        cmd = [str(MPIRUN), "-np", str(ranks), *cmd]
    done = run_bounded(cmd, deadline)
    if done.timed_out:
        raise RunTimeout(console_rounds(done.stderr))
    if done.returncode != 0:
        raise RuntimeError(f"run failed ({done.returncode}): {done.stderr.strip()[-1500:]}")
    return done


def one_run(args: list[str]) -> int:
    """Subprocess body: run the simulator like `launch/main.py`, then print this rank's peak memory."""
    import torch  # noqa: PLC0415 - only the run's process needs it

    from fedmetanas.cli import main as cli_main  # noqa: PLC0415
    from fedmetanas.runtime import peak_memory_mib  # noqa: PLC0415

    code = cli_main(args)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_initialized() else torch.device("cpu")
    host, gpu = peak_memory_mib(device)
    print("PEAK " + json.dumps({"host_mib": host, "gpu_mib": gpu}), flush=True)
    return code


def console_rounds(stderr: str) -> list[dict[str, float]]:
    """The rounds a run's console reported (so a killed run still tells how far it got and how fast)."""
    return [{"round": int(m[1]), "local_s": float(m[2]), "comm_s": float(m[3]), "eval_s": float(m[4])}
            for m in CONSOLE_ROUND.finditer(stderr)]


def _peak(done: Bounded) -> dict[str, float]:
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("PEAK ")]
    return json.loads(lines[0][5:]) if lines else {}


def rounds_log(run_dir: Path) -> dict[str, list[float]]:
    """Per-round times, client batch and GPU memory from the run's HDF5 log."""
    import h5py  # noqa: PLC0415

    with h5py.File(run_dir / "trajectory.h5", "r") as f:
        g = f["rounds"]
        return {k: [float(v) for v in g[k][()].reshape(len(g[k]), -1).max(axis=1)]
                for k in ("time_round", "time_local", "client_batch", "memory_gpu_rank_mib") if k in g}


def _final(run_dir: Path) -> tuple[dict[str, Any], str]:
    import torch  # noqa: PLC0415

    saved = torch.load(run_dir / "supernet.pt", map_location="cpu", weights_only=False)
    return saved["state_dict"], (run_dir / "genotype.txt").read_text().strip()


def _alphas_equal(a: Path, b: Path) -> bool:
    import torch  # noqa: PLC0415

    (sa, ga), (sb, gb) = _final(a), _final(b)
    return ga == gb and all(torch.equal(sa[k], sb[k]) for k in sa if k.startswith(("alpha_", "beta_")))


def _all_equal(a: Path, b: Path) -> bool:
    import torch  # noqa: PLC0415

    (sa, ga), (sb, gb) = _final(a), _final(b)
    return ga == gb and sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def reference(ctx: SectionContext) -> Path:
    """The uninterrupted 1-rank, 1-lane tiny run that resume and shared compare with (run once per check:
    gpu_check clears out/runs when it starts)."""
    runs = ctx.out_dir / "runs"
    if not (runs / "reference" / "supernet.pt").exists():
        launch(run_overrides(ctx.device, "tiny", runs, "reference"), ctx.deadline)
    return runs / "reference"


def check_resume(ctx: SectionContext) -> dict[str, Any]:
    """The tiny run SIGKILLed once its first checkpoint lands, resumed: bit-identical to the uninterrupted run."""
    ref = reference(ctx)
    runs = ctx.out_dir / "runs"
    args = run_overrides(ctx.device, "tiny", runs, "killed")
    ctx.deadline.check("the run to kill")
    job = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "one-run", *args], cwd=REPO,
                           env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                           start_new_session=True)
    first = runs / "killed" / "checkpoints" / "round-000001.pt"
    while not first.exists() and job.poll() is None and ctx.deadline.left() > 0:
        time.sleep(0.05)
    killed_inside = job.poll() is None and first.exists()
    if job.poll() is None:
        os.killpg(job.pid, signal.SIGKILL)
    job.communicate()
    ctx.record["killed_inside_the_run"] = killed_inside
    ctx.deadline.check("the resumed run")
    launch([a for a in args if a != "--overwrite"] + ["--resume"], ctx.deadline)
    ctx.record["bit_identical"] = _all_equal(runs / "killed", ref)
    return {"status": "ok" if ctx.record["bit_identical"] and killed_inside else "failed"}


def check_shared(ctx: SectionContext) -> dict[str, Any]:
    """Two ranks on one GPU (gloo fallback; on a CPU two gloo ranks) against the one-rank reference run."""
    ref = reference(ctx)
    runs = ctx.out_dir / "runs"
    extra = ["runtime.devices=[0,0]"] if ctx.device == "cuda" else []
    done = launch(run_overrides(ctx.device, "tiny", runs, "shared") + extra, ctx.deadline, ranks=2)
    ctx.record["gloo_fallback_warned"] = "NCCL cannot put two ranks on one GPU" in done.stderr
    ctx.record["alphas_equal_to_1_rank"] = _alphas_equal(runs / "shared", ref)
    ok = ctx.record["alphas_equal_to_1_rank"] and (ctx.record["gloo_fallback_warned"] or ctx.device != "cuda")
    return {"status": "ok" if ok else "failed"}


def check_e2e(ctx: SectionContext) -> dict[str, Any]:
    """2-round runs with 1 and 4 lanes: s/round of the warm round 2, peak memory, alphas equal to 1 lane.

    Trimmed from 3 rounds and 1/2/4 lanes: lanes are not the lever (docs/gpu.md); this keeps their
    end-to-end equality and one timing."""
    runs = ctx.out_dir / "runs"
    size = "tiny" if ctx.quick else "small"
    for count in (1, 4):
        name = f"lanes{count}"
        ctx.deadline.check(name)
        done = launch(run_overrides(ctx.device, size, runs, name, rounds=2) + [f"runtime.streams_per_rank={count}"],
                      ctx.deadline)
        log = rounds_log(runs / name)
        ctx.record[name] = {"s_per_round": log["time_round"][-1], **_peak(done),
                            "alphas_equal_to_1_lane": _alphas_equal(runs / name, runs / "lanes1")}
    return {"status": "ok" if ctx.record["lanes4"]["alphas_equal_to_1_lane"] else "failed"}


def _default_search(ctx: SectionContext, name: str, extra: list[str]) -> dict[str, Any]:
    """configs/default.yaml on one rank for DEFAULT_ROUNDS rounds with `extra` overrides: s/round of its
    warm soft top-2 round (2) and hard round (3), and their mean (the search runs half of each)."""
    runs = ctx.out_dir / "runs"
    quick = ["algorithm.local_steps=2", "eval.subset=200"] if ctx.quick else []
    args = ["--config", str(DEFAULT_CONFIG), f"data.root={REPO / 'data'}", f"federated.rounds={DEFAULT_ROUNDS}",
            "eval.final_full=false", "personalize.steps=0", f"runtime.device={ctx.device}", *quick, *extra,
            f"output.dir={runs}", f"output.name={name}", "--overwrite"]
    ctx.record["overrides"] = [a for a in args if a.startswith(("runtime.", "algorithm.", "federated."))]
    try:
        done = launch(args, ctx.deadline)
    except RunTimeout as out_of_time:
        ctx.record["console_rounds"] = out_of_time.rounds  # how far it got, for the log; the table says timeout
        raise
    log = rounds_log(runs / name)
    soft, hard = log["time_round"][1], log["time_round"][2]
    ctx.record.update(s_per_round_by_round=log["time_round"], local_s_by_round=log["time_local"],
                      client_batch_by_round=log["client_batch"], gpu_mib_by_round=log.get("memory_gpu_rank_mib"),
                      s_per_round_soft_top2=soft, s_per_round_hard=hard, s_per_round=(soft + hard) / 2, **_peak(done))
    return {"status": "ok"}


def default_sequential(ctx: SectionContext) -> dict[str, Any]:
    """The default search, clients one after another (`runtime.client_batch=1`)."""
    return _default_search(ctx, "default_sequential", ["runtime.client_batch=1"])


def default_batched(ctx: SectionContext) -> dict[str, Any]:
    """The default search, its 10 clients as one batch (`runtime.client_batch=10`: what auto picks on a GPU
    whose memory holds them; explicit so that a CPU dry run takes the same path)."""
    return _default_search(ctx, "default_batched", ["runtime.client_batch=10"])


def default_captured(ctx: SectionContext) -> dict[str, Any]:
    """The default search batched and captured (`runtime.capture=compile`), where this checkout has it."""
    from fedmetanas.config import RuntimeConfig  # noqa: PLC0415

    if "capture" not in {f.name for f in dataclasses.fields(RuntimeConfig)}:
        return {"status": "unavailable",
                "why": "fedmetanas.config.RuntimeConfig has no `capture` field in this checkout"}
    return _default_search(ctx, "default_captured", CAPTURE_OVERRIDES)


if __name__ == "__main__":
    if sys.argv[1:2] != ["one-run"]:
        sys.exit(f"usage: {sys.argv[0]} one-run [fedmetanas arguments]")
    sys.exit(one_run(sys.argv[2:]))
