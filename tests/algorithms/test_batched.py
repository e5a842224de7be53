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

from fedmetanas.algorithms.batched import ClientStack, batched_form, clip_stacked
from fedmetanas.algorithms.common import LocalContext, copy_state
from fedmetanas.algorithms.fedavg import FedAvgConfig, FedAvgLocal
from fedmetanas.algorithms.fedmetanas import FedMetaNAS
from fedmetanas.algorithms.fednas import FedNASConfig, MiLeNAS
from fedmetanas.algorithms.phases import NEVER
from fedmetanas.config import AlgorithmConfig
from fedmetanas.data.datasets import TensorSplit
from fedmetanas.federated.aggregation import aggregated_tensors
from fedmetanas.search.discrete import CNN, DiscreteNet
from fedmetanas.search.genotypes import DARTS_V2, resolve_primitives
from fedmetanas.search.norms import apply_norm
from fedmetanas.search.supernet import ArchMasks, SuperNet
from tests.helpers import nudged

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


def _darts_group_norm() -> nn.Module:
    return apply_norm(_darts(), "group", 2)


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


def _assert_within_rounding(got: list[list[torch.Tensor]], want, rule, build, ctxs, start: torch.Tensor) -> None:  # noqa: ANN001
    """Each client's batched tensors are no farther from its sequential ones than the sequential result
    itself moves when its start is nudged by float32 rounding. One nudge can miss a discrete event that
    rounding alone triggers (a max-pool tie, a ReLU at 0, Adam's g / sqrt(v) on a near-zero gradient):
    where the first nudge's distance is exceeded, up to three more are tried and the largest counts."""
    pending = list(range(len(want)))
    start = start.detach()
    for seed in (5, 6, 7, 8):
        _, moved = _sequential(rule(), nudged(build, seed), ctxs())
        still = []
        for c in pending:
            size = (_flat(want[c][0]).detach() - start).norm()
            distance = float((_flat(got[c]).detach() - _flat(want[c][0]).detach()).norm() / size)
            yardstick = float((_flat(moved[c][0]).detach() - _flat(want[c][0]).detach()).norm() / size)
            if distance > 2 * yardstick + 1e-5:
                still.append((c, distance, yardstick))
        pending = [c for c, _, _ in still]
        if not pending:
            return
    c, distance, yardstick = still[0]
    raise AssertionError(f"client {c}: {distance:.2e} vs rounding {yardstick:.2e}")


NETS = {"cnn": _cnn, "darts_v2": _darts, "darts_v2_group_norm": _darts_group_norm}


@pytest.mark.parametrize("net", sorted(NETS))
@pytest.mark.parametrize("rule_name", sorted(RULES))
def test_a_batch_of_clients_equals_the_clients_one_after_another(rule_name: str, net: str) -> None:
    # Prepare: each client's sequential update, and the same from a start nudged by float32 rounding
    build = NETS[net]
    split, k = _split(3), 3
    glob, want = _sequential(RULES[rule_name](), build, _contexts(split, k, lr_scale=0.7))
    before = [t.clone() for t in aggregated_tensors(glob)]

    # Execute
    update = RULES[rule_name]().local_update_batch(glob, _contexts(split, k, lr_scale=0.7))

    # Assert: every client's tensors are as close to its sequential update as rounding allows. Adam's
    # step g / sqrt(v) turns rounding-sized differences in near-zero gradients into visible ones (and
    # max-pool ties flip), so the bound is relative to what a 1e-7 nudge of the start does to the
    # sequential result itself (measured: the batched distance is below it in every case here).
    assert update.steps == want[0][2]
    for c, (tensors, loss, _) in enumerate(want):
        assert [g.shape for g in update.client(c)] == [w.shape for w in tensors]
        assert update.losses[c] == pytest.approx(loss, rel=1e-3)
    _assert_within_rounding([update.client(c) for c in range(k)], want, RULES[rule_name], build,
                            lambda: _contexts(split, k, lr_scale=0.7), _flat(before))
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
def _supernet(input_mode: str, norm: str = "batch"):  # noqa: ANN202 - test helper
    def build() -> nn.Module:
        torch.manual_seed(0)
        return apply_norm(SuperNet(1, CLASSES, 4, 2, 2, resolve_primitives("metanas"), reduction_layers=(1,),
                                   input_mode=input_mode, alpha_init_std=0.5,
                                   generator=torch.Generator().manual_seed(1), stem_stride=2), norm, 2)
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
                     train_arch: bool = True, topk: int = 0, eps: float = 0.0) -> list[LocalContext]:
    return [dataclasses.replace(ctx, masks=masks, tau=0.7, relax_mode=mode, train_arch=train_arch, soft_topk=topk,
                                soft_eps=eps, round=0)
            for ctx in _contexts(split, clients, lr_scale=0.7)]


