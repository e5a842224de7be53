"""Per-FedAvg: FedMetaNAS's dual learner on a fixed network is first-order MAML on the weights, checked
by hand on a linear model; and it is registered and built like any other algorithm."""

import copy

import pytest
import torch

from fedmetanas.algorithms import ALGORITHMS, declared_sections
from fedmetanas.algorithms.base import ModelInputs
from fedmetanas.algorithms.fedmetanas import FedMetaNAS
from fedmetanas.algorithms.perfedavg import PerFedAvg
from fedmetanas.algorithms.phases import TrainPhase
from fedmetanas.config import AlgorithmConfig, ConfigError
from fedmetanas.configure import config_from_dict
from fedmetanas.search.discrete import DiscreteNet
from fedmetanas.search.genotypes import DARTS_V2
from tests.helpers import LINEAR_ROWS as N
from tests.helpers import Linear
from tests.helpers import full_batch_grad as _loss_grad
from tests.helpers import linear_ctx as _ctx
from tests.helpers import linear_split as _split

INNER_LR, META_LR = 0.01, 0.1


def test_one_meta_step_is_first_order_maml_computed_by_hand():
    # Prepare: one inner Adam step (betas (0, 0.999): its first step is lr * g / (|g| + eps)), then the
    # query gradient at the adapted weights applied to the client's weights by plain SGD.
    split = _split()
    torch.manual_seed(0)
    net = Linear()
    w0 = [p.detach().clone() for p in net.parameters()]
    adapted = copy.deepcopy(net)
    g1 = _loss_grad(adapted, split)
    with torch.no_grad():
        for p, g in zip(adapted.parameters(), g1):
            p -= INNER_LR * g / (g.abs() + 1e-8)
    g2 = _loss_grad(adapted, split)
    want = [w - META_LR * g for w, g in zip(w0, g2)]
    cfg = AlgorithmConfig(local_steps=1, inner_steps=1, batch_size=N, query_batch_size=N, inner_lr_w=INNER_LR,
                          meta_optimizer="sgd", meta_lr_w=META_LR, grad_clip=0.0)

    # Execute
    result = FedMetaNAS(cfg).local_update(net, copy.deepcopy(net), _ctx(split))

    # Assert
    assert result.steps == 2  # one inner step and one query step
    for got, expected in zip(net.parameters(), want):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_personalization_adapts_a_copy_and_returns_the_adapted_network():
    split = _split()
    torch.manual_seed(0)
    net, task = Linear(), Linear()
    before = [p.detach().clone() for p in net.parameters()]
    cfg = AlgorithmConfig(batch_size=N, inner_lr_w=INNER_LR)

    adapted = FedMetaNAS(cfg).personalize(net, task, _ctx(split), steps=2)

    assert adapted is task
    assert all(torch.equal(p, b) for p, b in zip(net.parameters(), before))  # the global copy is untouched
    assert not all(torch.equal(p, b) for p, b in zip(task.parameters(), before))


def test_perfedavg_is_registered_with_its_own_section_and_trains_darts_v2_by_default():
    cfg = config_from_dict({"algorithm": {"name": "perfedavg"}})

    (phase,) = ALGORITHMS["perfedavg"](cfg).phases()

    assert ALGORITHMS["perfedavg"] is PerFedAvg and declared_sections()["perfedavg"] is type(cfg.perfedavg)
    assert isinstance(phase, TrainPhase) and phase.needs_task and phase.genotype == DARTS_V2
    assert isinstance(phase.build_model(ModelInputs(1, 10, 28)), DiscreteNet)
    assert phase.span.rounds == cfg.federated.rounds


def test_a_bad_perfedavg_architecture_is_refused_naming_the_field():
    with pytest.raises(ConfigError, match="perfedavg.architecture"):
        config_from_dict({"algorithm": {"name": "perfedavg"}, "perfedavg": {"architecture": "resnet"}})
