"""FedMetaNAS's local search, checked against first-order MAML and Reptile written out by hand.

The reference reproduces one meta-step from the same random streams: the batch generator gives the
support batch then the query batch, the Gumbel generator the support sample then the query sample.
The first Adam step with betas (0, 0.999) is p - lr * g / (|g| + eps): m = g and the bias-corrected
v is g^2.
"""

import copy
import dataclasses
import math

import pytest
import torch
from torch import nn

from fedmetanas.algorithms.fedmetanas import (META_STATE, FedMetaNAS, FedMetaNASAlgorithm, LocalContext,
                                               adam_state_size, adaptation_wins, dump_adam_state, holdout_split,
                                               load_adam_state, paired_outcomes)
from fedmetanas.config import AlgorithmConfig, PersonalizeConfig
from fedmetanas.configure import config_from_dict
from fedmetanas.data.client_data import sample_batch
from fedmetanas.data.datasets import TensorSplit
from fedmetanas.search.genotypes import METANAS_PRIMITIVES
from fedmetanas.search.supernet import SuperNet, arch_from_genotype, derive_genotype, sample_arch

N, CLASSES, BATCH, EPS = 24, 3, 4, 1e-8

BASE = AlgorithmConfig(meta_update="fomaml", local_steps=1, inner_steps=1, batch_size=BATCH, query_batch_size=BATCH,
                       inner_lr_w=0.05, inner_lr_alpha=0.08, meta_optimizer="sgd", meta_lr_w=0.3,
                       meta_lr_alpha=0.5, reptile_lr_w=0.7, reptile_lr_alpha=0.6, weight_decay=0.0, grad_clip=0.0)


def _net(seed: int = 0) -> SuperNet:
    """Alphas come from the generator; module weights from the global RNG, seeded and restored here
    (as the simulation builds its model)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return SuperNet(1, CLASSES, channels=4, layers=2, nodes=2, primitives=METANAS_PRIMITIVES, stem_multiplier=1,
                        reduction_layers=(1,), alpha_init_std=0.3, generator=torch.Generator().manual_seed(seed))


def _split() -> TensorSplit:
    gen = torch.Generator().manual_seed(123)
    images = torch.randint(0, 256, (N, 1, 8, 8), generator=gen, dtype=torch.uint8)
    labels = torch.randint(0, CLASSES, (N,), generator=gen)
    return TensorSplit(images, labels, (0.5,), (0.25,), num_classes=CLASSES)


def _ctx(net: SuperNet, batch_seed: int = 1, gumbel_seed: int = 2, mode: str = "hard",
         lr_scale: float = 1.0) -> LocalContext:
    return LocalContext(train=_split(), train_idx=torch.arange(N), masks=net.initial_masks(), tau=1.0,
                        relax_mode=mode, batch_gen=torch.Generator().manual_seed(batch_seed),
                        gumbel_gen=torch.Generator().manual_seed(gumbel_seed), lr_scale=lr_scale)


def _clone(gen: torch.Generator) -> torch.Generator:
    return torch.Generator().set_state(gen.get_state())


def _loss_and_grads(model: SuperNet, ctx: LocalContext, batch_gen, gumbel_gen):
    """One batch and one relaxed sample, in the code's order; gradients of all parameters (None if unused)."""
    x, y = sample_batch(ctx.train, ctx.train_idx, BATCH, batch_gen)
    arch = sample_arch(model, ctx.masks, ctx.tau, ctx.relax_mode, gumbel_gen)
    loss = nn.functional.cross_entropy(model(x, arch), y)
    grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
    return loss.detach(), grads


def _is_alpha(model: SuperNet):
    alpha_ids = {id(p) for p in model.alphas()}
    return [id(p) in alpha_ids for p in model.parameters()]


def _clip_weight_grads(grads, kinds, max_norm: float):
    """Scale the weights' gradients to total norm `max_norm` (torch's clip_grad_norm_ rule)."""
    if max_norm <= 0:
        return list(grads)
    norm = math.sqrt(sum(float((g ** 2).sum()) for g, a in zip(grads, kinds) if g is not None and not a))
    scale = min(1.0, max_norm / (norm + 1e-6))
    return [g if g is None or a else g * scale for g, a in zip(grads, kinds)]


