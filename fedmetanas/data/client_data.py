"""A client's view of the data: its index sets into the shared split, and how batches are drawn."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from fedmetanas.config import ConfigError
from fedmetanas.data.datasets import TensorSplit
from fedmetanas.runtime import to_device

log = logging.getLogger(__name__)


@dataclass
class ClientData:
    """Which rows of the shared train split one client owns, split into local train and local test."""

    client_id: int
    train_idx: torch.Tensor  # int64 rows of the train split
    test_idx: torch.Tensor  # int64 rows of the train split held out for local evaluation

    @property
    def num_train(self) -> int:
        """Local training-set size: the client's weight in sample-weighted aggregation."""
        return int(self.train_idx.numel())


def sample_batch(split: TensorSplit, idx: torch.Tensor, batch_size: int, generator: torch.Generator,
                 augment: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw a batch of `batch_size` distinct rows of `idx` (all of them, shuffled, if fewer).

    Args:
        split: the dataset split the indices point into (on any device).
        idx: int64 row indices owned by the client.
        batch_size: rows per batch, without replacement within the batch.
        generator: the only source of randomness (CPU); also drives augmentation.
        augment: apply the split's flip + crop augmentation.

    Returns:
        (x, y) on the split's device, as from `TensorSplit.batch`.
    """
    return split.batch(sample_rows(idx, batch_size, generator), augment=augment, generator=generator)


def sample_rows(idx: torch.Tensor, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """The rows of `idx` a batch of `sample_batch` holds (its one draw from `generator`): `batch_size`
    distinct ones, or all of them shuffled if fewer. Several clients' rows can then be gathered at once."""
    n = int(idx.numel())
    if n == 0:
        raise ValueError("sample_batch needs a non-empty index set")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    perm = torch.randperm(n, generator=generator, device=generator.device)[:batch_size]
    return idx.index_select(0, to_device(perm, idx.device))  # non-blocking: no host sync per batch


class Rows(Sequence[torch.Tensor]):
    """Each client's rows as views into one flat int64 tensor (offsets: client i owns flat[o[i]:o[i+1]])."""

    def __init__(self, flat: torch.Tensor, offsets: np.ndarray) -> None:
        self.flat, self.offsets = flat, offsets

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, cid: int) -> torch.Tensor:  # type: ignore[override]
        if not 0 <= cid < len(self):
            raise IndexError(f"client {cid} out of range 0..{len(self) - 1}")
        return self.flat[int(self.offsets[cid]) : int(self.offsets[cid + 1])]

    @property
    def sizes(self) -> np.ndarray:
        """Rows per client (int64)."""
        return np.diff(self.offsets)

    def to(self, device: torch.device | str) -> Rows:
        return Rows(self.flat.to(device), self.offsets)


class ClientIndex(Sequence[ClientData]):
    """Every client's local train and test rows, held as two flat tensors with offsets.

    A run of 10,000 clients used to hold 20,000 index tensors and 10,000 ClientData objects built at
    set-up (~0.2 s and tens of MiB at 10,000 clients) although a round uses 20 of them; here a client's
    ClientData is two views made when it is asked for, and the set-up builds two tensors whatever the
    number of clients. Indexing and iterating give ClientData as a list of them did.
    """

    def __init__(self, train: Rows, test: Rows) -> None:
        if len(train) != len(test):
            raise ValueError(f"ClientIndex: {len(train)} train and {len(test)} test row sets")
        self.train, self.test = train, test

    @classmethod
    def from_splits(cls, splits: Sequence[tuple[np.ndarray, np.ndarray]]) -> ClientIndex:
        """From (local_train, local_test) pairs as `partition.split_local` gives them, ids in order."""
        def rows(arrays: list[np.ndarray]) -> Rows:
            offsets = np.zeros(len(arrays) + 1, dtype=np.int64)
            np.cumsum([len(a) for a in arrays], out=offsets[1:])
            flat = np.concatenate(arrays).astype(np.int64, copy=False) if arrays else np.zeros(0, np.int64)
            return Rows(torch.from_numpy(np.ascontiguousarray(flat)), offsets)

        return cls(rows([np.asarray(tr) for tr, _ in splits]), rows([np.asarray(te) for _, te in splits]))

    def __len__(self) -> int:
        return len(self.train)

    def __getitem__(self, cid: int) -> ClientData:  # type: ignore[override]
        return ClientData(client_id=int(cid), train_idx=self.train[cid], test_idx=self.test[cid])

    @property
    def train_sizes(self) -> np.ndarray:
        """Each client's local train split size (its weight in aggregation), int64."""
        return self.train.sizes

    @property
    def test_sizes(self) -> np.ndarray:
        """Each client's local test split size, int64."""
        return self.test.sizes


def build_clients(splits: list[tuple[np.ndarray, np.ndarray]]) -> ClientIndex:
    """The clients of (local_train, local_test) pairs from `partition.split_local`, ids in order."""
    return ClientIndex.from_splits(splits)


def iterate_batches(split: TensorSplit, idx: torch.Tensor,
                    batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """In-order, unshuffled, unaugmented batches over `idx` (the last may be smaller), for evaluation."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for start in range(0, int(idx.numel()), batch_size):
        yield split.batch(idx[start:start + batch_size])


def _span(sorted_sizes: Sequence[int]) -> str:
    lo, hi = sorted_sizes[0], sorted_sizes[-1]
    return f"{lo}" if lo == hi else f"{lo}..{hi}"


def check_batch_sizes(batches: Sequence[tuple[str, int, int]], train_sizes: Sequence[int]) -> list[str]:
    """Refuse a batch size that no client can fill; warn (once per field) when only some clients cannot.

    A batch never repeats a sample, so a client whose local train split is smaller than the batch uses its
    whole split as every batch. Larger than every client's split is a mistake (a batch of 100000 made one
    local step take minutes): refused. Larger than only the smallest splits is what a very non-IID
    partition gives: those clients take their whole split, and the warning says so.

    Args:
        batches: (field, batch size, share of the split it draws from) as the algorithm's `batch_sizes()`.
        train_sizes: each client's local train split size (ClientData.num_train).

    Returns:
        The warnings logged (empty when every client fills every batch).

    Raises:
        ConfigError: naming the field, the split sizes and the largest size that works.
    """
    warnings = []
    for name, size, share in batches:
        usable = sorted(n // share for n in train_sizes)
        if not usable:
            continue
        what = "half of its local train split" if share == 2 else "local train split"
        if size > usable[-1]:
            raise ConfigError(
                f"{name} ({size}) is larger than every client's {what} ({_span(usable)} samples), so each batch "
                f"would be a whole split; use at most {usable[0]} (the smallest split)")
        small = [n for n in usable if n < size]
        if small:
            text = (f"{name} ({size}) is larger than the {what} of {len(small)} of {len(usable)} clients: their "
                    f"batches are their whole split ({_span(small)} samples)")
            log.warning(text)
            warnings.append(text)
    return warnings
