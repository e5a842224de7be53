"""The captured step (`runtime.capture`) against eager: compile time, steady ms per client-step, ops, s/round.

Two parts, printed side by side with ratios (compiled / eager):

- **steps** (in this process, one thread): a client's local update one after another, as a lane runs it —
  FedMetaNAS's dual learner on configs/default.yaml's supernet under each relaxation of the shipped search
  (sparse soft top-2, hard; captured unit `op`), FedAvg on the CNN and on DARTS_V2 (unit `fixed`), and with
  `--batches K` the same K clients at once (units `stacked_op`, `fixed_batched`). For each: the first call
  (an update of one client-step: compile time is `first - steady`), the steady seconds per client-step (a
  client's local step: a meta-step, support and query, for the search; an SGD step for FedAvg)
  (median of `--repeats` updates of `--steps` client-steps, after a warm-up), the aten ops the profiler
  records per client-step (nested calls counted) and the kernels inductor generated that ran (`cpp_fused_*`
  on a CPU, `triton_*` on a GPU, with their CUDA launches), and the graphs the unit compiled so far.
- **runs** (`--runs`): short real runs (`launch/main.py`, `federated.rounds=3`, `mpirun -np 2`) of the
  default search and of FedAvg on DARTS_V2, eager and compiled: local seconds of round 1 (which pays the
  compilation) and the mean of rounds 2-3, and the graphs rank 0 compiled over the run.

Inductor's caches live in a fresh folder per variant unless `--warm-cache` (a first run on a machine pays
the cold compile; a later run of the same shapes finds its kernels on disk and pays far less).

    .venv/bin/python benchmarks/capture.py [--cases search fedavg] [--batches 10] [--runs] [--json out.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import h5py
import numpy as np
import torch
import torch._inductor.config
from torch.profiler import ProfilerActivity, profile

from fedmetanas.algorithms.base import ModelInputs
from fedmetanas.algorithms.common import LocalContext, copy_state
from fedmetanas.algorithms.fedavg import FedAvgLocal
from fedmetanas.algorithms.fedmetanas import FedMetaNAS
from fedmetanas.algorithms.phases import build_fixed, build_supernet, parse_architecture
from fedmetanas.configure import load_config
from fedmetanas.data.datasets import load_dataset
from fedmetanas.launcher import REPO, launch
from fedmetanas.runtime import configure_determinism

PER_CLIENT = 300
MODES = {"soft_top2": ("soft", 2), "hard": ("hard", 0)}  # the shipped search: soft top-2 then hard


def _fresh_cache() -> None:
    """Point inductor at an empty cache folder (and the FX graph cache with it): a cold compile."""
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="capture-bench-inductor-")


@dataclasses.dataclass
class Case:
    name: str
    unit: str
    clients: int  # stepped together (1: one after another)
    update: Callable[[int, str, int], None]  # (local steps, capture mode, clients) -> runs the local update(s)


def contexts(split: Any, clients: int, masks: Any, mode: str, topk: int, capture: str,  # noqa: ANN401
             channels_last: bool) -> list[LocalContext]:
    """Client c: rows [c * PER_CLIENT, (c + 1) * PER_CLIENT) of `split` (on its device), CPU generators."""
    device = split.images.device
    return [LocalContext(split, torch.arange(c * PER_CLIENT, (c + 1) * PER_CLIENT, device=device), masks, 1.0, mode,
                         torch.Generator().manual_seed(c), torch.Generator().manual_seed(1000 + c),
                         channels_last=channels_last, client_id=c, soft_topk=topk, capture=capture)
            for c in range(clients)]


def cases(args: argparse.Namespace, device: torch.device) -> list[Case]:
    """What a run of configs/default.yaml computes: its nets in its memory format (`model.channels_last`), under
    its determinism switches (`runtime.deterministic`: inductor compiles other kernels under them)."""
    cfg = load_config(str(REPO / "configs" / "default.yaml"))
    configure_determinism(cfg.runtime.deterministic)
    last = cfg.model.channels_last
    fmt = torch.channels_last if last else torch.contiguous_format
    train = load_dataset("fashion_mnist", args.data_root, False)[0].to(device)
    out: list[Case] = []
    if "search" in args.cases:
        nets = tuple(build_supernet(cfg, 1, 10).to(device, memory_format=fmt) for _ in range(3))
        masks = nets[0].initial_masks()
        for mode_name, (mode, topk) in MODES.items():
            def update(steps: int, capture: str, k: int, mode: str = mode, topk: int = topk,
                       nets: tuple[Any, ...] = nets) -> None:
                glob, worker, task = nets
                rule = FedMetaNAS(dataclasses.replace(cfg.algorithm, local_steps=steps))
                ctxs = contexts(train, k, masks, mode, topk, capture, last)
                if k > 1:
                    rule.local_update_batch(glob, ctxs)
                    return
                copy_state(worker, glob)
                rule.local_update(worker, task, ctxs[0])
            out += [Case(f"default search {mode_name}", "op", 1, update)] if not args.batched_only else []
            out += [Case(f"default search {mode_name}", "stacked_op", k, update) for k in args.batches]
    if "fedavg" in args.cases:
        for arch in ("cnn", "darts_v2"):
            fcfg = load_config(str(REPO / "configs" / "default.yaml"), ["algorithm.name=fedavg",
                                                                         f"fedavg.architecture={arch}"])
            net, worker = (build_fixed(fcfg, parse_architecture(arch), ModelInputs(1, 10, 28)).to(
                device, memory_format=fmt) for _ in range(2))

            def update(steps: int, capture: str, k: int, net: Any = net, worker: Any = worker,  # noqa: ANN401
                       fcfg: Any = fcfg) -> None:  # noqa: ANN401
                rule = FedAvgLocal(dataclasses.replace(fcfg.fedavg, local_steps=steps))
                ctxs = contexts(train, k, None, "expected", 0, capture, last)
                if k > 1:
                    rule.local_update_batch(net, ctxs)
                    return
                copy_state(worker, net)
                rule.local_update(worker, None, ctxs[0])
            out += [Case(f"fedavg {arch}", "fixed", 1, update)] if not args.batched_only else []
            out += [Case(f"fedavg {arch}", "fixed_batched", k, update) for k in args.batches]
    return out


def count_ops(fn: Callable[[], None], device: torch.device) -> dict[str, float]:
    """Aten ops (nested calls counted), inductor kernels and CUDA launches of one call of `fn`."""
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    events = prof.events()
    return {"ops": sum(1 for e in events if e.name.startswith("aten::")),
            "fused": sum(1 for e in events if re.search(r"cpp_fused|triton_", e.name)),
            "launches": sum(1 for e in events if str(getattr(e, "device_type", "")).endswith("CUDA"))}


def measure(case: Case, args: argparse.Namespace, device: torch.device) -> dict[str, dict[str, float]]:
    """First call, steady seconds and ops per client-step of `case`, eager (`off`) and `compile`; the timed
    updates alternate between the two, so a change in the machine's load falls on both alike."""
    from fedmetanas import capture as cap  # noqa: PLC0415

    k, modes = case.clients, ("off", *args.modes)
    per_update = lambda steps: steps * k  # noqa: E731 - client-steps of one update
    def graphs(mode: str) -> int:  # what the process's one instance of the unit compiled so far
        unit = cap._UNITS.get((case.unit, mode))
        return unit.graphs if unit is not None else 0

    before = {mode: graphs(mode) for mode in modes}  # count this case's graphs only
    sync = lambda: torch.cuda.synchronize(device) if device.type == "cuda" else None  # noqa: E731
    fig: dict[str, dict[str, float]] = {}
    for mode in modes:
        t = time.perf_counter()
        case.update(1, mode, k)
        sync()
        fig[mode] = {"first_s": time.perf_counter() - t}
        case.update(1, mode, k)  # a second warm-up: a backward compiled at its first use is compiled now
    times: dict[str, list[float]] = {mode: [] for mode in modes}
    for _ in range(args.repeats):
        for mode in modes:
            sync()
            t = time.perf_counter()
            case.update(args.steps, mode, k)
            sync()
            times[mode].append((time.perf_counter() - t) / per_update(args.steps))
    for mode in modes:
        steady = statistics.median(times[mode])
        one, two = (count_ops(lambda s=s: case.update(s, mode, k), device) for s in (1, 2))
        fig[mode].update({key: (two[key] - one[key]) / per_update(1) for key in one})  # marginal: no set-up
        fig[mode].update({"steady_ms": steady * 1e3, "compile_s": max(fig[mode]["first_s"] - steady * per_update(1), 0.0),
                          "graphs": graphs(mode) - before[mode]})
    return fig


