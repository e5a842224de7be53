"""The phase protocol's defaults: a phase that writes only its computation gets a working presentation
(final record, console lines, architecture text), and its server step is the configured aggregator then
the server optimizer."""

import torch
from torch import nn

from fedmetanas.algorithms.base import Phase, PhaseReport, RoundPlan, Span
from fedmetanas.algorithms.server import RoundSums
from fedmetanas.configure import config_from_dict


def _phase(*overrides: str) -> Phase:
    return Phase(config_from_dict({}, list(overrides)), Span("train", "rounds", 0, 3))


def test_presentation_is_a_separate_part_with_defaults_for_every_hook():
    phase = _phase()
    final = phase.final_record({"discrete_acc": 0.75, "discrete_loss": 0.5}, None, 1.0)

    assert isinstance(phase, PhaseReport)
    assert final == {"discrete_acc": 0.75, "discrete_loss": 0.5}
    assert phase.describe_final({**final, "genotype": "Linear"}) == ["final discrete_acc: 0.7500"]
    assert phase.arch_text(nn.Linear(2, 2), RoundPlan()) == "Linear"
    assert phase.record(nn.Linear(2, 2), RoundPlan()) == {} and phase.artifacts(nn.Linear(2, 2), RoundPlan(), True) == {}


def _sums(rows: torch.Tensor, weights: list[float]) -> RoundSums:
    w = torch.tensor(weights, dtype=torch.float64)
    return RoundSums(n=float(w.sum()), clients=torch.arange(len(rows)), weights=w,
                     included=torch.ones(len(rows), dtype=torch.bool), num_clients=len(rows), num_params=2,
                     old=torch.tensor([1.0, 1.0, 5.0], dtype=torch.float64), model_sum=(rows * w[:, None]).sum(0),
                     model_rows=rows)


def test_the_default_server_step_is_the_aggregator_then_the_server_optimizer_on_the_parameters_only():
    rows = torch.tensor([[0.0, 2.0, 7.0], [3.0, 5.0, 9.0]], dtype=torch.float64)  # 2 parameters, 1 BN buffer
    sums = _sums(rows, [1.0, 2.0])

    mean = _phase().server_step(sums, RoundPlan())
    momentum = _phase("federated.server_optimizer=momentum", "federated.server_lr=0.5",
                      "federated.server_momentum=0.0").server_step(sums, RoundPlan())
    median = _phase("federated.aggregator=median").server_step(sums, RoundPlan())

    assert mean.tolist() == [2.0, 4.0, 25.0 / 3]
    assert momentum.tolist() == [1.5, 2.5, 25.0 / 3]  # halfway from the old parameters; the buffer averaged
    assert median.tolist() == [1.5, 3.5, 8.0]
    assert _phase().model_rows is False and _phase("federated.aggregator=median").model_rows is True
