"""The GPU check's measurements (issue 13): lanes equal, syncs per step, step time, end-to-end runs.

Run by `benchmarks/gpu_check.sh` after `pytest -m gpu`; prints a summary table and writes every figure
to OUT/gpu_check.json (what docs/scaling.md quotes). Needs no network: the end-to-end runs read the
Fashion-MNIST that `make data` wrote to data/, the timings use synthetic tensors.

    .venv/bin/python benchmarks/gpu_check.py [--out runs/gpu_check] [--device cuda]
    .venv/bin/python benchmarks/gpu_check.py --device cpu --quick      # a dry run of every section on a CPU

Sections (each is timed and may fail without stopping the others):
  lanes     1 vs 4 lanes, `runtime.deterministic` on: torch.equal in each of --repeats rounds
  syncs     host-device syncs per local step (hard and soft Gumbel), counted by CUDA's sync debug mode
  step      ms per local step of the paper-size supernet (C=16, 8 cells x 4 nodes, batch 64, 32x32, soft)
            with 1 and 4 lanes, deterministic on and off: lanes speed-up, clients/s, GPU memory
  e2e       3-round runs of launch/main.py with 1, 2 and 4 lanes: s/round, GPU memory, alphas equal
  shared    two ranks on one GPU (gloo fallback) against the one-rank run: alphas equal
  resume    the 1-lane run killed after its first checkpoint and resumed: equal to the uninterrupted one
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

import torch

from fedmetanas.runtime import configure_determinism

configure_determinism(True)  # before any CUDA work: cuBLAS reads its workspace setting once

from fedmetanas.algorithms.fedmetanas import FedMetaNAS, LocalContext, copy_state
from fedmetanas.config import AlgorithmConfig
from fedmetanas.data.datasets import TensorSplit
from fedmetanas.federated.aggregation import add_weighted, aggregated_tensors, numel
from fedmetanas.federated.executor import (
    ClientExecutor,
    close_executors,
    make_executors,
    run_clients,
)
from fedmetanas.runtime import count_syncs, peak_memory_mib, synchronize
from fedmetanas.search.genotypes import METANAS_PRIMITIVES
from fedmetanas.search.supernet import SuperNet

MPIRUN = REPO / "scripts" / "mpirun.sh"


@dataclasses.dataclass(frozen=True)
class Net:
    """A supernet size and the synthetic batches it is fed."""

    channels: int
    layers: int
    nodes: int
    size: int
    in_channels: int
    batch: int


PAPER = Net(channels=16, layers=8, nodes=4, size=32, in_channels=3, batch=64)
SMALL = Net(channels=8, layers=3, nodes=3, size=16, in_channels=1, batch=32)
TINY = Net(channels=4, layers=2, nodes=2, size=8, in_channels=1, batch=8)


# -- in-process pieces: lanes of FedMetaNAS clients on synthetic data -------------------------------


def build(net: Net, device: torch.device) -> SuperNet:
    """The same initial supernet every call (seeded, built on the CPU, then moved)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = SuperNet(net.in_channels, 10, net.channels, net.layers, net.nodes, METANAS_PRIMITIVES,
                         alpha_init_std=0.1, generator=torch.Generator().manual_seed(0))
    return model.to(device)


def synthetic(net: Net, device: torch.device, clients: int) -> TensorSplit:
    g = torch.Generator().manual_seed(7)
    n = 4 * net.batch * clients
    images = torch.randint(0, 256, (n, net.in_channels, net.size, net.size), generator=g, dtype=torch.uint8)
    return TensorSplit(images, torch.randint(0, 10, (n,), generator=g), (0.5,) * net.in_channels,
                       (0.25,) * net.in_channels, 10).to(device)


def lanes(count: int, net: Net, device: torch.device) -> list[ClientExecutor]:
    """`count` lanes: streams on a GPU; on a CPU threads without streams (make_executors gives one there)."""
    n = numel(aggregated_tensors(build(net, device)))
    if device.type == "cuda":
        return make_executors(count, lambda: build(net, device), n, device)
    return [ClientExecutor(build(net, device), build(net, device), torch.zeros(n, dtype=torch.float64))
            for _ in range(count)]


