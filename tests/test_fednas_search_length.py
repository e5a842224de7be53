"""FedNAS's search ends once its genotype is stable (`fednas.stable_rounds`), at most after `federated.rounds`:
retraining starts at the next round, the log and /final say where and why the search ended, a resume
across the switch is bit-identical, and `stable_rounds: 0` searches every round as before.

A search whose architecture learning rate is 0 keeps its initial genotype, so it is stable from its
first round: with `stable_rounds: 2` it ends after round 3 (rounds 2 and 3 did not change it)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import pytest
import torch

from tests.helpers import launch, tiny_overrides

CAP, STABLE, RETRAIN = 6, 2, 2
SEARCHED = STABLE + 1  # the first round has no previous genotype to compare with
FEDNAS = ["algorithm.name=fednas", "model.primitives=darts", "search.input_mode=all", "fednas.local_steps=2",
          "fednas.batch_size=16", "fednas.lr_alpha=0", f"fednas.retrain_rounds={RETRAIN}", "fedavg.local_steps=3",
          "fedavg.batch_size=16", "fedavg.channels=4", "personalize.steps=0", "checkpoint.keep=10"]
# FedAvgM as well: its state must start afresh with the retrained network.
STABLE_RUN = FEDNAS + [f"federated.rounds={CAP}", f"fednas.stable_rounds={STABLE}",
                       "federated.server_optimizer=momentum", "federated.server_momentum=0.5"]


def _args(root: Path, out: Path, name: str, extra: list[str]) -> list[str]:
    return tiny_overrides(root, out, name) + extra


@pytest.fixture(scope="module")
def stable_run(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("stable")
    proc = launch(_args(data_root, out, "fednas", STABLE_RUN), np=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out / "fednas", proc.stderr


@pytest.mark.mpi
def test_the_search_ends_on_a_stable_genotype_and_retraining_starts_the_next_round(stable_run) -> None:
    run_dir, stderr = stable_run
    with h5py.File(run_dir / "trajectory.h5", "r") as f:
        assert f["rounds/round"][()].tolist() == list(range(SEARCHED))
        assert f["retrain/round"][()].tolist() == list(range(SEARCHED, SEARCHED + RETRAIN))
        assert len(set(f["rounds/genotype"][()])) == 1
        assert json.loads(f.attrs["stages"]) == [
            {"kind": "search", "group": "rounds", "first": 0, "rounds": SEARCHED},
            {"kind": "train", "group": "retrain", "first": SEARCHED, "rounds": RETRAIN}]
        final = dict(f["final"].attrs)
    assert final["search_stopped_by"] == "stable_genotype" and final["search_rounds"] == SEARCHED
    assert final["stopped_by"] == "rounds"
    assert f"phase 1 ends early, after round {SEARCHED} of its planned {CAP}" in stderr
    assert (run_dir / "search_genotype.txt").read_text() == (run_dir / "genotype.txt").read_text()


def test_the_server_optimizer_starts_afresh_with_the_retrained_network(stable_run) -> None:
    run_dir, _ = stable_run

    def state(next_round: int) -> dict:
        return torch.load(run_dir / "checkpoints" / f"round-{next_round:06d}.pt", weights_only=False)

    searching, switched, retraining = state(SEARCHED - 1), state(SEARCHED), state(SEARCHED + 1)
    assert searching["stage"] == 0 and switched["stage"] == retraining["stage"] == 1
    assert switched["server_optimizer"] == {}  # the new model's optimizer has taken no step yet
    params = sum(p.numel() for k, p in retraining["model"].items() if not k.endswith(
        ("running_mean", "running_var", "num_batches_tracked")))
    assert retraining["server_optimizer"]["v"].shape == (params,)
    assert searching["server_optimizer"]["v"].numel() > params  # the supernet's, left behind
    assert switched["phase_ends"] == [SEARCHED]


@pytest.mark.mpi
@pytest.mark.parametrize("next_round", [SEARCHED, SEARCHED + 1])
def test_a_resume_across_the_early_switch_is_bit_identical(stable_run, data_root: Path, tmp_path: Path,
                                                           next_round: int) -> None:
    ref_dir, _ = stable_run
    run_dir = tmp_path / "fednas"
    shutil.copytree(ref_dir, run_dir)
    for ckpt in (run_dir / "checkpoints").glob("round-*.pt"):
        if int(ckpt.stem.split("-")[1]) > next_round:
            ckpt.unlink()
    (run_dir / "model.pt").unlink()

    proc = launch(_args(data_root, tmp_path, "fednas", STABLE_RUN) + ["--resume"], np=2)

    assert proc.returncode == 0, proc.stderr[-3000:]
    want = torch.load(ref_dir / "model.pt", weights_only=False)["state_dict"]
    got = torch.load(run_dir / "model.pt", weights_only=False)["state_dict"]
    assert all(torch.equal(got[k], v) for k, v in want.items())
    with h5py.File(run_dir / "trajectory.h5", "r") as f, h5py.File(ref_dir / "trajectory.h5", "r") as ref:
        assert f["retrain/round"][()].tolist() == list(range(SEARCHED, SEARCHED + RETRAIN))
        assert f.attrs["stages"] == ref.attrs["stages"]
        assert f["final"].attrs["search_stopped_by"] == "stable_genotype"


def test_stable_rounds_0_searches_every_round_up_to_federated_rounds(data_root: Path, tmp_path: Path) -> None:
    rounds = 4
    proc = launch(_args(data_root, tmp_path, "all", FEDNAS + [f"federated.rounds={rounds}", "fednas.stable_rounds=0",
                                                              "fednas.retrain_rounds=1"]))
    assert proc.returncode == 0, proc.stderr[-3000:]
    with h5py.File(tmp_path / "all" / "trajectory.h5", "r") as f:
        assert len(set(f["rounds/genotype"][()])) == 1  # stable all along, yet searched to the cap
        assert f["rounds/round"][()].tolist() == list(range(rounds)) and f["retrain/round"][()].tolist() == [rounds]
        assert f["final"].attrs["search_stopped_by"] == "cap" and f["final"].attrs["search_rounds"] == rounds


def test_a_budget_spent_at_the_search_s_last_round_finalizes_the_search_and_a_larger_one_retrains_as_if_never_stopped(
        data_root: Path, tmp_path: Path) -> None:
    """The budget ends the run in the phase it is in (the search: its genotype, not retrained); resumed
    with a larger budget, the switch to retraining happens then, bit-identical to a run never stopped."""
    one = FEDNAS + ["federated.rounds=1"]
    ref = launch(_args(data_root, tmp_path, "ref", one))
    assert ref.returncode == 0, ref.stderr[-3000:]
    stopped = launch(_args(data_root, tmp_path, "run", one + ["federated.time_budget_s=0.001"]))
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    run_dir = tmp_path / "run"
    with h5py.File(run_dir / "trajectory.h5", "r") as f:
        assert f["final"].attrs["stopped_by"] == "time_budget" and "retrain" not in f
        assert json.loads(f.attrs["stages"]) == [{"kind": "search", "group": "rounds", "first": 0, "rounds": 1}]
    assert (run_dir / "discrete_model.pt").is_file() and not (run_dir / "model.pt").exists()

    resumed = launch(_args(data_root, tmp_path, "run", one + ["federated.time_budget_s=0", "--resume"]))

    assert resumed.returncode == 0, resumed.stderr[-3000:]
    want = torch.load(tmp_path / "ref" / "model.pt", weights_only=False)["state_dict"]
    got = torch.load(run_dir / "model.pt", weights_only=False)["state_dict"]
    assert all(torch.equal(got[k], v) for k, v in want.items())
    with h5py.File(run_dir / "trajectory.h5", "r") as f:
        assert f["retrain/round"][()].tolist() == [1, 2] and f["final"].attrs["stopped_by"] == "rounds"
        assert f["final"].attrs["search_stopped_by"] == "cap"