def _reference_adapt(model: SuperNet, ctx: LocalContext, cfg: AlgorithmConfig, batch_gen, gumbel_gen):
    """The task learner after one inner Adam step, computed by hand from cloned generators."""
    task = copy.deepcopy(model)
    loss, grads = _loss_and_grads(task, ctx, batch_gen, gumbel_gen)
    grads = _clip_weight_grads(grads, _is_alpha(task), cfg.grad_clip)
    with torch.no_grad():
        for p, g, is_alpha in zip(task.parameters(), grads, _is_alpha(task)):
            if g is not None:
                lr = cfg.inner_lr_alpha if is_alpha else cfg.inner_lr_w * ctx.lr_scale
                p.sub_(lr * g / (g.abs() + EPS))
    return task, loss


def _params(model: SuperNet) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def _split_by_kind(model: SuperNet, tensors: list[torch.Tensor]):
    kinds = _is_alpha(model)
    return [t for t, a in zip(tensors, kinds) if not a], [t for t, a in zip(tensors, kinds) if a]


# -- the meta-update rules ---------------------------------------------------------------------
@pytest.mark.parametrize("lr_scale", [1.0, 0.5])
def test_fomaml_step_is_the_query_gradient_at_the_adapted_parameters(lr_scale):
    # Prepare: the round's lr_scale multiplies the weights' inner and meta rates, not the alphas'.
    model, cfg = _net(), BASE
    ctx = _ctx(model, lr_scale=lr_scale)
    bg, gg = _clone(ctx.batch_gen), _clone(ctx.gumbel_gen)
    before = _params(model)
    adapted, _ = _reference_adapt(model, ctx, cfg, bg, gg)
    query_loss, query_grads = _loss_and_grads(adapted, ctx, bg, gg)
    kinds = _is_alpha(model)
    expected = [p if g is None else p - (cfg.meta_lr_alpha if a else cfg.meta_lr_w * lr_scale) * g
                for p, g, a in zip(before, query_grads, kinds)]

    # Execute
    result = FedMetaNAS(cfg).local_update(model, copy.deepcopy(model), ctx)

    # Assert
    after = _params(model)
    assert _max_diff(after, expected) < 1e-6
    moved_w, moved_a = _split_by_kind(model, [(x - y).abs().max() for x, y in zip(after, before)])
    assert max(moved_w) > 1e-2 and max(moved_a) > 1e-2  # a real step for both parameter sets
    assert result.loss == pytest.approx(float(query_loss), rel=1e-5)
    assert result.steps == 2
    # The adapted point matters: the query gradient at the *initial* parameters gives another step.
    _, naive_grads = _loss_and_grads(copy.deepcopy(_net()), ctx, _clone(_ctx(model).batch_gen),
                                     _clone(_ctx(model).gumbel_gen))
    naive = [p if g is None else p - (cfg.meta_lr_alpha if a else cfg.meta_lr_w * lr_scale) * g
             for p, g, a in zip(before, naive_grads, kinds)]
    assert _max_diff(after, naive) > 1e-3


