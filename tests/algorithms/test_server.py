"""The server optimizer (Reddi et al. 2021) on flat float64 vectors, checked against the update rules
written out in numpy: FedAvgM's momentum step, FedAdam's step without bias correction, and `avg` that
takes no step at all."""

import numpy as np
import pytest
import torch

from fedmetanas.algorithms.server import (RoundSums, ServerOptimizer, adam_step, aggregate, coordinate_median,
                                         momentum_step, pseudo_gradient, trimmed_mean)

P, B = 5, 3  # parameters, float buffers (BN statistics) after them


def _rounds(seed: int = 0, n: int = 4) -> tuple[np.ndarray, list[np.ndarray]]:
    """A start vector (parameters only) and `n` rounds' averages (parameters, then buffers)."""
    rng = np.random.default_rng(seed)
    return rng.normal(size=P), [rng.normal(size=P + B) for _ in range(n)]


def _run(opt: ServerOptimizer, x0: np.ndarray, averages: list[np.ndarray]) -> list[np.ndarray]:
    """The server's vector after each round: each round starts from the previous round's parameters."""
    x, out = torch.tensor(x0), []
    for avg in averages:
        new = opt.step(x, torch.tensor(avg))
        out.append(new.numpy())
        x = new[:P]
    return out


def test_the_pseudo_gradient_is_the_old_model_minus_the_average():
    assert pseudo_gradient(torch.tensor([3.0, -1.0]), torch.tensor([1.0, 1.0])).tolist() == [2.0, -2.0]


def test_avg_returns_the_average_itself_untouched():
    opt = ServerOptimizer("avg")
    avg = torch.arange(P + B, dtype=torch.float64)

    assert not opt.active
    assert opt.step(torch.zeros(P, dtype=torch.float64), avg) is avg
    assert opt.state_dict() == {}


def test_fedavgm_is_momentum_on_the_pseudo_gradient_computed_by_hand():
    x0, averages = _rounds()
    lr, mu = 0.7, 0.9

    got = _run(ServerOptimizer("momentum", lr=lr, momentum=mu), x0, averages)

    x, v = x0, np.zeros(P)
    for avg, step in zip(averages, got):
        v = mu * v + (x - avg[:P])
        x = x - lr * v
        np.testing.assert_allclose(step[:P], x, rtol=0, atol=1e-15)
        np.testing.assert_array_equal(step[P:], avg[P:])  # buffers: just averaged


def test_fedadam_is_adam_without_bias_correction_computed_by_hand():
    x0, averages = _rounds(1)
    lr, (b1, b2), eps = 0.05, (0.9, 0.99), 1e-3

    got = _run(ServerOptimizer("adam", lr=lr, betas=(b1, b2), eps=eps), x0, averages)

    x, m, v = x0, np.zeros(P), np.zeros(P)
    for avg, step in zip(averages, got):
        d = x - avg[:P]
        m = b1 * m + (1 - b1) * d
        v = b2 * v + (1 - b2) * d * d
        x = x - lr * m / (np.sqrt(v) + eps)
        np.testing.assert_allclose(step[:P], x, rtol=0, atol=1e-15)
        np.testing.assert_array_equal(step[P:], avg[P:])
    # No bias correction: the first step is lr (1 - b1) d / (sqrt(1 - b2) |d| + eps), not Adam's lr sign(d).
    d0 = x0 - averages[0][:P]
    np.testing.assert_allclose(got[0][:P], x0 - lr * (1 - b1) * d0 / (np.sqrt(1 - b2) * np.abs(d0) + eps))


def test_momentum_with_lr_1_and_no_momentum_is_the_plain_average():
    x0, averages = _rounds(2)

    got = _run(ServerOptimizer("momentum", lr=1.0, momentum=0.0), x0, averages)

    for avg, step in zip(averages, got):
        np.testing.assert_allclose(step, avg, rtol=0, atol=1e-15)


