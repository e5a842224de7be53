"""A client whose update holds NaN/Inf is caught before aggregation: excluded (and logged), or the run stops."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from fedmetanas import cli
from fedmetanas.algorithms.fedmetanas import FedMetaNAS
from tests.helpers import tiny_overrides

POISONED = 1


@pytest.fixture
def poison_client(monkeypatch: pytest.MonkeyPatch) -> None:
    """Client 1's local update ends with a NaN in one weight, as a diverging client would."""
    original = FedMetaNAS.local_update

    def local_update(self, model, task, ctx):
        result = original(self, model, task, ctx)
        if ctx.client_id == POISONED:
            with torch.no_grad():
                model.weights()[0].view(-1)[0] = float("nan")
        return result

    monkeypatch.setattr(FedMetaNAS, "local_update", local_update)


def test_a_nonfinite_client_is_excluded_and_logged(poison_client: None, data_root: Path, tmp_path: Path) -> None:
    code = cli.main(tiny_overrides(data_root, tmp_path) + ["federated.nonfinite=exclude"])
    assert code == 0
    with h5py.File(tmp_path / "tiny" / "trajectory.h5", "r") as f:
        excluded = f["rounds/excluded"][()]
        client_loss = f["rounds/client_loss"][()]
    assert excluded[:, POISONED].all() and excluded.sum() == excluded.shape[0]
    assert np.isnan(client_loss[:, POISONED]).all() and np.isfinite(np.delete(client_loss, POISONED, 1)).all()
    state = torch.load(tmp_path / "tiny" / "supernet.pt", weights_only=False)["state_dict"]
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_a_nonfinite_client_stops_the_run_when_asked(poison_client: None, data_root: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(tiny_overrides(data_root, tmp_path) + ["federated.nonfinite=stop"])
    err = capsys.readouterr().err
    assert code == 3
    assert f"client(s) [{POISONED}]" in err and "federated.nonfinite" in err


@pytest.fixture
def poison_every_client(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every client diverges, as algorithm.inner_lr_w=.inf once made them (now refused at load)."""
    original = FedMetaNAS.local_update

    def local_update(self, model, task, ctx):
        result = original(self, model, task, ctx)
        with torch.no_grad():
            model.weights()[0].view(-1)[0] = float("nan")
        return result

    monkeypatch.setattr(FedMetaNAS, "local_update", local_update)


def test_a_round_that_excluded_every_client_fails_with_exit_3(poison_every_client: None, data_root: Path,
                                                              tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 10: every round excluded every client, and the run printed the untrained model's accuracy."""
    code = cli.main(tiny_overrides(data_root, tmp_path) + ["federated.nonfinite=exclude"])
    captured = capsys.readouterr()
    errors = [ln for ln in captured.err.splitlines() if ln.startswith("error:")]
    assert code == 3, captured.err[-2000:]
    assert len(errors) == 1 and "round 1" in errors[0] and "NaN/Inf" in errors[0]
    assert "accuracy" not in captured.out  # no result is printed for a model that never trained


def test_a_diverged_personalization_is_named_and_not_reported_as_a_result(
        data_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 21: `personalize.lr=1e30` exited 0 printing personalized accuracies while every client's
    loss after adaptation was NaN."""
    code = cli.main(tiny_overrides(data_root, tmp_path) + ["federated.rounds=1", "personalize.steps=2",
                                                           "personalize.lr=1e30", "personalize.holdout=0"])

    out, err = capsys.readouterr()
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert code == 3 and len(errors) == 1, err[-2000:]
    assert "personalization diverged for 4 of 4 clients (0, 1, 2, 3)" in errors[0] and "personalize.lr" in errors[0]
    assert "personalized accuracy" not in out and "nan" not in out.lower()
    with h5py.File(tmp_path / "tiny" / "trajectory.h5", "r") as f:  # the run's log is complete and readable
        assert f["personalization/diverged"][()].all()
        assert not np.isfinite(f["personalization/acc_after"][()]).any()
        assert np.isfinite(f["personalization/acc_before"][()]).all()
        assert not any(k.startswith("personal_after") for k in f["final"].attrs)