@pytest.mark.parametrize(("weights_rule", "logits_rule"), [("sgd", "adam"), ("adam", "sgd")])
def test_weights_and_logits_each_take_their_own_meta_optimizers_step(weights_rule, logits_rule):
    # Prepare: DARTS's pair (SGD for the weights, Adam for the logits) and its reverse. A first step of SGD
    # without momentum is p - lr * g; a first Adam step is p - lr * g / (|g| + eps) (bias-corrected m = g, v = g^2)
    model = _net()
    cfg = dataclasses.replace(BASE, meta_optimizer=weights_rule, meta_optimizer_alpha=logits_rule)
    ctx = _ctx(model)
    bg, gg = _clone(ctx.batch_gen), _clone(ctx.gumbel_gen)
    before = _params(model)
    adapted, _ = _reference_adapt(model, ctx, cfg, bg, gg)
    _, query_grads = _loss_and_grads(adapted, ctx, bg, gg)

    def step(p, g, rule, lr):
        return p - lr * (g if rule == "sgd" else g / (g.abs() + EPS))

    expected = [p if g is None else step(p, g, logits_rule, cfg.meta_lr_alpha) if a
                else step(p, g, weights_rule, cfg.meta_lr_w) for p, g, a in zip(before, query_grads, _is_alpha(model))]

    # Execute
    FedMetaNAS(cfg).local_update(model, copy.deepcopy(model), ctx)

    # Assert: each parameter set by its own rule, and not by the other's
    assert _max_diff(_params(model), expected) < 1e-6
    one_rule = [p if g is None else step(p, g, weights_rule, cfg.meta_lr_alpha if a else cfg.meta_lr_w)
                for p, g, a in zip(before, query_grads, _is_alpha(model))]
    assert _max_diff(_params(model), one_rule) > 1e-3


def test_the_logits_meta_optimizer_is_the_weights_unless_set():
    assert AlgorithmConfig(meta_optimizer="sgd").alpha_optimizer == "sgd"
    assert AlgorithmConfig(meta_optimizer="sgd", meta_optimizer_alpha="adam").alpha_optimizer == "adam"
    assert AlgorithmConfig().alpha_optimizer == "adam"


def test_fomaml_copies_the_task_learners_bn_statistics():
    model, cfg = _net(), BASE
    ctx = _ctx(model)
    bg, gg = _clone(ctx.batch_gen), _clone(ctx.gumbel_gen)
    adapted, _ = _reference_adapt(model, ctx, cfg, bg, gg)
    _loss_and_grads(adapted, ctx, bg, gg)  # the query forward updates the running statistics too
    untouched = [b.clone() for b in model.buffers()]

    FedMetaNAS(cfg).local_update(model, copy.deepcopy(model), ctx)

    floats = [(b, r, u) for b, r, u in zip(model.buffers(), adapted.buffers(), untouched) if b.is_floating_point()]
    assert all(torch.allclose(b, r, atol=1e-6) for b, r, _ in floats)
    assert any(not torch.equal(b, u) for b, _, u in floats)
    # BN step counters: 2 (support + query) where both passes computed the op, fewer where a hard
    # sample skipped it.
    counters = [(b, r) for b, r in zip(model.buffers(), adapted.buffers()) if not b.is_floating_point()]
    assert all(torch.equal(b, r) for b, r in counters)
    assert int(model.stem[1].num_batches_tracked) == 2


def test_fomaml_clips_only_the_weight_gradient():
    clip = 1e-3
    model, cfg = _net(), dataclasses.replace(BASE, grad_clip=clip)
    ctx = _ctx(model)
    bg, gg = _clone(ctx.batch_gen), _clone(ctx.gumbel_gen)
    adapted, _ = _reference_adapt(model, ctx, cfg, bg, gg)
    _, query_grads = _loss_and_grads(adapted, ctx, bg, gg)
    before = _params(model)

    FedMetaNAS(cfg).local_update(model, copy.deepcopy(model), ctx)

    steps = [b - a for a, b in zip(_params(model), before)]
    w_steps, a_steps = _split_by_kind(model, steps)
    _, a_grads = _split_by_kind(model, list(query_grads))
    w_norm = math.sqrt(sum(float((s ** 2).sum()) for s in w_steps))
    assert w_norm == pytest.approx(cfg.meta_lr_w * clip, rel=1e-3)
    assert all(torch.allclose(s, cfg.meta_lr_alpha * g, atol=1e-5) for s, g in zip(a_steps, a_grads))


