"""The client scheduler: every client runs exactly once on some lane, lanes keep their own replicas and
threads across rounds, and under the fixed schedule running N lanes concurrently (threads; CUDA streams
on a GPU) gives the bits of one lane."""

from __future__ import annotations

import gc
import queue
import subprocess
import sys
import threading
from concurrent.futures import Future
from pathlib import Path

import pytest
import torch

from fedmetanas.algorithms.fedmetanas import FedMetaNAS, LocalContext, copy_state
from fedmetanas.config import AlgorithmConfig
from fedmetanas.data.datasets import TensorSplit
from fedmetanas.federated.aggregation import add_weighted, aggregated_tensors, numel
from fedmetanas.federated.evaluation import evaluate
from fedmetanas.federated.executor import (
    ClientExecutor,
    client_waves,
    close_executors,
    lane_main,
    make_executors,
    map_clients,
    run_clients,
)
from fedmetanas.runtime import configure_determinism
from fedmetanas.search.genotypes import METANAS_PRIMITIVES
from fedmetanas.search.supernet import SuperNet

CLIENTS = list(range(6))


def _build(device: torch.device) -> SuperNet:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = SuperNet(1, 3, 4, 2, 2, METANAS_PRIMITIVES, stem_multiplier=1, alpha_init_std=0.1,
                       generator=torch.Generator().manual_seed(0))
    return net.to(device)


def _search_round(executors: list[ClientExecutor], device: torch.device, threaded: bool,
                  deterministic: bool = True) -> torch.Tensor:
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

    return run_clients(executors, CLIENTS, work, threaded=threaded, deterministic=deterministic)


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


def test_the_fixed_schedule_puts_client_i_on_lane_i_mod_lanes_in_waves() -> None:
    assert client_waves(5, 2) == [[(0, 0), (1, 1)], [(0, 2), (1, 3)], [(0, 4)]]
    assert client_waves(3, 4) == [[(0, 0), (1, 1), (2, 2)]]
    assert client_waves(0, 3) == []


def test_concurrent_lanes_give_the_bits_of_one_lane_under_the_fixed_schedule_on_cpu() -> None:
    cpu = torch.device("cpu")
    sequential = _search_round(_lanes(1, cpu), cpu, threaded=False)
    for lanes in (2, 4):
        assert torch.equal(_search_round(_lanes(lanes, cpu), cpu, threaded=True), sequential)
    assert sequential.abs().sum() > 0


def test_the_free_schedule_equals_the_sequential_one_to_rounding_on_cpu() -> None:
    cpu = torch.device("cpu")
    sequential = _search_round(_lanes(1, cpu), cpu, threaded=False, deterministic=False)
    concurrent = _search_round(_lanes(3, cpu), cpu, threaded=True, deterministic=False)
    assert torch.allclose(sequential, concurrent, rtol=1e-12, atol=1e-12)


def test_the_fixed_schedule_adds_contributions_in_client_order_whatever_the_lanes() -> None:
    # Values whose float64 sum depends on the order of additions: 1e16 + 1 - 1e16 is 0 or 1.
    values = [1e16, 1.0, -1e16, 1.0, 3.0]
    sums = []
    for count in (1, 2, 3, 5):
        lanes = [ClientExecutor(None, None, torch.zeros(1, dtype=torch.float64)) for _ in range(count)]
        sums.append(run_clients(lanes, list(range(5)), lambda ex, cid: ex.buffer.add_(values[cid]), threaded=True))
    assert all(torch.equal(s, sums[0]) for s in sums)


def test_map_clients_returns_results_in_client_order_from_lane_i_mod_lanes() -> None:
    lanes = [ClientExecutor(None, None, torch.zeros(1, dtype=torch.float64)) for _ in range(3)]
    got = map_clients(lanes, [10, 11, 12, 13, 14], lambda ex, cid: (lanes.index(ex), cid, threading.get_ident()))
    assert [(lane, cid) for lane, cid, _ in got] == [(0, 10), (1, 11), (2, 12), (0, 13), (1, 14)]
    assert len({tid for *_, tid in got}) == 3  # one thread per lane
    close_executors(lanes)


def _personalize_on(executors: list[ClientExecutor]) -> list[torch.Tensor]:
    """Personalization as the round loop runs it on lanes: adapt a copy of the global model, evaluate it."""
    cpu = torch.device("cpu")
    global_net = _build(cpu)
    g = torch.Generator().manual_seed(5)
    split = TensorSplit(torch.randint(0, 256, (60, 1, 8, 8), generator=g, dtype=torch.uint8),
                        torch.randint(0, 3, (60,), generator=g), (0.5,), (0.25,), 3)
    algo = FedMetaNAS(AlgorithmConfig(batch_size=4, query_batch_size=4))

    def adapt_and_test(ex: ClientExecutor, cid: int) -> torch.Tensor:
        copy_state(ex.worker, global_net)
        ctx = LocalContext(split, torch.arange(cid * 10, cid * 10 + 10), global_net.initial_masks(), 1.0, "hard",
                           torch.Generator().manual_seed(cid), torch.Generator().manual_seed(50 + cid))
        adapted = algo.personalize(ex.worker, ex.task, ctx, steps=2)
        ex.task.eval()
        result = evaluate(adapted, split, torch.arange(cid * 10, cid * 10 + 10), 4)
        ex.task.train()
        return result

    return map_clients(executors, CLIENTS, adapt_and_test)


