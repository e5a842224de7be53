"""`runtime.client_batch` end to end (`launch/main.py`): batched clients give the same model on 1 and 2 ranks
(a batch is a fixed group of the round's participants, whole batches go to a rank), the same run as
clients one after another up to float rounding; FedNAS batches its search (MiLeNAS) and its retraining;
FedMetaNAS batches every round of the shipped search's schedule (sparse soft top-2, then hard, with
pruning), rank-invariantly, and a batched run killed mid-way resumes bit-identical; `auto` on a CPU runs
clients one after another and says why."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import h5py
import pytest
import torch

from tests.helpers import launch, launch_all, saved_model, tiny_overrides
from tests.helpers import start as _start
from tests.helpers import wait_for as _wait_for

ROUNDS = 2
FEDAVG = ["algorithm.name=fedavg", "fedavg.architecture=cnn", "fedavg.local_steps=3", "fedavg.batch_size=16",
          f"federated.rounds={ROUNDS}", "federated.num_clients=6", "data.min_samples=10"]


@pytest.fixture(scope="module")
def runs(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """FedAvg on the CNN: batches of 4 on 1 and 2 ranks, and the sequential run (6 clients: batches 4 + 2)."""
    out = tmp_path_factory.mktemp("batched")
    plans = {"batched_np1": (["runtime.client_batch=4"], 1), "batched_np2": (["runtime.client_batch=4"], 2),
             "sequential": ([], 2)}
    return launch_all(data_root, out, plans, FEDAVG)


_model = saved_model


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


def test_fednas_batches_its_search_and_its_retraining(data_root: Path, tmp_path: Path) -> None:
    # Prepare: a FedNAS run whose search and retraining both take part; client_batch larger than a round
    args = tiny_overrides(data_root, tmp_path, "fednas") + [
        "algorithm.name=fednas", "model.primitives=darts", "search.input_mode=all", "fednas.local_steps=1",
        "fednas.batch_size=16", "fednas.retrain_rounds=1", "federated.rounds=1", "fedavg.local_steps=2",
        "fedavg.batch_size=16", "fedavg.channels=4", "runtime.client_batch=8"]

    # Execute
    proc = launch(args, np=2)

    # Assert
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "round 1: clients in batches of 8" in proc.stderr  # MiLeNAS's own batched form
    assert "round 2: clients in batches of 8" in proc.stderr  # the retraining phase's first round
    assert "one after another" not in proc.stderr
    with h5py.File(tmp_path / "fednas" / "trajectory.h5", "r") as f:
        assert f["rounds/clients"].shape == (1, 4) and f["retrain/clients"].shape == (1, 4)
        assert torch.isfinite(torch.from_numpy(f["retrain/client_loss"][()])).all()


SEARCH = ["search.gumbel=soft", "search.soft_topk=2", "search.hard_after_fraction=0.5", "federated.rounds=4",
          "search.op_prune_threshold=0.05", "search.pair_prune_threshold=0.05", "runtime.client_batch=2"]


def _supernet(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "supernet.pt", weights_only=False)["state_dict"]


@pytest.mark.mpi
def test_fedmetanas_batches_every_round_of_its_schedule_rank_invariantly_and_resumes_bit_identical(
        data_root: Path, tmp_path: Path) -> None:
    # Prepare: the shipped search's schedule (sparse soft top-2, hard from the second half, pruning)
    runs = {np: launch(tiny_overrides(data_root, tmp_path, f"np{np}") + SEARCH, np=np) for np in (1, 2)}
    args = tiny_overrides(data_root, tmp_path, "killed") + SEARCH
    proc = _start(args, 2)
    _wait_for(tmp_path / "killed" / "checkpoints" / "round-000002.pt", proc)
    os.killpg(proc.pid, signal.SIGKILL)  # no handler runs: as a node failure
    proc.wait(timeout=30)

    # Execute
    resumed = launch(args + ["--resume"], np=2)

    # Assert: every round batched (the log says so once), 1 rank == 2 ranks == killed and resumed
    for run in (*runs.values(), resumed):
        assert run.returncode == 0, run.stderr[-3000:]
    assert "round 1: clients in batches of 2 (runtime.client_batch 2)" in runs[2].stderr
    assert "one after another" not in runs[2].stderr
    with h5py.File(tmp_path / "np2" / "trajectory.h5", "r") as f:
        assert f["rounds/client_batch"][()].tolist() == [2, 2, 2, 2]
    one, two, back = (_supernet(tmp_path / name) for name in ("np1", "np2", "killed"))
    for key in one:
        assert torch.equal(one[key], two[key]), key
        assert torch.equal(back[key], two[key]), key


def test_auto_steps_clients_one_after_another_on_a_cpu_and_says_why(data_root: Path, tmp_path: Path) -> None:
    proc = launch(tiny_overrides(data_root, tmp_path, "auto") + ["federated.rounds=1"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "round 1: clients one after another (auto on a CPU" in proc.stderr
    with h5py.File(tmp_path / "auto" / "trajectory.h5", "r") as f:
        assert f["rounds/client_batch"][()].tolist() == [1]


def test_an_explicit_batch_for_a_rule_without_a_batched_form_of_its_own_is_one_error(data_root: Path,
                                                                                    tmp_path: Path) -> None:
    # Prepare: a rule whose sequential step was rewritten in a subclass (it would inherit FedAvg's batched step)
    from fedmetanas.algorithms.fedavg import FedAvgLocal
    from fedmetanas.algorithms.phases import TrainPhase
    from fedmetanas.federated.batching import refuse_unbatchable
    from fedmetanas.config import ConfigError
    from fedmetanas.configure import load_config

    class Prox(FedAvgLocal):
        def local_update(self, model, task, ctx):  # noqa: ANN001, ANN201 - test double
            return super().local_update(model, task, ctx)

    cfg = load_config(None, ["algorithm.name=fedavg"])  # a config holds only its algorithm's sections
    phase = TrainPhase(cfg, None, Prox(cfg.fedavg), architecture="cnn", lr_scale=lambda r: 1.0, base_lr=0.1)

    # Execute / Assert
    with pytest.raises(ConfigError, match=r"runtime.client_batch: 4 but Prox overrides local_update.*set "
                                          r"runtime.client_batch: 1"):
        refuse_unbatchable(4, [phase])
    refuse_unbatchable("auto", [phase])  # auto and 1 run such a phase one client after another
    refuse_unbatchable(1, [phase])


@pytest.mark.mpi
def test_a_group_norm_search_runs_batched_rank_invariantly_and_its_final_network_has_no_batch_statistics(
        data_root: Path, tmp_path: Path) -> None:
    # Prepare / Execute: `model.norm: group` under the shipped schedule, batched, on 1 and 2 ranks
    runs = {np: launch(tiny_overrides(data_root, tmp_path, f"gn{np}") + SEARCH + ["model.norm=group"], np=np)
            for np in (1, 2)}

    # Assert: batched on every round, 1 rank == 2 ranks, group norms only (no running statistics anywhere),
    # and the pruned network is evaluated and personalized like a batch-norm one
    for run in runs.values():
        assert run.returncode == 0, run.stderr[-3000:]
    assert "round 1: clients in batches of 2 (runtime.client_batch 2)" in runs[2].stderr
    one, two = (_supernet(tmp_path / f"gn{np}") for np in (1, 2))
    assert not [key for key in one if "running" in key or "batches_tracked" in key]
    for key in one:
        assert torch.equal(one[key], two[key]), key
    with h5py.File(tmp_path / "gn2" / "trajectory.h5", "r") as f:
        final = dict(f["final"].attrs)
    assert 0.0 <= final["discrete_acc"] <= 1.0
    assert 0.0 <= final["personal_before_mean"] <= 1.0 and 0.0 <= final["personal_after_mean"] <= 1.0
