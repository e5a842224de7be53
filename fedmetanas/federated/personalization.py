"""Personalization after training: each client adapts the final model (the phase's rule) and is tested
on its local test split; and summaries of the per-client accuracies (pure functions)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
import torch
from torch import nn

from fedmetanas.algorithms.base import Phase, RoundPlan
from fedmetanas.algorithms.common import LocalContext, copy_state
from fedmetanas.dist import DistContext
from fedmetanas.federated.evaluation import evaluate
from fedmetanas.federated.executor import ClientExecutor, map_clients
from fedmetanas.federated.layout import FlatLayout
from fedmetanas.federated.scheduling import assign_to_ranks

if TYPE_CHECKING:
    from fedmetanas.federated.setup import Setup


def worst_fraction_mean(acc: np.ndarray, fraction: float = 0.1) -> float:
    """Mean accuracy of the worst `fraction` of clients (at least one client); NaNs are ignored."""
    values = np.sort(acc[np.isfinite(acc)])
    if values.size == 0:
        return float("nan")
    k = max(1, math.ceil(fraction * values.size))
    return float(values[:k].mean())


def summarize(acc: np.ndarray, prefix: str) -> dict[str, float]:
    """Mean, standard deviation and worst-10% mean of per-client accuracies, keyed with `prefix`."""
    finite = acc[np.isfinite(acc)]
    if finite.size == 0:
        return {f"{prefix}_mean": float("nan"), f"{prefix}_std": float("nan"), f"{prefix}_worst10": float("nan")}
    return {f"{prefix}_mean": float(finite.mean()), f"{prefix}_std": float(finite.std()),
            f"{prefix}_worst10": worst_fraction_mean(finite)}


def personalize_clients(ctx: DistContext, setup: Setup, phase: Phase, net: nn.Module,
                        lanes: Sequence[ClientExecutor], plan: RoundPlan,
                        context: Callable[[int, RoundPlan], LocalContext], steps: int, batch_size: int,
                        channels_last: bool) -> dict[str, np.ndarray]:
    """Every client adapts the final global model on its local train split (the phase's rule) and is
    tested on its local test split, before and after; clients spread over ranks and, within a rank,
    over its lanes (client i on lane i % lanes); one all-reduce.

    Returns the per-client arrays the log keeps under /personalization (NaN where a client has no
    local test split)."""
    k = len(setup.clients)
    layout = FlatLayout.of(("before", 3 * k), ("after", 3 * k))
    sums = layout.zeros(ctx.device)
    before_sums, after_sums = layout.view(sums, "before"), layout.view(sums, "after")
    before = phase.final_forward(net, plan)
    mine = assign_to_ranks(list(range(k)), [1.0] * k, ctx.world_size)[ctx.rank]
    todo = [cid for cid in mine if setup.clients[cid].test_idx.numel() > 0]

    def one(lane: ClientExecutor, cid: int) -> torch.Tensor:
        test_idx = setup.clients[cid].test_idx.to(ctx.device)
        sums_before = evaluate(before, setup.train, test_idx, batch_size, channels_last)
        copy_state(lane.worker, net)
        adapted = phase.personalize(lane.worker, lane.task, context(cid, plan), steps)
        replicas = [m for m in (lane.worker, lane.task) if m is not None]
        for m in replicas:
            m.eval()
        sums_after = evaluate(adapted, setup.train, test_idx, batch_size, channels_last)
        for m in replicas:
            m.train()
        return torch.cat([sums_before, sums_after])

    net.eval()  # the global model is only read: evaluated before adaptation, copied into the lanes
    for cid, both in zip(todo, map_clients(lanes, todo, one)):
        before_sums[3 * cid : 3 * cid + 3], after_sums[3 * cid : 3 * cid + 3] = both[:3], both[3:]
    net.train()
    ctx.all_reduce_sum(sums)
    s = sums.cpu().numpy().reshape(2, k, 3)
    with np.errstate(invalid="ignore", divide="ignore"):
        acc, loss = s[:, :, 1] / s[:, :, 2], s[:, :, 0] / s[:, :, 2]
    return {"personalization/acc_before": acc[0], "personalization/acc_after": acc[1],
            "personalization/loss_before": loss[0], "personalization/loss_after": loss[1],
            "personalization/test_sizes": s[0, :, 2].astype(np.int64)}
