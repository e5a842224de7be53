"""A FedMetaNAS search whose clients keep their meta Adam state between rounds (`algorithm.meta_state: kept`),
end to end, half the clients a round so that clients move between ranks: the same log and supernet on 1 and
2 ranks; stopped after round 1 and resumed, bit-identical to the uninterrupted run (the clients' states are
in the checkpoint); and the state matters: the same search with a fresh optimizer every round ends
elsewhere."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedmetanas.algorithms.fedmetanas import META_STATE
from tests.helpers import EVAL_LOSS, assert_same_run, launch, tiny_overrides, trained_model

EXTRA = ["federated.rounds=3", "federated.participation=0.5", "algorithm.local_steps=2", "personalize.steps=0",
         "checkpoint.keep=10", "search.hard_after_fraction=0.5"]
KEPT = ["algorithm.meta_state=kept"]


@pytest.fixture(scope="module")
def runs(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("meta_state")
    for name, np, extra in (("np1", 1, KEPT), ("np2", 2, KEPT), ("fresh", 1, [])):
        proc = launch(tiny_overrides(data_root, out, name) + EXTRA + extra, np=np)
        assert proc.returncode == 0, proc.stderr[-3000:]
        if extra:
            assert "clients one after another" in proc.stderr
    return {name: out / name for name in ("np1", "np2", "fresh")}


def test_a_search_with_kept_meta_state_is_the_same_on_one_and_two_ranks(runs: dict[str, Path]) -> None:
    # the two eval losses are sums over each rank's shard of the evaluation set: equal to float rounding only
    assert_same_run(runs["np2"], runs["np1"], rounding=(EVAL_LOSS, "rounds/supernet_loss"), model="supernet.pt")


def test_the_kept_state_changes_the_search(runs: dict[str, Path]) -> None:
    got, fresh = trained_model(runs["np1"], "supernet.pt"), trained_model(runs["np1"].parent / "fresh", "supernet.pt")
    assert any(not torch.equal(got[key], fresh[key]) for key in fresh)


def test_a_search_with_kept_meta_state_stopped_and_resumed_is_bit_identical(runs: dict[str, Path],
                                                                            data_root: Path, tmp_path: Path) -> None:
    # Prepare: a run that ends after round 1 (its budget), checkpointed with its clients' states
    args = tiny_overrides(data_root, tmp_path, "cut") + EXTRA + KEPT
    first = launch(args + ["federated.time_budget_s=0.001"])
    assert first.returncode == 0, first.stderr[-3000:]
    state = torch.load(tmp_path / "cut" / "checkpoints" / "round-000001.pt", weights_only=False)
    assert state["client_state"][META_STATE].abs().sum() > 0

    # Execute
    proc = launch(args + ["federated.time_budget_s=0", "--resume"])

    # Assert
    assert proc.returncode == 0, proc.stderr[-3000:]
    got, want = trained_model(tmp_path / "cut", "supernet.pt"), trained_model(runs["np1"], "supernet.pt")
    assert all(torch.equal(got[key], want[key]) for key in want)