def steps_part(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    rows = []
    for case in cases(args, device):
        if not args.warm_cache:
            _fresh_cache()
        fig = measure(case, args, device)
        e = fig["off"]
        for mode in args.modes:
            c = fig[mode]
            row = {"case": case.name, "unit": case.unit, "clients": case.clients, "mode": mode, "eager": e,
                   "compile": c, "speed": e["steady_ms"] / c["steady_ms"], "ops_ratio": c["ops"] / e["ops"],
                   "break_even_steps": (c["compile_s"] / ((e["steady_ms"] - c["steady_ms"]) / 1e3)
                                        if e["steady_ms"] > c["steady_ms"] else float("inf"))}
            rows.append(row)
            launches = f", {e['launches']:.0f} -> {c['launches']:.0f} CUDA launches" if device.type == "cuda" else ""
            print(f"{case.name:24s} {case.unit:13s} K={case.clients:<3d} eager {e['steady_ms']:8.2f} ms/client-step "
                  f"{e['ops']:7.0f} ops | {mode} {c['steady_ms']:8.2f} ms {c['ops']:6.0f} ops + {c['fused']:5.0f} "
                  f"fused{launches}, first call {c['first_s']:6.1f} s, {c['graphs']} graphs | speed {row['speed']:.2f}x, "
                  f"break-even after {row['break_even_steps']:.0f} client-steps", flush=True)
    return rows


RUNS = {"default search": [], "fedavg darts_v2": ["algorithm.name=fedavg", "fedavg.architecture=darts_v2"]}


def runs_part(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    out = Path(tempfile.mkdtemp(prefix="capture-bench-runs-"))
    for name, extra in RUNS.items():
        fig = {}
        for mode in ("off", *args.modes):
            if not args.warm_cache:
                _fresh_cache()
            run = f"{name.replace(' ', '-')}-{mode}"
            proc = launch(["--config", str(REPO / "configs" / "default.yaml"), f"output.dir={out}", f"output.name={run}",
                           "federated.rounds=3", f"data.root={args.data_root}", f"runtime.capture={mode}",
                           f"runtime.device={args.device}", "eval.final_full=false", "personalize.steps=0", *extra],
                          np=args.np, timeout=3600)
            if proc.returncode != 0:
                raise RuntimeError(f"{run} failed:\n{proc.stderr[-3000:]}")
            with h5py.File(out / run / "trajectory.h5", "r") as f:
                local = f["rounds/time_local"][()]
            graphs = re.search(r"captured step: (\d+) graphs compiled on rank 0", proc.stderr)
            fig[mode] = {"round1_s": float(local[0]), "rounds23_s": float(np.mean(local[1:])),
                         "graphs_rank0": int(graphs.group(1)) if graphs else 0}
        e = fig["off"]
        for mode in args.modes:
            c = fig[mode]
            rows.append({"run": name, "mode": mode, "eager": e, "compile": c,
                         "speed_rounds23": e["rounds23_s"] / c["rounds23_s"]})
            print(f"{name:18s} local s/round, round 1: eager {e['round1_s']:6.1f} {mode} {c['round1_s']:6.1f}; "
                  f"rounds 2-3: eager {e['rounds23_s']:6.2f} {mode} {c['rounds23_s']:6.2f} "
                  f"({rows[-1]['speed_rounds23']:.2f}x); graphs on rank 0: {c['graphs_rank0']}", flush=True)
    return rows


def table(results: dict[str, Any]) -> str:
    """The markdown tables docs/batched.md keeps."""
    lines = ["| case | unit | clients | mode | eager ms / client-step | captured | speed | aten ops eager -> captured "
             "(+ fused kernels) | first call (compile) | graphs | break-even |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results.get("steps", []):
        e, c = r["eager"], r["compile"]
        lines.append(f"| {r['case']} | `{r['unit']}` | {r['clients']} | {r['mode']} | {e['steady_ms']:.1f} | "
                     f"{c['steady_ms']:.1f} | "
                     f"{r['speed']:.2f}x | {e['ops']:.0f} -> {c['ops']:.0f} (+{c['fused']:.0f}) | "
                     f"{c['first_s']:.0f} s | {c['graphs']} | "
                     + ("never" if not np.isfinite(r["break_even_steps"]) else f"{r['break_even_steps']:.0f} client-steps")
                     + " |")
    if results.get("runs"):
        lines += ["", f"| run (3 rounds, {results['np']} ranks) | mode | local s, round 1: eager | captured | "
                  "rounds 2-3: eager | captured | speed | graphs (rank 0) |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in results["runs"]:
            e, c = r["eager"], r["compile"]
            lines.append(f"| {r['run']} | {r['mode']} | {e['round1_s']:.1f} | {c['round1_s']:.1f} | {e['rounds23_s']:.2f} | "
                         f"{c['rounds23_s']:.2f} | {r['speed_rounds23']:.2f}x | {c['graphs_rank0']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", nargs="*", default=["search", "fedavg"], choices=["search", "fedavg"])
    p.add_argument("--batches", type=int, nargs="*", default=[], help="also K clients at once (client_batch K)")
    p.add_argument("--batched-only", action="store_true", help="only the K-client cases of --batches")
    p.add_argument("--steps", type=int, default=5, help="local steps of a timed update")
    p.add_argument("--repeats", type=int, default=5, help="timed updates per variant (median)")
    p.add_argument("--runs", action="store_true", help="also 3-round real runs (mpirun -np --np)")
    p.add_argument("--np", type=int, default=2, help="ranks of the real runs")
    p.add_argument("--warm-cache", action="store_true", help="reuse inductor's on-disk caches (default: cold)")
    p.add_argument("--modes", nargs="+", default=None, choices=["compile", "graphs"],
                   help="captured modes beside eager (default: compile, and graphs on CUDA; graphs on a CPU is a dry "
                        "run: inductor skips CUDA graphs for CPU tensors)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--data-root", default=str(REPO / "data"))
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch._inductor.config.cpp.enable_kernel_profile = True  # fused kernels appear in the profiler
    device = torch.device(args.device)
    args.modes = args.modes or (["compile", "graphs"] if device.type == "cuda" else ["compile"])
    results: dict[str, Any] = {"device": str(device), "threads": torch.get_num_threads(), "np": args.np,
                               "date": time.strftime("%Y-%m-%d"), "steps": steps_part(args, device) if args.cases else []}
    if args.runs:
        results["runs"] = runs_part(args)
    print(table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
