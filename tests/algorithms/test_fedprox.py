"""FedProx: FedAvg's SGD on the loss plus (mu/2) ||w - w_global||^2, checked by hand on a linear model;
with mu 0 it is FedAvg's update to the bit; its server step is the sample-weighted mean; it has no batched
form, and its section refuses a negative mu naming the field."""

import copy

import pytest
import torch

from fedmetanas.algorithms import ALGORITHMS
from fedmetanas.algorithms.fedavg import FedAvgConfig, FedAvgLocal
from fedmetanas.algorithms.fedprox import FedProx, FedProxLocal
from fedmetanas.algorithms.server import RoundSums
from fedmetanas.config import ConfigError
from fedmetanas.configure import config_from_dict
from fedmetanas.federated.aggregation import flatten64
from fedmetanas.federated.batching import refuse_unbatchable
from tests.helpers import LINEAR_ROWS, Linear, full_batch_grad, linear_ctx, linear_split

LR, MU = 0.1, 0.5
PARAMS = 16 * 3 + 3  # the linear model's weights and biases
PLAIN = FedAvgConfig(local_steps=2, batch_size=LINEAR_ROWS, lr=LR, momentum=0.0, weight_decay=0.0, grad_clip=0.0)


def _net(seed: int = 0) -> Linear:
    torch.manual_seed(seed)
    return Linear()


def test_two_local_steps_are_sgd_on_the_loss_plus_the_proximal_term_computed_by_hand():
    # Prepare: w1 = w0 - lr g(w0) (the term is 0 at the global weights); w2 = w1 - lr (g(w1) + mu (w1 - w0))
    split, net = linear_split(), _net()
    w0 = [p.detach().clone() for p in net.parameters()]
    ref = copy.deepcopy(net)
    for _ in range(PLAIN.local_steps):
        grads = full_batch_grad(ref, split)
        with torch.no_grad():
            for p, g, anchor in zip(ref.parameters(), grads, w0):
                p -= LR * (g + MU * (p - anchor))

    # Execute
    result = FedProxLocal(PLAIN, MU).local_update(net, None, linear_ctx(split))

    # Assert
    assert result.steps == 2
    for got, want in zip(net.parameters(), ref.parameters()):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


def test_with_mu_zero_the_update_is_fedavg_s_to_the_bit_momentum_weight_decay_and_clipping_included():
    split, prox, avg = linear_split(), _net(), _net()
    cfg = FedAvgConfig(local_steps=4, batch_size=4, lr=0.3, grad_clip=0.05)  # clipping acts at this rate

    FedProxLocal(cfg, 0.0).local_update(prox, None, linear_ctx(split))
    FedAvgLocal(cfg).local_update(avg, None, linear_ctx(split))

    for a, b in zip(prox.parameters(), avg.parameters()):
        assert torch.equal(a, b)


def _vector(net: Linear) -> torch.Tensor:
    return flatten64(list(net.parameters()), PARAMS)


def test_the_server_step_is_the_sample_weighted_mean_of_the_clients_models():
    # Prepare: two clients' updates from the same global model (mu 0.5 and 0: distinct), 2 and 6 samples
    cfg = config_from_dict({"algorithm": {"name": "fedprox"}, "federated": {"num_clients": 4}})
    (phase,) = FedProx(cfg).phases()
    old, a, b = _net(), _net(), _net()
    FedProxLocal(PLAIN, MU).local_update(a, None, linear_ctx(linear_split()))
    FedProxLocal(PLAIN, 0.0).local_update(b, None, linear_ctx(linear_split()))
    sums = RoundSums(n=8.0, clients=torch.tensor([0, 2]), weights=torch.tensor([2.0, 6.0], dtype=torch.float64),
                     included=torch.tensor([True, True]), num_clients=4, num_params=PARAMS, old=_vector(old),
                     model_sum=2 * _vector(a) + 6 * _vector(b))

    # Execute
    new = phase.server_step(sums, phase.round_plan(0))

    # Assert
    assert not torch.equal(_vector(a), _vector(b))
    assert torch.equal(new, (2 * _vector(a) + 6 * _vector(b)) / 8)


def test_fedprox_is_registered_reads_the_fedavg_section_and_has_no_batched_form():
    cfg = config_from_dict({"algorithm": {"name": "fedprox"}, "fedavg": {"local_steps": 7}, "fedprox": {"mu": 0.1}})

    (phase,) = ALGORITHMS["fedprox"](cfg).phases()

    assert phase.rule.mu == 0.1 and phase.rule.cfg.local_steps == 7 and phase.base_lr == cfg.fedavg.lr
    assert phase.batch_refusal() == ("FedProxLocal overrides local_update but inherits local_update_batch from "
                                     "FedAvgLocal, which would compute the parent's step")
    with pytest.raises(ConfigError, match=r"^runtime\.client_batch: 2 but FedProxLocal .*runtime\.client_batch: 1"):
        refuse_unbatchable(2, [phase])
    refuse_unbatchable("auto", [phase])  # auto runs its clients one after another


def test_a_negative_mu_is_refused_naming_the_field_and_the_range():
    with pytest.raises(ConfigError, match=r"^fedprox\.mu: -0\.1 is out of range; use a number >= 0"):
        config_from_dict({"algorithm": {"name": "fedprox"}, "fedprox": {"mu": -0.1}})
