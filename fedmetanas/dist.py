"""The one module that touches MPI and torch.distributed.

`init_distributed` reads rank and size from the MPI launcher (mpirun/mpiexec, or srun with PMIx),
or from Slurm when `srun --mpi=none` starts the tasks, pins a device per local rank and starts a
torch.distributed process group (gloo on CPU, NCCL on GPUs) through a store that rank 0 serves (its
address and port broadcast over MPI, or MASTER_ADDR/MASTER_PORT under srun). Beside the main group every
multi-rank job has a small gloo group for the monitored barrier and object gathers, so a dead or hung
rank is named within `runtime.collective_timeout_s` whatever the main backend. A plain
`python launch/main.py` is the world-size-1 case of the same path: no `if distributed` anywhere else.
The pure functions (`placement_from_env` in `fedmetanas.placement`, `device_for`, `plan_backend`, `expand_nodelist`,
`store_host`) hold the rules and are tested with fake environments.
"""

from __future__ import annotations

import datetime
import errno
import ipaddress
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

import torch
import torch.distributed as tdist

from fedmetanas.placement import (  # noqa: F401 - re-exported: the launcher rules are part of this API
    DistError,
    Placement,
    env_int,
    launched_by_mpi,
    launched_by_srun,
    local_rank_from_env,
    placement_from_env,
    tasks_per_node,
)
from fedmetanas.runtime import configure_determinism, synchronize

log = logging.getLogger(__name__)



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
    side_group: Any = None  # gloo group of all ranks for barriers and objects; None for one rank

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_sum(self, buf: torch.Tensor) -> torch.Tensor:
        """Sum `buf` over all ranks in place (one collective) and return it.

        A monitored barrier on the gloo side group comes first: if a rank died or hangs, rank 0 learns
        *which* one within `timeout_s` instead of every survivor blocking in the all-reduce (on NCCL, in
        the next host copy until NCCL's watchdog kills the process, naming no one).
        """
        try:
            if self.side_group is not None:
                tdist.monitored_barrier(self.side_group, timeout=datetime.timedelta(seconds=self.timeout_s))
            tdist.all_reduce(buf, op=tdist.ReduceOp.SUM)
        except RuntimeError as err:
            raise CollectiveError(describe_collective_failure(str(err), self.rank, self.timeout_s)) from None
        return buf

    def timed_all_reduce_sum(self, buf: torch.Tensor) -> float:
        """`all_reduce_sum(buf)` and the seconds it took, the device's work included.

        A CUDA collective only queues work, so the device is synchronized before the clock starts (the
        local work is not the collective's) and before it stops (the sum must have arrived). The barrier's
        wait for the slowest rank is part of the figure, as it is part of the round.
        """
        synchronize(buf.device)
        start = time.perf_counter()
        self.all_reduce_sum(buf)
        synchronize(buf.device)
        return time.perf_counter() - start

    def all_gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's picklable object, in rank order (small objects only: errors, decisions).

        Over the gloo side group: pickles travel as CPU tensors, never through a GPU.
        """
        out: list[Any] = [None] * self.world_size
        if self.world_size == 1:
            out[0] = obj
            return out
        try:
            tdist.all_gather_object(out, obj, group=self.side_group)
        except RuntimeError as err:
            raise CollectiveError(describe_collective_failure(str(err), self.rank, self.timeout_s)) from None
        return out

    def close(self) -> None:
        """Tear down the process group (MPI itself finalizes at interpreter exit)."""
        if tdist.is_initialized():
            tdist.destroy_process_group()


_CONTEXT: DistContext | None = None


def _split_hostlist(spec: str) -> list[str]:
    """Split a Slurm host list at the commas that are outside brackets."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(spec):
        depth += (char == "[") - (char == "]")
        if char == "," and depth == 0:
            parts.append(spec[start:i])
            start = i + 1
    parts.append(spec[start:])
    return [p.strip() for p in parts if p.strip()]