@pytest.mark.parametrize("lr_scale", [1.0, 0.5])
def test_reptile_moves_towards_the_adapted_parameters_with_separate_rates(lr_scale):
    model, cfg = _net(), dataclasses.replace(BASE, meta_update="reptile")
    ctx = _ctx(model, lr_scale=lr_scale)
    before = _params(model)
    adapted, inner_loss = _reference_adapt(model, ctx, cfg, _clone(ctx.batch_gen), _clone(ctx.gumbel_gen))
    expected = [p + (cfg.reptile_lr_alpha if a else cfg.reptile_lr_w) * (q.detach() - p)
                for p, q, a in zip(before, adapted.parameters(), _is_alpha(model))]

    result = FedMetaNAS(cfg).local_update(model, copy.deepcopy(model), ctx)

    after = _params(model)
    assert _max_diff(after, expected) < 1e-6
    moved_w, moved_a = _split_by_kind(model, [(x - y).abs().max() for x, y in zip(after, before)])
    # One Adam step moves a parameter by ~lr; Reptile scales that by its own rate per set.
    assert max(moved_w) == pytest.approx(cfg.reptile_lr_w * cfg.inner_lr_w * lr_scale, rel=1e-3)
    assert max(moved_a) == pytest.approx(cfg.reptile_lr_alpha * cfg.inner_lr_alpha, rel=1e-3)
    assert result.loss == pytest.approx(float(inner_loss), rel=1e-6)
    assert result.steps == 1


def test_reptile_with_unit_rates_returns_the_adapted_model():
    model = _net()
    cfg = dataclasses.replace(BASE, meta_update="reptile", reptile_lr_w=1.0, reptile_lr_alpha=1.0, inner_steps=2)
    ctx = _ctx(model)
    task = copy.deepcopy(model)
    reference = copy.deepcopy(model)
    FedMetaNAS(cfg).adapt(reference, _ctx(model), cfg.inner_steps)  # the task learner on its own

    FedMetaNAS(cfg).local_update(model, task, ctx)

    # p + 1 * (q - p) is q up to one rounding.
    assert _max_diff(_params(model), _params(reference)) < 1e-6
    assert all(torch.equal(a, b) for a, b in zip(model.buffers(), reference.buffers()))


# -- whole local updates -----------------------------------------------------------------------
@pytest.mark.parametrize("meta_update", ["fomaml", "reptile"])
@pytest.mark.parametrize("mode", ["hard", "soft"])
def test_local_update_changes_weights_and_alphas_and_reports_a_finite_loss(meta_update, mode):
    model = _net()
    cfg = AlgorithmConfig(meta_update=meta_update, local_steps=2, inner_steps=2, batch_size=BATCH,
                          query_batch_size=BATCH, meta_lr_w=0.05, meta_lr_alpha=0.05)
    before = _params(model)

    result = FedMetaNAS(cfg).local_update(model, copy.deepcopy(model), _ctx(model, mode=mode))

    changed = [not torch.equal(a, b) for a, b in zip(_params(model), before)]
    changed_w, changed_a = _split_by_kind(model, changed)
    assert any(changed_w) and all(changed_a)
    assert math.isfinite(result.loss) and result.loss > 0
    assert result.steps == 2 * (2 + (meta_update == "fomaml"))


def test_plain_steps_are_the_meta_optimizer_on_support_batches_at_the_clients_own_parameters():
    # Prepare: from round 3 on (`algorithm.plain_after_fraction`), a round makes the same passes as its
    # meta-steps, (inner_steps + 1) per meta-step, each an SGD step of the client's weights and logits
    cfg = dataclasses.replace(BASE, local_steps=2, inner_steps=1)
    model = _net()
    ctx = dataclasses.replace(_ctx(model), round=3)
    bg, gg = _clone(ctx.batch_gen), _clone(ctx.gumbel_gen)
    expected = copy.deepcopy(model)
    kinds = _is_alpha(model)
    losses = []
    for _ in range(4):
        loss, grads = _loss_and_grads(expected, ctx, bg, gg)
        losses.append(float(loss))
        with torch.no_grad():
            for p, g, a in zip(expected.parameters(), grads, kinds):
                if g is not None:
                    p.sub_((cfg.meta_lr_alpha if a else cfg.meta_lr_w) * g)

    # Execute
    result = FedMetaNAS(cfg, plain_from=3).local_update(model, copy.deepcopy(model), ctx)

    # Assert
    assert _max_diff(_params(model), _params(expected)) < 1e-6
    assert result.steps == 4 and result.loss == pytest.approx(sum(losses) / 4, rel=1e-5)


