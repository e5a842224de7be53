"""Many clients: what a run records per client stays bounded by the clients it uses, and bounding
personalization (personalize.max_clients) measures the same clients with the same results on any rank count."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from fedmetanas import cli
from fedmetanas.federated.scheduling import sample_clients
from tests.helpers import launch, tiny_overrides

# FedAvg on the FedAvg paper's CNN: the cheapest whole run; 8 clients, 3 of them personalized.
SMALL = ["algorithm.name=fedavg", "fedavg.architecture=cnn", "fedavg.local_steps=2", "fedavg.batch_size=16",
         "federated.num_clients=8", "federated.rounds=1", "personalize.steps=2", "personalize.batch_size=8",
         "personalize.max_clients=3"]


@pytest.mark.mpi
def test_a_bounded_personalization_measures_the_same_clients_alike_on_one_and_two_ranks(data_root: Path,
                                                                                          tmp_path: Path) -> None:
    logs = {}
    for np_ in (1, 2):
        proc = launch(tiny_overrides(data_root, tmp_path, f"np{np_}") + SMALL, np=np_)
        assert proc.returncode == 0, proc.stderr[-3000:]
        with h5py.File(tmp_path / f"np{np_}" / "trajectory.h5", "r") as f:
            logs[np_] = ({k: v[()] for k, v in f["personalization"].items()}, dict(f["final"].attrs))
    (one, final1), (two, final2) = logs[1], logs[2]

    assert one["measured"].sum() == 3 and final1["personal_clients"] == final2["personal_clients"] == 3
    assert np.isfinite(one["acc_after"][one["measured"] > 0]).all()
    assert np.isnan(one["acc_after"][one["measured"] == 0]).all()
    for name in one:
        assert np.array_equal(one[name], two[name], equal_nan=True), name
    assert final1["personal_after_mean"] == final2["personal_after_mean"]
    assert final1["personal_after_mean"] == pytest.approx(float(np.nanmean(one["acc_after"])))


def test_the_log_and_checkpoints_keep_per_round_entries_only_for_the_rounds_participants(data_root: Path,
                                                                                           tmp_path: Path) -> None:
    # 60 clients, 3 a round: a round's client columns hold 3 entries (ids, losses, exclusions), not 60.
    args = tiny_overrides(data_root, tmp_path) + SMALL + ["federated.num_clients=60", "federated.clients_per_round=3",
                                                         "federated.rounds=2", "data.min_samples=5"]
    assert cli.main(args) == 0

    with h5py.File(tmp_path / "tiny" / "trajectory.h5", "r") as f:
        rounds = {k: f["rounds"][k][()] for k in ("clients", "client_loss", "excluded")}
        assert "participants" not in f["rounds"] and f.attrs["format_version"] == 2
    expected = [sample_clients(60, 3, 3, r).tolist() for r in range(2)]  # tiny_overrides: federated.seed=3
    assert rounds["clients"].tolist() == expected
    assert rounds["client_loss"].shape == rounds["excluded"].shape == (2, 3)
    assert np.isfinite(rounds["client_loss"]).all() and not rounds["excluded"].any()
    saved = torch.load(sorted((tmp_path / "tiny" / "checkpoints").glob("round-*.pt"))[-1], weights_only=False)
    assert [row["clients"].tolist() for _, row in saved["rows"]] == expected
    assert all(row["client_loss"].shape == (3,) for _, row in saved["rows"])