def _expand_host(part: str, spec: str) -> list[str]:
    found = re.fullmatch(r"([^\[\]]*)\[([^\[\]]+)\](.*)", part)
    if not found:
        if "[" in part or "]" in part:
            raise DistError(f"SLURM_JOB_NODELIST={spec!r} cannot be parsed; set MASTER_ADDR to the first node's name")
        return [part]
    prefix, ranges, rest = found.groups()
    hosts = []
    for item in ranges.split(","):
        low, _, high = item.strip().partition("-")
        if not low.isdigit() or not (high or low).isdigit():
            raise DistError(f"SLURM_JOB_NODELIST={spec!r} cannot be parsed; set MASTER_ADDR to the first node's name")
        for number in range(int(low), int(high or low) + 1):
            hosts += [f"{prefix}{number:0{len(low)}d}{tail}" for tail in _expand_host(rest, spec)]
    return hosts


def expand_nodelist(spec: str) -> list[str]:
    """Slurm's compact host list ('gpu[01-03,07],login1') as host names, in Slurm's order."""
    return [host for part in _split_hostlist(spec) for host in _expand_host(part, spec)]


def first_host(nodelist: str, scontrol: str | None = None) -> str:
    """The first host of a Slurm node list: `scontrol show hostnames` when given, else our own parser."""
    if scontrol:
        try:
            out = subprocess.run([scontrol, "show", "hostnames", nodelist], capture_output=True, text=True,
                                 timeout=30, check=False)
            if out.returncode == 0 and out.stdout.split():
                return out.stdout.split()[0]
        except (OSError, subprocess.TimeoutExpired):
            pass  # fall back to the parser, which handles the usual forms
    hosts = expand_nodelist(nodelist)
    if not hosts:
        raise DistError("SLURM_JOB_NODELIST is empty; set MASTER_ADDR to the first node's name")
    return hosts[0]


def rendezvous_address(environ: Mapping[str, str] | None = None, scontrol: str | None = None,
                       master_addr: str | None = None) -> tuple[str, int]:
    """Where rank 0 of an `srun` step listens: runtime.master_addr or MASTER_ADDR, and MASTER_PORT, if set,
    else derived from the job.

    The address is the step's first node (where srun's block distribution puts rank 0); the port is
    29500 + job id % 20000, so concurrent jobs sharing a node rarely collide (MASTER_PORT overrides).
    """
    env = os.environ if environ is None else environ
    host = master_addr or env.get("MASTER_ADDR", "").strip()
    if not host:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        if not nodelist:
            raise DistError("MASTER_ADDR is unset and SLURM_JOB_NODELIST is missing; "
                            "export MASTER_ADDR=<rank 0's host>")
        host = first_host(nodelist, scontrol)
    port = env_int(env, "MASTER_PORT")
    if port is None:
        port = 29500 + (env_int(env, "SLURM_JOB_ID", "SLURM_JOBID") or 0) % 20000
    if not 0 < port < 65536:
        raise DistError(f"MASTER_PORT={port} is not a TCP port; export MASTER_PORT=<a free port in 1024-65535>")
    return host, port


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return address == "localhost"


def resolve_host(name: str) -> list[str]:
    """The IPv4 addresses `name` resolves to on this node, in the resolver's order (none if it fails)."""
    try:
        infos = socket.getaddrinfo(name, None, socket.AF_INET, socket.SOCK_STREAM)
    except OSError:
        return []
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def store_host(environ: Mapping[str, str], master_addr: str | None, single_node: bool, hostname: str,
               resolve: Callable[[str], list[str]] = resolve_host) -> str:
    """Where the other MPI ranks reach the store rank 0 serves (decided on rank 0, then broadcast).

    runtime.master_addr, else MASTER_ADDR, else loopback when every rank is on rank 0's node, else the
    first address of rank 0's host name that is not loopback. Debian and Ubuntu map the host's own name
    to 127.0.1.1 in /etc/hosts; when that is all there is, the name itself is sent, for the other nodes to
    resolve through their own DNS (set MASTER_ADDR where they cannot).
    """
    if master_addr:
        return master_addr
    if environ.get("MASTER_ADDR", "").strip():
        return environ["MASTER_ADDR"].strip()
    if single_node:
        return "127.0.0.1"
    routable = [a for a in resolve(hostname) if not _is_loopback(a)]
    return routable[0] if routable else hostname