def test_rounds_before_the_plain_ones_are_meta_steps_bit_for_bit():
    cfg = AlgorithmConfig(local_steps=2, inner_steps=1, batch_size=BATCH, query_batch_size=BATCH)
    meta, early, plain = _net(), _net(), _net()

    FedMetaNAS(cfg).local_update(meta, _net(seed=77), dataclasses.replace(_ctx(meta), round=2))
    FedMetaNAS(cfg, plain_from=3).local_update(early, _net(seed=77), dataclasses.replace(_ctx(early), round=2))
    FedMetaNAS(cfg, plain_from=3).local_update(plain, _net(seed=77), dataclasses.replace(_ctx(plain), round=3))

    assert all(torch.equal(a, b) for a, b in zip(meta.state_dict().values(), early.state_dict().values()))
    assert _max_diff(_params(meta), _params(plain)) > 1e-4


# -- the meta optimizer's state kept by a client between rounds (`algorithm.meta_state: kept`) -------------
def _adam_steps(params: list[torch.Tensor], opt: torch.optim.Optimizer, steps: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in params[:-1]:  # the last tensor is never stepped: it has no state
            p.grad = torch.randn(p.shape, generator=gen)
        params[-1].grad = None
        opt.step()


def test_a_dumped_and_reloaded_adam_state_continues_as_if_never_interrupted():
    # Prepare: one Adam stepped 5 times, against 3 steps, a dump, a fresh Adam loading it, 2 more steps
    start = [torch.randn(3, 2, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    whole = [t.clone().requires_grad_() for t in start]
    _adam_steps(whole, torch.optim.Adam(whole, lr=0.1), 5, seed=9)
    cut = [t.clone().requires_grad_() for t in start]
    first = torch.optim.Adam(cut, lr=0.1)
    _adam_steps(cut, first, 3, seed=9)
    previous = torch.full((adam_state_size(cut),), 7.0)  # the never-stepped tensor keeps what it had

    # Execute
    flat = dump_adam_state(first, cut, previous)
    second = torch.optim.Adam(cut, lr=0.1)
    load_adam_state(second, cut, flat)
    gen = torch.Generator().manual_seed(9)
    for _ in range(3 * 2):  # skip the first 3 steps' draws
        torch.randn(3, 2, generator=gen)
    for _ in range(2):
        for p in cut[:-1]:
            p.grad = torch.randn(p.shape, generator=gen)
        second.step()

    # Assert
    assert all(torch.equal(a, b) for a, b in zip(cut, whole))
    m, v, t = flat.split([18, 18, 3])
    assert t.tolist() == [3.0, 3.0, 7.0] and torch.equal(m[12:], torch.full((6,), 7.0))


def test_a_clients_first_round_with_kept_state_is_the_fresh_round_and_its_state_continues_the_next():
    # Prepare: the state table starts at zeros (no client has stepped yet)
    cfg = AlgorithmConfig(local_steps=2, inner_steps=1, batch_size=BATCH, query_batch_size=BATCH)
    kept_cfg = dataclasses.replace(cfg, meta_state="kept")
    fresh, kept = _net(), _net()
    zeros = torch.zeros(adam_state_size([*kept.weights(), *kept.alphas()]))

    # Execute
    FedMetaNAS(cfg).local_update(fresh, _net(seed=77), _ctx(fresh))
    first = FedMetaNAS(kept_cfg).local_update(kept, _net(seed=77), dataclasses.replace(_ctx(kept),
                                                                                        state={META_STATE: zeros}))
    again_fresh, again_kept = _net(), _net()
    FedMetaNAS(cfg).local_update(again_fresh, _net(seed=77), _ctx(again_fresh, 3, 4))
    FedMetaNAS(kept_cfg).local_update(again_kept, _net(seed=77),
                                      dataclasses.replace(_ctx(again_kept, 3, 4), state=first.state))

    # Assert: round one bit for bit the fresh rule; every tensor stepped twice (hard sampling: the ops a
    # client drew); the second round starts from that state, not afresh
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), kept.state_dict().values()))
    params = [*kept.weights(), *kept.alphas()]
    steps = first.state[META_STATE][-len(params):]
    assert set(steps.tolist()) <= {0.0, 1.0, 2.0} and steps.max() == 2.0
    assert _max_diff(_params(again_fresh), _params(again_kept)) > 1e-4


