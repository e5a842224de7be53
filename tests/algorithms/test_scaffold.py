"""SCAFFOLD (option II): the client's drift-corrected steps and its new control variate, and the server's
model and control-variate step, checked by hand on a linear model; what the phase declares to the engine,
its state in checkpoints, no batched form, and a bad rate refused naming the field."""

import pytest
import torch

from fedmetanas.algorithms import ALGORITHMS
from fedmetanas.algorithms.base import Upload
from fedmetanas.algorithms.fedavg import FedAvgConfig, FedAvgLocal
from fedmetanas.algorithms.scaffold import SERVER_KEY, Scaffold, ScaffoldLocal, ScaffoldPhase
from fedmetanas.algorithms.server import RoundSums
from fedmetanas.config import ConfigError
from fedmetanas.configure import config_from_dict
from fedmetanas.federated.batching import refuse_unbatchable
from tests.helpers import LINEAR_ROWS, Linear, full_batch_grad, linear_ctx, linear_split

LR, STEPS, DECAY = 0.1, 3, 0.01
PARAMS = 16 * 3 + 3  # the linear model's weights and biases


def _vectors(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A server c and a client c_i (seeded, of the linear model's size)."""
    gen = torch.Generator().manual_seed(seed)
    return 0.1 * torch.randn(PARAMS, generator=gen), 0.1 * torch.randn(PARAMS, generator=gen)


def _phase(num_clients: int = 4) -> ScaffoldPhase:
    """SCAFFOLD's phase on the linear model, as the engine sets it up."""
    cfg = config_from_dict({"algorithm": {"name": "scaffold"}, "federated": {"num_clients": num_clients}})
    (phase,) = Scaffold(cfg).phases()
    torch.manual_seed(0)
    phase.on_model(Linear())
    return phase


def test_the_client_takes_corrected_plain_sgd_steps_and_its_new_control_variate_is_its_mean_direction():
    # Prepare: y <- y - lr (g(y) + wd y - c_i + c), K times; c_i+ = c_i - c + (x - y) / (K lr), which for
    # plain steps is the mean of the client's own directions g(y_k) + wd y_k
    split, c, c_i = linear_split(), *_vectors(0)
    torch.manual_seed(0)
    net, ref = Linear(), Linear()
    ref.load_state_dict(net.state_dict())
    x = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
    y, directions = x.clone(), []
    for _ in range(STEPS):
        with torch.no_grad():
            torch.nn.utils.vector_to_parameters(y, ref.parameters())
        direction = torch.cat([g.reshape(-1) for g in full_batch_grad(ref, split)]) + DECAY * y
        directions.append(direction)
        y = y - LR * (direction - c_i + c)
    rule = ScaffoldLocal(FedAvgConfig(local_steps=STEPS, batch_size=LINEAR_ROWS, lr=LR, momentum=0.0,
                                      weight_decay=DECAY, grad_clip=0.0))
    rule.c = c

    # Execute
    result = rule.local_update(net, None, linear_ctx(split, {"c": c_i.clone()}))

    # Assert
    got_y = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
    torch.testing.assert_close(got_y, y, rtol=1e-6, atol=1e-7)
    want_c_i = c_i - c + (x - y) / (STEPS * LR)
    torch.testing.assert_close(result.state["c"], want_c_i, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(result.state["c"], torch.stack(directions).mean(0), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(result.uploads["delta_c"], result.state["c"] - c_i, rtol=0, atol=0)


def test_with_zero_control_variates_the_client_update_is_plain_sgd():
    split = linear_split()
    torch.manual_seed(0)
    net, ref = Linear(), Linear()
    ref.load_state_dict(net.state_dict())
    cfg = FedAvgConfig(local_steps=STEPS, batch_size=LINEAR_ROWS, lr=LR, momentum=0.0)
    rule = ScaffoldLocal(cfg)
    rule.c = torch.zeros(PARAMS)

    rule.local_update(net, None, linear_ctx(split, {"c": torch.zeros(PARAMS)}))
    FedAvgLocal(cfg).local_update(ref, None, linear_ctx(split))

    for a, b in zip(net.parameters(), ref.parameters()):
        assert torch.equal(a, b)


def test_the_phase_declares_the_control_variate_as_client_state_and_its_change_as_a_summed_upload():
    phase = _phase()

    assert phase.client_state() == {"c": PARAMS}
    assert phase.uploads() == (Upload("delta_c", PARAMS, "sum"),)
    assert torch.equal(phase.rule.c, torch.zeros(PARAMS))


def test_the_server_averages_the_models_and_moves_c_by_the_summed_changes_over_all_clients():
    # Prepare: 2 of 4 clients took part (3 and 5 samples); c, and their control-variate changes
    phase, (c, _) = _phase(num_clients=4), _vectors(1)
    phase.rule.c = c.clone()
    gen = torch.Generator().manual_seed(2)
    x_old, x_a, x_b = (torch.randn(PARAMS, generator=gen, dtype=torch.float64) for _ in range(3))
    d_a, d_b = torch.randn(PARAMS, generator=gen), torch.randn(PARAMS, generator=gen)
    delta_sum = d_a.to(torch.float64) + d_b.to(torch.float64)  # what the round's all-reduce carries
    sums = RoundSums(n=8.0, clients=torch.tensor([1, 3]), weights=torch.tensor([3.0, 5.0], dtype=torch.float64),
                     included=torch.tensor([True, True]), num_clients=4, num_params=PARAMS, old=x_old,
                     model_sum=3 * x_a + 5 * x_b, uploads={"delta_c": delta_sum})

    # Execute
    new = phase.server_step(sums, phase.round_plan(0))

    # Assert: the model is the sample-weighted mean; c <- c + (1/N) sum delta_c with N = 4, not 2
    assert torch.equal(new, (3 * x_a + 5 * x_b) / 8)
    assert phase.rule.c.dtype == torch.float32
    torch.testing.assert_close(phase.rule.c, c + (d_a + d_b) / 4, rtol=0, atol=1e-7)
    assert torch.equal(phase.rule.c, (c.to(torch.float64) + delta_sum / 4).to(torch.float32))


def test_the_server_control_variate_is_saved_under_its_own_key_and_restored():
    phase, (c, _) = _phase(), _vectors(3)
    phase.rule.c = c.clone()

    saved = phase.state_dict()
    fresh = _phase()
    fresh.load_state_dict({"model": {}, "client_state": {}, **saved})

    assert list(saved) == [SERVER_KEY] and SERVER_KEY not in ("model", "masks", "server_optimizer", "client_state")
    assert torch.equal(fresh.rule.c, c)
    with pytest.raises(ValueError, match=SERVER_KEY):
        fresh.load_state_dict({SERVER_KEY: torch.zeros(PARAMS + 1)})


def test_scaffold_is_registered_trains_with_plain_sgd_at_its_own_rates_and_has_no_batched_form():
    cfg = config_from_dict({"algorithm": {"name": "scaffold"}, "fedavg": {"local_steps": 7},
                            "scaffold": {"lr": 0.2, "lr_min": 0.01}})

    (phase,) = ALGORITHMS["scaffold"](cfg).phases()

    f = phase.rule.cfg
    assert (f.lr, f.lr_min, f.momentum, f.local_steps) == (0.2, 0.01, 0.0, 7) and phase.base_lr == 0.2
    assert phase.round_plan(cfg.federated.rounds - 1).lr_scale == pytest.approx(0.01 / 0.2)
    assert "ScaffoldLocal overrides local_update" in phase.batch_refusal()
    with pytest.raises(ConfigError, match=r"^runtime\.client_batch: 2 but ScaffoldLocal"):
        refuse_unbatchable(2, [phase])


def test_a_learning_rate_of_zero_is_refused_naming_the_field():
    with pytest.raises(ConfigError, match=r"^scaffold\.lr: 0\.0 is out of range; use a number > 0"):
        config_from_dict({"algorithm": {"name": "scaffold"}, "scaffold": {"lr": 0.0}})
