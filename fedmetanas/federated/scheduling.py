"""Which clients take part in a round, and which rank runs each of them."""

from __future__ import annotations

import heapq
from typing import Sequence

import numpy as np

from fedmetanas.seeding import Purpose, numpy_generator


def clients_per_round(num_clients: int, clients_per_round: int, participation: float) -> int:
    """How many clients take part each round (an explicit count wins over a fraction)."""
    if clients_per_round > 0:
        return min(clients_per_round, num_clients)
    return max(1, int(round(participation * num_clients)))


def sample_clients(num_clients: int, count: int, seed: int, round_idx: int) -> np.ndarray:
    """The round's participants, sorted; the same draw whatever the rank count."""
    if count >= num_clients:
        return np.arange(num_clients)
    rng = numpy_generator(seed, Purpose.SAMPLING, round_idx)
    return np.sort(rng.choice(num_clients, size=count, replace=False))


def assign_to_ranks(clients: Sequence[int], loads: Sequence[float], world_size: int) -> list[list[int]]:
    """Balance clients over ranks by their load (longest-processing-time-first greedy).

    Deterministic: ties break by client id and rank index, so every rank computes the same plan.
    """
    order = sorted(clients, key=lambda c: (-loads[c], c))
    heap = [(0.0, r) for r in range(world_size)]
    plan: list[list[int]] = [[] for _ in range(world_size)]
    for c in order:
        load, r = heapq.heappop(heap)
        plan[r].append(int(c))
        heapq.heappush(heap, (load + float(loads[c]), r))
    return [sorted(p) for p in plan]
