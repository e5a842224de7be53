"""SCAFFOLD end to end (`launch/main.py`), half the clients a round so that clients move between ranks:
the same log and model on 1 and 2 ranks; killed after a checkpoint and resumed, bit-identical to the
uninterrupted run (the clients' control variates and the server's c are in the checkpoint); and that state
matters: the same resume with the clients' control variates zeroed ends elsewhere."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch

from fedmetanas.algorithms.scaffold import SERVER_KEY
from fedmetanas.federated.scheduling import assign_to_ranks, sample_clients
from tests.helpers import EVAL_LOSS, assert_same_run, launch, start, stopped_copy, tiny_overrides, trained_model
from tests.helpers import wait_for

ROUNDS, CLIENTS, SEED = 6, 4, 3  # tiny_overrides: 4 clients, seed 3
EXTRA = ["algorithm.name=scaffold", f"federated.rounds={ROUNDS}", "federated.participation=0.5",
         "fedavg.local_steps=2", "fedavg.batch_size=16", "personalize.steps=0", "checkpoint.keep=10"]


@pytest.fixture(scope="module")
def runs(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    out = tmp_path_factory.mktemp("scaffold")
    for np in (1, 2):
        proc = launch(tiny_overrides(data_root, out, f"np{np}") + EXTRA, np=np)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "clients one after another (auto: this phase has no batched form)" in proc.stderr
    return {np: out / f"np{np}" for np in (1, 2)}


def test_clients_change_ranks_between_rounds_in_these_runs() -> None:
    """What makes the client state's journey through the all-reduce matter: a client's next round may be on
    another rank than its last."""
    ranks: dict[int, set[int]] = {}
    for rnd in range(ROUNDS):
        plan = assign_to_ranks(sample_clients(CLIENTS, CLIENTS // 2, SEED, rnd).tolist(), [1.0] * CLIENTS, 2)
        for rank, cids in enumerate(plan):
            for cid in cids:
                ranks.setdefault(cid, set()).add(rank)
    assert any(len(r) > 1 for r in ranks.values())


def test_scaffold_logs_and_trains_the_same_on_one_and_two_ranks(runs: dict[int, Path]) -> None:
    assert_same_run(runs[2], runs[1], rounding=(EVAL_LOSS,))


@pytest.mark.mpi
def test_scaffold_killed_after_a_checkpoint_resumes_bit_identical(runs: dict[int, Path], data_root: Path,
                                                                  tmp_path: Path) -> None:
    # Prepare: SIGKILL every rank (no handler runs) as soon as round 2's checkpoint lands
    args = tiny_overrides(data_root, tmp_path, "np2") + EXTRA
    proc = start(args, 2)
    ckpt = tmp_path / "np2" / "checkpoints" / "round-000002.pt"
    wait_for(ckpt, proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert not (tmp_path / "np2" / "model.pt").exists()
    state = torch.load(ckpt, weights_only=False)
    assert state["client_state"]["c"].abs().sum() > 0 and state[SERVER_KEY].abs().sum() > 0

    # Execute
    resumed = launch(args + ["--resume"], np=2)

    # Assert
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr
    assert_same_run(tmp_path / "np2", runs[2])


def test_a_resume_with_the_clients_control_variates_zeroed_ends_elsewhere(runs: dict[int, Path], data_root: Path,
                                                                         tmp_path: Path) -> None:
    # Prepare: the 2-rank run as a stop after round 2 leaves it, its clients' c_i then set to zero
    run_dir = stopped_copy(runs[2], tmp_path / "np2", after_round=2)
    ckpt = run_dir / "checkpoints" / "round-000002.pt"
    state = torch.load(ckpt, weights_only=False)
    state["client_state"]["c"].zero_()
    torch.save(state, ckpt)

    # Execute: on one rank (a resume may change the rank count)
    proc = launch(tiny_overrides(data_root, tmp_path, "np2") + EXTRA + ["--resume"])

    # Assert
    assert proc.returncode == 0, proc.stderr[-3000:]
    got, want = trained_model(run_dir), trained_model(runs[2])
    assert any(not torch.equal(got[key], want[key]) for key in want)