class Workload:
    """One round's FedMetaNAS clients from one global model on synthetic data, set up outside any timing."""

    def __init__(self, net: Net, device: torch.device, clients: int) -> None:
        self.net, self.device, self.clients = net, device, clients
        self.global_net = build(net, device)
        self.split = synthetic(net, device, clients)
        self.masks = self.global_net.initial_masks()
        self.masks.on(device)  # the once-per-round copy
        self.idx = [torch.arange(c * 4 * net.batch, (c + 1) * 4 * net.batch, device=device) for c in range(clients)]
        synchronize(device)

    def run(self, executors: list[ClientExecutor], mode: str, local_steps: int = 2,
            deterministic: bool = True, clients: int | None = None) -> tuple[torch.Tensor, int]:
        """(sum of n * parameters over the clients, local steps run); the device's work is still queued."""
        algo = FedMetaNAS(AlgorithmConfig(local_steps=local_steps, inner_steps=1, batch_size=self.net.batch,
                                          query_batch_size=self.net.batch, grad_clip=5.0))
        count = self.clients if clients is None else clients
        steps = [0] * count

        def work(ex: ClientExecutor, cid: int) -> None:
            copy_state(ex.worker, self.global_net)
            ctx = LocalContext(self.split, self.idx[cid], self.masks, 1.0, mode,
                               torch.Generator().manual_seed(100 + cid), torch.Generator().manual_seed(200 + cid))
            steps[cid] = algo.local_update(ex.worker, ex.task, ctx).steps
            add_weighted(ex.buffer, aggregated_tensors(ex.worker), float(cid + 1))

        total = run_clients(executors, list(range(count)), work, threaded=len(executors) > 1,
                            deterministic=deterministic)
        return total, sum(steps)


def check_lanes(device: torch.device, quick: bool, repeats: int) -> dict[str, Any]:
    """1 lane vs 4 under the deterministic switch: torch.equal in every repeat."""
    net, clients = (TINY, 4) if quick else (SMALL, 8)
    work = Workload(net, device, clients)
    one, four = lanes(1, net, device), lanes(4, net, device)
    out: dict[str, Any] = {}
    for mode in ("hard", "soft"):
        reference = work.run(one, mode)[0]
        equal = [torch.equal(work.run(four, mode)[0], reference) for _ in range(repeats)]
        free = work.run(four, mode, deterministic=False)[0]
        out[mode] = {"equal": sum(equal), "repeats": repeats,
                     "free_schedule_max_abs_diff": float((free - reference).abs().max())}
    close_executors(one + four)
    out["ok"] = all(out[m]["equal"] == repeats for m in ("hard", "soft"))
    return out


def check_syncs(device: torch.device, quick: bool) -> dict[str, Any]:
    """Host-device syncs per local step of one client (target <= 2), lane setup excluded."""
    out: dict[str, Any] = {}
    for name, net in (("small", TINY if quick else SMALL), ("paper", TINY if quick else PAPER)):
        work, one = Workload(net, device, 1), lanes(1, net, device)
        for mode in ("hard", "soft"):
            work.run(one, mode, local_steps=1)  # warm-up: CUDA and cuDNN initialise lazily
            synchronize(device)
            with count_syncs(device) as syncs:
                _, steps = work.run(one, mode, local_steps=3)
            synchronize(device)
            out[f"{name}/{mode}"] = round(syncs.count / steps, 2)
    out["ok"] = all(v <= 2 for v in out.values())
    return out


