"""Ops per client meta-step and client-steps/s: clients one after another vs `runtime.client_batch` K.

For FedMetaNAS's dual learner on a supernet, in each relaxation of the shipped search (configs/default.yaml:
sparse soft top-2 for the first half of the rounds, hard for the second), measures side by side in one
process:

- **ops per client meta-step**: aten ops the PyTorch profiler records (every nested call counted), and on a
  GPU the CUDA kernels launched and their summed run time (GPU busy);
- **client-steps/s**: client meta-steps (support step + query step) per second of wall time.

A local update pays a set-up once (stacking the clients' tensors, optimizer state) and then `local_steps`
meta-steps, so each variant is run with 1 and with 2 meta-steps: the difference is the marginal meta-step,
and a figure is `marginal + set-up / local_steps` with the config's `local_steps` (30), as a round of the
shipped search pays it. Sequential clients run `FedMetaNAS.local_update` one after another on one replica
(what a lane does with `client_batch: 1`); batched ones `local_update_batch` on K clients at once.

Nets: `default` (configs/default.yaml's supernet on real Fashion-MNIST, 28x28, batch 32) and `paper`
(C16, 8 cells, 4 nodes, DARTS's 8 ops, 3x32x32 synthetic images, batch 64: op and kernel counts do not
depend on the pixels). The ops of a step do not depend on the resolution, so on a CPU, where a batched
step of the paper-size net would not fit in memory, its ops are counted at 8x8 and batch 16 and no
throughput is reported (`--paper-ops-only false` to time it). Not below batch 16: the CPU convolution
backend runs a grouped 1x1 convolution one group at a time on smaller batches (725 aten ops instead of 8).

    .venv/bin/python benchmarks/kernels.py [--nets default paper] [--batches 10 50] [--device cpu|cuda]
        [--modes soft_top2 hard soft_dense] [--no-ops] [--memory] [--budget-s S] [--json out.json] [--quick]

`--memory` (GPU) adds the peak memory of a batch of 1 and of 2 clients per net and relaxation: the bytes
one more batched client costs and the largest batch in 80% of the device (benchmarks/gpu_check.py's
paper section); `--budget-s` lets a caller with a time limit keep what was measured before it ran out.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from typing import Any, Callable

import torch
from torch.profiler import ProfilerActivity, profile

from fedmetanas.algorithms.common import LocalContext, copy_state
from fedmetanas.algorithms.fedmetanas import FedMetaNAS
from fedmetanas.algorithms.phases import build_supernet
from fedmetanas.configure import load_config
from fedmetanas.data.datasets import TensorSplit, load_dataset
from fedmetanas.federated.batching import MEMORY_SHARE, fit_client_batch
from fedmetanas.launcher import REPO
from fedmetanas.search.genotypes import resolve_primitives
from fedmetanas.search.supernet import ArchMasks, SuperNet

PER_CLIENT = 300
# The shipped search: soft top-2 then hard (50/50); configs/paper/*: dense soft (every op on every edge).
MODES = {"soft_top2": ("soft", 2), "hard": ("hard", 0), "soft_dense": ("soft", 0)}


@dataclasses.dataclass
class Net:
    name: str
    build: Callable[[], SuperNet]
    split: TensorSplit
    batch: int
    ops_only: bool


def synthetic(n: int, channels: int, size: int, classes: int = 10) -> TensorSplit:
    gen = torch.Generator().manual_seed(0)
    return TensorSplit(torch.randint(0, 256, (n, channels, size, size), generator=gen, dtype=torch.uint8),
                       torch.randint(0, classes, (n,), generator=gen), (0.5,) * channels, (0.25,) * channels,
                       num_classes=classes)


def contexts(net: Net, clients: int, mode: str, topk: int, device: torch.device, masks,  # noqa: ANN001
             tau: float = 1.0) -> list[LocalContext]:
    return [LocalContext(net.split, torch.arange(c * PER_CLIENT, (c + 1) * PER_CLIENT, device=device), masks, tau,
                         mode, torch.Generator().manual_seed(c), torch.Generator().manual_seed(1000 + c),
                         client_id=c, soft_topk=topk) for c in range(clients)]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn: Callable[[], None], device: torch.device, count_ops: bool, repeats: int) -> dict[str, float]:
    """Median wall seconds of `fn` over `repeats` calls (after a warm-up call), and with `count_ops` its
    aten ops (and CUDA kernels and their busy time) under the profiler, in one more call."""
    fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        t = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t)
    out = {"s": statistics.median(times)}
    if count_ops:
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=acts) as prof:
            fn()
            synchronize(device)
        events = prof.events()
        out["ops"] = sum(1 for e in events if e.name.startswith("aten::"))
        kernels = [e for e in events if str(getattr(e, "device_type", "")).endswith("CUDA")]
        out["kernels"] = len(kernels)
        out["busy_s"] = sum(e.time_range.elapsed_us() for e in kernels) / 1e6
    return out


def per_client_step(one: dict[str, float], two: dict[str, float], clients: int, local_steps: int) -> dict[str, float]:
    """Figures per client meta-step from runs of 1 and 2 meta-steps: marginal + set-up / local_steps."""
    out = {}
    for key in one:
        marginal = max(two[key] - one[key], 0.0)  # timing noise can make a difference negative
        setup = max(one[key] - marginal, 0.0)
        out[key] = (marginal + setup / local_steps) / clients
    return out


class OutOfTime(Exception):
    """`--budget-s` is spent: the figures measured so far are written with status `timeout`."""


def memory_per_client(net: Net, rule: Callable[[int], FedMetaNAS], glob: SuperNet, mode: str, topk: int,
                      device: torch.device, masks) -> dict[str, Any]:  # noqa: ANN001
    """Peak GPU memory of a batched local update of 1 and of 2 clients (2 meta-steps, so the optimizer
    state is held), the bytes one more client costs, and the largest batch that fits MEMORY_SHARE of the
    device: the probe `client_batch: auto` makes (fedmetanas/federated/batching.py), on this net alone."""
    if device.type != "cuda":
        return {"status": "unavailable", "why": "a CPU has no peak-memory counter to reset per batch"}
    peaks = {}
    for k in (1, 2):
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        rule(2).local_update_batch(glob, contexts(net, k, mode, topk, device, masks))
        torch.cuda.synchronize(device)
        peaks[k] = torch.cuda.max_memory_allocated(device)
    per_client = max(peaks[2] - peaks[1], 1)
    total = torch.cuda.get_device_properties(device).total_memory
    largest = fit_client_batch(per_client, peaks[1] - per_client, total, 10**9)
    return {"status": "ok", "peak_batch1_mib": peaks[1] / 2**20, "peak_batch2_mib": peaks[2] / 2**20,
            "per_client_mib": per_client / 2**20, "total_gib": total / 2**30, "share": MEMORY_SHARE,
            "largest_batch": largest}


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    deadline = time.time() + args.budget_s if args.budget_s else float("inf")
    cfg = load_config(str(REPO / "configs" / "default.yaml"))
    local_steps = cfg.algorithm.local_steps
    clients_max = max(args.batches + [2])
    nets = []
    if "default" in args.nets:
        train, _ = load_dataset("fashion_mnist", args.data_root, False)
        quick = args.quick
        nets.append(Net("default", lambda: build_supernet(cfg, 1, 10), train.to(device),
                        8 if quick else cfg.algorithm.batch_size, False))
    if "paper" in args.nets:
        ops_only = args.paper_ops_only if args.paper_ops_only is not None else device.type == "cpu"
        size, batch = (8, 16) if ops_only or args.quick else (32, 64)

        def paper() -> SuperNet:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                return SuperNet(3, 10, 16, 8, 4, resolve_primitives("darts"),
                                generator=torch.Generator().manual_seed(1))

        nets.append(Net("paper", paper, synthetic(clients_max * PER_CLIENT, 3, size).to(device), batch, ops_only))
    results: dict[str, Any] = {"device": str(device), "threads": torch.get_num_threads(), "local_steps": local_steps,
                               "count_ops": args.ops, "rows": [], "memory": [], "status": "ok"}
    try:
        for net in nets:
            measure_net(net, args, cfg, device, deadline, results)
    except OutOfTime:
        results["status"] = "timeout"
    return results


def load_state(model: SuperNet, path: str) -> tuple[ArchMasks, float]:
    """A run's checkpoint into `model` (weights and logits); its masks and its last round's temperature.

    Without it every op of every edge is a candidate (the first round); a search prunes most of them within
    its first rounds (configs/default.yaml at round 13: 12 and 10 of 63 ops kept), and a client computes
    only unpruned ops: the state makes the count the search's at that round."""
    state = torch.load(path, weights_only=False, map_location="cpu")
    model.load_state_dict(state["model"])
    masks = state["masks"]
    return ArchMasks(masks["ops"], masks["pairs"]), float(state["rows"][-1][1]["tau"])


