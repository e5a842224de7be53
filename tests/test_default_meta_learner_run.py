"""The shipped default's meta learner end to end (configs/default.yaml's `algorithm` section: SGD with momentum for
the weights, Adam for the logits, the weights' rate warmed up over the first rounds; docs/results.md, "The seed-2
confirmation set"), on the tiny search: the same search on one and two ranks; stopped at the end of the warm-up
and resumed, bit-identical to the uninterrupted run (the schedule is a function of the round, so the resumed run
goes on from the rate's peak instead of warming up again); and the warm-up matters: without it the search ends
elsewhere.

The options are read from configs/default.yaml, so the test follows the default wherever it moves."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedmetanas.algorithms.phases import switch_round
from fedmetanas.configure import load_config
from tests.helpers import EVAL_LOSS, REPO, assert_same_run, launch, launch_all, tiny_overrides, trained_model

_SHIPPED = load_config(REPO / "configs" / "default.yaml").algorithm
META_LEARNER = [f"algorithm.meta_optimizer={_SHIPPED.meta_optimizer}",
                f"algorithm.meta_optimizer_alpha={_SHIPPED.meta_optimizer_alpha}",
                f"algorithm.meta_momentum={_SHIPPED.meta_momentum}", f"algorithm.meta_lr_w={_SHIPPED.meta_lr_w}",
                f"algorithm.lr_warmup_fraction={_SHIPPED.lr_warmup_fraction}",
                f"algorithm.lr_schedule={_SHIPPED.lr_schedule}"]
# The fewest rounds in which the shipped fraction warms up over one round (its first), so that a stop after that
# round falls on the boundary between the ramp and the schedule.
ROUNDS = next(r for r in range(2, 100) if switch_round(_SHIPPED.lr_warmup_fraction, r) == 1)
EXTRA = [f"federated.rounds={ROUNDS}", "personalize.steps=0", "checkpoint.keep=100"]


def test_the_shipped_default_warms_up_the_weights_rate_of_a_momentum_sgd_meta_learner():
    # what the runs below exercise; a change of the default that drops any of it should be a decision, not a slip
    assert (_SHIPPED.meta_optimizer, _SHIPPED.alpha_optimizer) == ("sgd", "adam")
    assert _SHIPPED.meta_momentum > 0 and 0 < _SHIPPED.lr_warmup_fraction < 1


@pytest.fixture(scope="module")
def runs(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    no_warmup = [*META_LEARNER, "algorithm.lr_warmup_fraction=0"]  # the later override wins
    plans = {"np1": (META_LEARNER, 1), "np2": (META_LEARNER, 2), "without_warmup": (no_warmup, 1)}
    return launch_all(data_root, tmp_path_factory.mktemp("default_meta"), plans, EXTRA)


def test_the_default_meta_learner_is_the_same_on_one_and_two_ranks(runs: dict[str, Path]) -> None:
    # the two eval losses are sums over each rank's shard of the evaluation set: equal to float rounding only
    assert_same_run(runs["np2"], runs["np1"], rounding=(EVAL_LOSS, "rounds/supernet_loss"), model="supernet.pt")


def test_the_warm_up_changes_the_search(runs: dict[str, Path]) -> None:
    got, without = trained_model(runs["np1"], "supernet.pt"), trained_model(runs["without_warmup"], "supernet.pt")
    assert any(not torch.equal(got[key], without[key]) for key in without)


def test_stopped_after_the_warm_up_round_and_resumed_is_bit_identical(runs: dict[str, Path], data_root: Path,
                                                                      tmp_path: Path) -> None:
    # Prepare: a run that ends after its first round (its budget), the one round of the warm-up
    args = tiny_overrides(data_root, tmp_path, "cut") + EXTRA + META_LEARNER
    first = launch(args + ["federated.time_budget_s=0.001"])
    assert first.returncode == 0, first.stderr[-3000:]
    checkpoints = sorted(path.name for path in (tmp_path / "cut" / "checkpoints").glob("round-*.pt"))
    assert checkpoints == ["round-000001.pt"]

    # Execute
    proc = launch(args + ["federated.time_budget_s=0", "--resume"])

    # Assert
    assert proc.returncode == 0, proc.stderr[-3000:]
    got, want = trained_model(tmp_path / "cut", "supernet.pt"), trained_model(runs["np1"], "supernet.pt")
    assert all(torch.equal(got[key], want[key]) for key in want)
