"""The one module that touches MPI and torch.distributed.

`init_distributed` reads rank and size from the MPI launcher (mpirun/mpiexec, or srun with PMIx),
pins a device per local rank and starts a torch.distributed process group (gloo on CPU, NCCL on
GPUs) whose address rank 0 picks and broadcasts over MPI. A plain `python launch/main.py` is the
world-size-1 case of the same path: no `if distributed` anywhere else.
"""

from __future__ import annotations

import datetime
import logging
import os
import re
import socket
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as tdist

log = logging.getLogger(__name__)

# Variables that tell us an MPI launcher started this process.
_MPI_ENV = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS", "HYDRA_CONTROL_FD")


class DistError(RuntimeError):
    """A user-fixable problem with ranks or devices; the message names the fix."""


class CollectiveError(RuntimeError):
    """A collective failed or timed out: another rank died or hangs."""


def describe_collective_failure(message: str, rank: int, timeout_s: float) -> str:
    """One line for the user from a backend's error text, naming the failed rank when it is known."""
    found = re.search(r"[Rr]ank (\d+) failed to pass monitoredBarrier", message)
    if found:
        who = f"rank {found.group(1)} did not reach the round's all-reduce within {timeout_s:g} s (it died or hangs)"
    elif "timed out" in message.lower() or "timeout" in message.lower():
        who = f"a collective timed out after {timeout_s:g} s (rank 0 or the network stopped answering)"
    else:
        first = message.strip().splitlines()[0][:200] if message.strip() else "unknown error"
        who = f"a collective failed: {first}"
    return (f"rank {rank}: {who}; the last checkpoint is intact, continue with --resume "
            "(runtime.collective_timeout_s sets the wait)")


@dataclass
class DistContext:
    """Where this process sits in the job and how it talks to the others."""

    rank: int
    world_size: int
    local_rank: int
    local_size: int
    device: torch.device
    backend: str
    comm: Any = None  # mpi4py communicator, or None without MPI
    timeout_s: float = 600.0  # collective timeout (runtime.collective_timeout_s)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_sum(self, buf: torch.Tensor) -> torch.Tensor:
        """Sum `buf` over all ranks in place (one collective) and return it.

        On gloo a monitored barrier comes first: if a rank died or hangs, rank 0 learns *which* one
        within `timeout_s` instead of every survivor blocking in the all-reduce.
        """
        try:
            if self.backend == "gloo" and self.world_size > 1:
                tdist.monitored_barrier(timeout=datetime.timedelta(seconds=self.timeout_s))
            tdist.all_reduce(buf, op=tdist.ReduceOp.SUM)
        except RuntimeError as err:
            raise CollectiveError(describe_collective_failure(str(err), self.rank, self.timeout_s)) from None
        return buf

    def all_gather_floats(self, values: list[float]) -> list[list[float]]:
        """Every rank's small list of floats (timings), in rank order."""
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        out = [torch.zeros_like(t) for _ in range(self.world_size)]
        tdist.all_gather(out, t)
        return [o.cpu().tolist() for o in out]

    def all_gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's picklable object, in rank order (small objects only: errors, decisions)."""
        out: list[Any] = [None] * self.world_size
        tdist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """Send a picklable object from `src` to all ranks."""
        box = [obj]
        tdist.broadcast_object_list(box, src=src, device=self.device if self.backend == "nccl" else None)
        return box[0]

    def barrier(self) -> None:
        if self.backend == "nccl":
            tdist.barrier(device_ids=[self.device.index])
        else:
            tdist.barrier()

    def close(self) -> None:
        """Tear down the process group (MPI itself finalizes at interpreter exit)."""
        if tdist.is_initialized():
            tdist.destroy_process_group()


_CONTEXT: DistContext | None = None


def launched_by_mpi(environ: dict[str, str] | None = None) -> bool:
    """Whether the environment shows an MPI launcher (so mpi4py must be used)."""
    env = os.environ if environ is None else environ
    return any(k in env for k in _MPI_ENV)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


def select_device(requested: str, local_rank: int, cuda_count: int) -> torch.device:
    """The device for a local rank: one GPU each when CUDA is there (or asked for), else the CPU."""
    if requested == "cpu" or (requested == "auto" and cuda_count == 0):
        return torch.device("cpu")
    if cuda_count == 0:
        raise DistError("runtime.device: cuda was requested but no GPU is visible; set runtime.device: cpu (or auto)")
    return torch.device("cuda", local_rank % cuda_count)


def init_distributed(device: str = "auto", threads_per_rank: int = 1,
                     timeout_s: float = 600.0) -> DistContext:
    """Join (or form) the job's process group; safe to call twice (returns the same context)."""
    global _CONTEXT
    if _CONTEXT is not None and tdist.is_initialized():
        return _CONTEXT
    torch.set_num_threads(threads_per_rank)
    comm = None
    if launched_by_mpi():
        from mpi4py import MPI  # noqa: PLC0415 - importing initialises MPI; only under a launcher

        comm = MPI.COMM_WORLD
        rank, world = comm.Get_rank(), comm.Get_size()
        node = comm.Split_type(MPI.COMM_TYPE_SHARED, key=rank)
        local_rank, local_size = node.Get_rank(), node.Get_size()
        node.Free()
        if rank == 0:
            host = "127.0.0.1" if local_size == world else socket.gethostbyname(socket.gethostname())
            address = (host, _free_port())
        else:
            address = None
        host, port = comm.bcast(address, root=0)
    else:
        rank, world, local_rank, local_size = 0, 1, 0, 1
        host, port = "127.0.0.1", _free_port()

    dev = select_device(device, local_rank, torch.cuda.device_count())
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    tdist.init_process_group(backend, init_method=f"tcp://{host}:{port}", rank=rank, world_size=world,
                             timeout=datetime.timedelta(seconds=timeout_s))
    _CONTEXT = DistContext(rank, world, local_rank, local_size, dev, backend, comm, timeout_s)
    log.debug("rank %d/%d on %s (%s)", rank, world, dev, backend)
    return _CONTEXT


def shutdown() -> None:
    """Close the process group started by `init_distributed`."""
    global _CONTEXT
    if _CONTEXT is not None:
        _CONTEXT.close()
    _CONTEXT = None
