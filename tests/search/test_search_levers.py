"""The levers that make FedMetaNAS's search cheaper and harder to collapse, as specifications:

- a sparse soft sample (top-k ops per edge, or ops with weight >= eps) equals the plain soft sample
  wherever it leaves nothing out, and otherwise differs only by the entries it leaves out;
- evidence-based pruning drops an entry only after `patience` consecutive rounds below the threshold,
  and with patience 1 is the plain soft pruning;
- the search schedule: warm-up rounds freeze the logits and keep tau at tau_max, the hybrid switches to
  hard sampling, pruning waits for its first round.
"""

from __future__ import annotations

import pytest
import torch

from fedmetanas.algorithms.base import Span
from fedmetanas.algorithms.fedmetanas import FedMetaNAS
from fedmetanas.algorithms.phases import SearchSchedule
from fedmetanas.config import AlgorithmConfig, SearchConfig
from fedmetanas.configure import load_config
from fedmetanas.search.genotypes import METANAS_PRIMITIVES
from fedmetanas.search.relax import gumbel_noise, prune_on_evidence, relax, sparse_active, update_mask
from fedmetanas.search.supernet import SuperNet, sample_arch
from tests.algorithms.test_fedmetanas import BASE, _ctx, _net


def _logits(seed: int, rows: int = 6, k: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, k, generator=g), gumbel_noise((rows, k), g)


# -- sparse soft ---------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(4))
def test_a_sparse_sample_that_leaves_nothing_out_is_the_soft_sample(seed: int) -> None:
    logits, noise = _logits(seed)
    mask = torch.ones_like(logits, dtype=torch.bool)
    soft, active = relax(logits, mask, 0.7, "soft", noise)
    for topk, eps in ((logits.shape[1], 0.0), (0, 1e-30)):
        sparse, sparse_on = relax(logits, mask, 0.7, "soft", noise, topk=topk, eps=eps)
        assert torch.equal(sparse, soft)
        assert torch.equal(sparse_on, active)


@pytest.mark.parametrize("seed", range(4))
def test_top_k_keeps_exactly_the_k_largest_perturbed_logits_of_each_row(seed: int) -> None:
    logits, noise = _logits(seed)
    mask = torch.rand(logits.shape, generator=torch.Generator().manual_seed(seed)) > 0.2
    mask[:, 0] = True
    active = sparse_active(logits, mask, noise, 1.0, 2, 0.0)
    z = (logits + noise).masked_fill(~mask, float("-inf"))
    for row in range(logits.shape[0]):
        expect = set(z[row].topk(min(2, int(mask[row].sum()))).indices.tolist())
        assert set(active[row].nonzero().flatten().tolist()) == expect
    assert not (active & ~mask).any()


@pytest.mark.parametrize("seed", range(4))
def test_eps_skips_exactly_the_weights_below_it_and_never_a_rows_largest(seed: int) -> None:
    logits, noise = _logits(seed)
    mask = torch.ones_like(logits, dtype=torch.bool)
    tau, eps = 0.3, 0.05
    soft, _ = relax(logits, mask, tau, "soft", noise)
    sparse, active = relax(logits, mask, tau, "soft", noise, eps=eps)
    expect = (soft >= eps)
    expect.scatter_(-1, soft.argmax(-1, keepdim=True), True)
    assert torch.equal(active, expect)
    assert torch.equal(sparse, torch.where(active, soft, torch.zeros_like(soft)))  # kept weights not renormalized


def test_a_sparse_sample_reaches_every_logit_with_a_gradient() -> None:
    logits, noise = _logits(0)
    logits.requires_grad_(True)
    w, _ = relax(logits, torch.ones_like(logits, dtype=torch.bool), 1.0, "soft", noise, topk=1)
    (w * torch.arange(7.0)).sum().backward()
    assert (logits.grad != 0).all()  # through the softmax's normalizer, also the ops not computed


def _supernet() -> SuperNet:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return SuperNet(1, 3, 4, 2, 2, METANAS_PRIMITIVES, 1, (1,), alpha_init_std=0.5,
                        generator=torch.Generator().manual_seed(0))


def test_the_supernet_under_a_sparse_sample_that_skips_nothing_computes_the_soft_output() -> None:
    net = _supernet()
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    masks = net.initial_masks()
    soft = net(x, sample_arch(net, masks, 1.0, "soft", torch.Generator().manual_seed(5)))
    every = net(x, sample_arch(net, masks, 1.0, "soft", torch.Generator().manual_seed(5), topk=len(METANAS_PRIMITIVES)))
    assert torch.equal(soft, every)
    top1 = sample_arch(net, masks, 1.0, "soft", torch.Generator().manual_seed(5), topk=1)
    assert all(len(ix) == 1 for ix in top1.normal.op_index)  # one op per edge computed
    assert not torch.equal(net(x, top1), soft)


