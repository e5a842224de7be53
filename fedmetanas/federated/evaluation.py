"""Test-set evaluation of the global model, sharded over ranks and summed with one collective."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from fedmetanas.data.client_data import iterate_batches
from fedmetanas.data.datasets import TensorSplit
from fedmetanas.dist import DistContext
from fedmetanas.federated.layout import metrics_layout


@torch.no_grad()
def evaluate(forward: Callable[[torch.Tensor], torch.Tensor], split: TensorSplit, idx: torch.Tensor,
             batch_size: int, channels_last: bool = False) -> torch.Tensor:
    """[summed cross-entropy, correct predictions, count] over `idx` as a float64 vector.

    Sums (not means) so that shards from different ranks add up exactly.
    """
    out = torch.zeros(3, dtype=torch.float64, device=split.labels.device)
    for x, y in iterate_batches(split, idx, batch_size):
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        logits = forward(x)
        out[0] += torch.nn.functional.cross_entropy(logits, y, reduction="sum").to(torch.float64)
        out[1] += (logits.argmax(dim=1) == y).sum().to(torch.float64)
        out[2] += y.numel()
    return out


def shard(idx: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """This rank's contiguous slice of the evaluation indices."""
    n = idx.numel()
    lo, hi = rank * n // world_size, (rank + 1) * n // world_size
    return idx[lo:hi]


def evaluate_forwards(ctx: DistContext, net: nn.Module, forwards: dict[str, Callable[[torch.Tensor], torch.Tensor]],
                      test: TensorSplit, idx: torch.Tensor, batch_size: int,
                      channels_last: bool = False) -> dict[str, float]:
    """`{name}_loss` and `{name}_acc` of each forward over `idx`, each rank evaluating its shard and one
    all-reduce summing them (`net` in eval mode meanwhile)."""
    mine = shard(idx, ctx.rank, ctx.world_size).to(test.labels.device)
    layout = metrics_layout(list(forwards))
    net.eval()
    sums = torch.cat([evaluate(f, test, mine, batch_size, channels_last) for f in forwards.values()])
    net.train()
    ctx.all_reduce_sum(sums)
    out = {}
    for name, (loss, correct, count) in layout.split(sums.cpu()).items():
        out[f"{name}_loss"], out[f"{name}_acc"] = float(loss) / float(count), float(correct) / float(count)
    return out
