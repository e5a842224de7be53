"""Batched clients (`runtime.client_batch`): K clients stepped together through torch.func give each client
what its own sequential local update gives — weights, logits, BN statistics and loss — to float rounding:
FedAvg's SGD and Per-FedAvg's dual learner (FOMAML and Reptile) on the CNN (no BN) and on DARTS_V2 (affine
BN), and FedMetaNAS's dual learner on a pruned supernet under dense soft / expected relaxations (with and
without pair logits, with the logits frozen in a warm-up). Per-client clipping matches `clip_grad_norm_`
client by client."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn

from fedmetanas.algorithms.batched import ClientStack, batchable_sample, clip_stacked
from fedmetanas.algorithms.common import LocalContext, copy_state
from fedmetanas.algorithms.fedavg import FedAvgConfig, FedAvgLocal
from fedmetanas.algorithms.fedmetanas import FedMetaNAS
from fedmetanas.config import AlgorithmConfig
from fedmetanas.data.datasets import TensorSplit
from fedmetanas.federated.aggregation import aggregated_tensors
from fedmetanas.search.discrete import CNN, DiscreteNet
from fedmetanas.search.genotypes import DARTS_V2, resolve_primitives
from fedmetanas.search.supernet import ArchMasks, SuperNet

SIZE, CLASSES, PER_CLIENT = 12, 4, 40


def _split(clients: int) -> TensorSplit:
    gen = torch.Generator().manual_seed(7)
    n = clients * PER_CLIENT
    return TensorSplit(torch.randint(0, 256, (n, 1, SIZE, SIZE), generator=gen, dtype=torch.uint8),
                       torch.randint(0, CLASSES, (n,), generator=gen), (0.5,), (0.25,), num_classes=CLASSES)


def _contexts(split: TensorSplit, clients: int, lr_scale: float = 1.0) -> list[LocalContext]:
    """Client c: its own indices and generators (as the loop derives them from (seed, round, client))."""
    return [LocalContext(split, torch.arange(c * PER_CLIENT, (c + 1) * PER_CLIENT), None, float("nan"), "expected",
                         torch.Generator().manual_seed(100 + c), torch.Generator().manual_seed(200 + c),
                         lr_scale=lr_scale, client_id=c) for c in range(clients)]


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return CNN(1, CLASSES, SIZE)


def _darts() -> nn.Module:
    torch.manual_seed(0)
    return DiscreteNet.from_genotype(DARTS_V2, 1, CLASSES, 4, 2, reduction_layers=(1,))


def _sequential(rule, build, ctxs):  # noqa: ANN001, ANN202 - test helper
    """Each client from the same global model, one after another: (tensors, loss) per client."""
    glob = build()
    out = []
    for ctx in ctxs:
        worker, task = build(), build()
        copy_state(worker, glob)
        result = rule.local_update(worker, task, ctx)
        out.append(([t.detach().clone() for t in aggregated_tensors(worker)], result.loss, result.steps))
    return glob, out


RULES = {
    "fedavg": lambda: FedAvgLocal(FedAvgConfig(local_steps=3, batch_size=8, lr=0.05, grad_clip=5.0)),
    "fedavg_tight_clip": lambda: FedAvgLocal(FedAvgConfig(local_steps=2, batch_size=8, lr=0.05, grad_clip=0.05)),
    "perfedavg_fomaml": lambda: FedMetaNAS(AlgorithmConfig(local_steps=2, inner_steps=2, batch_size=8,
                                                           query_batch_size=8, grad_clip=0.5)),
    "perfedavg_sgd_meta": lambda: FedMetaNAS(AlgorithmConfig(local_steps=2, inner_steps=1, batch_size=8,
                                                             query_batch_size=8, meta_optimizer="sgd",
                                                             meta_momentum=0.9)),
    "perfedavg_reptile": lambda: FedMetaNAS(AlgorithmConfig(local_steps=2, inner_steps=2, batch_size=8,
                                                            meta_update="reptile")),
}


def _flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def _nudged(build):  # noqa: ANN001, ANN202 - test helper
    """`build` with every weight moved by float32 rounding (a relative 1e-7): how far the sequential
    result itself moves under rounding-sized differences, the yardstick for "equal to float rounding"."""
    def make() -> nn.Module:
        net = build()
        gen = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for p in net.parameters():
                p.mul_(1 + 1e-7 * torch.randn(p.shape, generator=gen))
        return net
    return make


@pytest.mark.parametrize("net", ["cnn", "darts_v2"])
@pytest.mark.parametrize("rule_name", sorted(RULES))
def test_a_batch_of_clients_equals_the_clients_one_after_another(rule_name: str, net: str) -> None:
    # Prepare: each client's sequential update, and the same from a start nudged by float32 rounding
    build = _cnn if net == "cnn" else _darts
    split, k = _split(3), 3
    glob, want = _sequential(RULES[rule_name](), build, _contexts(split, k, lr_scale=0.7))
    _, nudged = _sequential(RULES[rule_name](), _nudged(build), _contexts(split, k, lr_scale=0.7))
    before = [t.clone() for t in aggregated_tensors(glob)]

    # Execute
    update = RULES[rule_name]().local_update_batch(glob, _contexts(split, k, lr_scale=0.7))

    # Assert: every client's tensors are as close to its sequential update as rounding allows. Adam's
    # step g / sqrt(v) turns rounding-sized differences in near-zero gradients into visible ones (and
    # max-pool ties flip), so the bound is relative to what a 1e-7 nudge of the start does to the
    # sequential result itself (measured: the batched distance is below it in every case here).
    assert update.steps == want[0][2]
    start = _flat(before)
    for c, (tensors, loss, _) in enumerate(want):
        got = update.client(c)
        assert [g.shape for g in got] == [w.shape for w in tensors]
        size = (_flat(tensors) - start).norm()
        distance = (_flat(got) - _flat(tensors)).norm() / size
        yardstick = (_flat(nudged[c][0]) - _flat(tensors)).norm() / size
        assert distance <= 2 * yardstick + 1e-5, f"client {c}: {distance:.2e} vs rounding {yardstick:.2e}"
        assert update.losses[c] == pytest.approx(loss, rel=1e-3)
    for b, a in zip(before, aggregated_tensors(glob)):
        assert torch.equal(b, a)  # the template model is left as it was


def test_clients_of_a_batch_differ_from_each_other() -> None:
    # Guards the test above against a batch that gives every client the same (e.g. the first client's) update.
    split = _split(2)
    update = RULES["fedavg"]().local_update_batch(_cnn(), _contexts(split, 2))
    assert not torch.allclose(update.client(0)[0], update.client(1)[0])


def test_stacked_clipping_is_clip_grad_norm_client_by_client() -> None:
    # Prepare: two clients' gradients, one above the limit and one below
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(2, 3, 4, generator=gen), torch.randn(2, 5, generator=gen)]
    grads[0][1] *= 1e-3
    grads[1][1] *= 1e-3
    params = [torch.zeros_like(g, requires_grad=True) for g in grads]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    want = []
    for k in range(2):
        ps = [torch.zeros_like(g[k], requires_grad=True) for g in grads]
        for p, g in zip(ps, grads):
            p.grad = g[k].clone()
        nn.utils.clip_grad_norm_(ps, 1.0)
        want.append([p.grad for p in ps])

    # Execute
    clip_stacked(params, 1.0)

    # Assert
    for k in range(2):
        for p, w in zip(params, want[k]):
            torch.testing.assert_close(p.grad[k], w)
    assert torch.equal(params[0].grad[1], grads[0][1])  # below the limit: untouched


def test_a_stack_runs_each_client_through_its_own_weights() -> None:
    net = _cnn()
    stack = ClientStack(net, 2)
    with torch.no_grad():
        for p in stack.params:
            p[1].mul_(0.5)
    x = torch.randn(2, 3, 1, SIZE, SIZE)
    out = stack(x)
    other = copy.deepcopy(net)
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(0.5)
    torch.testing.assert_close(out[0], net(x[0]))
    torch.testing.assert_close(out[1], other(x[1]))


# -- the soft supernet: every client computes the masks' op set, under its own Gumbel weights ----------------
def _supernet(input_mode: str):  # noqa: ANN202 - test helper
    def build() -> nn.Module:
        torch.manual_seed(0)
        return SuperNet(1, CLASSES, 4, 2, 2, resolve_primitives("metanas"), reduction_layers=(1,),
                        input_mode=input_mode, alpha_init_std=0.5, generator=torch.Generator().manual_seed(1),
                        stem_stride=2)
    return build


def _pruned_masks(net: SuperNet) -> ArchMasks:
    """Some ops pruned (their weights must get no step at all), and on pairwise inputs one pair pruned."""
    masks = net.initial_masks()
    for kind in masks.ops:
        masks.ops[kind][:, 1::2] = False
    if masks.pairs is not None:
        for kind in masks.pairs:
            masks.pairs[kind][1, 0] = False
    return masks


def _search_contexts(split: TensorSplit, clients: int, masks: ArchMasks, mode: str,
                     train_arch: bool = True) -> list[LocalContext]:
    return [dataclasses.replace(ctx, masks=masks, tau=0.7, relax_mode=mode, train_arch=train_arch)
            for ctx in _contexts(split, clients, lr_scale=0.7)]


SEARCH_RULES = {
    "fomaml": dict(local_steps=2, inner_steps=2, batch_size=8, query_batch_size=8, grad_clip=0.5),
    "reptile": dict(local_steps=2, inner_steps=2, batch_size=8, meta_update="reptile"),
}


@pytest.mark.parametrize("input_mode", ["pairs", "all"])
@pytest.mark.parametrize("mode,train_arch", [("soft", True), ("expected", True), ("soft", False)])
@pytest.mark.parametrize("rule_name", sorted(SEARCH_RULES))
def test_a_batch_of_supernet_clients_equals_the_clients_one_after_another(rule_name: str, mode: str,
                                                                          train_arch: bool, input_mode: str) -> None:
    # Prepare
    build = _supernet(input_mode)
    masks = _pruned_masks(build())
    split, k = _split(3), 3
    rule = FedMetaNAS(AlgorithmConfig(**SEARCH_RULES[rule_name]))
    glob, want = _sequential(rule, build, _search_contexts(split, k, masks, mode, train_arch))
    _, nudged = _sequential(rule, _nudged(build), _search_contexts(split, k, masks, mode, train_arch))
    before = [t.clone() for t in aggregated_tensors(glob)]

    # Execute
    update = rule.local_update_batch(glob, _search_contexts(split, k, masks, mode, train_arch))

    # Assert: weights, logits and BN statistics of every client, within what rounding does to the
    # sequential result itself; pruned ops' weights and (warm-up) frozen logits exactly as they were
    start = _flat(before)
    for c, (tensors, loss, _) in enumerate(want):
        got = update.client(c)
        size = (_flat(tensors) - start).norm()
        distance = (_flat(got) - _flat(tensors)).norm() / size
        yardstick = (_flat(nudged[c][0]) - _flat(tensors)).norm() / size
        assert distance <= 2 * yardstick + 1e-5, f"client {c}: {distance:.2e} vs rounding {yardstick:.2e}"
        assert update.losses[c] == pytest.approx(loss, rel=1e-3)
        for g, w, b in zip(got, tensors, before):
            if torch.equal(w, b):  # untouched sequentially (a pruned op, frozen logits): untouched here too
                assert torch.equal(g, b)
    names = [n for n, _ in glob.named_parameters()]
    alphas = [i for i, n in enumerate(names) if SuperNet._is_alpha(n)]
    for i in alphas:
        assert torch.equal(update.client(0)[i], before[i]) == (not train_arch)


def test_a_hard_or_sparse_sample_is_refused_by_the_batched_path() -> None:
    build = _supernet("pairs")
    net = build()
    ctxs = _search_contexts(_split(2), 2, net.initial_masks(), "hard")
    with pytest.raises(ValueError, match="cannot be batched"):
        FedMetaNAS(AlgorithmConfig(local_steps=1, inner_steps=1, batch_size=8)).local_update_batch(net, ctxs)
    sparse = [dataclasses.replace(c, relax_mode="soft", soft_topk=2) for c in ctxs]
    with pytest.raises(ValueError, match="cannot be batched"):
        FedMetaNAS(AlgorithmConfig(local_steps=1, inner_steps=1, batch_size=8)).local_update_batch(net, sparse)
    assert not batchable_sample("soft", 2, 0.0) and not batchable_sample("soft", 0, 0.01)
    assert batchable_sample("soft", 0, 0.0) and batchable_sample("expected", 0, 0.0)