SEARCH_RULES = {
    "fomaml": dict(local_steps=2, inner_steps=2, batch_size=8, query_batch_size=8, grad_clip=0.5),
    "reptile": dict(local_steps=2, inner_steps=2, batch_size=8, meta_update="reptile"),
    "fomaml_sgd_momentum": dict(local_steps=3, inner_steps=1, batch_size=8, query_batch_size=8, grad_clip=0.5,
                                meta_optimizer="sgd", meta_momentum=0.9),
    "fomaml_adam_meta": dict(local_steps=3, inner_steps=1, batch_size=8, query_batch_size=8, grad_clip=0.5,
                             meta_optimizer="adam"),
    # DARTS's pair: SGD with momentum on the weights, Adam on the logits (`algorithm.meta_optimizer_alpha`)
    "fomaml_sgd_adam": dict(local_steps=3, inner_steps=1, batch_size=8, query_batch_size=8, grad_clip=0.5,
                            meta_optimizer="sgd", meta_momentum=0.9, meta_optimizer_alpha="adam"),
}
# (rule, relaxation, logits trained (False: a warm-up), top-k, eps, input mode): every phase a FedMetaNAS
# search has (dense and sparse soft, expected, hard, warm-ups), each meta rule where what a client did not
# use matters most (hard and sparse: Adam's and momentum's None-vs-zero), both input modes
SEARCH_CASES = [
    ("fomaml", "soft", True, 0, 0.0, "pairs"), ("fomaml", "expected", True, 0, 0.0, "all"),
    ("fomaml", "soft", False, 0, 0.0, "pairs"), ("fomaml", "soft", True, 2, 0.0, "pairs"),
    ("fomaml", "soft", True, 2, 0.0, "all"), ("fomaml", "soft", True, 0, 0.2, "pairs"),
    ("fomaml", "hard", True, 0, 0.0, "pairs"), ("fomaml", "hard", True, 0, 0.0, "all"),
    ("fomaml", "hard", False, 0, 0.0, "pairs"), ("reptile", "hard", True, 0, 0.0, "pairs"),
    ("reptile", "soft", True, 2, 0.0, "all"), ("reptile", "soft", False, 0, 0.0, "all"),
    ("fomaml_sgd_momentum", "hard", True, 0, 0.0, "pairs"), ("fomaml_sgd_momentum", "soft", True, 2, 0.0, "pairs"),
    ("fomaml_adam_meta", "hard", True, 0, 0.0, "all"), ("fomaml_adam_meta", "soft", True, 2, 0.0, "pairs"),
    # plain steps in place of meta-steps (`algorithm.plain_after_fraction`), Adam and SGD with momentum
    ("fomaml_adam_meta_plain", "hard", True, 0, 0.0, "pairs"), ("fomaml_plain", "soft", True, 2, 0.0, "all"),
    ("fomaml_sgd_momentum_plain", "soft", False, 2, 0.0, "pairs"),
    # weights and logits under different meta optimizers, meta-steps and plain steps
    ("fomaml_sgd_adam", "hard", True, 0, 0.0, "pairs"), ("fomaml_sgd_adam", "soft", True, 2, 0.0, "all"),
    ("fomaml_sgd_adam_plain", "soft", True, 2, 0.0, "pairs"),
]


@pytest.mark.parametrize("rule_name,mode,train_arch,topk,eps,input_mode", SEARCH_CASES)
def test_a_batch_of_supernet_clients_equals_the_clients_one_after_another(rule_name: str, mode: str,
                                                                          train_arch: bool, topk: int, eps: float,
                                                                          input_mode: str) -> None:
    _check_supernet_batch(rule_name, mode, train_arch, topk, eps, input_mode, "batch")


