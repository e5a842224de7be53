"""Participant sampling and the client-to-rank plan: deterministic, complete and balanced."""

import numpy as np

from fedmetanas.federated.scheduling import assign_to_ranks, clients_per_round, sample_clients


def test_sample_clients_is_deterministic_in_seed_and_round():
    a = sample_clients(20, 5, seed=3, round_idx=7)
    b = sample_clients(20, 5, seed=3, round_idx=7)

    assert np.array_equal(a, b)


def test_sample_clients_changes_with_round_and_seed():
    by_round = {tuple(sample_clients(20, 5, seed=3, round_idx=r)) for r in range(10)}
    by_seed = {tuple(sample_clients(20, 5, seed=s, round_idx=0)) for s in range(10)}

    assert len(by_round) > 1
    assert len(by_seed) > 1


def test_sample_clients_returns_count_distinct_sorted_ids():
    for r in range(5):
        chosen = sample_clients(12, 4, seed=0, round_idx=r)

        assert len(chosen) == 4
        assert len(set(chosen.tolist())) == 4
        assert chosen.tolist() == sorted(chosen.tolist())
        assert chosen.min() >= 0 and chosen.max() < 12


def test_sample_clients_takes_everyone_when_count_reaches_the_population():
    assert sample_clients(6, 6, seed=1, round_idx=2).tolist() == list(range(6))
    assert sample_clients(6, 9, seed=1, round_idx=2).tolist() == list(range(6))


def test_sample_clients_leaves_the_global_numpy_rng_alone():
    state = np.random.get_state()[1].copy()

    sample_clients(20, 5, seed=3, round_idx=1)

    assert np.array_equal(np.random.get_state()[1], state)


def _check_plan(plan, clients, world_size):
    assert len(plan) == world_size
    flat = [c for rank in plan for c in rank]
    assert sorted(flat) == sorted(clients)  # every client exactly once
    assert all(rank == sorted(rank) for rank in plan)


def test_assign_to_ranks_covers_each_client_once_and_balances_equal_loads():
    clients = [3, 7, 1, 9, 4, 0, 8]
    loads = [1.0] * 10

    for world_size in (1, 2, 3, 4, 7, 9):
        plan = assign_to_ranks(clients, loads, world_size)

        _check_plan(plan, clients, world_size)
        sizes = [len(r) for r in plan]
        assert max(sizes) - min(sizes) <= 1


def test_assign_to_ranks_is_deterministic_and_independent_of_input_order():
    clients = list(range(11))
    loads = [float((7 * c) % 5 + 1) for c in range(11)]
    rng = np.random.default_rng(0)

    plans = [assign_to_ranks([int(c) for c in rng.permutation(clients)], loads, 3) for _ in range(5)]

    assert all(p == plans[0] for p in plans)
    _check_plan(plans[0], clients, 3)


def test_assign_to_ranks_puts_a_heavy_client_alone():
    # Longest-processing-time first: client 0 outweighs all others together.
    loads = [10.0, 1.0, 1.0, 1.0, 1.0, 1.0]

    plan = assign_to_ranks([0, 1, 2, 3, 4, 5], loads, 2)

    assert plan == [[0], [1, 2, 3, 4, 5]]


def test_assign_to_ranks_balances_unequal_loads():
    loads = [5.0, 4.0, 3.0, 3.0, 2.0, 2.0, 1.0]

    plan = assign_to_ranks(range(7), loads, 2)

    totals = sorted(sum(loads[c] for c in rank) for rank in plan)
    assert totals == [10.0, 10.0]


def test_clients_per_round_prefers_an_explicit_count():
    assert clients_per_round(10, 3, 0.9) == 3
    assert clients_per_round(10, 25, 0.9) == 10


def test_clients_per_round_uses_the_fraction_with_at_least_one():
    assert clients_per_round(10, 0, 0.3) == 3
    assert clients_per_round(10, 0, 1.0) == 10
    assert clients_per_round(10, 0, 0.01) == 1
