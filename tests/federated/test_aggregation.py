"""Server averaging on flat float64 buffers: equal to the per-tensor weighted mean, whatever the
split of clients over ranks."""

import pytest
import torch
from torch import nn

from fedmetanas.federated.aggregation import (
    add_weighted,
    aggregated_tensors,
    flatten64,
    numel,
    weighted_average,
    write_flat,
)
from fedmetanas.search.genotypes import METANAS_PRIMITIVES
from fedmetanas.search.supernet import SuperNet


def _client_model(seed: int) -> nn.Module:
    """A small model with parameters, BN running statistics and an integer buffer, all seed-specific
    (every floating-point value is overwritten from the generator, so module init does not matter)."""
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.Flatten(), nn.Linear(12, 5))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in list(model.parameters()) + [model[1].running_mean, model[1].running_var]:
            t.copy_(torch.randn(t.shape, generator=gen))
        model[1].num_batches_tracked.fill_(seed)
    return model


CLIENTS = [_client_model(s) for s in range(5)]
SAMPLES = [17.0, 3.0, 250.0, 1.0, 42.0]


def _flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1).double() for t in aggregated_tensors(model)])


def _accumulate(clients, samples) -> torch.Tensor:
    buf = torch.zeros(numel(aggregated_tensors(clients[0])), dtype=torch.float64)
    for model, n in zip(clients, samples):
        add_weighted(buf, aggregated_tensors(model), n)
    return buf


def test_flat_accumulation_equals_the_weighted_average_reference():
    buf = _accumulate(CLIENTS, SAMPLES)

    avg = buf / sum(SAMPLES)

    ref = weighted_average([_flat(m) for m in CLIENTS], SAMPLES)
    assert buf.dtype == torch.float64
    assert (avg - ref).abs().max() < 1e-12


def test_flat_accumulation_equals_a_per_tensor_hand_average():
    avg = _accumulate(CLIENTS, SAMPLES) / sum(SAMPLES)

    per_tensor = []
    for k in range(len(aggregated_tensors(CLIENTS[0]))):
        total = sum(n * aggregated_tensors(m)[k].detach().double() for m, n in zip(CLIENTS, SAMPLES))
        per_tensor.append((total / sum(SAMPLES)).reshape(-1))
    assert (avg - torch.cat(per_tensor)).abs().max() < 1e-12


def test_summing_two_ranks_buffers_equals_one_rank():
    # What the all-reduce does: each rank accumulates its own clients, the sums are added.
    one_rank = _accumulate(CLIENTS, SAMPLES)

    rank0 = _accumulate(CLIENTS[:2], SAMPLES[:2])
    rank1 = _accumulate(CLIENTS[2:], SAMPLES[2:])

    assert (((rank0 + rank1) - one_rank) / sum(SAMPLES)).abs().max() < 1e-12


def test_any_split_over_three_ranks_gives_the_same_average():
    order = [3, 0, 4, 2, 1]
    groups = [order[:1], order[1:4], order[4:]]

    summed = sum(_accumulate([CLIENTS[i] for i in g], [SAMPLES[i] for i in g]) for g in groups)

    ref = weighted_average([_flat(m) for m in CLIENTS], SAMPLES)
    assert (summed / sum(SAMPLES) - ref).abs().max() < 1e-12


def test_weighted_average_weighs_by_sample_count():
    a, b = torch.tensor([0.0, 10.0]), torch.tensor([4.0, 2.0])

    out = weighted_average([a, b], [1, 3])

    assert out.dtype == torch.float64
    assert out.tolist() == [3.0, 4.0]


def test_weighted_average_rejects_zero_total_weight():
    with pytest.raises(ValueError, match="positive"):
        weighted_average([torch.ones(2)], [0])


def test_write_flat_round_trips_into_the_model():
    target = _client_model(99)
    avg = _accumulate(CLIENTS, SAMPLES) / sum(SAMPLES)

    write_flat(aggregated_tensors(target), avg)

    tensors = aggregated_tensors(target)
    assert all(t.dtype == torch.float32 for t in tensors)
    assert torch.equal(_flat(target), avg.float().double())
    # Integer buffers are not part of the average and are left alone.
    assert int(target[1].num_batches_tracked) == 99


def test_write_flat_of_own_values_is_the_identity():
    model = _client_model(7)
    before = [t.detach().clone() for t in aggregated_tensors(model)]

    write_flat(aggregated_tensors(model), _flat(model))

    assert all(torch.equal(a, b) for a, b in zip(before, aggregated_tensors(model)))


def test_aggregated_tensors_hold_parameters_and_bn_statistics_but_not_step_counts():
    model = _client_model(0)

    tensors = aggregated_tensors(model)

    ids = [id(t) for t in tensors]
    assert ids[: len(list(model.parameters()))] == [id(p) for p in model.parameters()]
    assert id(model[1].running_mean) in ids and id(model[1].running_var) in ids
    assert id(model[1].num_batches_tracked) not in ids
    assert all(t.is_floating_point() for t in tensors)
    assert numel(tensors) == sum(p.numel() for p in model.parameters()) + 2 * 3


def test_aggregated_tensors_of_a_supernet_include_the_architecture_logits():
    net = SuperNet(1, 3, 4, 2, 2, METANAS_PRIMITIVES, stem_multiplier=1, generator=torch.Generator().manual_seed(0))

    ids = {id(t) for t in aggregated_tensors(net)}

    assert all(id(p) in ids for p in net.alphas())
    assert all(id(p) in ids for p in net.weights())


def test_flatten64_takes_the_leading_values_of_the_tensors_as_one_float64_vector():
    model = CLIENTS[0]
    params = numel(model.parameters())

    flat = flatten64(aggregated_tensors(model), params)

    assert flat.dtype == torch.float64 and flat.numel() == params
    assert torch.equal(flat, _flat(model)[:params])
    with pytest.raises(ValueError, match="fewer"):
        flatten64(list(model.parameters()), params + 1)
