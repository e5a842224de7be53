"""Summaries of per-client personalized accuracy, and which clients personalization measures."""

import math

import numpy as np
import pytest

from fedmetanas.federated.personalization import personalization_sample, summarize, worst_fraction_mean
from fedmetanas.federated.scheduling import assign_to_ranks


def test_the_worst_ten_percent_is_the_mean_of_the_lowest_tenth_rounded_up():
    acc = np.arange(20) / 20.0  # 20 clients: the worst 2
    assert worst_fraction_mean(acc) == (0.0 + 0.05) / 2
    assert worst_fraction_mean(np.array([0.7, 0.2, 0.9])) == 0.2  # at least one client


def test_clients_without_a_local_test_split_are_ignored():
    s = summarize(np.array([0.5, np.nan, 1.0]), "x")
    assert s == {"x_mean": 0.75, "x_std": 0.25, "x_worst10": 0.5}
    assert all(math.isnan(v) for v in summarize(np.array([np.nan]), "y").values())


def test_every_client_with_a_local_test_split_is_measured_up_to_max_clients():
    sizes = np.array([3, 0, 2, 5, 0, 1])

    assert personalization_sample(sizes, 0, seed=1).tolist() == [0, 2, 3, 5]  # 0: no bound
    assert personalization_sample(sizes, 4, seed=1).tolist() == [0, 2, 3, 5]
    assert personalization_sample(sizes, 100, seed=1).tolist() == [0, 2, 3, 5]


def test_above_max_clients_a_seeded_uniform_sample_of_clients_with_test_data_is_measured():
    sizes = np.tile([4, 0], 5000)  # 10,000 clients, every other one without a local test split

    chosen = personalization_sample(sizes, 100, seed=7)

    assert len(chosen) == 100 and np.all(np.diff(chosen) > 0) and np.all(sizes[chosen] > 0)
    assert np.array_equal(chosen, personalization_sample(sizes, 100, seed=7))  # a pure function of its arguments
    assert not np.array_equal(chosen, personalization_sample(sizes, 100, seed=8))
    assert chosen.min() < 1000 and chosen.max() > 9000  # drawn from all of them, not the first ones


@pytest.mark.parametrize("world_size", [1, 2, 3, 8])
def test_the_ranks_share_the_measured_clients_each_exactly_once_whatever_their_number(world_size):
    # personalize_clients hands position j of the sample to a rank; no rank-dependent input decides the sample.
    chosen = personalization_sample(np.ones(1000), 20, seed=0)

    plan = assign_to_ranks(range(len(chosen)), [1.0] * len(chosen), world_size)

    assert sorted(j for mine in plan for j in mine) == list(range(20))
