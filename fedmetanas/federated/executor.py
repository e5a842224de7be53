"""Run a rank's clients on several CUDA streams at once (sequentially on a CPU).

Each executor owns a model replica, a task-learner replica, a CUDA stream and a float64 accumulation
buffer; a client is scheduled onto whichever executor is free (one Python thread per executor: CUDA
calls release the GIL, and each thread's host syncs wait only on its own stream). Memory is
O(executors x model), never O(clients). The executors' buffers are summed in executor order at the end.
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn


@dataclass(eq=False)  # identity semantics: a lane is a resource, not a value
class ClientExecutor:
    """One lane of concurrent client work."""

    worker: nn.Module
    task: nn.Module | None  # a task-learner replica, for rules that adapt a copy (None otherwise)
    buffer: torch.Tensor  # float64 partial sums of this lane's clients
    stream: torch.cuda.Stream | None = None

    def context(self):  # noqa: ANN201 - a context manager
        return torch.cuda.stream(self.stream) if self.stream is not None else nullcontext()


def make_executors(count: int, build: Callable[[], nn.Module], buffer_len: int,
                   device: torch.device, with_task: bool = True) -> list[ClientExecutor]:
    """`count` lanes on a GPU (one stream each); a single lane on a CPU. Each lane holds a worker
    replica and, `with_task`, a task-learner replica."""
    lanes = count if device.type == "cuda" else 1
    return [ClientExecutor(build(), build() if with_task else None, torch.zeros(buffer_len, dtype=torch.float64, device=device),
                           torch.cuda.Stream(device) if device.type == "cuda" else None)
            for _ in range(lanes)]


def run_clients(executors: Sequence[ClientExecutor], clients: Sequence[int],
                work: Callable[[ClientExecutor, int], None], threaded: bool | None = None) -> torch.Tensor:
    """Run `work(executor, client)` for every client, each on the next free executor; return the sum of
    the executors' buffers (zeroed first). `threaded` defaults to "more than one executor"."""
    for ex in executors:
        if ex.stream is not None:
            ex.stream.wait_stream(torch.cuda.current_stream(ex.stream.device))  # the global model is ready
        with ex.context():
            ex.buffer.zero_()
    if threaded is None:
        threaded = len(executors) > 1
    if not threaded:
        for cid in clients:
            with executors[0].context():
                work(executors[0], cid)
    else:
        pending: queue.SimpleQueue[int] = queue.SimpleQueue()
        for cid in clients:
            pending.put(cid)
        errors: list[BaseException] = []
        lock = threading.Lock()

        def lane(ex: ClientExecutor) -> None:
            with ex.context():
                while not errors:
                    try:
                        cid = pending.get_nowait()
                    except queue.Empty:
                        return
                    try:
                        work(ex, cid)
                    except BaseException as err:  # noqa: BLE001 - re-raised on the calling thread
                        with lock:
                            errors.append(err)

        with ThreadPoolExecutor(len(executors)) as pool:
            list(pool.map(lane, executors))
        if errors:
            raise errors[0]
    total = executors[0].buffer
    for ex in executors:
        if ex.stream is not None:
            torch.cuda.current_stream(ex.stream.device).wait_stream(ex.stream)
    for ex in executors[1:]:
        total = total + ex.buffer
    return total.clone() if len(executors) == 1 else total
