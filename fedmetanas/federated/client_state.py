"""State that each client keeps across rounds (a control variate, a personal head, ...).

A phase declares it (`Phase.client_state`: name -> values per client). Clients move between ranks from
round to round (`scheduling.assign_to_ranks` balances each round afresh, and a resume may run on another
rank count), so no rank owns a client: every rank keeps every client's state, and the round's one
all-reduce carries the participants' new state (one row per participant), which every rank writes into
its table. The table is float32, as the parameters it usually mirrors; it goes into every checkpoint.
Memory: clients x declared size per rank (a weight-sized state of a 1M-parameter net, 1,000 clients: 4 GB).
"""

from __future__ import annotations

from typing import Any

import torch


class ClientStates:
    """Every client's declared state, on one rank (identical on every rank)."""

    def __init__(self, sizes: dict[str, int], num_clients: int, device: torch.device | str = "cpu") -> None:
        self.sizes = dict(sizes)
        self.tables = {name: torch.zeros(num_clients, size, device=device) for name, size in self.sizes.items()}

    def __bool__(self) -> bool:
        return bool(self.sizes)

    def of(self, cid: int) -> dict[str, torch.Tensor]:
        """Client `cid`'s state, as copies its update may change freely."""
        return {name: table[cid].clone() for name, table in self.tables.items()}

    def write(self, cids: list[int], rows: dict[str, torch.Tensor]) -> None:
        """Replace the state of `cids` by `rows[name]` (len(cids) x size each, any float dtype)."""
        if not cids:
            return
        index = torch.tensor(cids, dtype=torch.long, device=next(iter(self.tables.values())).device)
        for name, table in self.tables.items():
            table[index] = rows[name].to(device=table.device, dtype=table.dtype)

    def state_dict(self) -> dict[str, Any]:
        return {name: table.cpu() for name, table in self.tables.items()}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Restore `state_dict`'s tables; a checkpoint without them (an older one, or a phase that keeps
        none) leaves the zeros."""
        for name, saved in (state or {}).items():
            if name in self.tables:
                if saved.shape != self.tables[name].shape:
                    raise ValueError(f"client state {name!r}: checkpoint {tuple(saved.shape)}, "
                                     f"run {tuple(self.tables[name].shape)}")
                self.tables[name].copy_(saved)