# -- evidence-based pruning ----------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(4))
def test_patience_one_is_the_plain_soft_pruning(seed: int) -> None:
    logits, _ = _logits(seed)
    mask = torch.ones_like(logits, dtype=torch.bool)
    new, below = prune_on_evidence(logits, mask, 0.5, 0.1, torch.zeros(logits.shape, dtype=torch.int64), 1)
    assert torch.equal(new, update_mask(logits, mask, 0.5, 0.1))
    assert not below.any()


def test_an_entry_is_dropped_only_after_patience_rounds_below_the_threshold_in_a_row() -> None:
    mask = torch.ones(1, 3, dtype=torch.bool)
    below = torch.zeros(1, 3, dtype=torch.int64)
    low = torch.tensor([[5.0, 0.0, -5.0]])  # entries 1 and 2 below a 0.05 threshold at tau 1
    high = torch.tensor([[5.0, 4.0, 4.0]])
    mask, below = prune_on_evidence(low, mask, 1.0, 0.05, below, 3)
    mask, below = prune_on_evidence(low, mask, 1.0, 0.05, below, 3)
    assert mask.all() and below.tolist() == [[0, 2, 2]]
    mask, below = prune_on_evidence(high, mask, 1.0, 0.05, below, 3)  # one round above: the counts reset
    assert mask.all() and below.tolist() == [[0, 0, 0]]
    for _ in range(3):
        mask, below = prune_on_evidence(low, mask, 1.0, 0.05, below, 3)
    assert mask.tolist() == [[True, False, False]]
    assert below.tolist() == [[0, 0, 0]]  # pruned entries stop counting


# -- the schedule --------------------------------------------------------------------------------
def test_the_schedule_turns_the_search_sections_fractions_into_rounds() -> None:
    s = SearchConfig(warmup_fraction=0.25, hard_after_fraction=0.75, soft_topk=2, prune_start_fraction=0.5,
                     prune_patience=3)
    sch = SearchSchedule.of(s, 16)
    assert (sch.warmup_rounds, sch.hard_from, sch.soft_topk, sch.prune_from, sch.patience) == (4, 12, 2, 8, 3)
    assert SearchSchedule.of(SearchConfig(warmup_fraction=0.5), 10).prune_from == 5  # never prune in a warm-up
    assert SearchSchedule.of(SearchConfig(), 10) == SearchSchedule(prune_from=0)


def test_warm_up_rounds_freeze_the_logits_at_tau_max_then_the_search_anneals_and_switches_to_hard(
        tmp_path) -> None:
    from fedmetanas.algorithms.fedmetanas import FedMetaNASAlgorithm

    cfg = load_config(None, ["federated.rounds=8", "search.warmup_fraction=0.25", "search.gumbel=soft",
                             "search.hard_after_fraction=0.75", "search.soft_topk=2", "search.tau_max=2",
                             "search.anneal_fraction=1"])
    (phase,) = FedMetaNASAlgorithm(cfg).phases()
    plans = [phase.round_plan(r) for r in range(8)]
    assert [p.train_arch for p in plans] == [False, False] + [True] * 6
    assert [p.relax_mode for p in plans] == ["hard", "hard", "soft", "soft", "soft", "soft", "hard", "hard"]
    assert [p.tau for p in plans[:3]] == [2.0, 2.0, 2.0] and plans[-1].tau == pytest.approx(cfg.search.tau_min)
    assert all(p.soft_topk == 2 and p.round == r for r, p in enumerate(plans))


@pytest.mark.parametrize("meta_update", ["fomaml", "reptile"])
def test_a_frozen_round_leaves_the_logits_bit_equal_and_trains_the_weights(meta_update: str) -> None:
    net, task = _net(), _net()
    before = [a.detach().clone() for a in net.alphas()]
    w_before = [w.detach().clone() for w in net.weights()]
    ctx = _ctx(net, mode="hard")
    ctx.train_arch = False
    cfg = AlgorithmConfig(**{**BASE.__dict__, "meta_update": meta_update, "local_steps": 2,
                             "meta_optimizer": "adam"})
    FedMetaNAS(cfg).local_update(net, task, ctx)
    assert all(torch.equal(a, b) for a, b in zip(net.alphas(), before))
    assert any(not torch.equal(w, b) for w, b in zip(net.weights(), w_before))


def test_a_warm_up_phase_does_not_prune_and_counts_no_evidence() -> None:
    from fedmetanas.algorithms.fedmetanas import FedMetaNASAlgorithm

    cfg = load_config(None, ["federated.rounds=4", "search.warmup_fraction=0.5", "search.op_prune_threshold=0.3"])
    (phase,) = FedMetaNASAlgorithm(cfg).phases()
    net = _supernet()
    phase.on_model(net)
    before = phase.masks().clone()
    phase.server_update(net, phase.round_plan(0))
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(phase.masks().items(), before.items()))
    assert not any(v.any() for v in phase.state_dict()["prune_below"].values())
    phase.server_update(net, phase.round_plan(2))  # after the warm-up a 0.3 threshold prunes 4 ops at once
    assert sum(int(m.sum()) for _, m in phase.masks().items()) < sum(int(m.sum()) for _, m in before.items())
    assert Span("search", "rounds", 0, 4) == phase.span
