"""The DARTS-style supernet: mixed ops on every edge, cells, and the network around them.

The relaxed architecture is an *argument* of `forward` (an `ArchSample`), computed once per step
at network level by `sample_arch`, so the same weights run under a Gumbel sample, the expected
softmax, or the one-hot weights of a genotype. Ops whose weight is structurally zero (not sampled,
or pruned by a mask) are not computed at all: on a CPU that is where the time goes.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Iterator, Literal

import torch
from torch import nn

from fedmetanas.capture import OpRunner
from fedmetanas.runtime import to_device
from fedmetanas.search.genotypes import CELL_KINDS, Genotype, default_reduction_layers
from fedmetanas.search.operations import OPS, FactorizedReduce, ReLUConvBN
from fedmetanas.search.relax import (RelaxMode, gumbel_noise, probabilities, relaxed_weights, sampled_onehot,
                                     sparse_active)
from fedmetanas.search.tensor_lists import TensorListsModule

def input_pairs(n_inputs: int) -> list[tuple[int, int]]:
    """Unordered pairs of a node's inputs, in the fixed order the pair logits use."""
    return list(itertools.combinations(range(n_inputs), 2))


def edge_offsets(nodes: int) -> list[int]:
    """Index of node j's first incoming edge in the flat edge list (node j has j + 2 inputs)."""
    return [sum(t + 2 for t in range(j)) for j in range(nodes)]


def num_edges(nodes: int) -> int:
    return sum(j + 2 for j in range(nodes))


@dataclass
class CellArch:
    """One cell type's relaxed architecture: op weights per edge and input weights per node."""

    op_weights: torch.Tensor  # (edges, ops), on the model's device
    op_index: list[list[int]]  # per edge, the ops to compute
    input_coeff: list[torch.Tensor] | None  # per node, (inputs,) weights; None = all inputs weigh 1
    input_index: list[list[int]]  # per node, the inputs to compute


@dataclass
class ArchSample:
    normal: CellArch
    reduce: CellArch