@pytest.mark.parametrize("rule_name,mode,topk", [("fomaml_sgd_momentum", "soft", 2), ("fomaml", "hard", 0),
                                                 ("fomaml_adam_meta", "soft", 0)])
def test_a_batch_of_group_norm_supernet_clients_equals_the_clients_one_after_another(rule_name: str, mode: str,
                                                                                     topk: int) -> None:
    # `model.norm: group`: the stacked GroupNorm spans K clients x E edges, its groups never mixing two.
    # Sparse soft top-2 under the SGD meta step: every tensor within 3e-8 of the sequential one (measured);
    # under Adam the same case lands 6x past the one-nudge yardstick, on one conv_3x3's weights only,
    # Adam's g / sqrt(v) amplifying rounding in near-zero gradients (the other Adam cases here pass).
    _check_supernet_batch(rule_name, mode, True, topk, 0.0, "pairs", "group")


def _check_supernet_batch(rule_name: str, mode: str, train_arch: bool, topk: int, eps: float, input_mode: str,
                          norm: str) -> None:
    # Prepare: hard and sparse samples give each client its own ops; the union is computed, and what a
    # client did not compute must move exactly as sequentially (not at all, or only by what it did use)
    build = _supernet(input_mode, norm)
    masks = _pruned_masks(build())
    split, k = _split(3), 3
    plain = rule_name.endswith("_plain")  # the contexts' round is 0: plain from round 0 on
    rule = FedMetaNAS(AlgorithmConfig(**SEARCH_RULES[rule_name.removesuffix("_plain")]),
                      plain_from=0 if plain else NEVER)
    glob, want = _sequential(rule, build, _search_contexts(split, k, masks, mode, train_arch, topk, eps))
    before = [t.clone() for t in aggregated_tensors(glob)]

    # Execute
    update = rule.local_update_batch(glob, _search_contexts(split, k, masks, mode, train_arch, topk, eps))

    # Assert: weights, logits and BN statistics of every client, within what rounding does to the
    # sequential result itself; pruned ops' weights and (warm-up) frozen logits exactly as they were
    _assert_within_rounding([update.client(c) for c in range(k)], want, lambda: rule, build,
                            lambda: _search_contexts(split, k, masks, mode, train_arch, topk, eps), _flat(before))
    for c, (tensors, loss, _) in enumerate(want):
        got = update.client(c)
        assert update.losses[c] == pytest.approx(loss, rel=1e-3)
        for g, w, b in zip(got, tensors, before):
            if torch.equal(w, b):  # untouched sequentially (a pruned op, frozen logits): untouched here too
                assert torch.equal(g, b)
    names = [n for n, _ in glob.named_parameters()]
    alphas = [i for i, n in enumerate(names) if SuperNet._is_alpha(n)]
    for i in alphas:
        assert torch.equal(update.client(0)[i], before[i]) == (not train_arch)


class _OwnLoss(FedAvgLocal):
    """A FedProx-like rule written as a new user would: only the loss changes (label smoothing here)."""

    def loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(logits, y, label_smoothing=0.3)


class _OwnStep(FedAvgLocal):
    """A rule that rewrites the sequential step itself and has no batched step of its own."""

    def local_update(self, model, task, ctx):  # noqa: ANN001, ANN201 - test double
        return super().local_update(model, task, ctx)


def test_a_rule_that_changes_its_loss_changes_its_batched_step_too() -> None:
    # Prepare
    cfg = FedAvgConfig(local_steps=2, batch_size=8, lr=0.05)
    split = _split(2)
    _, own = _sequential(_OwnLoss(cfg), _cnn, _contexts(split, 2))
    _, plain = _sequential(FedAvgLocal(cfg), _cnn, _contexts(split, 2))

    # Execute
    update = _OwnLoss(cfg).local_update_batch(_cnn(), _contexts(split, 2))

    # Assert: the batched result is the overriding rule's, not FedAvg's
    for c in range(2):
        got, want, other = _flat(update.client(c)), _flat(own[c][0]), _flat(plain[c][0])
        assert (got - want).norm() < 1e-3 * (got - other).norm()
        assert update.losses[c] == pytest.approx(own[c][1], rel=1e-4)


