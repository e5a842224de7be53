"""Fixed-architecture networks: a genotype built from scratch (FedNAS retraining, FedAvg) and the CNN."""

import pytest
import torch
from torch import nn

from fedmetanas.search.discrete import CNN, DiscreteNet
from fedmetanas.search.genotypes import DARTS_V2, Genotype


def _count(net: nn.Module, kind: type) -> int:
    return sum(isinstance(m, kind) for m in net.modules())


def test_a_network_built_from_a_genotype_has_exactly_its_ops_and_affine_batch_norm():
    net = DiscreteNet.from_genotype(DARTS_V2, 1, 10, channels=4, layers=3, stem_multiplier=1)
    assert net(torch.randn(2, 1, 16, 16)).shape == (2, 10)
    for cell in net.cells:
        gene = DARTS_V2.reduce if cell.reduction else DARTS_V2.normal
        assert cell.inputs == [[i for _, i in node] for node in gene]
        assert [len(ops) for ops in cell.ops] == [len(node) for node in gene]
    assert all(bn.affine for bn in net.modules() if isinstance(bn, nn.BatchNorm2d))
    assert net.alphas() == [] and len(net.weights()) == len(list(net.parameters()))


def test_pooling_in_the_trained_network_has_no_batch_norm_after_it():
    pool_only = Genotype([[("max_pool_3x3", 0), ("max_pool_3x3", 1)]], [2],
                         [[("avg_pool_3x3", 0), ("avg_pool_3x3", 1)]], [2])
    net = DiscreteNet.from_genotype(pool_only, 1, 3, channels=4, layers=1, stem_multiplier=1, reduction_layers=())
    cell = net.cells[0]
    assert all(isinstance(op, nn.MaxPool2d) for op in cell.ops[0])


def test_the_same_seed_builds_the_same_network():
    def build() -> DiscreteNet:
        torch.manual_seed(5)
        return DiscreteNet.from_genotype(DARTS_V2, 3, 10, channels=4, layers=2)

    a, b = build(), build()
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_a_genotype_with_an_unknown_or_zero_op_is_refused():
    bad = Genotype([[("none", 0), ("skip_connect", 1)]], [2], [[("skip_connect", 0), ("skip_connect", 1)]], [2])
    with pytest.raises(ValueError, match="none"):
        DiscreteNet.from_genotype(bad, 1, 3, channels=4, layers=1)


@pytest.mark.parametrize("size,channels", [(28, 1), (32, 3)])
def test_the_fedavg_cnn_matches_the_papers_shape(size: int, channels: int):
    net = CNN(channels, 10, size)
    assert net(torch.randn(2, channels, size, size)).shape == (2, 10)
    if size == 28 and channels == 1:
        assert sum(p.numel() for p in net.parameters()) == 1_663_370  # McMahan et al. 2017, MNIST CNN