def _run(batch_seed: int, gumbel_seed: int, meta_update: str = "fomaml"):
    model = _net()
    cfg = AlgorithmConfig(meta_update=meta_update, local_steps=2, inner_steps=2, batch_size=BATCH,
                          query_batch_size=BATCH)
    result = FedMetaNAS(cfg).local_update(model, _net(seed=77), _ctx(model, batch_seed, gumbel_seed))
    return model.state_dict(), result.loss


@pytest.mark.parametrize("meta_update", ["fomaml", "reptile"])
def test_local_update_is_bit_identical_for_the_same_generator_seeds(meta_update):
    rng_before = torch.get_rng_state()

    state_a, loss_a = _run(1, 2, meta_update)
    state_b, loss_b = _run(1, 2, meta_update)

    assert loss_a == loss_b
    assert state_a.keys() == state_b.keys()
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    assert torch.equal(torch.get_rng_state(), rng_before)  # only the explicit generators are used


def test_local_update_depends_on_both_generators():
    state, _ = _run(1, 2)
    other_batches, _ = _run(5, 2)
    other_gumbel, _ = _run(1, 5)

    assert not torch.equal(state["alpha_normal"], other_batches["alpha_normal"])
    assert not torch.equal(state["alpha_normal"], other_gumbel["alpha_normal"])


def test_task_learner_starts_from_the_meta_model_not_its_own_state():
    # The task model passed in holds unrelated values; local_update must overwrite them.
    model = _net()
    ctx_a, ctx_b = _ctx(model), _ctx(model)
    model_b = copy.deepcopy(model)

    FedMetaNAS(BASE).local_update(model, copy.deepcopy(model), ctx_a)
    FedMetaNAS(BASE).local_update(model_b, _net(seed=55), ctx_b)

    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model_b.parameters()))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize(("mode", "meta_update", "meta_optimizer"),
                         [("hard", "fomaml", "adam"), ("soft", "fomaml", "sgd"), ("hard", "reptile", "sgd")])
def test_a_local_step_on_a_gpu_makes_at_most_two_host_syncs(mode, meta_update, meta_optimizer):
    from fedmetanas.runtime import count_syncs

    gpu = torch.device("cuda", torch.cuda.current_device())
    cfg = dataclasses.replace(BASE, local_steps=3, inner_steps=2, meta_update=meta_update,
                              meta_optimizer=meta_optimizer, grad_clip=5.0)
    model, task = _net().to(gpu), _net().to(gpu)
    ctx = dataclasses.replace(_ctx(model, mode=mode), train=_split().to(gpu), train_idx=torch.arange(N, device=gpu))
    ctx.masks.on(gpu)  # once per round, before the clients
    FedMetaNAS(cfg).local_update(model, task, ctx)  # warm-up: CUDA and cuDNN initialise lazily
    with count_syncs(gpu) as syncs:
        result = FedMetaNAS(cfg).local_update(model, task, ctx)
    assert syncs.count <= 2 * result.steps, (syncs.count, result.steps)


