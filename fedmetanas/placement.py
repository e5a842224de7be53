"""Where the launcher put this process, read from its environment variables alone (no torch, no MPI).

Split from `fedmetanas.dist` so that code running before torch loads (the entry point's Ctrl-C handler,
which must know whether it is rank 0) reads the same rules. Every function is pure over a mapping and
tested with fake environments in tests/test_dist.py; `fedmetanas.dist` re-exports them.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

# Variables that tell us an MPI launcher started this process.
_MPI_ENV = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS", "HYDRA_CONTROL_FD")


class DistError(RuntimeError):
    """A user-fixable problem with ranks or devices; the message names the fix."""


def launched_by_mpi(environ: Mapping[str, str] | None = None) -> bool:
    """Whether the environment shows an MPI launcher (so mpi4py must be used)."""
    env = os.environ if environ is None else environ
    return any(k in env for k in _MPI_ENV)


def launched_by_srun(environ: Mapping[str, str] | None = None) -> bool:
    """Whether this is a task of an `srun --mpi=none` step; the batch shell itself (no step id) is not."""
    env = os.environ if environ is None else environ
    return "SLURM_PROCID" in env and "SLURM_STEP_ID" in env and not launched_by_mpi(env)


@dataclass(frozen=True)
class Placement:
    """Where the launcher put this process, as its environment variables tell it."""

    rank: int
    world_size: int
    local_rank: int
    local_size: int
    launcher: Literal["mpi", "srun", "none"]


def env_int(env: Mapping[str, str], *keys: str) -> int | None:
    """The first of `keys` that is set, as an integer (None when none is)."""
    for key in keys:
        if env.get(key, "").strip():
            try:
                return int(env[key])
            except ValueError:
                raise DistError(f"{key}={env[key]!r} is not an integer; unset it or fix the launcher") from None
    return None


def tasks_per_node(spec: str) -> list[int]:
    """Slurm's compressed task counts per node ('2(x3),1') expanded to one entry per node ([2, 2, 2, 1])."""
    counts: list[int] = []
    for part in filter(None, spec.split(",")):
        found = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not found:
            raise DistError(f"SLURM_TASKS_PER_NODE={spec!r} is not Slurm's 'N(xM),K' form; "
                            "unset it or fix the launcher")
        counts += [int(found.group(1))] * int(found.group(2) or 1)
    return counts


def _slurm_local_size(env: Mapping[str, str]) -> int | None:
    spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    if not spec:
        return None
    counts, node = tasks_per_node(spec), env_int(env, "SLURM_NODEID") or 0
    return counts[node] if node < len(counts) else None


# Node-local (rank, size) variables of each MPI, most specific first.
_LOCAL_ENV = (("OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE"), ("MPI_LOCALRANKID", "MPI_LOCALNRANKS"))


def _local_from_env(env: Mapping[str, str]) -> tuple[int | None, int | None]:
    """(local rank, ranks on this node) from the launcher, None where it does not say.

    MPI's own variables come first: under `mpirun` inside a Slurm job every rank also inherits the
    launcher step's SLURM_LOCALID (0 for all), which is right only for tasks that srun started itself.
    """
    for rank_key, size_key in _LOCAL_ENV:
        if rank_key in env:
            return env_int(env, rank_key), env_int(env, size_key)
    if "SLURM_STEP_ID" in env:
        return env_int(env, "SLURM_LOCALID"), _slurm_local_size(env)
    return None, None


def local_rank_from_env(environ: Mapping[str, str] | None = None) -> int | None:
    """This process's rank on its node (OpenMPI, MPICH/Intel MPI, or an srun task); None if unknown."""
    return _local_from_env(os.environ if environ is None else environ)[0]


def placement_from_env(environ: Mapping[str, str] | None = None) -> Placement:
    """Rank, size and node-local rank/size from the launcher's variables; a plain run is rank 0 of 1.

    Under MPI this is a hint (MPI itself is the authority once initialised); under `srun` without MPI
    it is all there is. Unknown node-local values fall back to the global ones (a single node).
    """
    env = os.environ if environ is None else environ
    in_step = "SLURM_STEP_ID" in env  # a task srun started (the batch shell has no step id)
    if launched_by_mpi(env):
        rank = env_int(env, "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK") or 0
        world = env_int(env, "OMPI_COMM_WORLD_SIZE", "PMI_SIZE") or (
            env_int(env, "SLURM_STEP_NUM_TASKS") if in_step else None) or rank + 1  # PMIx names no size
        launcher: Literal["mpi", "srun", "none"] = "mpi"
    elif launched_by_srun(env):
        rank = env_int(env, "SLURM_PROCID") or 0
        world = env_int(env, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS") or 1
        launcher = "srun"
    else:
        return Placement(0, 1, 0, 1, "none")
    local_rank, local_size = _local_from_env(env)
    if local_rank is None or local_size is None:  # nothing says otherwise: one node
        local_rank, local_size = rank, world
    return Placement(rank, world, local_rank, local_size, launcher)
