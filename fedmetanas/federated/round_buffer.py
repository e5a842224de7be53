"""What one round's all-reduce carries, as the current phase declared it, and how a client goes into it.

The buffer (`layout.round_layout`) always holds the engine's segments: the sample-weighted model sum,
the sample count, the stop flag, per-client losses and flags, per-rank timings. A phase may declare
more (`Phase.model_rows`, `Phase.uploads`, `Phase.client_state`); each becomes a segment after them, so
a phase that declares nothing sends exactly the bytes it always did. Rows are laid out by slot: the
round's participants in ascending id, the same on every rank, so each rank writes only its clients'
rows and the sum over ranks is every row.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from fedmetanas.algorithms.base import Phase, Upload
from fedmetanas.algorithms.common import LocalResult
from fedmetanas.algorithms.server import RoundSums
from fedmetanas.federated.layout import FlatLayout, round_layout

MODEL_ROWS = "model_rows"


def upload_segment(name: str) -> str:
    return f"upload/{name}"


def state_segment(name: str) -> str:
    return f"state/{name}"


class RoundBuffer:
    """The round's segments for one phase: the layout, and encoding a client into a lane's buffer."""

    def __init__(self, phase: Phase, model_size: int, num_clients: int, slots: int, world_size: int) -> None:
        self.model_size, self.slots, self.num_clients = model_size, slots, num_clients
        self.rows = phase.model_rows
        self.uploads: tuple[Upload, ...] = tuple(phase.uploads())
        self.state_sizes = dict(phase.client_state())
        extra: list[tuple[str, int]] = []
        if self.rows:
            extra.append((MODEL_ROWS, slots * model_size))
        for u in self.uploads:
            extra.append((upload_segment(u.name), u.size * (slots if u.reduce == "rows" else 1)))
        for name, size in self.state_sizes.items():
            extra.append((state_segment(name), slots * size))
        self.layout: FlatLayout = round_layout(0 if self.rows else model_size, num_clients, world_size, tuple(extra))

    def add(self, seg: dict[str, torch.Tensor], cid: int, slot: int, n: int, loss: float,
            tensors: list[torch.Tensor], result: LocalResult | None = None) -> bool:
        """Client `cid` (round slot `slot`, `n` samples) into a lane's segments; False (and nothing but its
        flags written) when its loss or anything it sends is not finite: it is then excluded."""
        seg["flag"][cid] = 1.0
        flat = torch.cat([t.detach().reshape(-1) for t in tensors])
        extras = self._extras(cid, result)
        finite = math.isfinite(loss) and all(bool(torch.isfinite(v).all()) for v in (flat, *extras.values()))
        if not finite:
            seg["excluded"][cid] = 1.0  # excluded: contributes nothing to the average
            return False
        if self.rows:
            seg[MODEL_ROWS].view(self.slots, -1)[slot] = flat.to(torch.float64)
        else:
            seg["params"].add_(flat.to(torch.float64), alpha=float(n))
        for u in self.uploads:
            value, view = extras[upload_segment(u.name)].to(torch.float64), seg[upload_segment(u.name)]
            if u.reduce == "rows":
                view.view(self.slots, -1)[slot] = value
            else:
                view.add_(value, alpha=float(n) if u.reduce == "weighted" else 1.0)
        for name in self.state_sizes:
            seg[state_segment(name)].view(self.slots, -1)[slot] = extras[state_segment(name)].to(torch.float64)
        seg["n"] += n
        seg["loss"][cid] = loss
        return True

    def _extras(self, cid: int, result: LocalResult | None) -> dict[str, torch.Tensor]:
        """The client's declared uploads and new state, flat, checked against their declared sizes."""
        out: dict[str, torch.Tensor] = {}
        wanted = [(upload_segment(u.name), u.name, u.size, "uploads") for u in self.uploads]
        wanted += [(state_segment(n), n, s, "state") for n, s in self.state_sizes.items()]
        for key, name, size, kind in wanted:
            given: dict[str, Any] = getattr(result, kind, {}) if result is not None else {}
            if name not in given or given[name].numel() != size:
                have = "nothing" if name not in given else f"{given[name].numel()} values"
                raise ValueError(f"client {cid}: the phase declares {kind} {name!r} of {size} values; its local "
                                 f"update returned {have} (LocalResult.{kind}[{name!r}])")
            out[key] = given[name].detach().reshape(-1)
        return out

    def sums(self, seg: dict[str, torch.Tensor], clients: list[int], included: torch.Tensor, weights: torch.Tensor,
             n: float, old: torch.Tensor, num_params: int) -> RoundSums:
        """The all-reduced segments as the server step receives them."""
        uploads = {u.name: seg[upload_segment(u.name)].view(self.slots, -1) if u.reduce == "rows"
                   else seg[upload_segment(u.name)] for u in self.uploads}
        return RoundSums(n=n, clients=torch.tensor(clients, dtype=torch.long), weights=weights, included=included,
                         num_clients=self.num_clients, num_params=num_params, old=old,
                         model_sum=None if self.rows else seg["params"],
                         model_rows=seg[MODEL_ROWS].view(self.slots, -1) if self.rows else None, uploads=uploads)

    def states(self, seg: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The participants' new state rows (slots x size per name)."""
        return {name: seg[state_segment(name)].view(self.slots, -1) for name in self.state_sizes}
