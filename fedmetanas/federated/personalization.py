"""Personalization after training: each client adapts the final model (the phase's rule) and is tested
on its local test split; which clients do (all, or a seeded sample of `personalize.max_clients`); and
summaries of the per-client accuracies (pure functions)."""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
import torch
from torch import nn

from fedmetanas.algorithms.base import Phase, RoundPlan
from fedmetanas.algorithms.common import LocalContext, copy_state
from fedmetanas.config import Config
from fedmetanas.dist import DistContext
from fedmetanas.federated.evaluation import evaluate
from fedmetanas.federated.executor import ClientExecutor, map_clients
from fedmetanas.federated.layout import FlatLayout
from fedmetanas.federated.scheduling import assign_to_ranks
from fedmetanas.seeding import Purpose, numpy_generator

if TYPE_CHECKING:
    from fedmetanas.federated.setup import Setup

log = logging.getLogger(__name__)


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


def personalization_sample(test_sizes: np.ndarray, max_clients: int, seed: int) -> np.ndarray:
    """The clients personalization measures, sorted: every client with a local test split, or, when there are
    more than `max_clients` (> 0) of them, a uniform sample of that many drawn from (seed, PERSONALIZE).

    Adapting a client costs as much as a few rounds of its training, so at 10,000 clients measuring each
    would take hours; a uniform sample estimates the same mean. A pure function of its arguments: every
    rank, whatever their number, measures the same clients.
    """
    eligible = np.flatnonzero(np.asarray(test_sizes) > 0)
    if max_clients <= 0 or max_clients >= eligible.size:
        return eligible
    rng = numpy_generator(seed, Purpose.PERSONALIZE)
    return np.sort(rng.choice(eligible, size=max_clients, replace=False))


def personalize_clients(ctx: DistContext, setup: Setup, phase: Phase, net: nn.Module,
                        lanes: Sequence[ClientExecutor], plan: RoundPlan,
                        context: Callable[[int, RoundPlan], LocalContext], steps: int, batch_size: int,
                        channels_last: bool, chosen: Sequence[int]) -> dict[str, np.ndarray]:
    """Each client of `chosen` (`personalization_sample`) adapts the final global model on its local train
    split (the phase's rule) and is tested on its local test split, before and after; the clients spread
    over ranks and, within a rank, over its lanes (client i on lane i % lanes); one all-reduce of
    6 values a chosen client (not a client of the run).

    Returns the per-client arrays the log keeps under /personalization, one entry per client of the run
    (NaN where a client has no local test split or was not chosen; `measured` says which were)."""
    chosen = np.asarray(chosen, dtype=np.int64)
    k, m = len(setup.clients), len(chosen)
    layout = FlatLayout.of(("before", 3 * m), ("after", 3 * m))
    sums = layout.zeros(ctx.device)
    before_sums, after_sums = layout.view(sums, "before"), layout.view(sums, "after")
    before = phase.final_forward(net, plan)
    slots = assign_to_ranks(range(m), [1.0] * m, ctx.world_size)[ctx.rank]  # positions in `chosen`
    todo = [int(chosen[j]) for j in slots]

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
    for j, both in zip(slots, map_clients(lanes, todo, one)):
        before_sums[3 * j : 3 * j + 3], after_sums[3 * j : 3 * j + 3] = both[:3], both[3:]
    net.train()
    ctx.all_reduce_sum(sums)
    s = sums.cpu().numpy().reshape(2, m, 3)
    acc, loss = np.full((2, k), np.nan), np.full((2, k), np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        acc[:, chosen], loss[:, chosen] = s[:, :, 1] / s[:, :, 2], s[:, :, 0] / s[:, :, 2]
    measured = np.zeros(k, dtype=bool)
    measured[chosen] = True
    # A client whose adapted model's loss is NaN/Inf diverged: its accuracy (argmax of NaN logits) is no
    # result, so neither is logged; `diverged` says which, and the run reports them (`divergence_error`).
    diverged = measured & ~np.isfinite(loss[1])
    acc[1, diverged] = loss[1, diverged] = np.nan
    return {"personalization/acc_before": acc[0], "personalization/acc_after": acc[1],
            "personalization/loss_before": loss[0], "personalization/loss_after": loss[1],
            "personalization/test_sizes": setup.clients.test_sizes, "personalization/measured": measured,
            "personalization/diverged": diverged}


def divergence_error(personal: dict[str, np.ndarray], steps: int, lr: float) -> str | None:
    """The one line that says which clients' personalization diverged (None when none did): their mean
    after adaptation would be no result, so the run reports none and says what to lower."""
    clients = np.flatnonzero(personal.get("personalization/diverged", np.zeros(0, dtype=bool))).tolist()
    if not clients:
        return None
    measured = int(np.count_nonzero(personal["personalization/measured"]))
    shown = ", ".join(map(str, clients[:10])) + (f" and {len(clients) - 10} more" if len(clients) > 10 else "")
    rate = f"personalize.lr={lr:g}" if lr > 0 else "the algorithm's last learning rate (personalize.lr: 0)"
    return (f"personalization diverged for {len(clients)} of {measured} clients ({shown}): the loss after "
            f"personalize.steps={steps} at {rate} is NaN/Inf, so no personalized accuracy is reported (the global "
            "model's results stand, in the run directory); lower personalize.lr (or personalize.steps)")


def personalize_final(cfg: Config, ctx: DistContext, setup: Setup, phase: Phase, net: nn.Module,
                      executors: list[ClientExecutor], plan: RoundPlan,
                      context: Callable[[int, RoundPlan], LocalContext]
                      ) -> tuple[dict[str, np.ndarray] | None, dict[str, float], str | None]:
    """After the final evaluation: the chosen clients adapt the final model (`personalize.steps` at
    `personalize.lr`, relative to the phase's base rate) and are tested before and after.

    Returns (per-client arrays for the log or None, the summary for /final, a fault line or None). A
    diverged client's mean would be no result: then no summary is recorded or printed, and the fault says
    why."""
    p = cfg.personalize
    if p.steps <= 0:
        return None, {}, None
    if not setup.clients.test_sizes.any():
        log.warning("personalization skipped: no client has a local test sample (data.local_test_fraction "
                    "%g); raise it to measure personalization", cfg.data.local_test_fraction)
        return None, {}, None
    base = phase.personalize_base_lr()
    lr_scale = p.lr / base if p.lr > 0 and base > 0 else plan.lr_scale
    chosen = personalization_sample(setup.clients.test_sizes, p.max_clients, cfg.federated.seed)
    personal = personalize_clients(ctx, setup, phase, net, executors, dataclasses.replace(plan, lr_scale=lr_scale),
                                   context, p.steps, cfg.eval.batch_size, cfg.model.channels_last, chosen)
    fault = divergence_error(personal, p.steps, p.lr)
    if fault is not None:
        return personal, {}, fault
    return personal, {**summarize(personal["personalization/acc_before"], "personal_before"),
                      **summarize(personal["personalization/acc_after"], "personal_after"),
                      "personal_clients": len(chosen)}, None
