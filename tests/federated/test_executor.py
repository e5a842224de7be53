"""The client scheduler: every client runs exactly once on some lane, lanes keep their own replicas,
and running lanes concurrently (threads; CUDA streams on a GPU) gives the sequential result."""

from __future__ import annotations

import threading

import pytest
import torch

from fedmetanas.algorithms.fedmetanas import FedMetaNAS, LocalContext, copy_state
from fedmetanas.config import AlgorithmConfig
from fedmetanas.data.datasets import TensorSplit
from fedmetanas.federated.aggregation import add_weighted, aggregated_tensors, numel
from fedmetanas.federated.executor import ClientExecutor, make_executors, run_clients
from fedmetanas.search.genotypes import METANAS_PRIMITIVES
from fedmetanas.search.supernet import SuperNet

CLIENTS = list(range(6))


def _build(device: torch.device) -> SuperNet:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = SuperNet(1, 3, 4, 2, 2, METANAS_PRIMITIVES, stem_multiplier=1, alpha_init_std=0.1,
                       generator=torch.Generator().manual_seed(0))
    return net.to(device)


def _search_round(executors: list[ClientExecutor], device: torch.device, threaded: bool) -> torch.Tensor:
    """Each client runs FedMetaNAS's local update from the same global model; sum of n * parameters."""
    global_net = _build(device)
    g = torch.Generator().manual_seed(9)
    split = TensorSplit(torch.randint(0, 256, (60, 1, 8, 8), generator=g, dtype=torch.uint8),
                        torch.randint(0, 3, (60,), generator=g), (0.5,), (0.25,), 3).to(device)
    algo = FedMetaNAS(AlgorithmConfig(local_steps=2, inner_steps=1, batch_size=4, query_batch_size=4))

    def work(ex: ClientExecutor, cid: int) -> None:
        copy_state(ex.worker, global_net)
        ctx = LocalContext(split, torch.arange(cid * 10, cid * 10 + 10, device=device), global_net.initial_masks(),
                           1.0, "hard", torch.Generator().manual_seed(100 + cid), torch.Generator().manual_seed(200 + cid))
        algo.local_update(ex.worker, ex.task, ctx)
        add_weighted(ex.buffer, aggregated_tensors(ex.worker), float(cid + 1))

    return run_clients(executors, CLIENTS, work, threaded=threaded)


def _lanes(count: int, device: torch.device) -> list[ClientExecutor]:
    n = numel(aggregated_tensors(_build(device)))
    return [ClientExecutor(_build(device), _build(device), torch.zeros(n, dtype=torch.float64, device=device))
            for _ in range(count)]


def test_every_client_runs_exactly_once_and_lanes_work_concurrently() -> None:
    seen: list[tuple[int, int]] = []
    lock = threading.Lock()
    lanes = [ClientExecutor(None, None, torch.zeros(len(CLIENTS), dtype=torch.float64)) for _ in range(3)]

    def work(ex: ClientExecutor, cid: int) -> None:
        with lock:
            seen.append((lanes.index(ex), cid))
        ex.buffer[cid] += 1.0

    total = run_clients(lanes, CLIENTS, work, threaded=True)
    assert sorted(c for _, c in seen) == CLIENTS
    assert torch.equal(total, torch.ones(len(CLIENTS), dtype=torch.float64))


def test_an_error_in_one_client_is_raised_to_the_caller() -> None:
    lanes = [ClientExecutor(None, None, torch.zeros(1, dtype=torch.float64)) for _ in range(2)]

    def work(ex: ClientExecutor, cid: int) -> None:
        if cid == 3:
            raise ValueError("client 3 failed")

    with pytest.raises(ValueError, match="client 3"):
        run_clients(lanes, CLIENTS, work, threaded=True)


def test_buffers_are_zeroed_between_rounds() -> None:
    lanes = [ClientExecutor(None, None, torch.full((2,), 7.0, dtype=torch.float64))]
    total = run_clients(lanes, [0], lambda ex, cid: ex.buffer.add_(1.0))
    assert torch.equal(total, torch.ones(2, dtype=torch.float64))


def test_on_a_cpu_there_is_one_lane_whatever_streams_are_asked_for() -> None:
    lanes = make_executors(4, lambda: _build(torch.device("cpu")), 5, torch.device("cpu"))
    assert len(lanes) == 1 and lanes[0].stream is None


def test_concurrent_lanes_equal_the_sequential_schedule_on_cpu() -> None:
    cpu = torch.device("cpu")
    sequential = _search_round(_lanes(1, cpu), cpu, threaded=False)
    concurrent = _search_round(_lanes(3, cpu), cpu, threaded=True)
    assert torch.allclose(sequential, concurrent, rtol=1e-12, atol=1e-12)
    assert sequential.abs().sum() > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_streams_equal_the_sequential_schedule() -> None:
    gpu = torch.device("cuda", 0)
    sequential = _search_round(make_executors(1, lambda: _build(gpu), _lanes(1, gpu)[0].buffer.numel(), gpu), gpu,
                               threaded=False)
    streams = make_executors(3, lambda: _build(gpu), sequential.numel(), gpu)
    assert all(ex.stream is not None for ex in streams)
    concurrent = _search_round(streams, gpu, threaded=True)
    torch.cuda.synchronize()
    assert torch.allclose(sequential, concurrent, rtol=1e-6, atol=1e-6)
