"""`federated.aggregator` end to end: the robust aggregators (coordinate median, trimmed mean) carry every
participant's model through the round's one all-reduce, give the same model on 1 and 2 ranks, differ
from the sample-weighted mean (of four clients, a quarter-trimmed mean is exactly the median), and refuse a trim fraction that would drop everything."""

from __future__ import annotations

from pathlib import Path

import h5py
import pytest
import torch

from tests.helpers import launch, launch_all, saved_model, tiny_overrides

FEDAVG = ["algorithm.name=fedavg", "fedavg.architecture=cnn", "fedavg.local_steps=2", "fedavg.batch_size=16",
          "federated.rounds=2", "federated.num_clients=5", "federated.clients_per_round=4", "data.min_samples=10"]


@pytest.fixture(scope="module")
def runs(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("aggregators")
    plans = {"mean": ([], 1), "median_np1": (["federated.aggregator=median"], 1),
             "median_np2": (["federated.aggregator=median"], 2),
             "trimmed_np2": (["federated.aggregator=trimmed_mean", "federated.trim_fraction=0.25"], 2)}
    return launch_all(data_root, out, plans, FEDAVG)


_model = saved_model


def test_the_median_gives_the_same_model_on_one_and_two_ranks(runs: dict[str, Path]) -> None:
    one, two = _model(runs["median_np1"]), _model(runs["median_np2"])
    for key in one:
        assert torch.equal(one[key], two[key]), key


def test_the_median_is_not_the_mean_and_of_four_clients_a_quarter_trimmed_mean_is_the_median(
        runs: dict[str, Path]) -> None:
    mean, median, trimmed = _model(runs["mean"]), _model(runs["median_np1"]), _model(runs["trimmed_np2"])
    weight = next(k for k in mean if k.endswith("weight"))

    assert not torch.equal(mean[weight], median[weight])
    for key in median:  # four rows, one dropped from each end: the mean of the two middle values, both ways
        assert torch.equal(median[key], trimmed[key]), key


def test_the_round_buffer_carries_one_model_row_per_participant(runs: dict[str, Path]) -> None:
    with h5py.File(runs["mean"] / "trajectory.h5", "r") as f:
        mean_bytes = int(f["rounds/bytes_allreduced"][0])
    with h5py.File(runs["median_np1"] / "trajectory.h5", "r") as f:
        rows_bytes = int(f["rounds/bytes_allreduced"][0])
    model = sum(t.numel() for t in _model(runs["mean"]).values() if t.is_floating_point())

    assert rows_bytes - mean_bytes == (4 - 1) * model * 8  # four rows instead of one sum, float64


def test_a_trim_fraction_of_half_is_one_error_line(data_root: Path, tmp_path: Path) -> None:
    proc = launch(tiny_overrides(data_root, tmp_path) + FEDAVG + ["federated.trim_fraction=0.5"])

    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: federated.trim_fraction")
