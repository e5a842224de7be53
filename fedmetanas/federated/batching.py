"""How many of a round's clients a rank steps together (`runtime.client_batch`), and why.

An explicit K > 1 is the user's choice: a phase whose rule has no batched form of its own is refused at
set-up (`refuse_unbatchable`), never silently run another way. `auto` (the default) picks by device:

- **CPU: one client after another.** The batched supernet step (`search.stacked`) computes the union of
  the clients' sampled ops, each client's weight 0 on the ops it did not sample: ~8x fewer aten ops per
  client-step, but ~3x the arithmetic of the sparse sequential step, and a CPU core is compute-bound on it
  (`benchmarks/kernels.py`, docs/batched.md: the batched soft top-2 and hard steps are slower per client
  on 2 cores). Fixed networks gain at most ~1.1x there (the CNN loses 2x).
- **GPU: the round's clients in batches as large as memory holds.** A client's sequential step is
  thousands of launches of tiny kernels; a batch launches each kernel once for all of them. The batch
  size is fitted to the device's memory from a probe (peak memory of a batch of 1 and of 2 clients: the
  bytes one more client costs), the same on every rank (the smallest of the ranks' fits), so a batch is
  the same computation whatever the rank count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from fedmetanas.algorithms.base import Phase
from fedmetanas.config import ConfigError

MEMORY_SHARE = 0.8  # of the device's total memory a batch may fill (the rest: the model, lanes, allocator slack)


@dataclass(frozen=True)
class BatchChoice:
    """Clients per batch (1: one after another) and the reason the console and the log give."""

    k: int
    why: str


def refuse_unbatchable(setting: int | str, phases: list[Phase]) -> None:
    """An explicit `runtime.client_batch` > 1 with a phase whose rule has no batched form of its own: one
    error naming the field and the fix (never a silently different computation)."""
    if setting == "auto" or int(setting) <= 1:
        return
    for phase in phases:
        reason = phase.batch_refusal()
        if reason is not None:
            raise ConfigError(f"runtime.client_batch: {setting} but {reason}; set runtime.client_batch: 1 "
                              "(or auto, which steps such a phase's clients one after another)")


def fit_client_batch(per_client_bytes: float, fixed_bytes: float, total_bytes: float, clients: int) -> int:
    """The most clients (at least 1, at most `clients`) whose batch fits `MEMORY_SHARE` of `total_bytes`,
    given what the batch costs beyond one client's share (`fixed_bytes`) and per client. Pure."""
    room = MEMORY_SHARE * total_bytes - fixed_bytes
    if per_client_bytes <= 0:
        return max(1, clients)
    return int(min(max(1, clients), max(1, math.floor(room / per_client_bytes))))


def choose(setting: int | str, device: torch.device, phase_batches: bool, clients: int,
           probe: Callable[[int], int] | None = None, agree: Callable[[int], int] | None = None) -> BatchChoice:
    """The round's batch size: `setting` (an int, or `auto`), on `device`, for a phase that can
    (`phase_batches`) step `clients` clients together. `probe(k)` runs a batch of k clients and returns its
    peak device memory in bytes (GPU, auto only); `agree(k)` gives the ranks' smallest k."""
    if setting != "auto":
        k = int(setting)
        if k > 1 and phase_batches:
            return BatchChoice(k, f"runtime.client_batch {k}")
        return BatchChoice(1, "runtime.client_batch 1" if k <= 1 else "this phase has no batched form")
    if not phase_batches:
        return BatchChoice(1, "auto: this phase has no batched form")
    if device.type != "cuda" or probe is None:
        return BatchChoice(1, "auto on a CPU: the batched step computes the union of the clients' ops and is "
                              "slower per client on a CPU (docs/batched.md)")
    if clients <= 1:
        return BatchChoice(1, "auto: one client in the round")
    one, two = probe(1), probe(2)
    per_client = max(two - one, 1)
    total = torch.cuda.get_device_properties(device).total_memory
    k = fit_client_batch(per_client, one - per_client, total, clients)
    if agree is not None:
        k = agree(k)
    return BatchChoice(k, f"auto on a GPU: {k} of {clients} clients per batch fit {MEMORY_SHARE:.0%} of "
                          f"{total / 2**30:.0f} GiB at {per_client / 2**20:.0f} MiB per client (measured)")