def check_step(device: torch.device, quick: bool) -> dict[str, Any]:
    """ms per local step of the paper-size supernet, 1 vs 4 lanes, deterministic on and off."""
    net, clients = (TINY, 4) if quick else (PAPER, 8)
    work = Workload(net, device, clients)
    out: dict[str, Any] = {"net": dataclasses.asdict(net), "clients": clients}
    for deterministic in (True, False):
        configure_determinism(deterministic)
        for count in (1, 4):
            executors = lanes(count, net, device)
            work.run(executors, "soft", local_steps=1, deterministic=deterministic, clients=count)  # warm-up
            synchronize(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            start = time.perf_counter()
            _, steps = work.run(executors, "soft", deterministic=deterministic)
            synchronize(device)
            seconds = time.perf_counter() - start
            close_executors(executors)
            key = f"{'det' if deterministic else 'free'}/lanes{count}"
            out[key] = {"ms_per_step": 1000 * seconds / steps, "clients_per_s": clients / seconds,
                        "gpu_mib": peak_memory_mib(device)[1]}
    configure_determinism(True)
    for mode in ("det", "free"):
        out[f"{mode}/speedup"] = out[f"{mode}/lanes1"]["ms_per_step"] / out[f"{mode}/lanes4"]["ms_per_step"]
    out["determinism_cost"] = out["det/lanes1"]["ms_per_step"] / out["free/lanes1"]["ms_per_step"]
    out["ok"] = True
    return out


# -- runs of launch/main.py ---------------------------------------------------------------------


def run_overrides(device: str, quick: bool, out_dir: Path, name: str) -> list[str]:
    """A 3-round FedMetaNAS search on Fashion-MNIST sized to take seconds per round on one GPU."""
    model = ["model.channels=4", "model.layers=2", "model.nodes=2", "model.stem_stride=2"] if quick else [
        "model.channels=8", "model.layers=5", "model.nodes=4", "model.stem_stride=1"]
    return [
        "data.name=fashion_mnist", f"data.root={REPO / 'data'}", "federated.num_clients=8", "federated.rounds=3",
        "federated.seed=5", *model, f"algorithm.local_steps={2 if quick else 5}", "algorithm.inner_steps=1",
        f"algorithm.batch_size={16 if quick else 64}", f"algorithm.query_batch_size={16 if quick else 64}",
        f"eval.subset={200 if quick else 2000}", "eval.final_full=false", f"runtime.device={device}",
        "runtime.deterministic=true", f"output.dir={out_dir}", f"output.name={name}", "--overwrite",
    ]


def _env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "4"))


def launch(args: list[str], ranks: int = 1, timeout: float = 240, wait: bool = True) -> Any:
    """`gpu_check.py one-run ARGS` (launch/main.py in-process, then its peak memory), under mpirun if ranks > 1."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "one-run", *args]
    if ranks > 1:
        cmd = [str(MPIRUN), "-np", str(ranks), *cmd]
    if not wait:
        return subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, start_new_session=True)
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"run failed ({proc.returncode}): {proc.stderr.strip()[-1500:]}")
    return proc


def one_run(args: list[str]) -> int:
    """Subprocess body: run the simulator like `launch/main.py`, then print this rank's peak memory."""
    from fedmetanas.cli import main as cli_main  # noqa: PLC0415

    code = cli_main(args)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_initialized() else torch.device("cpu")
    host, gpu = peak_memory_mib(device)
    print("PEAK " + json.dumps({"host_mib": host, "gpu_mib": gpu}), flush=True)
    return code


def _peak(proc: subprocess.CompletedProcess) -> dict[str, float]:
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("PEAK ")]
    return json.loads(lines[0][5:]) if lines else {}


def _final(run_dir: Path) -> tuple[dict[str, torch.Tensor], str]:
    saved = torch.load(run_dir / "supernet.pt", map_location="cpu", weights_only=False)
    return saved["state_dict"], (run_dir / "genotype.txt").read_text().strip()


def _alphas_equal(a: Path, b: Path) -> bool:
    (sa, ga), (sb, gb) = _final(a), _final(b)
    return ga == gb and all(torch.equal(sa[k], sb[k]) for k in sa if k.startswith(("alpha_", "beta_")))


