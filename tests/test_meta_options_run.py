"""FedMetaNAS's meta-learner options end to end, half the clients a round so that clients move between ranks:
plain steps from half-way (`algorithm.plain_after_fraction`) with DARTS's pair of meta optimizers (SGD with
momentum for the weights, Adam for the logits: `algorithm.meta_optimizer_alpha`). The same log and supernet on
1 and 2 ranks; stopped before the switch to plain steps and resumed, bit-identical to the uninterrupted run;
and the options matter: without them the same search ends elsewhere."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedmetanas.algorithms.phases import switch_round
from tests.helpers import EVAL_LOSS, assert_same_run, launch, launch_all, tiny_overrides, trained_model

ROUNDS = 3
EXTRA = [f"federated.rounds={ROUNDS}", "federated.participation=0.5", "algorithm.local_steps=2",
         "personalize.steps=0", "checkpoint.keep=10", "search.hard_after_fraction=0.5"]
OPTIONS = ["algorithm.plain_after_fraction=0.5", "algorithm.meta_optimizer=sgd", "algorithm.meta_optimizer_alpha=adam",
           "algorithm.meta_momentum=0.9", "algorithm.meta_lr_w=0.025"]


@pytest.fixture(scope="module")
def runs(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    plans = {"np1": (OPTIONS, 1), "np2": (OPTIONS, 2), "without": ([], 1)}
    return launch_all(data_root, tmp_path_factory.mktemp("meta_options"), plans, EXTRA)


def test_the_run_switches_to_plain_steps_in_its_last_round():
    # what the resume test below relies on: rounds 0 and 1 (counted from 0) take meta-steps, round 2 plain ones
    assert switch_round(0.5, ROUNDS) == 2


def test_plain_steps_under_darts_optimizers_are_the_same_on_one_and_two_ranks(runs: dict[str, Path]) -> None:
    # the two eval losses are sums over each rank's shard of the evaluation set: equal to float rounding only
    assert_same_run(runs["np2"], runs["np1"], rounding=(EVAL_LOSS, "rounds/supernet_loss"), model="supernet.pt")


def test_the_options_change_the_search(runs: dict[str, Path]) -> None:
    got, without = trained_model(runs["np1"], "supernet.pt"), trained_model(runs["without"], "supernet.pt")
    assert any(not torch.equal(got[key], without[key]) for key in without)


def test_stopped_before_the_plain_steps_and_resumed_is_bit_identical(runs: dict[str, Path], data_root: Path,
                                                                     tmp_path: Path) -> None:
    # Prepare: a run that ends after round 1 (its budget), before its first round of plain steps
    args = tiny_overrides(data_root, tmp_path, "cut") + EXTRA + OPTIONS
    first = launch(args + ["federated.time_budget_s=0.001"])
    assert first.returncode == 0, first.stderr[-3000:]
    assert (tmp_path / "cut" / "checkpoints" / "round-000001.pt").exists()

    # Execute
    proc = launch(args + ["federated.time_budget_s=0", "--resume"])

    # Assert
    assert proc.returncode == 0, proc.stderr[-3000:]
    got, want = trained_model(tmp_path / "cut", "supernet.pt"), trained_model(runs["np1"], "supernet.pt")
    assert all(torch.equal(got[key], want[key]) for key in want)