def test_a_rule_whose_sequential_step_was_rewritten_has_no_batched_form() -> None:
    assert batched_form(FedAvgLocal(FedAvgConfig())) is None
    assert batched_form(_OwnLoss(FedAvgConfig())) is None
    reason = batched_form(_OwnStep(FedAvgConfig()))
    assert reason is not None and "_OwnStep overrides local_update" in reason
    assert "no batched form" in batched_form(object())


def test_clients_with_fewer_rows_than_a_batch_are_stepped_in_their_own_group() -> None:
    # Prepare: client 1 holds 5 rows, fewer than a batch of 8 (it draws all 5 every step, as sequentially)
    build = _supernet("pairs")
    masks = _pruned_masks(build())
    split = _split(3)
    rule = FedMetaNAS(AlgorithmConfig(local_steps=1, inner_steps=1, batch_size=8, query_batch_size=8))

    def ctxs() -> list[LocalContext]:
        out = _search_contexts(split, 3, masks, "hard")
        out[1] = dataclasses.replace(out[1], train_idx=out[1].train_idx[:5])
        return out

    glob, want = _sequential(rule, build, ctxs())

    # Execute
    update = rule.local_update_batch(glob, ctxs())

    # Assert: every client's update is its own, in the clients' order
    for c in range(3):
        assert update.losses[c] == pytest.approx(want[c][1], rel=1e-3)
        torch.testing.assert_close(_flat(update.client(c)), _flat(want[c][0]), rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("input_mode,train_arch", [("pairs", True), ("all", True), ("pairs", False)])
def test_a_batch_of_milenas_clients_equals_the_clients_one_after_another(input_mode: str, train_arch: bool) -> None:
    # Prepare: FedNAS's search rule (softmax relaxation, alpha Adam on val + lambda * train, weight SGD)
    build = _supernet(input_mode)
    masks = build().initial_masks()
    split, k = _split(3), 3
    rule = MiLeNAS(FedNASConfig(local_steps=3, batch_size=8, lr_alpha=0.05))

    def ctxs() -> list[LocalContext]:
        return _search_contexts(split, k, masks, "expected", train_arch)

    glob, want = _sequential(rule, build, ctxs())
    before = [t.clone() for t in aggregated_tensors(glob)]

    # Execute
    update = rule.local_update_batch(glob, ctxs())

    # Assert
    _assert_within_rounding([update.client(c) for c in range(k)], want, lambda: rule, build, ctxs, _flat(before))
    for c in range(k):
        assert update.losses[c] == pytest.approx(want[c][1], rel=1e-3)
    alphas = [i for i, (n, _) in enumerate(glob.named_parameters()) if SuperNet._is_alpha(n)]
    assert all(torch.equal(update.client(0)[i], before[i]) == (not train_arch) for i in alphas)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("mode,topk", [("hard", 0), ("soft", 2)])
def test_the_stacked_step_on_a_gpu_equals_it_on_the_cpu(mode: str, topk: int) -> None:
    # Prepare: the same clients (CPU generators, as the loop derives them) on a CUDA copy of the model and data
    build = _supernet("pairs")
    masks = _pruned_masks(build())
    split = _split(3)
    rule = FedMetaNAS(AlgorithmConfig(local_steps=2, inner_steps=1, batch_size=8, query_batch_size=8))
    cuda = torch.device("cuda")
    gpu_split = split.to(cuda)

    def ctxs(on: TensorSplit) -> list[LocalContext]:
        return [dataclasses.replace(c, train=on, train_idx=c.train_idx.to(on.images.device))
                for c in _search_contexts(split, 3, masks, mode, topk=topk)]

    # Execute
    cpu = rule.local_update_batch(build(), ctxs(split))
    gpu = rule.local_update_batch(build().to(cuda), ctxs(gpu_split))

    # Assert: the same sampled ops and updates, to float rounding
    for c in range(3):
        torch.testing.assert_close(_flat(gpu.client(c)).cpu(), _flat(cpu.client(c)), rtol=1e-3, atol=1e-4)
