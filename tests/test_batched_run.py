"""`runtime.client_batch` end to end (`launch/main.py`): batched clients give the same model on 1 and 2 ranks
(a batch is a fixed group of the round's participants, whole batches go to a rank), the same run as
clients one after another up to float rounding; FedNAS batches its retraining while its search (MiLeNAS,
no batched form) runs clients one after another; FedMetaNAS batches its dense soft rounds, not its hard
ones, rank-invariantly."""

from __future__ import annotations

from pathlib import Path

import h5py
import pytest
import torch

from tests.helpers import launch, tiny_overrides

ROUNDS = 2
FEDAVG = ["algorithm.name=fedavg", "fedavg.architecture=cnn", "fedavg.local_steps=3", "fedavg.batch_size=16",
          f"federated.rounds={ROUNDS}", "federated.num_clients=6", "data.min_samples=10"]


@pytest.fixture(scope="module")
def runs(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """FedAvg on the CNN: batches of 4 on 1 and 2 ranks, and the sequential run (6 clients: batches 4 + 2)."""
    out = tmp_path_factory.mktemp("batched")
    plans = {"batched_np1": (["runtime.client_batch=4"], 1), "batched_np2": (["runtime.client_batch=4"], 2),
             "sequential": ([], 2)}
    for name, (extra, np) in plans.items():
        proc = launch(tiny_overrides(data_root, out, name) + FEDAVG + extra, np=np)
        assert proc.returncode == 0, proc.stderr[-3000:]
    return {name: out / name for name in plans}


def _model(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "model.pt", weights_only=False)["state_dict"]


def test_batched_clients_give_the_same_model_on_one_and_two_ranks(runs: dict[str, Path]) -> None:
    one, two = _model(runs["batched_np1"]), _model(runs["batched_np2"])
    assert one.keys() == two.keys()
    for key in one:
        assert torch.equal(one[key], two[key]), key


def test_batched_clients_train_the_model_sequential_clients_train(runs: dict[str, Path]) -> None:
    batched, sequential = _model(runs["batched_np2"]), _model(runs["sequential"])
    for key in batched:  # SGD: no Adam-style amplification of rounding, so a tight tolerance holds
        torch.testing.assert_close(batched[key], sequential[key], rtol=1e-4, atol=1e-5)
    with h5py.File(runs["batched_np2"] / "trajectory.h5", "r") as fb, \
            h5py.File(runs["sequential"] / "trajectory.h5", "r") as fs:
        assert fb["rounds/clients"][()].tolist() == fs["rounds/clients"][()].tolist() == [list(range(6))] * ROUNDS
        torch.testing.assert_close(torch.from_numpy(fb["rounds/client_loss"][()]),
                                   torch.from_numpy(fs["rounds/client_loss"][()]), rtol=1e-4, atol=1e-5)


def test_fednas_batches_its_retraining_and_searches_one_client_after_another(data_root: Path,
                                                                             tmp_path: Path) -> None:
    # Prepare: a FedNAS run whose search and retraining both take part; client_batch larger than a round
    args = tiny_overrides(data_root, tmp_path, "fednas") + [
        "algorithm.name=fednas", "model.primitives=darts", "search.input_mode=all", "fednas.local_steps=1",
        "fednas.batch_size=16", "fednas.retrain_rounds=1", "federated.rounds=1", "fedavg.local_steps=2",
        "fedavg.batch_size=16", "fedavg.channels=4", "runtime.client_batch=8"]

    # Execute
    proc = launch(args, np=2)

    # Assert
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "round 1: clients one after another" in proc.stderr  # MiLeNAS has no batched form
    assert "round 2: clients in batches of 8" in proc.stderr
    with h5py.File(tmp_path / "fednas" / "trajectory.h5", "r") as f:
        assert f["rounds/clients"].shape == (1, 4) and f["retrain/clients"].shape == (1, 4)
        assert torch.isfinite(torch.from_numpy(f["retrain/client_loss"][()])).all()


def test_fedmetanas_batches_its_dense_soft_rounds_and_stays_rank_invariant(data_root: Path, tmp_path: Path) -> None:
    # Prepare: soft Gumbel-softmax on every op for the first half, then hard (one client after another)
    extra = ["search.gumbel=soft", "search.soft_topk=0", "search.hard_after_fraction=0.5", "federated.rounds=2",
             "runtime.client_batch=2"]

    # Execute
    procs = {np: launch(tiny_overrides(data_root, tmp_path, f"np{np}") + extra, np=np) for np in (1, 2)}

    # Assert
    for proc in procs.values():
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert "round 1: clients in batches of 2" in procs[2].stderr
    assert "round 2: clients one after another" in procs[2].stderr  # hard sampling
    one, two = (torch.load(tmp_path / f"np{np}" / "supernet.pt", weights_only=False)["state_dict"] for np in (1, 2))
    for key in one:
        assert torch.equal(one[key], two[key]), key