@pytest.mark.parametrize("kind", ["momentum", "adam"])
def test_the_state_saved_after_a_round_continues_the_run_exactly(kind: str):
    x0, averages = _rounds(3)
    whole = _run(ServerOptimizer(kind), x0, averages)
    first = ServerOptimizer(kind)
    half = _run(first, x0, averages[:2])

    second = ServerOptimizer(kind)
    second.load_state_dict({k: v.clone() for k, v in first.state_dict().items()}, torch.device("cpu"))
    rest = _run(second, half[-1][:P], averages[2:])

    assert set(first.state_dict()) == ({"v"} if kind == "momentum" else {"m", "v"})
    for a, b in zip(whole, half + rest):
        np.testing.assert_array_equal(a, b)


def test_the_pure_steps_agree_with_the_optimizer():
    x, d = torch.tensor([1.0, 2.0]), torch.tensor([0.5, -0.25])
    assert momentum_step(x, d, torch.zeros(2), 1.0, 0.9)[0].tolist() == [0.5, 2.25]
    new, m, v = adam_step(x, d, torch.zeros(2), torch.zeros(2), 1.0, (0.0, 0.0), 0.0)
    assert new.tolist() == [0.0, 3.0] and m.tolist() == d.tolist() and v.tolist() == (d * d).tolist()


# --- the aggregators: what the round's client models become ---------------------------------------

ROWS = np.array([[1.0, 10.0, -2.0], [2.0, -50.0, 0.0], [3.0, 20.0, 4.0], [100.0, 30.0, 1.0]])


def test_the_median_of_an_even_count_is_the_mean_of_the_two_middle_values_per_coordinate():
    got = coordinate_median(torch.tensor(ROWS))

    assert got.tolist() == np.median(ROWS, axis=0).tolist() == [2.5, 15.0, 0.5]


def test_the_median_of_an_odd_count_ignores_one_outlier_completely():
    rows = torch.tensor([[1.0], [2.0], [1e9]])

    assert coordinate_median(rows).tolist() == [2.0]


def test_the_trimmed_mean_drops_the_largest_and_smallest_per_coordinate():
    got = trimmed_mean(torch.tensor(ROWS), 0.25)  # one of four from each end

    assert got.tolist() == [2.5, 15.0, 0.5]  # of four, keeping two: the two middle values' mean
    assert trimmed_mean(torch.tensor(ROWS), 0.0).tolist() == ROWS.mean(axis=0).tolist()


def test_a_trim_of_half_or_more_is_refused_and_a_small_one_of_few_rows_drops_nothing():
    with pytest.raises(ValueError, match="leaves no value"):
        trimmed_mean(torch.tensor(ROWS), 0.5)
    assert trimmed_mean(torch.tensor(ROWS[:2]), 0.49).tolist() == ROWS[:2].mean(axis=0).tolist()


def _sums(rows: np.ndarray, weights: list[float], included: list[bool]) -> RoundSums:
    inc = torch.tensor(included)
    w = torch.tensor(weights, dtype=torch.float64) * inc
    r = torch.tensor(rows) * inc[:, None]  # an excluded slot's row stays zero
    return RoundSums(n=float(w.sum()), clients=torch.arange(len(rows)), weights=w, included=inc,
                     num_clients=len(rows), num_params=rows.shape[1], old=torch.zeros(rows.shape[1], dtype=torch.float64),
                     model_sum=(r * w[:, None]).sum(0), model_rows=r)


def test_aggregate_mean_is_the_sample_weighted_average_and_the_robust_ones_skip_excluded_rows():
    sums = _sums(ROWS, [1.0, 1.0, 2.0, 4.0], [True, True, True, False])

    assert aggregate("mean", sums).tolist() == pytest.approx(((ROWS[:3] * [[1], [1], [2]]).sum(0) / 4).tolist())
    assert aggregate("median", sums).tolist() == [2.0, 10.0, 0.0]  # of the three included rows
    assert aggregate("trimmed_mean", sums, 0.34).tolist() == [2.0, 10.0, 0.0]
