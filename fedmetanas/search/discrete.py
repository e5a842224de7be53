"""Networks of a fixed architecture: the discrete net of a genotype, and FedAvg's plain CNN.

`DiscreteNet.from_supernet` is FedMetaNAS's final model: the genotype's cells with exactly the op
modules (and BN statistics) the supernet trained for them, used without retraining.
`DiscreteNet.from_genotype` is a fresh network (affine BN, as DARTS's evaluation network) trained
from scratch: FedNAS's retraining stage and the FedAvg baseline on a given genotype.
Both share SuperNet's tensor-list interface (`weights()`, `alphas()` = [], `param_list()`,
`buffer_list()`), so the same local-update, copy and aggregation code runs on every model.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from fedmetanas.search.genotypes import Genotype, cell_kinds, default_reduction_layers, validate_genotype
from fedmetanas.search.operations import OPS, FactorizedReduce, ReLUConvBN
from fedmetanas.search.supernet import SuperNet, edge_offsets
from fedmetanas.search.tensor_lists import TensorListsModule


class FixedNet(TensorListsModule):
    """A network with no architecture parameters: `weights()` is every parameter, `alphas()` is empty."""


class DiscreteCell(nn.Module):
    """One cell of a genotype: each node sums its chosen ops applied to its chosen inputs."""

    def __init__(self, pre0: nn.Module, pre1: nn.Module, gene: list[list[tuple[str, int]]],
                 ops: list[list[nn.Module]], concat: list[int], reduction: bool) -> None:
        super().__init__()
        self.pre0, self.pre1 = pre0, pre1
        self.inputs = [[i for _, i in node] for node in gene]
        self.ops = nn.ModuleList(nn.ModuleList(node_ops) for node_ops in ops)
        self.concat = list(concat)
        self.reduction = reduction

    def forward(self, s0: torch.Tensor, s1: torch.Tensor) -> torch.Tensor:
        states = [self.pre0(s0), self.pre1(s1)]
        for inputs, ops in zip(self.inputs, self.ops):
            node = None
            for i, op in zip(inputs, ops):
                out = op(states[i])
                node = out if node is None else node + out
            states.append(node)
        return torch.cat([states[i] for i in self.concat], dim=1)


class DiscreteNet(FixedNet):
    """Stem, discrete cells and classifier; same layout as the supernet it came from."""

    def __init__(self, stem: nn.Module, cells: list[DiscreteCell], classifier: nn.Module,
                 genotype: Genotype) -> None:
        super().__init__()
        self.stem = stem
        self.cells = nn.ModuleList(cells)
        self.classifier = classifier
        self.genotype = genotype

    @classmethod
    def from_supernet(cls, net: SuperNet, genotype: Genotype) -> "DiscreteNet":
        """Copy the genotype's ops (weights and BN statistics) out of a trained supernet."""
        cells = []
        for cell in net.cells:
            gene = genotype.reduce if cell.reduction else genotype.normal
            concat = genotype.reduce_concat if cell.reduction else genotype.normal_concat
            offsets = edge_offsets(cell.nodes)
            ops = [[copy.deepcopy(cell.edges[offsets[j] + i].ops[net.primitives.index(op)]) for op, i in node]
                   for j, node in enumerate(gene)]
            cells.append(DiscreteCell(copy.deepcopy(cell.pre0), copy.deepcopy(cell.pre1), gene, ops,
                                      concat, cell.reduction))
        return cls(copy.deepcopy(net.stem), cells, copy.deepcopy(net.classifier), genotype)

    @classmethod
    def from_genotype(cls, genotype: Genotype, in_channels: int, num_classes: int, channels: int, layers: int,
                      stem_multiplier: int = 3, reduction_layers: tuple[int, ...] | None = None,
                      stem_stride: int = 1) -> "DiscreteNet":
        """A freshly initialised network of the genotype's cells (weights from the global RNG: seed it)."""
        try:
            validate_genotype(genotype, OPS)
        except ValueError as err:
            raise ValueError(f"genotype: {err}") from None
        if reduction_layers is None:
            reduction_layers = default_reduction_layers(layers)
        missing = [k for k in cell_kinds(layers, reduction_layers) if k not in genotype.cells]
        if missing:
            raise ValueError(f"genotype: has no {missing[0]} cell, which a network of {layers} layer(s) with "
                             f"reduction layers {list(reduction_layers)} needs")
        c_curr = stem_multiplier * channels
        stem = nn.Sequential(nn.Conv2d(in_channels, c_curr, 3, stride=stem_stride, padding=1, bias=False),
                             nn.BatchNorm2d(c_curr))
        c_pp, c_p, c_curr = c_curr, c_curr, channels
        cells, reduction_prev = [], False
        for layer in range(layers):
            reduction = layer in reduction_layers
            if reduction:
                c_curr *= 2
            gene = genotype.reduce if reduction else genotype.normal
            concat = genotype.reduce_concat if reduction else genotype.normal_concat
            pre0 = (FactorizedReduce(c_pp, c_curr, affine=True) if reduction_prev
                    else ReLUConvBN(c_pp, c_curr, 1, 1, 0, affine=True))
            pre1 = ReLUConvBN(c_p, c_curr, 1, 1, 0, affine=True)
            ops = [[OPS[op](c_curr, 2 if reduction and i < 2 else 1, True) for op, i in node] for node in gene]
            cells.append(DiscreteCell(pre0, pre1, gene, ops, concat, reduction))
            reduction_prev = reduction
            c_pp, c_p = c_p, len(concat) * c_curr
        return cls(stem, cells, nn.Linear(c_p, num_classes), genotype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s0 = s1 = self.stem(x)
        for cell in self.cells:
            s0, s1 = s1, cell(s0, s1)
        # Global average pooling as a mean: what AdaptiveAvgPool2d(1) computes, but never the adaptive
        # kernel whose CUDA backward torch.use_deterministic_algorithms refuses (runtime.deterministic).
        return self.classifier(s1.mean((2, 3)))


class CNN(FixedNet):
    """The CNN of the FedAvg paper (McMahan et al. 2017): two 5x5 conv + 2x2 max-pool layers
    (32, 64 channels), a 512-unit fully connected layer and the classifier."""

    def __init__(self, in_channels: int, num_classes: int, image_size: int) -> None:
        super().__init__()
        side = image_size // 4
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(64 * side * side, 512), nn.ReLU(),
                                        nn.Linear(512, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))
