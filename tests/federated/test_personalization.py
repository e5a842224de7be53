"""Summaries of per-client personalized accuracy."""

import math

import numpy as np

from fedmetanas.federated.personalization import summarize, worst_fraction_mean


def test_the_worst_ten_percent_is_the_mean_of_the_lowest_tenth_rounded_up():
    acc = np.arange(20) / 20.0  # 20 clients: the worst 2
    assert worst_fraction_mean(acc) == (0.0 + 0.05) / 2
    assert worst_fraction_mean(np.array([0.7, 0.2, 0.9])) == 0.2  # at least one client


def test_clients_without_a_local_test_split_are_ignored():
    s = summarize(np.array([0.5, np.nan, 1.0]), "x")
    assert s == {"x_mean": 0.75, "x_std": 0.25, "x_worst10": 0.5}
    assert all(math.isnan(v) for v in summarize(np.array([np.nan]), "y").values())