# -- personalization: the client adapts the weights of the global final net -------------------------------
def _one_class_client(label: int, n: int = 40) -> tuple[TensorSplit, torch.Tensor, torch.Tensor]:
    """A split whose class shows in the image (a bright square in a class-dependent corner), and a client
    holding only `label`: its train and test indices (disjoint)."""
    gen = torch.Generator().manual_seed(7)
    labels = torch.full((2 * n,), label)
    images = torch.randint(0, 60, (2 * n, 1, 8, 8), generator=gen, dtype=torch.uint8)
    r, c = divmod(label, 2)
    images[:, :, 4 * r : 4 * r + 4, 4 * c : 4 * c + 4] = 250
    split = TensorSplit(images, labels, (0.5,), (0.25,), num_classes=CLASSES)
    return split, torch.arange(n), torch.arange(n, 2 * n)


def _personalize_ctx(net: SuperNet, split: TensorSplit, train_idx: torch.Tensor) -> LocalContext:
    return LocalContext(train=split, train_idx=train_idx, masks=net.initial_masks(), tau=0.1, relax_mode="hard",
                        batch_gen=torch.Generator().manual_seed(11), gumbel_gen=torch.Generator().manual_seed(12))


def _accuracy(forward, split: TensorSplit, idx: torch.Tensor) -> float:
    x, y = split.batch(idx)
    with torch.no_grad():
        return float((forward(x).argmax(dim=1) == y).float().mean())


def _global_forward(net: SuperNet, ctx: LocalContext):
    arch = arch_from_genotype(net, derive_genotype(net, ctx.masks, ctx.tau))
    return lambda x: net(x, arch)


@pytest.mark.parametrize("label", [1, 2])
def test_personalizing_a_client_that_holds_one_class_does_not_lower_its_accuracy(label):
    # Prepare: a global net that has never seen the client's class; the client holds that class alone.
    split, train_idx, test_idx = _one_class_client(label)
    rule = FedMetaNAS(dataclasses.replace(BASE, inner_lr_w=0.02, batch_size=8), PersonalizeConfig())
    model, task = _net(), _net(1)
    ctx = _personalize_ctx(model, split, train_idx)
    model.eval()
    before = _accuracy(_global_forward(model, ctx), split, test_idx)
    model.train()
    # Execute
    forward = rule.personalize(model, task, ctx, steps=10)
    model.eval(), task.eval()
    after = _accuracy(forward, split, test_idx)
    # Assert: never worse, and the client's own class is learned
    assert after >= before
    assert after >= 0.9


def test_personalization_keeps_the_global_genotype_logits_and_bn_statistics():
    # Prepare
    split, train_idx, test_idx = _one_class_client(1)
    rule = FedMetaNAS(dataclasses.replace(BASE, inner_lr_w=0.02, batch_size=8), PersonalizeConfig(holdout=0.0))
    model, task = _net(), _net(1)
    ctx = _personalize_ctx(model, split, train_idx)
    # Execute
    forward = rule.personalize(model, task, ctx, steps=5)
    # Assert: the logits and the BN running statistics are the global ones, the weights moved, and the client's
    # model is the global genotype's net with the adapted weights
    for a_task, a_model in zip(task.alphas(), model.alphas()):
        assert torch.equal(a_task, a_model)
    for b_task, b_model in zip(task.buffer_list(), model.buffer_list()):
        assert torch.equal(b_task, b_model)
    assert any(not torch.equal(w_task, w_model) for w_task, w_model in zip(task.weights(), model.weights()))
    task.eval()
    x, _ = split.batch(test_idx)
    assert torch.equal(forward(x), _global_forward(task, ctx)(x))


def test_the_old_supernet_rule_rederives_the_net_from_the_adapted_logits():
    split, train_idx, _ = _one_class_client(1)
    rule = FedMetaNAS(BASE, PersonalizeConfig(adapt="supernet"))
    model, task = _net(), _net(1)
    rule.personalize(model, task, _personalize_ctx(model, split, train_idx), steps=3)
    assert any(not torch.equal(a_task, a_model) for a_task, a_model in zip(task.alphas(), model.alphas()))


