"""The supernet: shapes, the two parameter sets, which ops a relaxed sample computes, genotype
decoding, and equality with the discrete net built from a genotype."""

from collections import Counter

import pytest
import torch
from torch import nn

from fedmetanas.search.discrete import DiscreteNet
from fedmetanas.runtime import count_syncs
from fedmetanas.search.genotypes import DARTS_PRIMITIVES, DARTS_V2, METANAS_PRIMITIVES, Genotype
from fedmetanas.search.relax import gumbel_noise, relax
from fedmetanas.search.supernet import (
    CELL_KINDS,
    MixedOp,
    SuperNet,
    arch_from_genotype,
    derive_genotype,
    edge_offsets,
    input_pairs,
    num_edges,
    sample_arch,
)

CLASSES = 3


def _net(primitives=METANAS_PRIMITIVES, input_mode="pairs", seed=0, nodes=2, alpha_init_std=1.0) -> SuperNet:
    """2 layers: cell 0 normal, cell 1 reduction, so both cell kinds are exercised. Module weights
    come from the global RNG, seeded and restored here as the simulation does."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return SuperNet(1, CLASSES, channels=4, layers=2, nodes=nodes, primitives=primitives, stem_multiplier=1,
                        reduction_layers=(1,), input_mode=input_mode, alpha_init_std=alpha_init_std,
                        generator=torch.Generator().manual_seed(seed))


def _x(seed: int = 0, size: int = 8) -> torch.Tensor:
    return torch.randn(4, 1, size, size, generator=torch.Generator().manual_seed(seed))


def _record_op_calls(net: SuperNet) -> tuple[Counter, list]:
    """Count forward calls of every candidate op, keyed by (cell, edge, op index)."""
    calls: Counter = Counter()
    handles = []
    for c, cell in enumerate(net.cells):
        for e, mixed in enumerate(cell.edges):
            assert isinstance(mixed, MixedOp)
            for k, op in enumerate(mixed.ops):
                handles.append(op.register_forward_hook(
                    lambda *_, key=(c, e, k): calls.__setitem__(key, calls[key] + 1)))
    return calls, handles


# -- shapes and parameter sets -------------------------------------------------------------------
@pytest.mark.parametrize("input_mode", ["pairs", "all"])
@pytest.mark.parametrize("primitives", [DARTS_PRIMITIVES, METANAS_PRIMITIVES], ids=["darts", "metanas"])
@pytest.mark.parametrize("mode", ["hard", "soft"])
def test_forward_gives_batch_by_classes(input_mode, primitives, mode):
    net = _net(primitives, input_mode)
    arch = sample_arch(net, net.initial_masks(), 1.0, mode, torch.Generator().manual_seed(1))

    out = net(_x(), arch)

    assert out.shape == (4, CLASSES)
    assert torch.isfinite(out).all()


def test_architecture_logits_have_edge_and_pair_shapes():
    net = _net(nodes=3)

    shapes = {name: tuple(p.shape) for name, p in net.named_alphas()}

    # 3 nodes have 2 + 3 + 4 = 9 incoming edges; the 4 inputs of the last node make C(4, 2) = 6 pairs.
    assert num_edges(3) == 9 and edge_offsets(3) == [0, 2, 5]
    assert shapes == {"alpha_normal": (9, 7), "alpha_reduce": (9, 7), "beta_normal": (3, 6), "beta_reduce": (3, 6)}


def test_all_inputs_mode_has_no_pair_logits():
    net = _net(input_mode="all")

    assert [name for name, _ in net.named_alphas()] == ["alpha_normal", "alpha_reduce"]
    assert net.initial_masks().pairs is None


def test_architecture_logits_are_registered_parameters_in_the_state_dict():
    net = _net()

    state = net.state_dict()

    for name in ("alpha_normal", "alpha_reduce", "beta_normal", "beta_reduce"):
        assert isinstance(getattr(net, name), nn.Parameter)
        assert torch.equal(state[name], getattr(net, name).detach())
    assert "pair_incidence" not in state  # a derived constant, not saved


def test_weights_and_alphas_partition_the_parameters():
    net = _net()

    weights = {id(p) for p in net.weights()}
    alphas = {id(p) for p in net.alphas()}

    assert weights and alphas
    assert not weights & alphas
    assert weights | alphas == {id(p) for p in net.parameters()}
    assert len(weights) + len(alphas) == len(list(net.parameters()))
    assert {n for n, _ in net.named_alphas()} == {"alpha_normal", "alpha_reduce", "beta_normal", "beta_reduce"}


def test_to_float64_moves_the_architecture_logits_too():
    net = _net()

    net = net.to(torch.float64)

    assert all(p.dtype == torch.float64 for p in net.alphas())
    assert all(p.dtype == torch.float64 for p in net.weights())
    assert net.pair_incidence.dtype == torch.float64


@pytest.mark.parametrize("mode", ["hard", "expected"])
def test_float64_supernet_with_pairs_runs_forward(mode):
    net = _net().to(torch.float64)

    arch = sample_arch(net, net.initial_masks(), 1.0, mode, torch.Generator().manual_seed(0))
    out = net(_x().double(), arch)

    assert out.dtype == torch.float64 and out.shape == (4, CLASSES)


def test_alpha_init_is_reproducible_from_the_generator():
    a, b, c = _net(seed=3), _net(seed=3), _net(seed=4)

    assert torch.equal(a.alpha_normal, b.alpha_normal) and torch.equal(a.beta_reduce, b.beta_reduce)
    assert not torch.equal(a.alpha_normal, c.alpha_normal)


def test_pair_incidence_maps_each_pair_to_its_two_inputs():
    net = _net(nodes=2)

    inc = net.pair_incidence

    # Node 0 has inputs {0, 1}: one pair, two padding rows. Node 1 has inputs {0, 1, 2}: pairs
    # (0, 1), (0, 2), (1, 2), in that order.
    expected = torch.tensor([
        [[1, 1, 0], [0, 0, 0], [0, 0, 0]],
        [[1, 1, 0], [1, 0, 1], [0, 1, 1]],
    ], dtype=torch.float32)
    assert torch.equal(inc, expected)
    assert input_pairs(3) == [(0, 1), (0, 2), (1, 2)]


def test_initial_masks_keep_all_ops_and_only_the_real_pairs():
    net = _net(nodes=3)

    masks = net.initial_masks()

    assert all(m.all() for m in masks.ops.values())
    assert masks.pairs["normal"].sum(dim=1).tolist() == [1, 3, 6]
    assert [name for name, _ in masks.items()] == [name for name, _ in net.named_alphas()]


# -- which ops a sample computes ----------------------------------------------------------------
@pytest.mark.parametrize("seed", range(4))
def test_hard_sample_computes_one_op_per_used_edge_and_only_the_sampled_pair(seed):
    net = _net(DARTS_PRIMITIVES)
    arch = sample_arch(net, net.initial_masks(), 1.0, "hard", torch.Generator().manual_seed(seed))
    calls, handles = _record_op_calls(net)

    net(_x(), arch)
    for h in handles:
        h.remove()

    expected = Counter()
    for c, cell in enumerate(net.cells):
        cell_arch = arch.reduce if cell.reduction else arch.normal
        for j, off in enumerate(edge_offsets(net.nodes)):
            assert len(cell_arch.input_index[j]) == 2  # one sampled pair = two inputs
            for i in cell_arch.input_index[j]:
                assert len(cell_arch.op_index[off + i]) == 1
                expected[(c, off + i, cell_arch.op_index[off + i][0])] = 1
    assert calls == expected
    assert sum(calls.values()) == 2 * net.nodes * len(net.cells)


def test_hard_sample_picks_the_argmax_of_logits_plus_the_generators_noise():
    net = _net()
    gen = torch.Generator().manual_seed(9)
    twin = torch.Generator().set_state(gen.get_state())

    arch = sample_arch(net, net.initial_masks(), 1.0, "hard", gen)

    noise = -torch.log(-torch.log(torch.rand(tuple(net.alpha_normal.shape), generator=twin).clamp(1e-10, 1 - 1e-7)))
    best = (net.alpha_normal.detach() + noise).argmax(dim=1).tolist()
    assert arch.normal.op_index == [[k] for k in best]


def _relax_one_tensor_at_a_time(net: SuperNet, masks, tau: float, mode: str, gen: torch.Generator) -> dict:
    """The definition `sample_arch` batches: `relax` per logit tensor, noise drawn tensor by tensor."""
    out = {}
    for kind in CELL_KINDS:
        for name, mask in ((f"alpha_{kind}", masks.ops[kind]),
                           *(((f"beta_{kind}", masks.pairs[kind]),) if masks.pairs is not None else ())):
            logits = getattr(net, name)
            noise = gumbel_noise(tuple(logits.shape), gen) if mode in ("soft", "hard") else None
            out[name] = relax(logits, mask, tau, mode, noise)
    return out


@pytest.mark.parametrize("input_mode", ["pairs", "all"])
@pytest.mark.parametrize("mode", ["soft", "hard", "expected", "argmax"])
def test_a_batched_sample_equals_relax_on_each_logit_tensor_in_turn(input_mode, mode):
    net = _net(input_mode=input_mode, nodes=3)
    masks = net.initial_masks()
    masks.ops["normal"][0, [1, 4]] = False
    if masks.pairs is not None:
        masks.pairs["reduce"][2, 0] = False
    arch = sample_arch(net, masks, 0.7, mode, torch.Generator().manual_seed(4))
    ref = _relax_one_tensor_at_a_time(net, masks, 0.7, mode, torch.Generator().manual_seed(4))
    for kind, cell in (("normal", arch.normal), ("reduce", arch.reduce)):
        weights, active = ref[f"alpha_{kind}"]
        assert torch.equal(cell.op_weights, weights)
        assert cell.op_index == [row.nonzero().flatten().tolist() for row in active]
        if input_mode == "pairs":
            pw, pactive = ref[f"beta_{kind}"]
            for j in range(net.nodes):
                assert torch.equal(cell.input_coeff[j], pw[j] @ net.pair_incidence[j, :, : j + 2])
                used = (pactive[j].float() @ net.pair_incidence[j, :, : j + 2]) > 0
                assert cell.input_index[j] == used.nonzero().flatten().tolist()


def test_masks_on_the_cpu_are_themselves_and_a_clone_shares_no_device_copy():
    masks = _net().initial_masks()
    assert masks.on(torch.device("cpu")) is masks
    masks._copies["cuda:0"] = masks  # as if used on a GPU this round
    assert masks.clone()._copies == {}  # next round's masks are copied afresh


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize(("mode", "most"), [("soft", 0), ("expected", 0), ("hard", 1), ("argmax", 1)])
def test_a_sample_on_a_gpu_makes_at_most_one_host_sync(mode, most):
    gpu = torch.device("cuda", torch.cuda.current_device())
    net = _net().to(gpu)
    masks = net.initial_masks()
    masks.on(gpu)  # the once-per-round copy
    gen = torch.Generator().manual_seed(0)
    cpu_arch = sample_arch(_net(), masks, 1.0, mode, torch.Generator().manual_seed(0))
    with count_syncs(gpu) as syncs:
        arch = sample_arch(net, masks, 1.0, mode, gen)
    assert syncs.count <= most
    assert arch.normal.op_index == cpu_arch.normal.op_index  # the same logits sample the same ops


def test_soft_sample_computes_every_unpruned_op_once_and_never_a_pruned_one():
    net = _net()
    masks = net.initial_masks()
    masks.ops["normal"][0, [1, 4]] = False
    masks.ops["normal"][3, 0] = False
    masks.ops["reduce"][2, :6] = False
    arch = sample_arch(net, masks, 1.0, "soft", torch.Generator().manual_seed(0))
    calls, handles = _record_op_calls(net)

    out = net(_x(), arch)
    for h in handles:
        h.remove()

    assert torch.isfinite(out).all()
    for c, cell in enumerate(net.cells):
        mask = masks.ops["reduce" if cell.reduction else "normal"]
        for e in range(mask.shape[0]):
            for k in range(mask.shape[1]):
                assert calls[(c, e, k)] == int(mask[e, k]), (c, e, k)


def test_pruned_pairs_remove_inputs_from_the_soft_computation():
    net = _net()
    masks = net.initial_masks()
    masks.pairs["normal"][1] = torch.tensor([False, True, False])  # node 1 keeps only pair (0, 2)
    arch = sample_arch(net, masks, 1.0, "soft", torch.Generator().manual_seed(0))
    calls, handles = _record_op_calls(net)

    net(_x(), arch)
    for h in handles:
        h.remove()

    off = edge_offsets(net.nodes)[1]
    assert arch.normal.input_index[1] == [0, 2]
    assert sum(calls[(0, off + 1, k)] for k in range(len(net.primitives))) == 0
    assert all(calls[(0, off + i, k)] == 1 for i in (0, 2) for k in range(len(net.primitives)))
    assert torch.allclose(arch.normal.input_coeff[1], torch.tensor([1.0, 0.0, 1.0]))


@pytest.mark.parametrize("mode", ["hard", "soft"])
def test_gradient_reaches_every_architecture_logit_set(mode):
    net = _net()
    arch = sample_arch(net, net.initial_masks(), 1.0, mode, torch.Generator().manual_seed(2))
    y = torch.tensor([0, 1, 2, 0])

    nn.functional.cross_entropy(net(_x(), arch), y).backward()

    for name, p in net.named_alphas():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # Node 1's three real pairs get gradient; padding entries of node 0 never do.
    for beta in (net.beta_normal, net.beta_reduce):
        assert beta.grad[1].abs().sum() > 0
        assert torch.equal(beta.grad[0, 1:], torch.zeros(2))


# -- genotypes --------------------------------------------------------------------------------
def _set(param: torch.Tensor, values: torch.Tensor) -> None:
    with torch.no_grad():
        param.copy_(values)


def test_derive_genotype_with_pairs_picks_the_best_pair_and_best_real_op():
    net = _net(DARTS_PRIMITIVES)
    none, maxp, skip, sep3, dil5 = (DARTS_PRIMITIVES.index(n) for n in
                                    ("none", "max_pool_3x3", "skip_connect", "sep_conv_3x3", "dil_conv_5x5"))
    alpha = torch.zeros(5, 8)
    alpha[0, sep3] = 3.0
    alpha[1, none], alpha[1, skip] = 9.0, 2.0  # `none` is best here but a discrete cell cannot use it
    alpha[2, dil5] = 3.0
    alpha[3, maxp] = 3.0  # node 1, input 1: strong op, but its pairs lose
    alpha[4, sep3] = 3.0
    beta = torch.zeros(2, 3)
    beta[1] = torch.tensor([0.0, 4.0, 1.0])  # node 1: pair (0, 2)
    _set(net.alpha_normal, alpha)
    _set(net.beta_normal, beta)
    _set(net.alpha_reduce, alpha.flip(0))
    _set(net.beta_reduce, torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 5.0]]))  # node 1: pair (1, 2)

    g = derive_genotype(net, net.initial_masks())

    assert g.normal == [[("sep_conv_3x3", 0), ("skip_connect", 1)], [("dil_conv_5x5", 0), ("sep_conv_3x3", 2)]]
    # reduce: alpha rows reversed, so edges 0..4 hold the rows 4..0 above.
    assert g.reduce == [[("sep_conv_3x3", 0), ("max_pool_3x3", 1)], [("skip_connect", 1), ("sep_conv_3x3", 2)]]
    assert g.normal_concat == g.reduce_concat == [2, 3]


def test_derive_genotype_ignores_pruned_pairs():
    net = _net()
    _set(net.beta_normal, torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 5.0]]))
    masks = net.initial_masks()
    masks.pairs["normal"][1, 2] = False

    g = derive_genotype(net, masks)

    # The remaining pairs (0, 1) and (0, 2) tie; the first in pair order wins.
    assert [i for _, i in g.normal[1]] == [0, 1]


def test_derive_genotype_without_pairs_takes_the_two_strongest_edges_like_darts():
    net = _net(DARTS_PRIMITIVES, input_mode="all")
    none, skip, sep3, dil3 = (DARTS_PRIMITIVES.index(n) for n in ("none", "skip_connect", "sep_conv_3x3",
                                                                  "dil_conv_3x3"))
    alpha = torch.zeros(5, 8)
    alpha[0, skip], alpha[1, sep3] = 1.0, 1.0
    alpha[2, sep3] = 4.0  # node 1, input 0: strong
    alpha[3, none], alpha[3, skip] = 10.0, 3.0  # input 1: `none` dominates, so its best real op is weak
    alpha[4, dil3] = 5.0  # input 2: strongest
    _set(net.alpha_normal, alpha)
    _set(net.alpha_reduce, alpha)

    g = derive_genotype(net, net.initial_masks())

    expected = [[("skip_connect", 0), ("sep_conv_3x3", 1)], [("sep_conv_3x3", 0), ("dil_conv_3x3", 2)]]
    assert g.normal == expected and g.reduce == expected


@pytest.mark.parametrize("genotype", [
    DARTS_V2,
    Genotype([[("conv_3x3", 0), ("skip_connect", 1)], [("sep_conv_3x3", 1), ("dil_conv_3x3", 2)]], [2, 3],
             [[("max_pool_3x3", 1), ("conv_1x5_5x1", 0)]], [2]),
])
def test_genotype_string_round_trips(genotype):
    text = genotype.to_string()

    back = Genotype.from_string(text)

    assert back == genotype
    assert isinstance(back, Genotype) and back.to_string() == text


def _trained_bn(net: SuperNet) -> SuperNet:
    """Run a few train-mode passes so BN running statistics are not their trivial defaults."""
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for s in range(3):
            net(_x(seed=10 + s), sample_arch(net, net.initial_masks(), 1.0, "soft", gen))
    return net.eval()


@pytest.mark.parametrize("input_mode", ["pairs", "all"])
@pytest.mark.parametrize("seed", range(3))
def test_discrete_net_equals_the_supernet_under_the_genotypes_one_hot_arch(input_mode, seed):
    net = _trained_bn(_net(input_mode=input_mode, seed=seed))
    genotype = derive_genotype(net, net.initial_masks())
    discrete = DiscreteNet.from_supernet(net, genotype).eval()
    x = _x(seed=99)

    with torch.no_grad():
        expected = net(x, arch_from_genotype(net, genotype))
        got = discrete(x)

    assert torch.allclose(got, expected, atol=1e-6, rtol=0)
    assert sum(p.numel() for p in discrete.parameters()) < sum(p.numel() for p in net.weights())


def test_discrete_net_from_a_hand_written_genotype_uses_the_named_ops():
    net = _trained_bn(_net(nodes=2))
    genotype = Genotype([[("conv_3x3", 0), ("skip_connect", 1)], [("sep_conv_3x3", 1), ("dil_conv_3x3", 2)]],
                        [2, 3], [[("max_pool_3x3", 1), ("conv_1x5_5x1", 0)], [("avg_pool_3x3", 0),
                                                                              ("conv_3x3", 2)]], [2, 3])
    discrete = DiscreteNet.from_supernet(net, genotype).eval()

    with torch.no_grad():
        expected = net(_x(), arch_from_genotype(net, genotype))
        got = discrete(_x())

    assert torch.allclose(got, expected, atol=1e-6, rtol=0)
    # The copied op is a different module with the same weights (the supernet is left untouched).
    conv = discrete.cells[0].ops[0][0]
    source = net.cells[0].edges[0].ops[METANAS_PRIMITIVES.index("conv_3x3")]
    assert conv is not source and torch.equal(conv[1].weight, source[1].weight)


def test_arch_from_genotype_rejects_a_wrong_node_count():
    with pytest.raises(ValueError, match="nodes"):
        arch_from_genotype(_net(nodes=2), DARTS_V2)


# -- a network without one kind of cell (issue 10: model.layers=1) --------------------------------
def _one_layer_net(reduction_layers: tuple[int, ...] = ()) -> SuperNet:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return SuperNet(1, CLASSES, channels=4, layers=1, nodes=2, primitives=METANAS_PRIMITIVES, stem_multiplier=1,
                        reduction_layers=reduction_layers, alpha_init_std=1.0, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(("reduction_layers", "kind", "absent"), [((), "normal", "reduce"), ((0,), "reduce", "normal")])
def test_a_genotype_reports_only_the_cells_the_network_has(reduction_layers, kind, absent):
    net = _one_layer_net(reduction_layers)

    g = derive_genotype(net, net.initial_masks())

    assert net.cell_kinds == (kind,) and g.cells == (kind,)
    assert getattr(g, absent) == [] and getattr(g, f"{absent}_concat") == []
    assert absent not in g.to_string() and Genotype.from_string(g.to_string()) == g


def test_a_one_cell_genotype_runs_in_its_supernet_and_as_a_discrete_net():
    net = _one_layer_net().eval()
    g = derive_genotype(net, net.initial_masks())

    with torch.no_grad():
        expected = net(_x(), arch_from_genotype(net, g))
        got = DiscreteNet.from_supernet(net, g).eval()(_x())

    torch.testing.assert_close(got, expected)


def test_a_genotype_lacking_a_cell_the_supernet_has_is_refused():
    one_cell = derive_genotype(_one_layer_net(), _one_layer_net().initial_masks())

    with pytest.raises(ValueError, match="nodes per cell"):
        arch_from_genotype(_net(), one_cell)
    with pytest.raises(ValueError, match="no reduce cell"):
        DiscreteNet.from_genotype(one_cell, 1, CLASSES, channels=4, layers=3)


def test_an_old_genotype_string_with_both_cells_still_parses():
    old = ("{'normal': [[('sep_conv_3x3', 0), ('sep_conv_3x3', 1)]], 'normal_concat': [2], "
           "'reduce': [[('max_pool_3x3', 0), ('max_pool_3x3', 1)]], 'reduce_concat': [2]}")

    g = Genotype.from_string(old)

    assert g.cells == ("normal", "reduce") and g.to_string() == old
