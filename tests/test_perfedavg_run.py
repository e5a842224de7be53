"""Per-FedAvg end to end (`launch/main.py`): the same model on 1 and 2 ranks, and a resume from a
mid-run checkpoint equal to the uninterrupted run."""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import pytest
import torch

from tests.helpers import launch, tiny_overrides

ROUNDS = 3
EXTRA = ["algorithm.name=perfedavg", f"federated.rounds={ROUNDS}", "checkpoint.keep=10", "personalize.steps=2"]


@pytest.fixture(scope="module")
def runs(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    out = tmp_path_factory.mktemp("perfedavg")
    dirs = {}
    for np in (1, 2):
        proc = launch(tiny_overrides(data_root, out, f"np{np}") + EXTRA, np=np)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "trained net test accuracy" in proc.stdout
        dirs[np] = out / f"np{np}"
    return dirs


def _model(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "model.pt", weights_only=False)["state_dict"]


def test_perfedavg_gives_the_same_model_on_one_and_two_ranks(runs: dict[int, Path]) -> None:
    one, two = _model(runs[1]), _model(runs[2])
    assert one.keys() == two.keys()
    for key in one:
        assert torch.equal(one[key], two[key]), key
    with h5py.File(runs[2] / "trajectory.h5", "r") as f:
        assert f.attrs["algorithm"] == "perfedavg"
        assert f["rounds/round"][()].tolist() == list(range(ROUNDS))
        assert "tau" not in f["rounds"]  # a fixed architecture logs no architecture state
        assert f["personalization/acc_after"].shape == (4,)


def test_perfedavg_resumes_bit_identically_from_a_mid_run_checkpoint(runs: dict[int, Path], tmp_path: Path,
                                                                       data_root: Path) -> None:
    run_dir = tmp_path / "np2"
    shutil.copytree(runs[2], run_dir)
    for ckpt in (run_dir / "checkpoints").glob("round-*.pt"):
        if int(ckpt.stem.split("-")[1]) > 1:
            ckpt.unlink()
    (run_dir / "model.pt").unlink()

    proc = launch(tiny_overrides(data_root, tmp_path, "np2") + EXTRA + ["--resume"], np=2)

    assert proc.returncode == 0, proc.stderr[-3000:]
    want, got = _model(runs[2]), _model(run_dir)
    for key in want:
        assert torch.equal(got[key], want[key]), key
    with h5py.File(run_dir / "trajectory.h5", "r") as f:
        assert f["rounds/round"][()].tolist() == list(range(ROUNDS))