def measure_net(net: Net, args: argparse.Namespace, cfg, device: torch.device, deadline: float,  # noqa: ANN001
                results: dict[str, Any]) -> None:
    """Every mode and variant of one net into `results` (rows, memory), stopping at `deadline`."""
    local_steps = cfg.algorithm.local_steps
    glob, worker, task = (net.build().to(device) for _ in range(3))
    masks, tau = glob.initial_masks(), 1.0
    if args.state and net.name == "default":
        masks, tau = load_state(glob, args.state)
        glob.to(device)
    for mode_name in args.modes:
        mode, topk = MODES[mode_name]

        def rule(steps: int) -> FedMetaNAS:
            return FedMetaNAS(dataclasses.replace(cfg.algorithm, local_steps=steps, batch_size=net.batch,
                                                  query_batch_size=net.batch))

        if args.memory:
            if time.time() > deadline:
                raise OutOfTime
            results["memory"].append({"net": net.name, "mode": mode_name,
                                      **memory_per_client(net, rule, glob, mode, topk, device, masks)})

        def sequential(steps: int, n: int = 2) -> Callable[[], None]:
            def go() -> None:
                r = rule(steps)
                for ctx in contexts(net, n, mode, topk, device, masks, tau):
                    copy_state(worker, glob)
                    r.local_update(worker, task, ctx)
            return go

        def batched(steps: int, k: int) -> Callable[[], None]:
            def go() -> None:
                rule(steps).local_update_batch(glob, contexts(net, k, mode, topk, device, masks, tau))
            return go

        variants = {"sequential": (2, sequential)}
        variants.update({f"batch {k}": (k, lambda s, k=k: batched(s, k)) for k in args.batches})
        rows = {}
        for name, (k, make) in variants.items():
            if time.time() > deadline:
                raise OutOfTime
            one = measure(make(1), device, args.ops, args.repeats)
            two = measure(make(2), device, args.ops, args.repeats)
            fig = per_client_step(one, two, k, local_steps)
            rows[name] = fig
            seq = rows["sequential"]  # measured first
            timed = not net.ops_only and fig["s"] > 0
            counted = args.ops and device.type == "cuda"
            results["rows"].append({  # at once: a budget that runs out later keeps this row
                "net": net.name, "mode": mode_name, "variant": name, "ops": fig.get("ops"),
                "ops_vs_sequential": fig["ops"] / seq["ops"] if args.ops else None,
                "kernels": fig["kernels"] if counted else None,
                "gpu_busy_ms": fig["busy_s"] * 1e3 if counted else None,
                "client_steps_per_s": 1.0 / fig["s"] if timed else None,
                "speed_vs_sequential": seq["s"] / fig["s"] if timed else None,
                "gpu_busy_share": fig["busy_s"] / fig["s"] if counted and fig["s"] > 0 else None})
            print(f"{net.name:8s} {mode_name:10s} {name:11s}"
                  + (f" ops/client-step {fig['ops']:9.0f}" if args.ops else "")
                  + (f"  kernels {fig['kernels']:7.0f}  GPU busy {fig['busy_s'] * 1e3:7.2f} ms"
                     if args.ops and device.type == "cuda" else "")
                  + (f"  client-steps/s {1.0 / fig['s']:8.2f}" if timed else ""), flush=True)


