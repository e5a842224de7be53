"""Clients per second: one client after another vs K clients stepped together (`runtime.client_batch`).

For each fixed-network workload, times a round's local work of `--clients` clients from the same global
model — sequentially on one replica (what a lane does with client_batch 1) and in batches of K through
torch.func — side by side in one process, interleaved, median of `--repeats`, and prints clients/s and
the ratio to sequential. The data are real Fashion-MNIST (`--data-root`, as `make data` leaves it); each
client draws its batches from its own 300 images.

Workloads: the FedAvg paper's CNN with 5 SGD steps of batch 32 (benchmarks/peers.py's), FedAvg on
DARTS_V2 as configs/fedavg.yaml trains it (8 channels, 3 cells, stem stride 2, 15 steps of 32),
Per-FedAvg on DARTS_V2 (the `algorithm` section's dual learner, as configs/default.yaml sets it), and
FedMetaNAS's dual learner on configs/default.yaml's supernet under the dense soft relaxation (every op,
each client its own Gumbel weights, tau 1; the batchable relaxation), with `--local-steps` meta-steps.

    .venv/bin/python benchmarks/clients_batched.py [--clients 10] [--batches 5 10] [--repeats 3] [--device cpu]
        [--workloads fedavg_cnn ...] [--json out.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from typing import Callable

import torch

from fedmetanas.algorithms.common import LocalContext, copy_state
from fedmetanas.algorithms.fedavg import FedAvgConfig, FedAvgLocal
from fedmetanas.algorithms.fedmetanas import FedMetaNAS
from fedmetanas.algorithms.phases import build_supernet
from fedmetanas.configure import load_config
from fedmetanas.data.datasets import load_dataset
from fedmetanas.search.discrete import CNN, DiscreteNet
from fedmetanas.search.genotypes import DARTS_V2
from fedmetanas.launcher import REPO

PER_CLIENT = 300


def contexts(train, clients: int, device: torch.device) -> list[LocalContext]:  # noqa: ANN001 - a TensorSplit
    """Each client's context. The generators are CPU ones on any device, as a run's are
    (`seeding.torch_generator`): the draws are made on the host and copied (a CUDA generator here made
    the soft-supernet workload crash on a GPU, passed to a CPU `torch.rand`)."""
    return [LocalContext(train, torch.arange(c * PER_CLIENT, (c + 1) * PER_CLIENT, device=device), None,
                         float("nan"), "expected", torch.Generator().manual_seed(c),
                         torch.Generator().manual_seed(1000 + c), client_id=c) for c in range(clients)]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=10, help="clients of a round on this lane")
    p.add_argument("--batches", type=int, nargs="+", default=[5, 10], help="client_batch values to time")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--data-root", default=str(REPO / "data"))
    p.add_argument("--workloads", nargs="+",
                   default=["fedavg_cnn", "fedavg_darts_v2", "perfedavg_darts_v2", "fedmetanas_soft"])
    p.add_argument("--local-steps", type=int, default=3, help="meta-steps of the soft-supernet workload")
    p.add_argument("--json", help="write the figures here (clients/s, s/round, ratio to sequential per variant)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    train, _ = load_dataset("fashion_mnist", args.data_root, False)
    train = train.to(device)
    fedavg_cfg = load_config(str(REPO / "configs" / "fedavg.yaml"))
    default_cfg = load_config(str(REPO / "configs" / "default.yaml"))
    m = fedavg_cfg.model

    def darts() -> torch.nn.Module:
        return DiscreteNet.from_genotype(DARTS_V2, 1, 10, m.channels, m.layers, m.stem_multiplier, None,
                                         m.stem_stride).to(device)

    def supernet() -> torch.nn.Module:
        return build_supernet(default_cfg, 1, 10).to(device)

    soft_rule = FedMetaNAS(dataclasses.replace(default_cfg.algorithm, local_steps=args.local_steps))
    workloads: dict[str, tuple[Callable[[], torch.nn.Module], object]] = {
        "fedavg_cnn": (lambda: CNN(1, 10, 28).to(device),
                       FedAvgLocal(FedAvgConfig(local_steps=5, batch_size=32, lr=fedavg_cfg.fedavg.lr))),
        "fedavg_darts_v2": (darts, FedAvgLocal(fedavg_cfg.fedavg)),
        "perfedavg_darts_v2": (darts, FedMetaNAS(default_cfg.algorithm)),
        "fedmetanas_soft": (supernet, soft_rule),
    }
    print(f"clients/s of one lane: {args.clients} clients, {args.device}, {args.threads} thread(s), "
          f"median of {args.repeats} (real Fashion-MNIST, {PER_CLIENT} images per client)")
    results: dict[str, object] = {"device": str(device), "clients": args.clients, "repeats": args.repeats,
                                  "threads": args.threads, "workloads": {}}
    for name in args.workloads:
        build, rule = workloads[name]
        torch.manual_seed(0)
        glob, worker, task = build(), build(), build()
        masks = glob.initial_masks() if hasattr(glob, "initial_masks") else None

        def contexts_of() -> list[LocalContext]:
            ctxs = contexts(train, args.clients, device)
            return ctxs if masks is None else [dataclasses.replace(c, masks=masks, tau=1.0, relax_mode="soft")
                                               for c in ctxs]

        def sequential() -> None:
            for ctx in contexts_of():
                copy_state(worker, glob)
                rule.local_update(worker, task, ctx)

        def batched(k: int) -> Callable[[], None]:
            def run() -> None:
                ctxs = contexts_of()
                for i in range(0, len(ctxs), k):
                    rule.local_update_batch(glob, ctxs[i:i + k])
            return run

        variants = {"sequential": sequential, **{f"batch {k}": batched(k) for k in args.batches}}
        for fn in variants.values():  # warm-up (and, on a GPU, kernel selection)
            fn()
        times: dict[str, list[float]] = {k: [] for k in variants}
        for _ in range(args.repeats):
            for key, fn in variants.items():
                synchronize(device)
                t = time.perf_counter()
                fn()
                synchronize(device)
                times[key].append(time.perf_counter() - t)
        seq = statistics.median(times["sequential"])
        print(f"  {name}")
        figures = {}
        for key, ts in times.items():
            s = statistics.median(ts)
            print(f"    {key:12s} {args.clients / s:8.2f} clients/s   {s:7.3f} s/round   {seq / s:5.2f} x sequential")
            figures[key] = {"clients_per_s": args.clients / s, "s_per_round": s, "vs_sequential": seq / s}
        results["workloads"][name] = figures  # type: ignore[index]
        if args.json:  # after each workload: a caller that kills this at its time limit keeps what was done
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