def test_a_client_keeps_the_global_weights_when_adaptation_does_worse_on_its_held_out_train_samples(monkeypatch):
    # Prepare: a global net that predicts the client's class, and an "adaptation" that breaks it
    split, train_idx, test_idx = _one_class_client(1)
    rule = FedMetaNAS(BASE, PersonalizeConfig(holdout=0.25))
    model, task = _net(), _net(1)
    with torch.no_grad():
        model.classifier.bias[1] = 100.0

    def breaks(net, arch, ctx, steps, frozen_bn):  # noqa: ARG001
        with torch.no_grad():
            net.classifier.bias[1] = -100.0

    monkeypatch.setattr(rule, "adapt_weights", breaks)
    ctx = _personalize_ctx(model, split, train_idx)
    # Execute
    forward = rule.personalize(model, task, ctx, steps=5)
    # Assert: the client's model is the global one
    model.eval(), task.eval()
    x, _ = split.batch(test_idx)
    assert torch.equal(forward(x), _global_forward(model, ctx)(x))


def test_paired_outcomes_count_the_samples_only_one_net_gets_right():
    adapted = torch.tensor([True, True, False, False, True])
    global_ = torch.tensor([True, False, True, False, False])
    assert paired_outcomes(adapted, global_) == (2, 1)


@pytest.mark.parametrize(("won", "lost", "z", "adapts"), [
    (30, 0, 1.645, True),     # label skew: adapting wins by far
    (12, 8, 1.645, False),    # noise: 4 more of 20 disagreements is 0.9 standard errors
    (20, 8, 1.645, True),     # 12 more of 28: 2.3 standard errors
    (0, 0, 1.645, False),     # no evidence at all: keep the global weights
    (5, 5, 0.0, True),        # z 0: at least as accurate is enough (the earlier rule)
    (4, 5, 0.0, False),
])
def test_a_client_adapts_only_on_significant_held_out_evidence(won, lost, z, adapts):
    assert adaptation_wins(won, lost, z) is adapts


def test_holdout_split_is_a_seeded_partition_of_the_clients_train_indices():
    idx = torch.arange(100, 150)
    fit, held = holdout_split(idx, 0.2, torch.Generator().manual_seed(3))
    again, held_again = holdout_split(idx, 0.2, torch.Generator().manual_seed(3))
    assert held.numel() == 10 and fit.numel() == 40
    assert sorted(torch.cat([fit, held]).tolist()) == idx.tolist()
    assert torch.equal(fit, again) and torch.equal(held, held_again)
    # too few samples to hold any out, or no fraction: every sample fits
    assert holdout_split(idx[:3], 0.2, torch.Generator())[1].numel() == 0
    assert torch.equal(holdout_split(idx, 0.0, torch.Generator())[0], idx)


def test_personalization_is_bit_identical_for_the_same_generator_seeds():
    # The generators come from (seed, client) alone, so this makes a client's result the same on any rank.
    split, train_idx, test_idx = _one_class_client(2)
    rule = FedMetaNAS(dataclasses.replace(BASE, inner_lr_w=0.02, batch_size=8), PersonalizeConfig())
    x, _ = split.batch(test_idx)
    outs = []
    for _ in range(2):
        model, task = _net(), _net(1)
        forward = rule.personalize(model, task, _personalize_ctx(model, split, train_idx), steps=3)
        task.eval()
        outs.append(forward(x).detach())
    assert torch.equal(outs[0], outs[1])


def test_lr_warmup_fraction_ramps_the_weights_rates_then_the_cosine_runs_to_its_floor():
    """20 rounds, warm-up 0.1: rounds 0 and 1 at 1/3 and 2/3 of the rates, the peak at round 2, the cosine's
    floor at the last round, as without a warm-up."""
    cfg = config_from_dict({"federated": {"rounds": 20},
                            "algorithm": {"lr_schedule": "cosine", "lr_warmup_fraction": 0.1}})
    phase = FedMetaNASAlgorithm(cfg).phases()[0]

    assert [phase.round_plan(r).lr_scale for r in (0, 1, 2)] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert phase.round_plan(19).lr_scale == pytest.approx(cfg.algorithm.lr_min_factor)
