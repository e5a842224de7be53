"""Named segments of a flat float64 buffer that one all-reduce sums across ranks.

A round's buffer carries the sample-weighted parameters, the sample count, the stop flag, per-client
losses and flags and per-rank timings; evaluation and personalization sum their own small buffers the
same way. One declaration of the segments replaces hand-laid offsets; encoding is writing into a
segment's view, decoding is `split`. Pure: no process group needed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class FlatLayout:
    """Segments (name, length) laid end to end, in declaration order."""

    segments: tuple[tuple[str, int], ...]

    @classmethod
    def of(cls, *segments: tuple[str, int]) -> "FlatLayout":
        names = [n for n, _ in segments]
        if len(set(names)) != len(names):
            raise ValueError(f"FlatLayout: segment names must be unique, got {names}")
        if any(length < 0 for _, length in segments):
            raise ValueError("FlatLayout: segment lengths must be >= 0")
        return cls(tuple(segments))

    @property
    def size(self) -> int:
        return sum(length for _, length in self.segments)

    def offset(self, name: str) -> int:
        """Where segment `name` starts."""
        at = 0
        for n, length in self.segments:
            if n == name:
                return at
            at += length
        raise KeyError(f"FlatLayout has no segment {name!r}; it has {[n for n, _ in self.segments]}")

    def length(self, name: str) -> int:
        return dict(self.segments)[name]

    def zeros(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """A zeroed float64 buffer of this layout."""
        return torch.zeros(self.size, dtype=torch.float64, device=device)

    def view(self, buf: torch.Tensor, name: str) -> torch.Tensor:
        """Segment `name` of `buf` as a view (writing into it encodes)."""
        at = self.offset(name)
        return buf[at : at + self.length(name)]

    def split(self, buf: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every segment of `buf` by name (views)."""
        if buf.numel() != self.size:
            raise ValueError(f"FlatLayout: buffer has {buf.numel()} values, the layout {self.size}")
        out, at = {}, 0
        for name, length in self.segments:
            out[name] = buf[at : at + length]
            at += length
        return out


def round_layout(n_params: int, num_clients: int, world_size: int,
                 extra: tuple[tuple[str, int], ...] = ()) -> FlatLayout:
    """The round's buffer: [sum n*params | sum n | stop | dropped | client loss | client flag | client excluded |
    rank seconds | rank peak host memory | rank peak GPU memory | what the phase declared (`extra`)].
    `stop`: ranks asked to stop after the round (a signal); `dropped`: ranks whose clients a Ctrl-C cut short."""
    return FlatLayout.of(("params", n_params), ("n", 1), ("stop", 1), ("dropped", 1), ("loss", num_clients),
                         ("flag", num_clients), ("excluded", num_clients), ("rank_seconds", world_size),
                         ("rank_mib", world_size), ("rank_gpu_mib", world_size), *extra)


def client_columns(flag: np.ndarray, excluded: np.ndarray, loss: np.ndarray) -> dict[str, np.ndarray]:
    """The round's per-client log columns from the decoded buffer, one entry per participant (ascending id):
    `clients` (ids), `client_loss` (NaN where excluded) and `excluded`.

    The clients that sat the round out are left out: at 10,000 clients and 20 per round their entries were
    nearly all of a round's log row (~100 KB) and of every checkpoint (which keeps each round's row), so a
    long run's log and checkpoints grew with rounds x total clients.
    """
    ids = np.flatnonzero(flag > 0)
    out = excluded[ids] > 0
    return {"clients": ids.astype(np.int64), "client_loss": np.where(out, np.nan, loss[ids]), "excluded": out}


def metrics_layout(names: tuple[str, ...] | list[str], per: int = 3) -> FlatLayout:
    """Evaluation sums: [loss sum, correct, count] per named forward (or per client)."""
    return FlatLayout.of(*((name, per) for name in names))
