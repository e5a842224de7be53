"""FedNAS's local MiLeNAS search, checked against the MiLeNAS update written out by hand.

One step draws a batch from the training half, then one from the validation half (same generator);
the alphas take an Adam step on grad L_val + lambda * grad L_train at the current (w, alpha) (first
Adam step: alpha - lr * g / (|g| + eps)), then the weights take an SGD step on grad L_train at the
new alphas (first momentum step: w - lr * g).
"""

import copy
import math

import torch
from torch import nn

from fedmetanas.algorithms.base import ModelInputs
from fedmetanas.algorithms.common import LocalContext
from fedmetanas.algorithms.fednas import MiLeNAS, milenas_alpha_grads, split_train_val
from fedmetanas.algorithms.fednas import FedNAS, FedNASConfig
from fedmetanas.algorithms.phases import SearchPhase
from fedmetanas.configure import config_from_dict
from fedmetanas.data.client_data import sample_batch
from fedmetanas.data.datasets import TensorSplit
from fedmetanas.search.genotypes import DARTS_PRIMITIVES
from fedmetanas.search.supernet import SuperNet, sample_arch

N, CLASSES, BATCH, EPS = 24, 3, 4, 1e-8
CFG = FedNASConfig(local_steps=1, batch_size=BATCH, lr_w=0.1, momentum=0.9, weight_decay=0.0, lr_alpha=0.01,
                   alpha_betas=(0.5, 0.999), alpha_weight_decay=0.0, lambda_train=0.5, grad_clip=0.0)


def _net(seed: int = 0) -> SuperNet:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return SuperNet(1, CLASSES, channels=4, layers=2, nodes=2, primitives=DARTS_PRIMITIVES, stem_multiplier=1,
                        reduction_layers=(1,), input_mode="all", alpha_init_std=0.3,
                        generator=torch.Generator().manual_seed(seed))


def _ctx(net: SuperNet, seed: int = 1) -> LocalContext:
    gen = torch.Generator().manual_seed(123)
    split = TensorSplit(torch.randint(0, 256, (N, 1, 8, 8), generator=gen, dtype=torch.uint8),
                        torch.randint(0, CLASSES, (N,), generator=gen), (0.5,), (0.25,), num_classes=CLASSES)
    return LocalContext(split, torch.arange(N), net.initial_masks(), 1.0, "expected",
                        torch.Generator().manual_seed(seed), torch.Generator().manual_seed(0))


def _loss(net: SuperNet, ctx: LocalContext, x, y) -> torch.Tensor:
    """Cross-entropy under the plain softmax of the alphas (DARTS's relaxation)."""
    return nn.functional.cross_entropy(net(x, sample_arch(net, ctx.masks, 1.0, "expected")), y)


def _batches(ctx: LocalContext, seed: int):
    gen = torch.Generator().manual_seed(seed)
    train_idx, val_idx = split_train_val(ctx.train_idx)
    return sample_batch(ctx.train, train_idx, BATCH, gen), sample_batch(ctx.train, val_idx, BATCH, gen)


def test_the_local_train_split_is_halved_into_disjoint_train_and_validation_parts():
    train, val = split_train_val(torch.arange(10, 21))
    assert set(train.tolist()).isdisjoint(val.tolist())
    assert sorted(train.tolist() + val.tolist()) == list(range(10, 21))
    assert abs(train.numel() - val.numel()) <= 1


def test_the_alpha_gradient_is_the_validation_gradient_plus_lambda_times_the_training_gradient():
    net = _net()
    ctx = _ctx(net)
    train, val = _batches(ctx, 5)
    g_val = torch.autograd.grad(_loss(net, ctx, *val), net.alphas())
    g_train = torch.autograd.grad(_loss(net, ctx, *train), net.alphas())
    for lam in (0.0, 1.0, 2.5):
        got = milenas_alpha_grads(net, ctx, train, val, lam)
        for g, gv, gt in zip(got, g_val, g_train):
            torch.testing.assert_close(g, gv + lam * gt, rtol=1e-5, atol=1e-7)


