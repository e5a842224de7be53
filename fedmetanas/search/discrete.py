"""A discrete network built from a genotype, reusing the searched supernet's weights.

This is FedMetaNAS's final model: the cells of the genotype with exactly the op modules (and BN
statistics) the supernet trained for them, used without retraining.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from fedmetanas.search.genotypes import Genotype
from fedmetanas.search.supernet import SuperNet, edge_offsets


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


class DiscreteNet(nn.Module):
    """Stem, discrete cells and classifier; same layout as the supernet it came from."""

    def __init__(self, stem: nn.Module, cells: list[DiscreteCell], classifier: nn.Module,
                 genotype: Genotype) -> None:
        super().__init__()
        self.stem = stem
        self.cells = nn.ModuleList(cells)
        self.pool = nn.AdaptiveAvgPool2d(1)
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s0 = s1 = self.stem(x)
        for cell in self.cells:
            s0, s1 = s1, cell(s0, s1)
        return self.classifier(torch.flatten(self.pool(s1), 1))
