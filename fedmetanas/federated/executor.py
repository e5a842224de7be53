"""Run a rank's clients on several CUDA streams at once (sequentially on a CPU).

Each executor ("lane") owns a model replica, a task-learner replica, a CUDA stream, a float64 buffer
and, once it first runs concurrently, one Python thread that lives until `close()` (CUDA calls release
the GIL, and each thread's host syncs wait only on its own stream). Memory is O(lanes x model), never
O(clients).

Deterministic schedule (the default, `runtime.deterministic`): client i of the list runs on lane
i % lanes, in waves of one client per lane; each client's contribution is written into its lane's
zeroed buffer and the buffers are added to the total in client order after each wave. The float64 sum
is then the same sequence of additions for any number of lanes, so 1 lane and N lanes give equal bits.
The free schedule gives each client to whichever lane is free and adds the lanes' buffers at the end:
no idle lane at the end of a wave, but the order of additions follows thread timing.
"""

from __future__ import annotations

import queue
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from contextlib import AbstractContextManager, ExitStack, nullcontext
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar

import torch
from torch import nn

T = TypeVar("T")


def lane_main(jobs: queue.SimpleQueue, device: torch.device,
              set_device: Callable[[torch.device], None] = torch.cuda.set_device) -> None:
    """A lane thread's body: bind the thread to the lane's GPU, then run (job, future) pairs until None.

    The device comes first: a new thread's current device is GPU 0, and entering or leaving a stream
    context there would create a CUDA context on GPU 0 (~0.5 GiB; an error on exclusive-process GPUs)
    in every rank whose GPU is another one.
    """
    if device.type == "cuda":
        set_device(device)
    while True:
        item = jobs.get()
        if item is None:
            return
        job, future = item
        del item
        if future.set_running_or_notify_cancel():
            try:
                future.set_result(job())
            except BaseException as err:  # noqa: BLE001 - handed to the caller through the future
                future.set_exception(err)
        del job, future  # hold nothing (models, tensors) between jobs


class LaneThread:
    """One long-lived worker thread; it stops on `stop()` or when its owner is garbage-collected."""

    def __init__(self, owner: object, device: torch.device, name: str = "fedmetanas-lane") -> None:
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.thread = threading.Thread(target=lane_main, args=(self.jobs, device), name=name, daemon=True)
        self.thread.start()
        # The thread holds only the queue, so a dropped lane does not keep its models alive.
        self._stop = weakref.finalize(owner, self.jobs.put, None)

    def submit(self, job: Callable[[], T]) -> Future[T]:
        future: Future[T] = Future()
        self.jobs.put((job, future))
        return future

    def stop(self, timeout: float | None = None) -> None:
        self._stop()  # puts the stop marker once, however often it is called
        self.thread.join(timeout)


@dataclass(eq=False)  # identity semantics: a lane is a resource, not a value
class ClientExecutor:
    """One lane of concurrent client work."""

    worker: nn.Module  # SuperNet or FixedNet: the client's model
    task: nn.Module | None  # a task-learner replica, for rules that adapt a copy (None otherwise)
    buffer: torch.Tensor  # float64: the contribution of the lane's current client (of its clients, free schedule)
    stream: torch.cuda.Stream | None = None
    _lane: LaneThread | None = field(default=None, init=False, repr=False)

    @property
    def device(self) -> torch.device:
        return self.stream.device if self.stream is not None else self.buffer.device

    def context(self) -> AbstractContextManager[Any]:
        """The lane's device and stream as the current ones (nothing on a CPU)."""
        if self.stream is None:
            return nullcontext()
        stack = ExitStack()
        stack.enter_context(torch.cuda.device(self.stream.device))
        stack.enter_context(torch.cuda.stream(self.stream))
        return stack

    def submit(self, job: Callable[[], T]) -> Future[T]:
        """Run `job()` on this lane's own thread (started on first use, kept across rounds) in its context."""
        if self._lane is None:
            self._lane = LaneThread(self, self.device)
        return self._lane.submit(partial(_in_context, self.context, job))

    def call(self, job: Callable[[], T]) -> T:
        """Run `job()` on the calling thread in this lane's context."""
        with self.context():
            return job()

    def follow_caller(self) -> None:
        """Work queued on the lane from now on starts after what the caller's stream has queued so far."""
        if self.stream is not None:
            self.stream.wait_stream(torch.cuda.current_stream(self.stream.device))

    def hand_back(self) -> None:
        """The caller's stream waits for everything queued on the lane so far."""
        if self.stream is not None:
            torch.cuda.current_stream(self.stream.device).wait_stream(self.stream)

    def close(self) -> None:
        """Stop the lane's thread (if it was started); the lane may still be used, sequentially or anew."""
        if self._lane is not None:
            self._lane.stop()
            self._lane = None


def _in_context(context: Callable[[], AbstractContextManager[Any]], job: Callable[[], T]) -> T:
    with context():
        return job()