def test_one_local_step_is_an_adam_step_on_the_alphas_then_an_sgd_step_on_the_weights_at_the_new_alphas():
    net, ref = _net(), _net()
    ctx = _ctx(net, seed=7)
    train, val = _batches(ctx, 7)
    # By hand: the alpha step from (w0, a0), then the weight step at (w0, a1).
    g = milenas_alpha_grads(ref, ctx, train, val, CFG.lambda_train)
    a1 = [a.detach() - CFG.lr_alpha * gi / (gi.abs() + EPS) for a, gi in zip(ref.alphas(), g)]
    with torch.no_grad():
        for a, new in zip(ref.alphas(), a1):
            a.copy_(new)
    gw = torch.autograd.grad(_loss(ref, ctx, *train), ref.weights(), allow_unused=True)
    w1 = [w.detach() - CFG.lr_w * (gi if gi is not None else 0) for w, gi in zip(ref.weights(), gw)]

    result = MiLeNAS(CFG).local_update(net, copy.deepcopy(net), ctx)

    assert math.isfinite(result.loss) and result.steps == 1
    for got, want in zip(net.alphas(), a1):
        torch.testing.assert_close(got.detach(), want, rtol=1e-5, atol=1e-6)
    for got, want in zip(net.weights(), w1):
        torch.testing.assert_close(got.detach(), want, rtol=1e-4, atol=1e-5)


def test_the_weights_gradient_is_clipped_not_the_alphas():
    clip = 1e-3
    cfg = FedNASConfig(**{**CFG.__dict__, "grad_clip": clip, "lr_alpha": 0.0})
    net = _net()
    before = [w.detach().clone() for w in net.weights()]
    alphas = [a.detach().clone() for a in net.alphas()]
    MiLeNAS(cfg).local_update(net, copy.deepcopy(net), _ctx(net))
    step = math.sqrt(sum(float(((w.detach() - b) ** 2).sum()) for w, b in zip(net.weights(), before)))
    # The first momentum step moves the weights by lr * clipped gradient: norm lr * clip.
    assert abs(step - cfg.lr_w * clip) < 1e-6
    for a, b in zip(net.alphas(), alphas):
        torch.testing.assert_close(a.detach(), b)  # lr_alpha 0: only the (unclipped) Adam step could move them


def test_every_op_of_every_edge_is_computed_under_the_softmax_relaxation():
    net = _net()
    calls = []
    for edge in net.modules():
        if hasattr(edge, "ops") and isinstance(edge.ops, nn.ModuleList):
            for op in edge.ops:
                op.register_forward_hook(lambda *_: calls.append(1))
    MiLeNAS(FedNASConfig(**{**CFG.__dict__})).local_update(net, copy.deepcopy(net), _ctx(net))
    edges = sum(len(c.edges) for c in net.cells)
    assert len(calls) == 3 * edges * len(DARTS_PRIMITIVES)  # 3 forward passes per step


# -- the search's length: the stability rule (fednas.stable_rounds) ------------------------------------
def _search_phase(stable_rounds: int, rounds: int = 20) -> SearchPhase:
    cfg = config_from_dict({"algorithm": {"name": "fednas"}, "federated": {"rounds": rounds},
                            "fednas": {"stable_rounds": stable_rounds}})
    search, retrain = FedNAS(cfg).phases()
    assert retrain.span.first == search.span.end == rounds  # planned: the cap, then retraining
    return search


def _asked(phase: SearchPhase, genotypes: str) -> list[bool]:
    """The phase's answers, round by round, to rows whose genotypes are the letters of `genotypes`."""
    return [phase.end_early(rnd, {"round": rnd, "genotype": g}) for rnd, g in enumerate(genotypes)]


def test_the_search_ends_once_its_genotype_has_not_changed_for_stable_rounds_rounds():
    # Round 0 has nothing to compare with; a change restarts the count.
    assert _asked(_search_phase(2), "abbbaccc") == [False, False, False, True, False, False, False, True]
    assert _asked(_search_phase(3), "aaaa") == [False, False, False, True]
    assert _asked(_search_phase(1), "abb") == [False, False, True]


def test_stable_rounds_0_searches_every_round_of_federated_rounds():
    assert _asked(_search_phase(0), "aaaaaa") == [False] * 6


def test_fednas_searches_until_stable_for_3_rounds_by_default():
    cfg = config_from_dict({"algorithm": {"name": "fednas"}})
    assert cfg.fednas.stable_rounds == 3 and FedNAS(cfg).phases()[0].stable_rounds == 3


def test_the_stability_count_survives_a_checkpoint():
    before = _search_phase(3)
    before.on_model(before.build_model(ModelInputs(1, 10, 28)))
    _asked(before, "abb")
    state = before.state_dict()

    after = _search_phase(3)
    after.load_state_dict(state)

    assert [after.end_early(r, {"genotype": "b"}) for r in (3, 4)] == [False, True]
    fresh = _search_phase(3)
    fresh.load_state_dict({"masks": None})  # a checkpoint from before the rule: counts from zero
    assert [fresh.end_early(r, {"genotype": "b"}) for r in (3, 4, 5, 6)] == [False, False, False, True]
