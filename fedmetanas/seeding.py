"""Random generators derived from (seed, round, client, purpose): placement never changes results.

A client's randomness depends only on these coordinates, never on which rank or stream runs it,
so the same config gives the same search under any rank count.
"""

from __future__ import annotations

import enum

import numpy as np
import torch


class Purpose(enum.IntEnum):
    """Independent random streams a client or the server draws from."""

    INIT = 0
    PARTITION = 1
    SAMPLING = 2
    BATCHES = 3
    GUMBEL = 4
    EVAL = 5
    PERSONALIZE = 6  # which clients personalization measures (personalize.max_clients)


def derive_seed(seed: int, *coords: int) -> int:
    """A 63-bit seed mixed from the run seed and integer coordinates (SeedSequence hashing)."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, *[int(c) & 0xFFFFFFFF for c in coords]])
    return int(state.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def torch_generator(seed: int, *coords: int) -> torch.Generator:
    """A CPU torch.Generator for the given coordinates."""
    g = torch.Generator(device="cpu")
    g.manual_seed(derive_seed(seed, *coords))
    return g


def numpy_generator(seed: int, *coords: int) -> np.random.Generator:
    """A numpy Generator for the given coordinates."""
    return np.random.default_rng(derive_seed(seed, *coords))