@dataclass
class ArchMasks:
    """Soft-pruning masks (True = kept), CPU bool tensors shaped like the logits they mask.

    A round's masks do not change (the server makes new ones), so `on(device)` copies them to a GPU once
    and every later step of every lane reuses that copy.
    """

    ops: dict[str, torch.Tensor]
    pairs: dict[str, torch.Tensor] | None
    _copies: dict[str, "ArchMasks"] = field(default_factory=dict, init=False, repr=False, compare=False)

    def clone(self) -> "ArchMasks":
        return ArchMasks({k: v.clone() for k, v in self.ops.items()},
                         None if self.pairs is None else {k: v.clone() for k, v in self.pairs.items()})

    def on(self, device: torch.device) -> "ArchMasks":
        """These masks on `device`: themselves on a CPU, else a copy made on first use and kept."""
        if device.type == "cpu":
            return self
        copy = self._copies.get(str(device))
        if copy is None:  # two lanes may both get here: each makes an equal, complete copy (blocking)
            copy = ArchMasks({k: v.to(device) for k, v in self.ops.items()},
                             None if self.pairs is None else {k: v.to(device) for k, v in self.pairs.items()})
            self._copies[str(device)] = copy
        if device.type == "cuda":  # used from several lanes' streams: keep the memory until they are done
            stream = torch.cuda.current_stream(device)
            for _, t in copy.items():
                t.record_stream(stream)
        return copy

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, mask) in the order of `SuperNet.named_alphas`."""
        for kind in CELL_KINDS:
            yield f"alpha_{kind}", self.ops[kind]
        if self.pairs is not None:
            for kind in CELL_KINDS:
                yield f"beta_{kind}", self.pairs[kind]


class MixedOp(nn.Module):
    """All candidate ops of one edge; the output is their weighted sum over the active ones."""

    def __init__(self, channels: int, stride: int, primitives: tuple[str, ...]) -> None:
        super().__init__()
        self.ops = nn.ModuleList(OPS[p](channels, stride) for p in primitives)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, index: list[int],
                run_op: OpRunner | None = None) -> torch.Tensor:
        """The weighted sum of the ops in `index`; `run_op(op, x)` runs an op (captured: `fedmetanas.capture`)."""
        out = None
        for k in index:
            term = weights[k] * (self.ops[k](x) if run_op is None else run_op(self.ops[k], x))
            out = term if out is None else out + term
        assert out is not None, "an edge needs at least one active op"
        return out


class Cell(nn.Module):
    """A DARTS cell: two preprocessed inputs, `nodes` intermediate nodes, output = their concat."""

    def __init__(self, nodes: int, c_pp: int, c_p: int, c: int, reduction: bool,
                 reduction_prev: bool, primitives: tuple[str, ...]) -> None:
        super().__init__()
        self.reduction = reduction
        self.nodes = nodes
        self.pre0 = FactorizedReduce(c_pp, c) if reduction_prev else ReLUConvBN(c_pp, c, 1, 1, 0)
        self.pre1 = ReLUConvBN(c_p, c, 1, 1, 0)
        self.edges = nn.ModuleList(
            MixedOp(c, 2 if reduction and i < 2 else 1, primitives)
            for j in range(nodes) for i in range(j + 2)
        )

    def forward(self, s0: torch.Tensor, s1: torch.Tensor, arch: CellArch,
                run_op: OpRunner | None = None) -> torch.Tensor:
        states = [self.pre0(s0), self.pre1(s1)]
        for j, off in enumerate(edge_offsets(self.nodes)):
            node = None
            for i in arch.input_index[j]:
                e = off + i
                out = self.edges[e](states[i], arch.op_weights[e], arch.op_index[e], run_op)
                if arch.input_coeff is not None:
                    out = arch.input_coeff[j][i] * out
                node = out if node is None else node + out
            assert node is not None, "a node needs at least one active input"
            states.append(node)
        return torch.cat(states[2:], dim=1)


class SuperNet(TensorListsModule):
    """Stem, a stack of normal/reduction cells, global pooling and a linear classifier.

    Architecture parameters are registered `nn.Parameter`s: `alpha_{normal,reduce}` (edges x ops)
    and, with pairwise inputs, `beta_{normal,reduce}` (nodes x max pairs; unused pads are masked).
    """

    def __init__(self, in_channels: int, num_classes: int, channels: int, layers: int, nodes: int,
                 primitives: tuple[str, ...], stem_multiplier: int = 3,
                 reduction_layers: tuple[int, ...] | None = None,
                 input_mode: Literal["pairs", "all"] = "pairs", alpha_init_std: float = 1e-3,
                 generator: torch.Generator | None = None, stem_stride: int = 1) -> None:
        super().__init__()
        if reduction_layers is None:
            reduction_layers = default_reduction_layers(layers)
        self.primitives = tuple(primitives)
        self.nodes = nodes
        self.input_mode = input_mode
        c_curr = stem_multiplier * channels
        self.stem = nn.Sequential(nn.Conv2d(in_channels, c_curr, 3, stride=stem_stride, padding=1, bias=False),
                                  nn.BatchNorm2d(c_curr))
        c_pp, c_p, c_curr = c_curr, c_curr, channels
        self.cells = nn.ModuleList()
        reduction_prev = False
        for layer in range(layers):
            reduction = layer in reduction_layers
            if reduction:
                c_curr *= 2
            self.cells.append(Cell(nodes, c_pp, c_p, c_curr, reduction, reduction_prev, self.primitives))
            reduction_prev = reduction
            c_pp, c_p = c_p, nodes * c_curr
        self.classifier = nn.Linear(c_p, num_classes)

        n_edges, n_ops = num_edges(nodes), len(self.primitives)
        max_pairs = len(input_pairs(nodes + 1))

        def init(*shape: int) -> nn.Parameter:
            return nn.Parameter(alpha_init_std * torch.randn(*shape, generator=generator))

        self.alpha_normal = init(n_edges, n_ops)
        self.alpha_reduce = init(n_edges, n_ops)
        if input_mode == "pairs":
            self.beta_normal = init(nodes, max_pairs)
            self.beta_reduce = init(nodes, max_pairs)
        # Pair -> input incidence per node, padded to max_pairs rows (constant, moves with .to).
        inc = torch.zeros(nodes, max_pairs, nodes + 1)
        for j in range(nodes):
            for p, (a, b) in enumerate(input_pairs(j + 2)):
                inc[j, p, a] = inc[j, p, b] = 1.0
        self.register_buffer("pair_incidence", inc, persistent=False)

    @property
    def cell_kinds(self) -> tuple[str, ...]:
        """The cell kinds the network has: both logits exist, but only these are trained and decoded."""
        kinds = {"reduce" if cell.reduction else "normal" for cell in self.cells}
        return tuple(k for k in CELL_KINDS if k in kinds)

    # -- the two named parameter sets ---------------------------------------------------------
    @staticmethod
    def _is_alpha(name: str) -> bool:
        """Alphas (op logits) and, with pairwise inputs, betas (pair logits)."""
        return name.startswith(("alpha_", "beta_"))

    def named_alphas(self) -> Iterator[tuple[str, nn.Parameter]]:
        for name, p in self.named_parameters():
            if self._is_alpha(name):
                yield name, p

    def named_weights(self) -> Iterator[tuple[str, nn.Parameter]]:
        for name, p in self.named_parameters():
            if not self._is_alpha(name):
                yield name, p

    def initial_masks(self) -> ArchMasks:
        """Nothing pruned; only the padding of the pair logits is masked out."""
        ops = {k: torch.ones(tuple(getattr(self, f"alpha_{k}").shape), dtype=torch.bool) for k in CELL_KINDS}
        pairs = None
        if self.input_mode == "pairs":
            valid = torch.zeros(self.beta_normal.shape, dtype=torch.bool)
            for j in range(self.nodes):
                valid[j, : len(input_pairs(j + 2))] = True
            pairs = {k: valid.clone() for k in CELL_KINDS}
        return ArchMasks(ops, pairs)

    def forward(self, x: torch.Tensor, arch: ArchSample, run_op: OpRunner | None = None) -> torch.Tensor:
        """Logits of `x` under the relaxed architecture `arch`; `run_op` runs the edges' ops (None: plainly;
        `capture.op_runner`: as the captured `op` unit)."""
        s0 = s1 = self.stem(x)
        for cell in self.cells:
            s0, s1 = s1, cell(s0, s1, arch.reduce if cell.reduction else arch.normal, run_op)
        # Global average pooling as a mean: what AdaptiveAvgPool2d(1) computes, but never the adaptive
        # kernel whose CUDA backward torch.use_deterministic_algorithms refuses (runtime.deterministic).
        return self.classifier(s1.mean((2, 3)))


def _logit_names(model: SuperNet, masks: ArchMasks) -> list[tuple[str, str]]:
    """(kind, parameter name) of a step's logits, in the order their noise is drawn: per cell kind, the
    op logits, then the pair logits."""
    names = []
    for kind in CELL_KINDS:
        names.append((kind, f"alpha_{kind}"))
        if masks.pairs is not None:
            names.append((kind, f"beta_{kind}"))
    return names


def _split(flat: torch.Tensor, shapes: list[torch.Size]) -> list[torch.Tensor]:
    return [part.view(shape) for part, shape in zip(flat.split([s.numel() for s in shapes]), shapes)]


def sample_arch(model: SuperNet, masks: ArchMasks, tau: float, mode: RelaxMode,
                generator: torch.Generator | None = None, topk: int = 0, eps: float = 0.0) -> ArchSample:
    """Relax both cell types' logits once for a forward pass (noise from `generator`).

    The same as `relax` on each logit tensor in turn, with at most one blocking host-device transfer:
    the noise for all logits is drawn in one call and sent in one non-blocking copy (with the sampled
    one-hots in `hard` mode); `hard` and `argmax` copy all logits to the host once (the host must know
    which ops to compute); the masks come from `masks.on(device)`, copied once per round. A sparse `soft`
    sample (`topk` / `eps`, see `relax.sparse_active`) copies the logits to the host as `hard` does.
    """
    device = model.alpha_normal.device
    names = _logit_names(model, masks)
    n = len(names)
    logits = [getattr(model, name) for _, name in names]
    shapes = [p.shape for p in logits]

    def pick(m: ArchMasks) -> list[torch.Tensor]:
        return [(m.ops if name.startswith("alpha") else m.pairs)[kind] for kind, name in names]

    cpu_masks, dev_masks = pick(masks), pick(masks.on(device))
    noise: list[torch.Tensor | None] = [None] * n
    onehots: list[torch.Tensor | None] = [None] * n
    if mode in ("soft", "hard"):
        noise = _split(gumbel_noise((sum(s.numel() for s in shapes),), generator), shapes)
    sparse = mode == "soft" and (topk > 0 or eps > 0)
    if mode in ("hard", "argmax") or sparse:
        host = _split(torch.cat([p.detach().reshape(-1) for p in logits]).cpu(), shapes)  # the one blocking copy
        onehots = [sparse_active(h, m, z, tau, topk, eps) if sparse else sampled_onehot(h, m, z)
                   for h, m, z in zip(host, cpu_masks, noise)]
    # What the device needs from the host (noise, then one-hots) in one non-blocking copy.
    sent = [t for t in noise + onehots if t is not None]
    arrived = iter(_split(to_device(torch.cat([t.reshape(-1).float() for t in sent]), device),
                          [t.shape for t in sent]) if sent else [])
    dev_noise = [None if t is None else next(arrived) for t in noise]
    dev_onehots = [None if t is None else next(arrived) for t in onehots]
    cells = {}
    for kind in CELL_KINDS:
        at = [i for i, (k, _) in enumerate(names) if k == kind]
        weights = [relaxed_weights(logits[i], dev_masks[i], tau, mode, dev_noise[i], dev_onehots[i]) for i in at]
        active = [cpu_masks[i] if onehots[i] is None else onehots[i] for i in at]
        cells[kind] = _cell_arch(model, weights, active)
    return ArchSample(cells["normal"], cells["reduce"])


def _cell_arch(model: SuperNet, weights: list[torch.Tensor], active: list[torch.Tensor]) -> CellArch:
    """A cell's relaxed architecture from its relaxed op weights (and pair weights), and the CPU masks of
    what is active; only host-side bookkeeping and small device ops, no sync."""
    op_index = [row.nonzero().flatten().tolist() for row in active[0]]
    if len(weights) == 1:
        return CellArch(weights[0], op_index, None, [list(range(j + 2)) for j in range(model.nodes)])
    pw, pactive = weights[1], active[1]
    coeff, input_index = [], []
    for j in range(model.nodes):
        n_in = j + 2
        # c_i = sum of the weights of the pairs that contain input i.
        coeff.append(pw[j] @ model.pair_incidence[j, :, :n_in])
        pairs = input_pairs(n_in)
        used = {i for p in pactive[j].nonzero().flatten().tolist() if p < len(pairs) for i in pairs[p]}
        input_index.append(sorted(used))
    return CellArch(weights[0], op_index, coeff, input_index)


# ------------------------------------------------------------------------------------------------
# Genotype: decode and encode
def _best_op(probs_row: torch.Tensor, primitives: tuple[str, ...]) -> tuple[str, float]:
    """Most likely op of an edge, never `none` (a discrete cell has no zero edges)."""
    order = torch.argsort(probs_row, descending=True).tolist()
    for k in order:
        if primitives[k] != "none":
            return primitives[k], float(probs_row[k])
    raise ValueError("model.primitives: a search space needs at least one op other than 'none'")


def derive_genotype(model: SuperNet, masks: ArchMasks, tau: float = 1.0) -> Genotype:
    """Discrete cells from the logits: with pairs, the most likely input pair per node and each
    input's most likely op; without, DARTS's rule (the two strongest incoming edges). Only the cell
    kinds the network has: a kind it lacks (no reduction layer) is empty, its logits never trained."""
    cells: dict[str, list[list[tuple[str, int]]]] = {k: [] for k in CELL_KINDS}
    for kind in model.cell_kinds:
        # Pruned ops keep a fallback probability of 0 so an all-pruned-but-none edge still decodes.
        p_ops = probabilities(getattr(model, f"alpha_{kind}"), masks.ops[kind], tau)
        nodes = []
        for j, off in enumerate(edge_offsets(model.nodes)):
            if masks.pairs is not None:
                p_pairs = probabilities(getattr(model, f"beta_{kind}")[j : j + 1], masks.pairs[kind][j : j + 1], tau)[0]
                a, b = input_pairs(j + 2)[int(p_pairs.argmax())]
                chosen = [a, b]
            else:
                strength = [_best_op(p_ops[off + i], model.primitives)[1] for i in range(j + 2)]
                chosen = sorted(sorted(range(j + 2), key=lambda i: -strength[i])[:2])
            nodes.append([(_best_op(p_ops[off + i], model.primitives)[0], i) for i in chosen])
        cells[kind] = nodes
    concat = {k: list(range(2, 2 + model.nodes)) if cells[k] else [] for k in CELL_KINDS}
    return Genotype(cells["normal"], concat["normal"], cells["reduce"], concat["reduce"])


def arch_from_genotype(model: SuperNet, genotype: Genotype) -> ArchSample:
    """Constant one-hot weights that make the supernet compute exactly the genotype's cells."""
    device = model.alpha_normal.device
    cells = []
    for kind in CELL_KINDS:
        gene = getattr(genotype, kind)
        if not gene and kind not in model.cell_kinds:
            # The network has no cell of this kind, so forward never reads it: an empty placeholder.
            w = torch.zeros(tuple(model.alpha_normal.shape), device=device)
            cells.append(CellArch(w, [[] for _ in range(w.shape[0])], None, [[] for _ in range(model.nodes)]))
            continue
        if len(gene) != model.nodes:
            raise ValueError(f"genotype has {len(gene)} nodes per cell but the model has {model.nodes}")
        w = torch.zeros(tuple(model.alpha_normal.shape), device=device)
        op_index: list[list[int]] = [[] for _ in range(w.shape[0])]
        input_index = []
        for j, off in enumerate(edge_offsets(model.nodes)):
            inputs = []
            for op, i in gene[j]:
                k = model.primitives.index(op)
                w[off + i, k] = 1.0
                op_index[off + i] = [k]
                inputs.append(i)
            input_index.append(sorted(inputs))
        cells.append(CellArch(w, op_index, None, input_index))
    return ArchSample(*cells)