def process_group_options(backend: str, device: torch.device) -> dict[str, Any]:
    """Extra arguments of `init_process_group`: NCCL is bound to the rank's GPU at once (eager init), so
    it never guesses the device from the current one and a bad GPU fails at start-up, not in round 1."""
    return {"device_id": device} if backend == "nccl" and device.type == "cuda" else {}


def device_for(requested: str, local_rank: int, local_size: int, cuda_count: int,
               devices: Sequence[int] | None = None) -> torch.device:
    """The device of one rank: CPU, or one GPU per local rank (`devices[local_rank]`, else local rank % GPUs).

    All of `devices` is checked on every rank, so a bad list fails everywhere with the same message.
    """
    if requested == "cpu":
        return torch.device("cpu")
    if cuda_count == 0:
        if requested == "cuda":
            raise DistError("runtime.device: cuda was requested but no GPU is visible; "
                            "set runtime.device: cpu (or auto), or run on a GPU node")
        if devices is not None:
            raise DistError("runtime.devices lists GPU ids but no GPU is visible; "
                            "leave runtime.devices null, or run on a GPU node")
        return torch.device("cpu")
    if devices is None:
        return torch.device("cuda", local_rank % cuda_count)
    if len(devices) < local_size:
        raise DistError(f"runtime.devices lists {len(devices)} GPU id(s) but {local_size} ranks run on this node; "
                        "give one id per rank on a node, or leave it null")
    missing = sorted({d for d in devices if not 0 <= d < cuda_count})
    if missing:
        raise DistError(f"runtime.devices names GPU {missing} but this rank sees {cuda_count} GPU(s) "
                        f"(ids 0-{cuda_count - 1} of CUDA_VISIBLE_DEVICES); use visible ids, or leave it null "
                        "(with Slurm's --gpus-per-task each rank sees only its own GPU 0)")
    return torch.device("cuda", devices[local_rank])


def plan_backend(owners: Sequence[tuple[str, str]]) -> tuple[str, str | None]:
    """The backend every rank must use, and a warning when ranks share a GPU, from each rank's (node, GPU).

    `owners[rank]` is (node, physical GPU id), GPU '' for a CPU rank. NCCL refuses two ranks on one GPU,
    so shared GPUs (or a mix of CPU and GPU ranks) fall back to gloo, which all-reduces CUDA tensors too.
    """
    if not owners or any(gpu == "" for _, gpu in owners):
        mixed = any(gpu for _, gpu in owners)
        return "gloo", ("some ranks run on the CPU and others on a GPU; collectives use gloo (slower): "
                        "set runtime.device: cuda or cpu for all ranks") if mixed else None
    ranks_of: dict[tuple[str, str], list[int]] = {}
    for rank, owner in enumerate(owners):
        ranks_of.setdefault(owner, []).append(rank)
    shared = {owner: ranks for owner, ranks in ranks_of.items() if len(ranks) > 1}
    if not shared:
        return "nccl", None
    nodes = sorted({node for node, _ in shared})
    detail = "; ".join(f"ranks {', '.join(map(str, ranks))} on one GPU of {node}"
                       for (node, _), ranks in sorted(shared.items(), key=lambda item: item[1]))
    return "gloo", (f"{len(owners)} ranks but fewer GPUs on {', '.join(nodes)} ({detail}); NCCL cannot put two "
                    "ranks on one GPU, so collectives use gloo (slower): start one rank per GPU "
                    "(--ntasks-per-node = GPUs per node) or set runtime.devices")