def make_executors(count: int, build: Callable[[], nn.Module], buffer_len: int,
                   device: torch.device, with_task: bool = True) -> list[ClientExecutor]:
    """`count` lanes on a GPU (one stream each); a single lane on a CPU. Each lane holds a worker
    replica and, `with_task`, a task-learner replica."""
    lanes = count if device.type == "cuda" else 1
    return [ClientExecutor(build(), build() if with_task else None,
                           torch.zeros(buffer_len, dtype=torch.float64, device=device),
                           torch.cuda.Stream(device) if device.type == "cuda" else None)
            for _ in range(lanes)]


def close_executors(executors: Sequence[ClientExecutor]) -> None:
    """Stop every lane's thread: when a stage's lanes are replaced and when the run ends."""
    for ex in executors:
        ex.close()


def _results(futures: Sequence[Future[T]]) -> list[T]:
    """Every future's result in order, after all have finished; the first failure (in order) is raised."""
    for f in futures:
        f.exception()  # waits
    return [f.result() for f in futures]


def client_waves(n_clients: int, lanes: int) -> list[list[tuple[int, int]]]:
    """The deterministic schedule: waves of (lane, position in the client list), position i on lane i % lanes."""
    return [[(i % lanes, i) for i in range(start, min(start + lanes, n_clients))]
            for start in range(0, n_clients, lanes)]


def _run_waves(executors: Sequence[ClientExecutor], clients: Sequence[int], fn: Callable[[ClientExecutor, int], T],
               threaded: bool) -> Iterator[list[tuple[ClientExecutor, T]]]:
    """Run `fn(lane, client)` wave by wave; yield each wave's (lane, result) in client order once the
    caller's stream has caught up with it. The next wave starts when the consumer asks for it, so the
    consumer may read and reuse the lanes' buffers in between."""
    for wave in client_waves(len(clients), len(executors)):
        jobs = [(executors[lane], partial(fn, executors[lane], clients[i])) for lane, i in wave]
        for ex, _ in jobs:
            ex.follow_caller()
        if threaded:
            results = _results([ex.submit(job) for ex, job in jobs])
        else:
            results = [ex.call(job) for ex, job in jobs]
        for ex, _ in jobs:
            ex.hand_back()
        yield [(ex, r) for (ex, _), r in zip(jobs, results)]


def map_clients(executors: Sequence[ClientExecutor], clients: Sequence[int], fn: Callable[[ClientExecutor, int], T],
                threaded: bool | None = None) -> list[T]:
    """`[fn(lane, client) for client in clients]`, run on the lanes (client i on lane i % lanes), in order.

    For per-client work whose results the caller collects, e.g. personalization. Tensors in the results
    were made on the lanes' streams; the caller's stream has waited for them. `fn` runs on a lane thread
    with PyTorch's thread-local defaults (grad mode on): it must set `no_grad`/`eval` itself.
    """
    threaded = len(executors) > 1 if threaded is None else threaded
    return [r for wave in _run_waves(executors, clients, fn, threaded) for _, r in wave]


def run_clients(executors: Sequence[ClientExecutor], clients: Sequence[int],
                work: Callable[[ClientExecutor, int], None], threaded: bool | None = None,
                deterministic: bool = True) -> torch.Tensor:
    """Run `work(executor, client)` for every client and return the sum of what they added to the buffers.

    Args:
        executors: the lanes (`make_executors`).
        clients: the rank's clients of the round, in the order that fixes the sum.
        work: adds one client's contribution into `executor.buffer`.
        threaded: run lanes on their threads; defaults to "more than one executor".
        deterministic: the fixed schedule (client i on lane i % lanes, buffers summed in client order):
            the result's bits do not depend on the number of lanes or on timing. False: the free schedule.

    Returns:
        A new float64 tensor (the caller's stream has waited for it).
    """
    threaded = len(executors) > 1 if threaded is None else threaded
    total = torch.zeros_like(executors[0].buffer)  # on the caller's stream
    if deterministic:
        def one(ex: ClientExecutor, cid: int) -> None:
            ex.buffer.zero_()
            work(ex, cid)

        for wave in _run_waves(executors, clients, one, threaded):
            for ex, _ in wave:
                total.add_(ex.buffer)
        return total
    return _run_free(executors, clients, work, threaded, total)


def _run_free(executors: Sequence[ClientExecutor], clients: Sequence[int],
              work: Callable[[ClientExecutor, int], None], threaded: bool, total: torch.Tensor) -> torch.Tensor:
    """The free schedule: each client on the next free lane; the lanes' buffers summed in lane order."""
    for ex in executors:
        ex.follow_caller()
        ex.call(ex.buffer.zero_)
    if not threaded:
        for cid in clients:
            executors[0].call(partial(work, executors[0], cid))
    else:
        pending: queue.SimpleQueue[int] = queue.SimpleQueue()
        for cid in clients:
            pending.put(cid)
        failed = threading.Event()

        def drain(ex: ClientExecutor) -> None:
            while not failed.is_set():
                try:
                    cid = pending.get_nowait()
                except queue.Empty:
                    return
                try:
                    work(ex, cid)
                except BaseException:
                    failed.set()  # the other lanes stop taking clients
                    raise

        _results([ex.submit(partial(drain, ex)) for ex in executors])
    for ex in executors:
        ex.hand_back()
        total.add_(ex.buffer)
    return total