def table(results: dict[str, Any]) -> str:
    """The markdown table docs/batched.md keeps."""
    lines = ["| net | relaxation | variant | aten ops / client-step | vs sequential | client-steps/s | speed vs sequential |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in results["rows"]:
        cps = "-" if r["client_steps_per_s"] is None else f"{r['client_steps_per_s']:.2f}"
        speed = "-" if r["speed_vs_sequential"] is None else f"{r['speed_vs_sequential']:.2f}x"
        ops = "-" if r["ops"] is None else f"{r['ops']:.0f}"
        ratio = "-" if not r["ops_vs_sequential"] else f"1/{1 / r['ops_vs_sequential']:.1f}"
        lines.append(f"| {r['net']} | {r['mode']} | {r['variant']} | {ops} | {ratio} | {cps} | {speed} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nets", nargs="+", default=["default", "paper"], choices=["default", "paper"])
    p.add_argument("--batches", type=int, nargs="+", default=[10, 50], help="client_batch values")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3, help="timed calls per variant (median)")
    p.add_argument("--data-root", default=str(REPO / "data"))
    p.add_argument("--paper-ops-only", type=lambda v: v == "true", default=None,
                   help="true/false: count the paper-size net's ops at batch 2, 8x8 only (default: on a CPU)")
    p.add_argument("--quick", action="store_true", help="small batches (a dry run of the script)")
    p.add_argument("--modes", nargs="+", default=["soft_top2", "hard"], choices=list(MODES),
                   help="relaxations to measure (default: the shipped search's two)")
    p.add_argument("--no-ops", dest="ops", action="store_false",
                   help="time only: no profiler pass (aten ops, CUDA kernels, GPU busy)")
    p.add_argument("--memory", action="store_true",
                   help="on a GPU, peak memory of a batch of 1 and 2 clients: bytes per client, largest batch")
    p.add_argument("--budget-s", type=float, default=0.0,
                   help="stop starting new measurements after this many seconds; what was measured is "
                        "written with status timeout (0: no budget)")
    p.add_argument("--state", help="a run's checkpoint (round-NNNNNN.pt) for the default net: its weights, logits, "
                                    "masks and temperature instead of the first round's")
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = run(args)
    print(table(results))
    for m in results["memory"]:
        if m["status"] == "ok":
            print(f"{m['net']} {m['mode']}: {m['per_client_mib']:.0f} MiB per batched client, largest batch "
                  f"{m['largest_batch']} in {m['share']:.0%} of {m['total_gib']:.0f} GiB", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