def _gpu_id(dev: torch.device) -> str:
    """A physical identity of a GPU that is the same whatever CUDA_VISIBLE_DEVICES each rank sees."""
    if dev.type != "cuda":
        return ""
    uuid = getattr(torch.cuda.get_device_properties(dev), "uuid", None)
    return str(uuid) if uuid else f"{os.environ.get('CUDA_VISIBLE_DEVICES', '')}#{dev.index}"


def _owner(value: bytes) -> tuple[str, str]:
    node, _, gpu = value.decode().partition("\n")
    return node, gpu


def listen_problem(host: str, port: int, address_field: str) -> str | None:
    """Why rank 0 cannot serve the store at host:port (None when it can), naming what to change.

    Probed with a plain socket before the store starts: c10d's own failure on an address that is not this
    host's comes after its connect retries (many seconds of stack dumps) and blames the port.
    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as err:
        return (f"{address_field}: rank 0 cannot resolve {host!r} ({err.strerror or err}); set it to rank 0's host "
                "name or address")
    problem: OSError | None = None
    for family, kind, proto, _, address in infos:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the store does: TIME_WAIT is fine
            try:
                probe.bind(address)
                return None
            except OSError as err:
                problem = problem if problem is not None and problem.errno == errno.EADDRINUSE else err
    if problem is not None and problem.errno == errno.EADDRINUSE:
        return (f"MASTER_PORT: rank 0 cannot listen on {host}:{port} (port in use); "
                "export MASTER_PORT=<a free port>")
    reason = problem.strerror if problem is not None else "no address"
    return (f"{address_field}: rank 0 cannot listen on {host} ({reason}): it is not an address of rank 0's host "
            f"{socket.gethostname()!r}; set {address_field} to one of that host's addresses, or unset it")


def _store(rank: int, world: int, host: str, port: int, timeout: datetime.timedelta,
           address_field: str = "MASTER_ADDR") -> tdist.Store:
    """The rendezvous store rank 0 serves; port 0 lets the OS pick (the MPI path broadcasts it).
    `address_field` is where `host` came from, for the error that names it."""
    if world == 1:
        return tdist.HashStore()
    if rank == 0:
        problem = listen_problem(host, port, address_field)
        if problem is not None:
            raise DistError(problem)
    try:
        return tdist.TCPStore(host, port, world, is_master=rank == 0, timeout=timeout, wait_for_workers=False)
    except (RuntimeError, OSError) as err:
        if rank == 0:
            raise DistError(f"MASTER_PORT: rank 0 cannot listen on {host}:{port} ({str(err).splitlines()[0][:120]}); "
                            "export MASTER_PORT=<a free port>") from None
        raise DistError(f"{address_field}: rank {rank} could not reach rank 0's rendezvous at {host}:{port} within "
                        f"{timeout.total_seconds():g} s (runtime.collective_timeout_s); check {address_field} and "
                        "MASTER_PORT, and that rank 0 started") from None


def _address_field(environ: Mapping[str, str], master_addr: str | None) -> str:
    """Which setting chose the rendezvous address (for the error that names it)."""
    if master_addr:
        return "runtime.master_addr"
    return "MASTER_ADDR" if environ.get("MASTER_ADDR", "").strip() else "the derived rendezvous address (MASTER_ADDR)"


def init_distributed(device: str = "auto", threads_per_rank: int = 1, timeout_s: float = 600.0,
                     devices: Sequence[int] | None = None, deterministic: bool = True,
                     master_addr: str | None = None) -> DistContext:
    """Join (or form) the job's process group; safe to call twice (returns the same context).

    Args:
        device: runtime.device ('auto', 'cpu', 'cuda').
        threads_per_rank: torch intra-op threads of this process.
        timeout_s: how long collectives and the rendezvous wait for the other ranks.
        devices: runtime.devices, the GPU id of each local rank (None: local rank % visible GPUs).
        deterministic: runtime.deterministic, applied before any CUDA work (`runtime.configure_determinism`).
        master_addr: runtime.master_addr, rank 0's address for the rendezvous (None: MASTER_ADDR or derived).
    """
    global _CONTEXT
    if _CONTEXT is not None and tdist.is_initialized():
        return _CONTEXT
    configure_determinism(deterministic)
    torch.set_num_threads(threads_per_rank)
    timeout = datetime.timedelta(seconds=timeout_s)
    placement, comm = placement_from_env(), None
    if placement.launcher == "mpi":
        from mpi4py import MPI  # noqa: PLC0415 - importing initialises MPI; only under a launcher

        comm = MPI.COMM_WORLD
        rank, world = comm.Get_rank(), comm.Get_size()
        node = comm.Split_type(MPI.COMM_TYPE_SHARED, key=rank)  # the truth about who shares this node
        local_rank, local_size = node.Get_rank(), node.Get_size()
        node.Free()
        store, problem, field = None, None, _address_field(os.environ, master_addr)
        if rank == 0:
            host = store_host(os.environ, master_addr, local_size == world, socket.gethostname())
            try:
                store = _store(rank, world, host, 0, timeout, field)  # the OS picks the port; MPI tells the others
            except DistError as err:
                problem = str(err)  # sent to every rank: none is left waiting in the broadcast
        port = store.port if isinstance(store, tdist.TCPStore) else 0  # world size 1: a HashStore
        host, port, problem = comm.bcast((host, port, problem) if rank == 0 else None, root=0)
        if problem is not None:
            raise DistError(problem)
        if store is None:
            store = _store(rank, world, host, port, timeout, field)
    else:  # srun without MPI, or a plain run (world size 1)
        rank, world = placement.rank, placement.world_size
        local_rank, local_size = placement.local_rank, placement.local_size
        host, port = (rendezvous_address(scontrol=shutil.which("scontrol"), master_addr=master_addr) if world > 1
                      else ("127.0.0.1", 0))
        store = _store(rank, world, host, port, timeout, _address_field(os.environ, master_addr))

    dev = device_for(device, local_rank, local_size, torch.cuda.device_count(), devices)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    backend, warning = "gloo" if dev.type == "cpu" else "nccl", None
    if world > 1:  # every rank's GPU, so that all ranks agree on the backend
        store.set(f"fedmetanas/gpu/{rank}", f"{socket.gethostname()}\n{_gpu_id(dev)}")
        keys = [f"fedmetanas/gpu/{r}" for r in range(world)]
        owners = [_owner(value) for value in store.multi_get(keys)]
        backend, warning = plan_backend(owners)
    if warning and rank == 0:
        log.warning("warning: %s", warning)
    tdist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout,
                             **process_group_options(backend, dev))
    # Every rank creates it, in the same order after the main group (new_group is collective).
    side = tdist.new_group(backend="gloo", timeout=timeout) if world > 1 else None
    _CONTEXT = DistContext(rank, world, local_rank, local_size, dev, backend, comm, timeout_s, side)
    log.debug("rank %d/%d (local %d/%d, %s) on %s (%s)", rank, world, local_rank, local_size,
              placement.launcher, dev, backend)
    return _CONTEXT


def shutdown() -> None:
    """Close the process group started by `init_distributed`."""
    global _CONTEXT
    if _CONTEXT is not None:
        _CONTEXT.close()
    _CONTEXT = None


def leave(code: int) -> NoReturn:
    """End the process now with `code`: the process group closed, MPI finalized, stdio flushed, then
    `os._exit`, skipping the interpreter's teardown of torch's modules (~2 s on this 2-core machine for
    a 2-rank job: 9.4 s from start to exit against 6.4 s with this). For a run that stopped on a signal,
    whose files are closed: under MPICH's mpiexec a second Ctrl-C during those seconds is its "force
    abort" (exit 255, the proxies' assertion messages) although the run had already stopped cleanly."""
    shutdown()
    mpi = sys.modules.get("mpi4py.MPI")  # only where a launcher initialised it (`init_distributed`)
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        mpi.Finalize()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
