"""Server-side averaging as pure functions on flat float64 vectors.

Each rank adds its clients' sample-weighted parameters into one flat buffer; the buffers are
summed across ranks by a single all-reduce and divided once. Accumulating in float64 keeps the
result independent of how clients are spread over ranks (to float32 rounding).
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch
from torch import nn


def aggregated_tensors(model: nn.Module) -> list[torch.Tensor]:
    """Everything the server averages: all parameters (weights and architecture logits) and the
    floating-point buffers (BN running statistics), in a fixed order."""
    params = list(model.parameters())
    buffers = [b for b in model.buffers() if b.is_floating_point()]
    return params + buffers


def numel(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() for t in tensors)


def add_weighted(buf: torch.Tensor, tensors: Sequence[torch.Tensor], weight: float) -> None:
    """buf += weight * concat(tensors), in float64 (buf is a flat float64 vector)."""
    offset = 0
    for t in tensors:
        n = t.numel()
        buf[offset : offset + n].add_(t.detach().reshape(-1).to(torch.float64), alpha=weight)
        offset += n


def flatten64(tensors: Sequence[torch.Tensor], length: int) -> torch.Tensor:
    """The first `length` values of concat(tensors), as one flat float64 vector (e.g. the parameters that
    lead `aggregated_tensors`)."""
    parts, taken = [], 0
    for t in tensors:
        if taken >= length:
            break
        flat = t.detach().reshape(-1)[: length - taken]
        parts.append(flat.to(torch.float64))
        taken += flat.numel()
    if taken < length:
        raise ValueError(f"flatten64: the tensors hold {taken} values, fewer than {length}")
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)


def write_flat(tensors: Sequence[torch.Tensor], flat: torch.Tensor) -> None:
    """Copy a flat vector back into the tensors (cast to each tensor's dtype)."""
    offset = 0
    with torch.no_grad():
        for t in tensors:
            n = t.numel()
            t.copy_(flat[offset : offset + n].view(t.shape).to(t.dtype))
            offset += n


def weighted_average(vectors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """Reference: sum_k w_k v_k / sum_k w_k (what the flat all-reduce must reproduce)."""
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("weighted_average: the weights must sum to a positive number")
    out = torch.zeros_like(vectors[0], dtype=torch.float64)
    for v, w in zip(vectors, weights):
        out += float(w) * v.to(torch.float64)
    return out / total