def _all_equal(a: Path, b: Path) -> bool:
    (sa, ga), (sb, gb) = _final(a), _final(b)
    return ga == gb and sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _seconds_per_round(run_dir: Path) -> float:
    import h5py  # noqa: PLC0415

    with h5py.File(run_dir / "trajectory.h5", "r") as f:
        times = f["rounds/time_round"][()]
    return float(times[1:].mean() if len(times) > 1 else times.mean())  # the first round warms up


def check_e2e(device: str, quick: bool, out_dir: Path) -> dict[str, Any]:
    """3-round runs with 1, 2 and 4 lanes: s/round, peak memory, alphas equal to the 1-lane run."""
    out: dict[str, Any] = {}
    for count in (1, 2, 4):
        name = f"lanes{count}"
        proc = launch(run_overrides(device, quick, out_dir, name) + [f"runtime.streams_per_rank={count}"])
        out[name] = {"s_per_round": _seconds_per_round(out_dir / name), **_peak(proc),
                     "alphas_equal_to_1_lane": _alphas_equal(out_dir / name, out_dir / "lanes1")}
    out["ok"] = all(out[f"lanes{c}"]["alphas_equal_to_1_lane"] for c in (2, 4))
    return out


def check_shared(device: str, quick: bool, out_dir: Path) -> dict[str, Any]:
    """Two ranks on one GPU (gloo fallback; on a CPU two gloo ranks) against the one-rank run."""
    extra = ["runtime.devices=[0,0]"] if device == "cuda" else []
    proc = launch(run_overrides(device, quick, out_dir, "shared") + extra, ranks=2)
    fallback = "NCCL cannot put two ranks on one GPU" in proc.stderr
    equal = _alphas_equal(out_dir / "shared", out_dir / "lanes1")
    return {"gloo_fallback_warned": fallback, "alphas_equal_to_1_rank": equal,
            "s_per_round": _seconds_per_round(out_dir / "shared"), "ok": equal and (fallback or device != "cuda")}


def check_resume(device: str, quick: bool, out_dir: Path) -> dict[str, Any]:
    """The 1-lane run SIGKILLed once its first checkpoint lands, resumed: equal to the uninterrupted run."""
    args = run_overrides(device, quick, out_dir, "killed")
    job = launch(args, wait=False)
    first = out_dir / "killed" / "checkpoints" / "round-000001.pt"
    deadline = time.time() + 240
    while not first.exists() and job.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    killed_in_run = job.poll() is None
    if killed_in_run:
        os.killpg(job.pid, signal.SIGKILL)
    job.communicate()
    launch([a for a in args if a != "--overwrite"] + ["--resume"])
    equal = _all_equal(out_dir / "killed", out_dir / "lanes1")
    return {"killed_inside_the_run": killed_in_run, "bit_identical": equal, "ok": equal and killed_in_run}


# -- driver -------------------------------------------------------------------------------------


def _timed(name: str, fn: Callable[[], dict[str, Any]], results: dict[str, Any]) -> None:
    start = time.perf_counter()
    try:
        results[name] = fn()
    except Exception as err:  # noqa: BLE001 - a failed section is reported, the others still run
        results[name] = {"ok": False, "error": f"{type(err).__name__}: {err}"[-600:]}
        traceback.print_exc()
    results[name]["seconds"] = round(time.perf_counter() - start, 1)
    print(f"[{name}] {'ok' if results[name].get('ok') else 'FAILED'} in {results[name]['seconds']} s", flush=True)


