"""Summaries of per-client personalized accuracy (pure functions; the adaptation itself is the
algorithm's `personalize`)."""

from __future__ import annotations

import math

import numpy as np


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
