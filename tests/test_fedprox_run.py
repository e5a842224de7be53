"""FedProx end to end (`launch/main.py`), half the clients a round: the same log and model on 1 and 2 ranks;
with mu 0 the very run FedAvg makes, to the bit; killed after a checkpoint and resumed, bit-identical; and, having no batched form, its clients run one after
another under the default `runtime.client_batch: auto`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.helpers import EVAL_LOSS, assert_same_run, killed_after, launch, tiny_overrides, trained_model

ROUNDS = 3
COMMON = [f"federated.rounds={ROUNDS}", "federated.participation=0.5", "fedavg.local_steps=2", "fedavg.batch_size=16",
          "personalize.steps=0", "checkpoint.keep=10"]
PROX = ["algorithm.name=fedprox", "fedprox.mu=0.1"]
RUNS = {"np1": (PROX, 1), "np2": (PROX, 2), "mu0": (["algorithm.name=fedprox", "fedprox.mu=0"], None),
        "fedavg": (["algorithm.name=fedavg"], None)}


@pytest.fixture(scope="module")
def runs(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("fedprox")
    for name, (extra, np) in RUNS.items():
        proc = launch(tiny_overrides(data_root, out, name) + COMMON + extra, np=np)
        assert proc.returncode == 0, proc.stderr[-3000:]
        if extra is PROX:
            assert "clients one after another (auto: this phase has no batched form)" in proc.stderr
    return {name: out / name for name in RUNS}


def test_fedprox_logs_and_trains_the_same_on_one_and_two_ranks(runs: dict[str, Path]) -> None:
    assert_same_run(runs["np2"], runs["np1"], rounding=(EVAL_LOSS,))


def test_fedprox_with_mu_zero_is_fedavg_s_run_to_the_bit(runs: dict[str, Path]) -> None:
    assert_same_run(runs["mu0"], runs["fedavg"])
    prox, avg = trained_model(runs["np1"]), trained_model(runs["fedavg"])
    assert any(not torch.equal(prox[key], avg[key]) for key in avg)  # while mu 0.1 pulls elsewhere



@pytest.mark.mpi
def test_fedprox_killed_after_a_checkpoint_resumes_bit_identical(runs: dict[str, Path], data_root: Path,
                                                                 tmp_path: Path) -> None:
    # Prepare: killed as soon as round 1's checkpoint lands (of 3 rounds)
    args = tiny_overrides(data_root, tmp_path, "np2") + COMMON + PROX
    killed_after(args, 2, tmp_path / "np2" / "checkpoints" / "round-000001.pt")
    assert not (tmp_path / "np2" / "model.pt").exists()

    # Execute
    resumed = launch(args + ["--resume"], np=2)

    # Assert
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr
    assert_same_run(tmp_path / "np2", runs["np2"])