def summary(results: dict[str, Any]) -> str:
    """The table the shell script ends with."""
    rows = [("check", "result", "figures")]
    r = results
    if "device" in r:
        rows.append(("device", "", r["device"]))
    if "lanes" in r and "hard" in r["lanes"]:
        lanes_r = r["lanes"]
        rows.append(("lanes 1 vs 4 (deterministic)", _ok(lanes_r),
                     ", ".join(f"{m}: {lanes_r[m]['equal']}/{lanes_r[m]['repeats']} torch.equal" for m in ("hard", "soft"))))
    if "syncs" in r and "ok" in r["syncs"]:
        rows.append(("syncs per local step", _ok(r["syncs"]),
                     ", ".join(f"{k} {v}" for k, v in r["syncs"].items() if "/" in k)))
    if "step" in r and "det/lanes1" in r["step"]:
        s = r["step"]
        rows.append(("paper supernet step (soft)", _ok(s),
                     f"1 lane {s['det/lanes1']['ms_per_step']:.0f} ms, 4 lanes {s['det/lanes4']['ms_per_step']:.0f} ms "
                     f"(x{s['det/speedup']:.2f}); deterministic off x{s['free/speedup']:.2f}; "
                     f"cost of determinism x{s['determinism_cost']:.2f}; "
                     f"{s['det/lanes4']['clients_per_s']:.2f} clients/s; GPU {s['det/lanes4']['gpu_mib']:.0f} MiB"))
    if "e2e" in r and "lanes1" in r["e2e"]:
        e = r["e2e"]
        rows.append(("3-round runs, 1/2/4 lanes", _ok(e), "; ".join(
            f"{c}: {e[c]['s_per_round']:.2f} s/round, GPU {e[c].get('gpu_mib', 0):.0f} MiB"
            + ("" if c == "lanes1" else f", alphas equal {e[c]['alphas_equal_to_1_lane']}")
            for c in ("lanes1", "lanes2", "lanes4") if c in e)))
    if "shared" in r and "alphas_equal_to_1_rank" in r["shared"]:
        rows.append(("2 ranks on 1 GPU (gloo)", _ok(r["shared"]),
                     f"equal to 1 rank: {r['shared']['alphas_equal_to_1_rank']}, "
                     f"fallback warned: {r['shared']['gloo_fallback_warned']}"))
    if "resume" in r and "bit_identical" in r["resume"]:
        rows.append(("resume across a kill", _ok(r["resume"]), f"bit-identical: {r['resume']['bit_identical']}"))
    for name, res in r.items():
        if isinstance(res, dict) and "error" in res:
            rows.append((name, "FAILED", res["error"][:100]))
    width = [max(len(row[i]) for row in rows) for i in range(2)]
    return "\n".join(f"{a:<{width[0]}}  {b:<{width[1]}}  {c}" for a, b, c in rows)


def _ok(section: dict[str, Any]) -> str:
    return "ok" if section.get("ok") else "FAILED"


SECTIONS = ("lanes", "syncs", "step", "e2e", "shared", "resume")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["one-run"]:
        return one_run(argv[1:])
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--out", default=str(REPO / "runs" / "gpu_check"))
    p.add_argument("--quick", action="store_true", help="tiny sizes (a dry run of every section)")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--only", nargs="*", choices=SECTIONS, default=list(SECTIONS))
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            print("error: --device cuda but no GPU is visible; use --device cpu --quick for a dry run", file=sys.stderr)
            return 2
        device = torch.device("cuda", 0)
        torch.cuda.set_device(device)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                               "torch": torch.__version__, "quick": args.quick}
    runs = out_dir / "runs"
    plan: dict[str, Callable[[], dict[str, Any]]] = {
        "lanes": lambda: check_lanes(device, args.quick, args.repeats),
        "syncs": lambda: check_syncs(device, args.quick),
        "step": lambda: check_step(device, args.quick),
        "e2e": lambda: check_e2e(args.device, args.quick, runs),
        "shared": lambda: check_shared(args.device, args.quick, runs),  # needs e2e's lanes1 run
        "resume": lambda: check_resume(args.device, args.quick, runs),  # likewise
    }
    for name in SECTIONS:
        if name in args.only:
            _timed(name, plan[name], results)
            (out_dir / "gpu_check.json").write_text(json.dumps(results, indent=2))
    print()
    print(summary(results))
    failed = [n for n in SECTIONS if n in results and not results[n].get("ok")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
