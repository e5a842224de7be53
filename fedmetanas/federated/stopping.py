"""The rules that end a run early, asked after every round with the same answer on every rank: a signal
(`Preempted`), a non-finite client update under `federated.nonfinite` (`NumericalFault`), and the
training-time budget (`federated.time_budget_s`)."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


class Preempted(RuntimeError):
    """A signal (SIGTERM, SIGUSR1, SIGINT) asked the run to stop; a checkpoint of the last round was written.
    `signal_name` is the signal this rank received ("" where it reached another rank)."""

    def __init__(self, message: str, signal_name: str = "") -> None:
        super().__init__(message)
        self.signal_name = signal_name


class NumericalFault(RuntimeError):
    """A client's update held NaN/Inf and `federated.nonfinite: stop` was set, or every update was."""


def nonfinite_fault(rnd: int, flags: np.ndarray, excluded: np.ndarray, policy: str) -> NumericalFault | None:
    """The fault that ends the run after round `rnd` (participants `flags`, their non-finite updates
    `excluded`), or None (then the excluded updates, if any, were only dropped: a warning says whose)."""
    if excluded.any() and policy == "stop":
        return NumericalFault(
            f"round {rnd + 1}: the update of client(s) {np.flatnonzero(excluded).tolist()} holds NaN/Inf; "
            "lower the learning rates, or set federated.nonfinite: exclude to drop such updates")
    if flags.any() and excluded[flags].all():
        return NumericalFault(f"round {rnd + 1}: every client's update held NaN/Inf and was excluded, so the model "
                              "did not change; lower the learning rates")
    if excluded.any():
        log.warning("round %d: excluded non-finite update(s) of client(s) %s", rnd + 1,
                    np.flatnonzero(excluded).tolist())
    return None


def training_seconds(wall_time: float, rows: list[tuple[str, dict[str, Any]]]) -> float:
    """The run's training time: wall time less the rounds' evaluation time (how often the model is
    measured is not the method's cost)."""
    return wall_time - sum(float(row["time_eval"]) for _, row in rows)


def log_stop_rule(stopped_by: str, end: int, total: int, seconds: float, budget: float, phase: int) -> None:
    """Say which stop rule ended the run after round `end` (of `total` planned); `seconds` is the training
    time the budget rule compared with `federated.time_budget_s`, `phase` the (1-based) phase it ends in."""
    if stopped_by == "time_budget":
        log.info("stopped_by=time_budget after round %d of %d: training time %.3f s >= federated.time_budget_s "
                 "%g s; finalizing in phase %d", end, total, seconds, budget, phase)
    else:
        log.info("stopped_by=rounds after round %d", end)
