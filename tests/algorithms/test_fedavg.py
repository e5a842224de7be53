"""FedAvg's local update and the baselines' personalization: plain SGD, checked against torch's SGD
run by hand on the same batches."""

import copy
import dataclasses

import pytest
import torch
from torch import nn

from fedmetanas.algorithms.common import LocalContext
from fedmetanas.algorithms.fedavg import FedAvgLocal
from fedmetanas.algorithms.fedavg import FedAvgConfig
from fedmetanas.algorithms.fednas import FedNAS
from fedmetanas.config import PersonalizeConfig
from fedmetanas.configure import config_from_dict
from fedmetanas.data.client_data import sample_batch
from fedmetanas.data.datasets import TensorSplit
from fedmetanas.search.discrete import CNN

N, CLASSES, BATCH = 40, 3, 8
CFG = FedAvgConfig(local_steps=3, batch_size=BATCH, lr=0.05, momentum=0.9, weight_decay=1e-3, grad_clip=0.0)


def _split() -> TensorSplit:
    gen = torch.Generator().manual_seed(4)
    return TensorSplit(torch.randint(0, 256, (N, 1, 8, 8), generator=gen, dtype=torch.uint8),
                       torch.randint(0, CLASSES, (N,), generator=gen), (0.5,), (0.25,), num_classes=CLASSES)


def _net() -> CNN:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return CNN(1, CLASSES, 8)


def _ctx(split: TensorSplit, seed: int = 3, lr_scale: float = 1.0) -> LocalContext:
    return LocalContext(split, torch.arange(N), None, float("nan"), "expected", torch.Generator().manual_seed(seed),
                        torch.Generator().manual_seed(0), lr_scale=lr_scale)


def test_the_local_update_is_sgd_with_momentum_on_the_clients_batches_at_the_rounds_rate():
    split, net = _split(), _net()
    ref = copy.deepcopy(net)
    opt = torch.optim.SGD(ref.parameters(), lr=CFG.lr * 0.5, momentum=CFG.momentum, weight_decay=CFG.weight_decay)
    gen = torch.Generator().manual_seed(3)
    for _ in range(CFG.local_steps):
        x, y = sample_batch(split, torch.arange(N), BATCH, gen)
        opt.zero_grad()
        nn.functional.cross_entropy(ref(x), y).backward()
        opt.step()

    result = FedAvgLocal(CFG).local_update(net, net, _ctx(split, lr_scale=0.5))

    assert result.steps == CFG.local_steps
    for got, want in zip(net.parameters(), ref.parameters()):
        torch.testing.assert_close(got, want)


def test_personalization_fine_tunes_the_weights_and_changes_the_clients_predictions():
    split, net = _split(), _net()
    before = [p.detach().clone() for p in net.parameters()]
    x = split.images[:8].float()
    logits_before = net(x).detach()
    adapted = FedAvgLocal(CFG, PersonalizeConfig(steps=4, lr=0.05)).personalize(net, net, _ctx(split), 4)
    assert any(not torch.equal(p, b) for p, b in zip(net.parameters(), before))
    assert not torch.allclose(adapted(x), logits_before)


def test_no_personalization_steps_leave_the_model_unchanged():
    split, net = _split(), _net()
    before = copy.deepcopy(net.state_dict())
    FedAvgLocal(CFG).personalize(net, net, _ctx(split), 0)
    for k, v in net.state_dict().items():
        torch.testing.assert_close(v, before[k])


def test_a_training_phase_s_schedule_follows_its_span_when_an_earlier_phase_ended_early():
    """FedNAS's retraining planned after a 20-round search cap starts at round 3 when the search ends
    there: its cosine starts at the full rate at round 3 and ends at lr_min at its own last round."""
    cfg = config_from_dict({"algorithm": {"name": "fednas"}, "federated": {"rounds": 20},
                            "fednas": {"retrain_rounds": 5}})
    retrain = FedNAS(cfg).phases()[1]
    assert retrain.span.first == 20

    retrain.span = dataclasses.replace(retrain.span, first=3)

    f = cfg.fedavg
    assert retrain.round_plan(3).lr_scale == 1.0
    assert retrain.round_plan(7).lr_scale == pytest.approx(f.lr_min / f.lr)  # its last round