def test_personalization_on_three_lanes_gives_the_results_of_one_lane() -> None:
    cpu = torch.device("cpu")
    one, three = _personalize_on(_lanes(1, cpu)), _personalize_on(_lanes(3, cpu))
    assert all(torch.equal(a, b) for a, b in zip(one, three)) and len(three) == len(CLIENTS)


def test_an_error_stops_the_later_waves_and_the_first_in_client_order_is_raised() -> None:
    lanes = [ClientExecutor(None, None, torch.zeros(1, dtype=torch.float64)) for _ in range(2)]
    ran: list[int] = []

    def work(ex: ClientExecutor, cid: int) -> None:
        ran.append(cid)
        if cid in (2, 3):
            raise ValueError(f"client {cid} failed")

    with pytest.raises(ValueError, match="client 2"):
        run_clients(lanes, CLIENTS, work, threaded=True)
    assert sorted(ran) == [0, 1, 2, 3]  # the wave of clients 2 and 3 finished; 4 and 5 never started
    close_executors(lanes)


def test_lane_threads_live_across_rounds_until_closed() -> None:
    lanes = [ClientExecutor(None, None, torch.zeros(1, dtype=torch.float64)) for _ in range(2)]
    thread = lambda ex, cid: threading.current_thread()  # noqa: E731
    first, second = map_clients(lanes, [0, 1], thread), map_clients(lanes, [0, 1], thread)
    assert first == second and threading.current_thread() not in first
    close_executors(lanes)
    assert not any(t.is_alive() for t in first)
    again = map_clients(lanes, [0, 1], thread)  # a closed lane starts a fresh thread when used again
    assert all(t.is_alive() for t in again) and not set(again) & set(first)
    close_executors(lanes)


def test_a_dropped_lane_stops_its_thread() -> None:
    lanes = [ClientExecutor(None, None, torch.zeros(1, dtype=torch.float64)) for _ in range(2)]
    map_clients(lanes, [0, 1], lambda ex, cid: None)
    threads = [ex._lane.thread for ex in lanes]
    del lanes
    gc.collect()
    for t in threads:
        t.join(timeout=10)
    assert not any(t.is_alive() for t in threads)


def test_a_lane_thread_binds_its_gpu_before_running_anything() -> None:
    events: list[tuple[str, object]] = []
    jobs: queue.SimpleQueue = queue.SimpleQueue()
    done: Future[None] = Future()
    jobs.put((lambda: events.append(("job", threading.get_ident())), done))
    jobs.put(None)
    thread = threading.Thread(target=lane_main, args=(jobs, torch.device("cuda", 3),
                                                      lambda dev: events.append(("set_device", dev))))
    thread.start()
    thread.join(timeout=10)
    assert events[0] == ("set_device", torch.device("cuda", 3)) and events[1][0] == "job"
    assert done.done() and done.exception() is None


@pytest.fixture
def deterministic():
    """`runtime.deterministic: true` for one test, PyTorch's defaults afterwards."""
    configure_determinism(True)
    yield
    configure_determinism(False)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_streams_give_the_bits_of_one_lane_under_the_deterministic_switch(deterministic) -> None:
    gpu = torch.device("cuda", 0)
    n = numel(aggregated_tensors(_build(gpu)))
    one = make_executors(1, lambda: _build(gpu), n, gpu)
    sequential = _search_round(one, gpu, threaded=False)
    streams = make_executors(4, lambda: _build(gpu), n, gpu)
    assert all(ex.stream is not None for ex in streams)
    for _ in range(3):
        assert torch.equal(_search_round(streams, gpu, threaded=True), sequential)
    close_executors(streams)


LANES_ON_GPU_1 = """
import sys, torch
sys.path.insert(0, {repo!r})
from fedmetanas.federated.executor import ClientExecutor, close_executors, map_clients
dev = torch.device("cuda", 1)
torch.cuda.set_device(dev)
lanes = [ClientExecutor(None, None, torch.zeros(4, dtype=torch.float64, device=dev), torch.cuda.Stream(dev))
         for _ in range(3)]
out = map_clients(lanes, list(range(6)), lambda ex, cid: (torch.cuda.current_device(), ex.buffer.add_(cid).sum()))
close_executors(lanes)
torch.cuda.synchronize(dev)
assert all(d == 1 for d, _ in out), out
print("context on GPU 0:", torch._C._cuda_hasPrimaryContext(0))
"""


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_lanes_on_gpu_1_never_create_a_context_on_gpu_0(tmp_path: Path) -> None:
    script = tmp_path / "lanes.py"
    script.write_text(LANES_ON_GPU_1.format(repo=str(Path(__file__).resolve().parents[2])))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "context on GPU 0: False" in out.stdout
