"""gpu_check's in-process sections: the device, lanes equal, syncs per step, the paper-size step on lanes.

FedMetaNAS clients on synthetic tensors (a TensorSplit of random pixels), run through the simulator's own
lanes (`federated.executor`): no data set and no run directory. Each function takes a SectionContext
(benchmarks/gpu_common.py) and returns its figures; a long one records as it goes and checks its deadline
between units of work.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import torch

from fedmetanas.runtime import configure_determinism

configure_determinism(True)  # before any CUDA work: cuBLAS reads its workspace setting once

from fedmetanas.algorithms.fedmetanas import FedMetaNAS, LocalContext, copy_state  # noqa: E402
from fedmetanas.config import AlgorithmConfig  # noqa: E402
from fedmetanas.data.datasets import TensorSplit  # noqa: E402
from fedmetanas.federated.aggregation import add_weighted, aggregated_tensors, numel  # noqa: E402
from fedmetanas.federated.executor import ClientExecutor, close_executors, make_executors, run_clients  # noqa: E402
from fedmetanas.runtime import count_syncs, peak_memory_mib, synchronize  # noqa: E402
from fedmetanas.search.genotypes import METANAS_PRIMITIVES  # noqa: E402
from fedmetanas.search.supernet import SuperNet  # noqa: E402

from gpu_common import SectionContext  # noqa: E402


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


def torch_device(ctx: SectionContext) -> torch.device:
    """The section's device: GPU 0 of what this process sees (bound as current), or the CPU."""
    if ctx.device != "cuda":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("--device cuda but no GPU is visible; use --device cpu --quick for a dry run")
    torch.cuda.set_device(0)
    return torch.device("cuda", 0)


def device_info(ctx: SectionContext) -> dict[str, Any]:
    """What ran the check: GPU name and memory, or the CPU's model; torch and CUDA versions."""
    out: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda, "threads": torch.get_num_threads()}
    if ctx.device == "cuda":
        dev = torch_device(ctx)
        props = torch.cuda.get_device_properties(dev)
        out.update(device_type="cuda", device=props.name, gpus=torch.cuda.device_count(),
                   total_memory_gib=props.total_memory / 2**30)
    else:
        model = next((ln.split(":", 1)[1].strip() for ln in _cpuinfo() if ln.startswith("model name")), "unknown CPU")
        out.update(device_type="cpu", device=f"CPU: {model}", cores=_cores())
    return out


def _cpuinfo() -> list[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return f.read().splitlines()
    except OSError:
        return []


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


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


def check_lanes(ctx: SectionContext) -> dict[str, Any]:
    """1 lane vs 4 under the deterministic switch: torch.equal in every repeat, hard and soft."""
    device = torch_device(ctx)
    net, clients = (TINY, 4) if ctx.quick else (SMALL, 8)
    work = Workload(net, device, clients)
    one, four = lanes(1, net, device), lanes(4, net, device)
    try:
        for mode in ("hard", "soft"):
            reference = work.run(one, mode)[0]
            equal = 0
            for i in range(ctx.repeats):
                ctx.deadline.check(f"{mode} repeat {i + 1}")
                equal += bool(torch.equal(work.run(four, mode)[0], reference))
                ctx.record[mode] = {"equal": equal, "repeats": i + 1}
            free = work.run(four, mode, deterministic=False)[0]
            ctx.record[mode] = {**ctx.record[mode], "free_schedule_max_abs_diff": float((free - reference).abs().max())}
    finally:
        close_executors(one + four)
    ok = all(ctx.record[m]["equal"] == ctx.record[m]["repeats"] for m in ("hard", "soft"))
    return {"status": "ok" if ok else "failed"}


def check_syncs(ctx: SectionContext) -> dict[str, Any]:
    """Host-device syncs per local step of one client (target <= 2), lane setup excluded."""
    device = torch_device(ctx)
    for name, net in (("small", TINY if ctx.quick else SMALL), ("paper", TINY if ctx.quick else PAPER)):
        work, one = Workload(net, device, 1), lanes(1, net, device)
        for mode in ("hard", "soft"):
            ctx.deadline.check(f"{name}/{mode}")
            work.run(one, mode, local_steps=1)  # warm-up: CUDA and cuDNN initialise lazily
            synchronize(device)
            with count_syncs(device) as syncs:
                _, steps = work.run(one, mode, local_steps=3)
            synchronize(device)
            ctx.record[f"{name}/{mode}"] = round(syncs.count / steps, 2)
        close_executors(one)
    return {"status": "ok" if all(v <= 2 for v in ctx.record.values()) else "failed"}


def check_step(ctx: SectionContext) -> dict[str, Any]:
    """ms per local step of the paper-size supernet (dense soft), 1 vs 4 lanes, deterministic on and off.

    Trimmed to one wave of 4 clients, 1 local step each after a warm-up, the lanes built once for both
    switches: lanes were measured not to pay at this size (0.86x on an H200, docs/gpu.md), so this
    section confirms, it does not explore."""
    device = torch_device(ctx)
    net, clients = (TINY, 4) if ctx.quick else (PAPER, 4)
    work = Workload(net, device, clients)
    ctx.record.update(net=dataclasses.asdict(net), clients=clients)
    built = {count: lanes(count, net, device) for count in (1, 4)}
    try:
        for deterministic in (True, False):
            configure_determinism(deterministic)
            for count, executors in built.items():
                key = f"{'det' if deterministic else 'free'}/lanes{count}"
                ctx.deadline.check(key)
                work.run(executors, "soft", local_steps=1, deterministic=deterministic, clients=count)  # warm-up
                synchronize(device)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                start = time.perf_counter()
                _, steps = work.run(executors, "soft", local_steps=1, deterministic=deterministic)
                synchronize(device)
                seconds = time.perf_counter() - start
                ctx.record[key] = {"ms_per_step": 1000 * seconds / steps, "clients_per_s": clients / seconds,
                                   "gpu_mib": peak_memory_mib(device)[1]}
    finally:
        configure_determinism(True)
        close_executors(built[1] + built[4])
    rec = ctx.record
    for mode in ("det", "free"):
        rec[f"{mode}/speedup"] = rec[f"{mode}/lanes1"]["ms_per_step"] / rec[f"{mode}/lanes4"]["ms_per_step"]
    rec["determinism_cost"] = rec["det/lanes1"]["ms_per_step"] / rec["free/lanes1"]["ms_per_step"]
    return {"status": "ok"}
