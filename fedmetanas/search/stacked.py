"""K clients' supernets as one computation: per source state, one kernel per op for every client and edge.

The sequential step runs one client's supernet edge by edge and op by op: a demo-size meta-step is ~20,000
aten ops (6,279 CUDA kernels), each doing almost nothing. Here the K clients of a batch and the E edges
that leave the same state are folded into the channel dimension — an activation is (batch, K*C, H, W),
an op's output (batch, K*E*C, H, W) — so a convolution with per-client, per-edge weights is one grouped
convolution, a BatchNorm one call over K*E*C channels, and a pooling op one call for all of them. What a
client computes is the sequential step's, client by client:

- **Each client's own relaxation.** Its Gumbel noise from its own generator (the same numbers
  `sample_arch` draws), its own hard / sparse / dense sample. An op is computed where *any* client of the
  batch computes it on any edge out of the state (the union), and each client's op weights are exactly 0
  (`torch.where`: no gradient path) where *it* did not compute the op, so its output, loss and gradient
  are its sequential ones to float rounding.
- **What a client did not compute is not touched.** `StepUse` says, per client, which ops ran (their BN
  statistics move; the others' are kept by a masked update) and which parameters reached the loss (the
  sequential step's `.grad` is not None): the masked optimizers (`flat_optim`) step only those, so
  Adam's None-vs-zero and SGD momentum behave as sequentially.
- **One flat buffer per replica.** Every client's parameters live in one 1-D tensor, group-major (each
  group's (K, members, *shape) block contiguous); the tensors the forward reads are views of it (a
  grouped convolution's weight is a view, not a copy), so copying a replica, an optimizer step, clipping
  and the update's mask are a few ops over the buffer, not a few per parameter tensor.

The template (`SuperNet`) is only read: its modules say what each op is; its tensors are copied in by
`StackedSuperNet.load` and the clients' results read back by `member_views`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedmetanas.capture import CaptureMode, unit
from fedmetanas.search.genotypes import CELL_KINDS
from fedmetanas.search.operations import FactorizedReduce, Zero
from fedmetanas.search.relax import RelaxMode, relaxed_weights, sampled_onehot, sparse_active
from fedmetanas.search.supernet import ArchMasks, SuperNet, edge_offsets, input_pairs

# ------------------------------------------------------------------------------------------------
# The plan: which template tensors are stacked together, where they sit in the flat buffer.


@dataclass
class Group:
    """Template tensors of one shape stacked as (K, members, *shape), the block [K * offset, K * (offset +
    numel)) of the flat buffer: the same parameter of one op on every edge leaving one state (or a single
    tensor: the stem's, a preprocessing conv's, the logits)."""

    names: list[str]
    shape: tuple[int, ...]
    offset: int = 0

    @property
    def numel(self) -> int:
        return len(self.names) * math.prod(self.shape)


@dataclass
class OpSlot:
    """One op on the edges leaving one state: the template module and its tensors' groups by the op's own
    parameter / buffer names (`"1.weight"`, `"3.running_mean"`)."""

    prim: int
    module: nn.Module
    params: dict[str, int]
    buffers: dict[str, int]


@dataclass
class StateSlot:
    """The edges leaving state i of a cell (to nodes j >= max(0, i - 1)) and their ops."""

    edges: list[int]  # edge indices in the cell's flat edge list, by target node
    nodes: list[int]  # target node of each edge
    ops: list[OpSlot]


@dataclass
class CellSlot:
    kind: str
    pre0: OpSlot
    pre1: OpSlot
    states: list[StateSlot]  # states 0 .. nodes (the last node feeds no edge)


@dataclass
class StackPlan:
    """The layout of a supernet's tensors in the flat buffers, built once per template (host only)."""

    params: list[Group]
    buffers: list[Group]
    n_weight_cols: int  # the weights lead the flat parameter buffer; the logits follow
    n_param_cols: int
    n_buffer_cols: int
    stem_conv: OpSlot
    stem_bn: OpSlot
    cells: list[CellSlot]
    classifier: dict[str, int]
    alphas: dict[str, int]  # logit name -> group
    param_names: list[str]  # the template's named_parameters order
    float_buffer_names: list[str]  # its floating-point buffers, in buffers() order
    member_of: dict[str, tuple[int, int]] = field(default_factory=dict)  # name -> (group, member)
    buffer_member_of: dict[str, tuple[int, int]] = field(default_factory=dict)
    buffer_members: int = 0
    # Where each group's members start in the list of all members (group i: [off[i], off[i + 1])).
    param_member_offsets: np.ndarray | None = None
    buffer_member_offsets: np.ndarray | None = None


def _module_tensors(mod: nn.Module) -> tuple[list[tuple[str, torch.Tensor]], list[tuple[str, torch.Tensor]]]:
    params = list(mod.named_parameters())
    buffers = [(n, b) for n, b in mod.named_buffers() if b.is_floating_point()]
    return params, buffers


def build_plan(model: SuperNet) -> StackPlan:
    """Group the template's tensors (see the module): per cell and source state, each op's tensors over
    the edges leaving the state; the stem, each cell's two preprocessing ops and the classifier alone."""
    params: list[Group] = []
    buffers: list[Group] = []
    alpha_groups: list[Group] = []

    def slot(mods: Sequence[nn.Module], prefixes: Sequence[str], prim: int = -1) -> OpSlot:
        tp, tb = _module_tensors(mods[0])
        pmap, bmap = {}, {}
        for n, t in tp:
            pmap[n] = len(params)
            params.append(Group([f"{p}.{n}" for p in prefixes], tuple(t.shape)))
        for n, t in tb:
            bmap[n] = len(buffers)
            buffers.append(Group([f"{p}.{n}" for p in prefixes], tuple(t.shape)))
        return OpSlot(prim, mods[0], pmap, bmap)

    stem_conv = slot([model.stem[0]], ["stem.0"])
    stem_bn = slot([model.stem[1]], ["stem.1"])
    cells = []
    offsets = edge_offsets(model.nodes)
    for l, cell in enumerate(model.cells):
        pre0 = slot([cell.pre0], [f"cells.{l}.pre0"])
        pre1 = slot([cell.pre1], [f"cells.{l}.pre1"])
        states = []
        for i in range(model.nodes + 1):
            nodes = list(range(max(0, i - 1), model.nodes))
            edges = [offsets[j] + i for j in nodes]
            if not edges:
                continue
            ops = [slot([cell.edges[e].ops[o] for e in edges], [f"cells.{l}.edges.{e}.ops.{o}" for e in edges], o)
                   for o in range(len(model.primitives))]
            states.append(StateSlot(edges, nodes, ops))
        cells.append(CellSlot("reduce" if cell.reduction else "normal", pre0, pre1, states))
    classifier = slot([model.classifier], ["classifier"]).params
    n_weight_groups = len(params)
    alphas = {}
    for name, p in model.named_alphas():
        alphas[name] = len(params) + len(alpha_groups)
        alpha_groups.append(Group([name], tuple(p.shape)))
    params += alpha_groups

    col = 0
    for g in params:
        g.offset, col = col, col + g.numel
    n_weight_cols = sum(g.numel for g in params[:n_weight_groups])
    bcol = 0
    for g in buffers:
        g.offset, bcol = bcol, bcol + g.numel
    plan = StackPlan(params, buffers, n_weight_cols, col, bcol, stem_conv, stem_bn, cells, classifier, alphas,
                     [n for n, _ in model.named_parameters()],
                     [n for n, b in model.named_buffers() if b.is_floating_point()])
    plan.member_of = {n: (gi, m) for gi, g in enumerate(params) for m, n in enumerate(g.names)}
    plan.buffer_member_of = {n: (gi, m) for gi, g in enumerate(buffers) for m, n in enumerate(g.names)}
    missing = set(plan.param_names) - set(plan.member_of)
    if missing:  # a supernet with modules this plan does not know: refuse rather than drop them
        raise ValueError(f"stacked supernet: parameters outside the plan: {sorted(missing)[:3]}")
    plan.buffer_members = sum(len(g.names) for g in buffers)
    plan.param_member_offsets = np.concatenate([[0], np.cumsum([len(g.names) for g in params])]).astype(np.int64)
    plan.buffer_member_offsets = np.concatenate([[0], np.cumsum([len(g.names) for g in buffers])]).astype(np.int64)
    return plan


def plan_of(model: SuperNet) -> StackPlan:
    """The template's plan, built on first use and kept (it holds names and offsets, no tensors)."""
    return model.derived("stack_plan", lambda: build_plan(model))


# ------------------------------------------------------------------------------------------------
# The relaxation of K clients


@dataclass
class StackedSample:
    """K clients' relaxed architectures of one step.

    `weights[kind]` (K, edges, ops): each client's effective op weight (its op weight times its input
    coefficient), exactly 0 where the client does not compute the op; `computed[kind]` (K, edges, ops)
    bool on the host: which ops each client's sequential step runs."""

    weights: dict[str, torch.Tensor]
    computed: dict[str, np.ndarray]


def _gumbel_rows(n: int, generators: Sequence[torch.Generator], device: torch.device) -> torch.Tensor:
    """(K, n) standard Gumbel noise, row k from client k's generator: the numbers `relax.gumbel_noise`
    gives that generator for n values (elementwise from one uniform draw per row), drawn where each
    generator lives (CPU or device) and returned on `device`."""
    u = torch.stack([torch.rand(n, generator=g, device=g.device, dtype=torch.float32).to(device)
                     for g in generators])
    return -torch.log(-torch.log(u.clamp_(1e-10, 1.0 - 1e-7)))


def sample_stacked(model: SuperNet, logits: dict[str, torch.Tensor], masks: ArchMasks, tau: float, mode: RelaxMode,
                   generators: Sequence[torch.Generator] | None, topk: int = 0, eps: float = 0.0) -> StackedSample:
    """Each client's relaxed architecture from its slice of the stacked `logits` ((K, rows, cols) per name)
    and its own generator, as `supernet.sample_arch` computes it for one client; the gradient flows back
    into the stacked logits."""
    names = [(kind, f"alpha_{kind}") for kind in CELL_KINDS]
    if masks.pairs is not None:
        names = [(kind, n) for kind in CELL_KINDS for n in (f"alpha_{kind}", f"beta_{kind}")]
    tensors = [logits[n] for _, n in names]
    k = tensors[0].shape[0]
    device = tensors[0].device

    def mask_of(kind: str, name: str) -> torch.Tensor:
        return (masks.ops if name.startswith("alpha") else masks.pairs)[kind]

    noise: list[torch.Tensor | None] = [None] * len(names)
    if mode in ("soft", "hard"):
        z = _gumbel_rows(sum(t[0].numel() for t in tensors), generators, device)
        noise = [part.view(t.shape) for part, t in zip(z.split([t[0].numel() for t in tensors], dim=1), tensors)]
    sparse = mode == "soft" and (topk > 0 or eps > 0)
    host_sets: list[torch.Tensor | None] = [None] * len(names)
    if mode in ("hard", "argmax") or sparse:
        host = torch.cat([t.detach().reshape(k, -1) for t in tensors], 1).cpu()
        hz = [None if z is None else z.cpu() for z in noise]
        for i, ((kind, name), part) in enumerate(zip(names, host.split([t[0].numel() for t in tensors], dim=1))):
            h, m = part.view(tensors[i].shape), mask_of(kind, name).cpu()
            host_sets[i] = (sparse_active(h, m.expand_as(h).contiguous(), hz[i], tau, topk, eps) if sparse
                            else sampled_onehot(h, m, hz[i]))
    weights: dict[str, torch.Tensor] = {}
    computed: dict[str, np.ndarray] = {}
    for kind in CELL_KINDS:
        at = [i for i, (kd, _) in enumerate(names) if kd == kind]
        rel = []
        for i in at:
            onehot = None if host_sets[i] is None else host_sets[i].to(device)
            rel.append(relaxed_weights(tensors[i], mask_of(*names[i]).to(device), tau, mode, noise[i], onehot))
        active = [(host_sets[i] if host_sets[i] is not None
                   else mask_of(*names[i]).cpu().expand(tensors[i].shape)).numpy() for i in at]
        weights[kind], computed[kind] = _effective(model, rel, active, device)
    return StackedSample(weights, computed)


def _effective(model: SuperNet, rel: list[torch.Tensor], active: list[np.ndarray],
               device: torch.device) -> tuple[torch.Tensor, np.ndarray]:
    """A cell kind's effective op weights (K, edges, ops) and which ops each client computes: op weights
    times the input coefficient (with pairs: the summed weights of the pairs holding the input), zero
    where an op is not sampled or its input is not used by any active pair of the node (`_cell_arch`)."""
    w, op_active = rel[0], active[0]
    k, edges = op_active.shape[0], op_active.shape[1]
    nodes = model.nodes
    edge_node = np.array([j for j in range(nodes) for _ in range(j + 2)])
    edge_input = np.array([i for j in range(nodes) for i in range(j + 2)])
    if len(rel) == 1:
        computed = op_active.copy()
        eff = w
    else:
        pair_active = active[1]  # (K, nodes, max_pairs)
        used = np.zeros((k, nodes, nodes + 1), dtype=bool)
        for j in range(nodes):
            for p, (a, b) in enumerate(input_pairs(j + 2)):
                on = pair_active[:, j, p]
                used[:, j, a] |= on
                used[:, j, b] |= on
        coeff = torch.einsum("knp,npi->kni", rel[1], model.pair_incidence)  # (K, nodes, nodes + 1)
        c_edge = coeff[:, torch.as_tensor(edge_node, device=device), torch.as_tensor(edge_input, device=device)]
        computed = op_active & used[:, edge_node, edge_input][:, :, None]
        eff = w * c_edge.unsqueeze(-1)
    assert computed.shape[1] == edges
    mask = torch.from_numpy(computed).to(device, non_blocking=True)
    return torch.where(mask, eff, torch.zeros((), device=device, dtype=eff.dtype)), computed


# ------------------------------------------------------------------------------------------------
# What each client's step used


@dataclass
class StepUse:
    """Per client, which member tensors got a gradient (`params`, (K, members)) and which BN statistics
    moved (`buffers`, (K, members)): the sequential step's `.grad is not None` and module calls."""

    params: np.ndarray
    buffers: np.ndarray


def step_use(plan: StackPlan, sample: StackedSample | None, k: int) -> StepUse:
    """Which of each client's tensors its sequential step would use (see `StepUse`): an op runs where the
    client computes it; a tensor gets a gradient where its output reaches the loss — a cell's states 0 and 1
    only through an edge the client computes, a cell's output only through a later cell that uses it."""
    moff, boff = plan.param_member_offsets, plan.buffer_member_offsets
    p_use = np.ones((k, int(moff[-1])), dtype=bool)
    b_use = np.ones((k, int(boff[-1])), dtype=bool)
    if sample is None:
        return StepUse(p_use, b_use)
    cells = plan.cells
    n = len(cells)
    out_used = np.zeros((n, k), dtype=bool)
    out_used[n - 1] = True
    stem_used = np.zeros(k, dtype=bool)
    kind_used = {kind: np.zeros(k, dtype=bool) for kind in CELL_KINDS}
    for l in range(n - 1, -1, -1):
        cell = cells[l]
        comp = sample.computed[cell.kind]  # (K, edges, ops)
        live = out_used[l]
        kind_used[cell.kind] |= live
        state_used = []
        for st in cell.states:
            c = comp[:, st.edges, :]  # (K, E, ops)
            for op in st.ops:
                for g in op.params.values():
                    p_use[:, moff[g]:moff[g + 1]] = c[:, :, op.prim] & live[:, None]
                for g in op.buffers.values():
                    b_use[:, boff[g]:boff[g + 1]] = c[:, :, op.prim]
            state_used.append(live & c.any(axis=(1, 2)))
        s0_used, s1_used = state_used[0], state_used[1]
        for pre, used in ((cell.pre0, s0_used), (cell.pre1, s1_used)):
            for g in pre.params.values():
                p_use[:, moff[g]:moff[g + 1]] = used[:, None]
        prev1 = l - 1  # s1 = the previous cell's output (the stem's for the first cell)
        prev0 = l - 2  # s0 = the output two cells back (the stem's for the first two cells)
        if prev1 >= 0:
            out_used[prev1] |= s1_used
        else:
            stem_used |= s1_used
        if prev0 >= 0:
            out_used[prev0] |= s0_used
        else:
            stem_used |= s0_used
    for slot in (plan.stem_conv, plan.stem_bn):
        for g in slot.params.values():
            p_use[:, moff[g]:moff[g + 1]] = stem_used[:, None]
    for name, g in plan.alphas.items():
        kind = name.split("_", 1)[1]
        p_use[:, moff[g]:moff[g + 1]] = kind_used[kind][:, None]
    return StepUse(p_use, b_use)


# ------------------------------------------------------------------------------------------------
# The stacked network


class StackedSuperNet:
    """K clients' copies of a supernet's parameters and BN statistics in two group-major flat buffers, and
    the forward pass of all K at once (see the module)."""

    def __init__(self, template: SuperNet, k: int, device: torch.device | None = None) -> None:
        self.template, self.k = template, k
        self.plan = plan_of(template)
        device = device or template.alpha_normal.device
        self.device = device
        # Parameters: one 1-D buffer, group-major — group g's (K, members, *shape) block contiguous at
        # [K * offset, K * (offset + numel)) — so a grouped convolution's weight is a view, never a copy;
        # the weights' blocks lead, the logits' follow (`n_weight`).
        self.flat = torch.zeros(k * self.plan.n_param_cols, device=device)
        self.n_weight = k * self.plan.n_weight_cols
        self.views = [self._block(self.flat, g).requires_grad_() for g in self.plan.params]
        # Runs of the buffer, in order: (group, client, member), each one member tensor long. A (K, members)
        # mask becomes a mask of the buffer by one gather and one repeat_interleave.
        n_members = [len(g.names) for g in self.plan.params]
        first = self.plan.param_member_offsets
        total = int(first[-1])
        self._runs = torch.as_tensor(np.concatenate(
            [np.full(k * n, math.prod(g.shape)) for g, n in zip(self.plan.params, n_members)]), device=device)
        self._run_member = torch.as_tensor(np.concatenate(
            [(np.arange(k)[:, None] * total + first[i] + np.arange(n)[None, :]).reshape(-1)
             for i, n in enumerate(n_members)]))
        weight_groups = len(self.plan.params) - len(self.plan.alphas)
        self._client_runs = torch.as_tensor([math.prod(g.shape) * len(g.names)
                                             for g in self.plan.params[:weight_groups] for _ in range(k)],
                                            device=device)
        # BN statistics: group-major (each group's (K, members, C) block contiguous, so a block is the 1-D
        # running-stat tensor of one native batch_norm over K*members*C channels); the forward writes a
        # scratch copy and the clients' used entries are taken from it after the pass.
        self.bflat = torch.zeros(k * self.plan.n_buffer_cols, device=device)
        self.bviews = [self._block(self.bflat, g) for g in self.plan.buffers]
        # Tensors of their own, not views of one buffer: batch_norm saves its running statistics for the
        # backward pass, and views would share one version counter that every BN's update moves.
        self.bscratch_views = [torch.zeros_like(v) for v in self.bviews]
        member = self.plan.buffer_member_offsets
        where = [np.broadcast_to((np.arange(k)[:, None] * self.plan.buffer_members + member[i]
                                  + np.arange(len(g.names))[None, :])[:, :, None], (k, len(g.names), g.shape[0]))
                 for i, g in enumerate(self.plan.buffers)]
        self._bcols = torch.from_numpy(np.concatenate([w.reshape(-1) for w in where]) if where else
                                       np.zeros(0, dtype=np.int64))
        self.momentum = self._bn_momentum()
        self._shared: dict[str, torch.Tensor] = {}  # see `_state`
        self._captured_op: Callable[..., tuple[torch.Tensor, int]] | None = None  # see `__call__`

    def _block(self, flat: torch.Tensor, g: Group) -> torch.Tensor:
        """Group g's (K, members, *shape) block of a group-major flat buffer (a view)."""
        start = self.k * g.offset
        return flat[start:start + self.k * g.numel].view(self.k, len(g.names), *g.shape)

    def _bn_momentum(self) -> float:
        moms = {m.momentum for m in self.template.modules() if isinstance(m, nn.BatchNorm2d)}
        if not moms:  # no BatchNorm (`model.norm: group`): no running statistics to move
            return 0.0
        if len(moms) != 1 or None in moms:
            raise ValueError("stacked supernet: every BatchNorm needs the same fixed momentum")
        return float(moms.pop())

    # -- moving tensors in and out -------------------------------------------------------------------
    def load(self, model: SuperNet) -> None:
        """Every client starts from `model`'s parameters and BN statistics."""
        with torch.no_grad():
            for name, p in model.named_parameters():
                gi, m = self.plan.member_of[name]
                self.views[gi][:, m].copy_(p)
            for name, b in model.named_buffers():
                if name in self.plan.buffer_member_of:
                    gi, m = self.plan.buffer_member_of[name]
                    self.bviews[gi][:, m].copy_(b)

    def copy_(self, other: "StackedSuperNet") -> None:
        """Take `other`'s parameters and statistics (two copies, whatever the number of tensors)."""
        with torch.no_grad():
            self.flat.copy_(other.flat)
            self.bflat.copy_(other.bflat)

    def member_views(self) -> list[torch.Tensor]:
        """Every aggregated tensor of the template (`aggregation.aggregated_tensors` order: parameters,
        then floating-point buffers) as a (K, *shape) view of the clients' values."""
        out = []
        for name in self.plan.param_names:
            gi, m = self.plan.member_of[name]
            out.append(self.views[gi].detach()[:, m])
        consts = dict(self.template.named_buffers())
        for name in self.plan.float_buffer_names:
            if name in self.plan.buffer_member_of:
                gi, m = self.plan.buffer_member_of[name]
                out.append(self.bviews[gi][:, m])
            else:  # a constant (the pair incidence): the same for every client
                t = consts[name]
                out.append(t.detach().unsqueeze(0).expand(self.k, *t.shape))
        return out

    def use_columns(self, use: np.ndarray) -> torch.Tensor:
        """`StepUse.params` (K, members) spread over the flat buffer: True where the client used the tensor."""
        runs = torch.from_numpy(use.reshape(-1))[self._run_member].to(self.device, non_blocking=True)
        return runs.repeat_interleave(self._runs, output_size=self.flat.numel())

    def columns(self, weights: float, logits: float) -> torch.Tensor:
        """A value per entry of the flat buffer: `weights` on the weights, `logits` on the logits."""
        out = torch.full_like(self.flat, logits)
        out[: self.n_weight] = weights
        return out

    def clip_weights(self, grad: torch.Tensor, max_norm: float) -> None:
        """`clip_grad_norm_` on each client's weight gradient on its own (the same formula, with its 1e-6);
        unused entries are zero, as a None gradient adds nothing to the sequential norm."""
        if max_norm <= 0 or self.n_weight == 0:
            return
        head = grad[: self.n_weight]
        sq = torch.segment_reduce(head * head, "sum", lengths=self._client_runs).view(-1, self.k).sum(0)
        coef = (max_norm / (sq.sqrt() + 1e-6)).clamp(max=1.0)
        head.mul_(coef.repeat(len(self._client_runs) // self.k).repeat_interleave(self._client_runs,
                                                                                   output_size=self.n_weight))

    @property
    def logits(self) -> dict[str, torch.Tensor]:
        """The stacked architecture logits (K, rows, cols) by name (views of the flat buffer)."""
        return {name: self.views[g][:, 0] for name, g in self.plan.alphas.items()}

    # -- the forward pass ---------------------------------------------------------------------------
    def __call__(self, x: torch.Tensor, sample: StackedSample, use: StepUse,
                 capture: CaptureMode = "off") -> torch.Tensor:
        """Logits (K, batch, classes) of inputs (K, batch, C, H, W): client k's batch through its parameters
        under its relaxed architecture. BN statistics move where `use.buffers` says (training mode). Under
        `capture` each op of a state runs as the captured unit `stacked_op` (`fedmetanas.capture`)."""
        k, b = x.shape[0], x.shape[1]
        self._captured_op = None if capture == "off" else unit("stacked_op", stacked_op, capture)
        self._set_sample(sample)
        with torch.no_grad():
            if self.bviews:
                torch._foreach_copy_(self.bscratch_views, self.bviews)
        h = x.transpose(0, 1).reshape(b, k * x.shape[2], *x.shape[3:])
        plan = self.plan
        h, _ = self._run(plan.stem_conv.module, h, 1, 1, plan.stem_conv, "")
        h, _ = self._run(plan.stem_bn.module, h, 1, 1, plan.stem_bn, "")
        s0 = s1 = h
        for cell in plan.cells:
            s0, s1 = s1, self._cell(cell, s0, s1, sample.weights[cell.kind])
        pooled = s1.mean((2, 3)).view(b, k, -1).transpose(0, 1)  # (K, batch, C)
        w = self.views[plan.classifier["weight"]][:, 0]  # (K, classes, C)
        bias = self.views[plan.classifier["bias"]][:, 0]  # (K, classes)
        with torch.no_grad():  # the statistics of the ops each client ran; the others' stay as they were
            if self.bviews:  # none under `model.norm: group`
                moved = torch.from_numpy(use.buffers.reshape(-1)[self._bcols.numpy()]).to(self.device,
                                                                                          non_blocking=True)
                scratch = torch.cat([t.view(-1) for t in self.bscratch_views])
                self.bflat.copy_(torch.where(moved, scratch, self.bflat))
        return torch.baddbmm(bias.unsqueeze(1), pooled, w.transpose(1, 2))

    def _cell(self, cell: CellSlot, s0: torch.Tensor, s1: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        k = self.k
        states = [self._run(cell.pre0.module, s0, 1, 1, cell.pre0, "")[0],
                  self._run(cell.pre1.module, s1, 1, 1, cell.pre1, "")[0]]
        sums: list[torch.Tensor | None] = []  # per state: (B, K, E, C, H, W) weighted sum of its ops
        nodes = []
        for j in range(self.template.nodes):
            while len(sums) < j + 2:  # the states node j reads that have not been expanded yet
                i = len(sums)
                sums.append(self._state(cell.states[i], states[i], weights))
            node = None
            for i in range(j + 2):
                st, acc = cell.states[i], sums[i]
                if acc is None:
                    continue
                term = acc[:, :, st.nodes.index(j)]
                node = term if node is None else node + term
            if node is None:  # every client leaves every input of this node out: impossible in a valid mask
                raise ValueError(f"stacked supernet: node {j} of a {cell.kind} cell has no computed input")
            bsz, _, c, hh, ww = node.shape
            nodes.append(node)
            states.append(node.reshape(bsz, k * c, hh, ww))
        out = torch.stack(nodes, dim=2)  # (B, K, nodes, C, H, W): each client's channels node after node
        return out.reshape(out.shape[0], k * out.shape[2] * out.shape[3], *out.shape[4:])

    def _state(self, st: StateSlot, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor | None:
        """The weighted sum of the ops on every edge leaving one state, for every client:
        (B, K, E, C, H', W'); None where no client computes anything on these edges."""
        k, e = self.k, len(st.edges)
        computed = self._state_ops(st)
        if not computed:
            return None
        self._shared = {}  # the state's ReLU (and its copy per member), shared by the ops that begin with one
        outs = []
        for op in st.ops:
            if op.prim not in computed:
                continue
            mod = op.module
            relu_first = _starts_with_relu(mod)
            if self._captured_op is not None and not isinstance(mod, nn.Identity):
                m = self._members(op)  # the op's own tensors as inputs: one graph per op and shape, any union
                y, g = self._captured_op(mod, x, self.k, e, self.momentum, m.params, m.buffers, relu_first)
            else:
                inp = x
                if relu_first:  # one ReLU of the state for every op that begins with one
                    if "relu" not in self._shared:
                        self._shared["relu"] = F.relu(x)
                    inp = self._shared["relu"]
                y, g = self._run(mod, inp, 1, e, op, "", skip_first_relu=relu_first)
            bsz, _, hh, ww = y.shape
            outs.append(y.view(bsz, k, g, -1, hh, ww).expand(bsz, k, e, y.shape[1] // (k * g), hh, ww))
        w = self._state_weights[id(st)]  # (K, E, computed ops, 1, 1, 1)
        return (torch.stack(outs, 3) * w).sum(3)

    def _state_ops(self, st: StateSlot) -> set[int]:
        return self._computed_ops.get(id(st), set())

    # -- one template module on K x E members --------------------------------------------------------
    def _run(self, mod: nn.Module, x: torch.Tensor, g: int, e: int, slot: OpSlot, prefix: str,
             skip_first_relu: bool = False) -> tuple[torch.Tensor, int]:
        """`mod` applied to every client and member (`Members.run`), with the slot's tensors of this net."""
        return self._members(slot).run(mod, x, g, e, prefix, skip_first_relu)

    def _members(self, slot: OpSlot) -> "Members":
        return Members(self.k, self.momentum, {n: self.views[gi] for n, gi in slot.params.items()},
                       {n: self.bscratch_views[gi] for n, gi in slot.buffers.items()}, self._shared)

    def _set_sample(self, sample: StackedSample) -> None:
        """Which ops the forward computes on each state's edges (those any client computes there), and
        their weights (K, E, computed ops), gathered once per step for both cell kinds."""
        self._computed_ops, self._state_weights = {}, {}
        for kind in CELL_KINDS:
            cells = [c for c in self.plan.cells if c.kind == kind]
            if not cells:
                continue
            comp = sample.computed[kind]
            rows, cols, slots = [], [], []
            for st in cells[0].states:
                prims = np.flatnonzero(comp[:, st.edges, :].any(axis=(0, 1))).tolist()
                slots.append((st, prims))
                for e in st.edges:
                    rows.extend([e] * len(prims))
                    cols.extend(prims)
            picked = sample.weights[kind][:, torch.as_tensor(rows), torch.as_tensor(cols)] if rows else None
            at = 0
            for i, (st, prims) in enumerate(slots):
                n = len(prims)
                width = n * len(st.edges)
                for cell in cells:  # every cell of a kind shares the kind's sample
                    same = cell.states[i]
                    self._computed_ops[id(same)] = set(prims)
                    if width:
                        self._state_weights[id(same)] = picked[:, at:at + width].view(self.k, len(st.edges), n, 1, 1, 1)
                at += width


@dataclass
class Members:
    """One template module's tensors for every client and member — `params` and `buffers` by the module's own
    names, (K, members, *shape) each — and the forward of the module on all of them."""

    k: int
    momentum: float
    params: dict[str, torch.Tensor]
    buffers: dict[str, torch.Tensor]
    shared: dict[str, torch.Tensor] | None = None  # the state's ReLU and its per-member copy, if shared

    def run(self, mod: nn.Module, x: torch.Tensor, g: int, e: int, prefix: str = "",
            skip_first_relu: bool = False) -> tuple[torch.Tensor, int]:
        """`mod` applied to every client and member: `x` is (B, K*g*C, H, W) with g = 1 (one input for all
        members) or g = e (one per member); returns the output and its g."""
        k = self.k
        shared = self.shared if self.shared is not None else {}
        if isinstance(mod, nn.Sequential):
            for idx, (name, child) in enumerate(mod.named_children()):
                x, g = self.run(child, x, g, e, f"{prefix}{name}.", skip_first_relu and idx == 0)
            return x, g
        if isinstance(mod, nn.ReLU):  # skipped: the state's shared ReLU is the input already
            return (x if skip_first_relu else F.relu(x)), g
        if isinstance(mod, Zero):  # `none`: zeros of the output's shape, as the sequential op computes them
            return mod(x), g
        if isinstance(mod, nn.Identity):
            return x, g
        if isinstance(mod, nn.Conv2d):
            w = self.params[f"{prefix}weight"]  # (K, E, Cout, Cin/groups, kh, kw)
            if mod.groups > 1 and g == 1 and e > 1:  # a per-member depthwise conv needs its own input copy
                if skip_first_relu and x is shared.get("relu") and "relu_wide" in shared:
                    x = shared["relu_wide"]  # the state's ReLU, already copied per member by another op
                else:
                    bsz, _, hh, ww = x.shape
                    wide = x.view(bsz, k, 1, -1, hh, ww).expand(bsz, k, e, x.shape[1] // k, hh, ww).reshape(
                        bsz, k * e * (x.shape[1] // k), hh, ww)
                    if skip_first_relu and x is shared.get("relu"):
                        shared["relu_wide"] = wide
                    x = wide
                g = e
            groups = k * g * mod.groups if g == e else k
            y = F.conv2d(x, w.reshape(-1, *w.shape[3:]), None, mod.stride, mod.padding, mod.dilation, groups)
            return y, e
        if isinstance(mod, (nn.BatchNorm2d, nn.GroupNorm)):
            return self.norm(mod, x, g, e, prefix), g
        if isinstance(mod, nn.MaxPool2d):
            return F.max_pool2d(x, mod.kernel_size, mod.stride, mod.padding), g
        if isinstance(mod, nn.AvgPool2d):
            return F.avg_pool2d(x, mod.kernel_size, mod.stride, mod.padding, count_include_pad=mod.count_include_pad), g
        if isinstance(mod, FactorizedReduce):
            if not skip_first_relu:
                x = F.relu(x)
            shifted = F.pad(x, (0, 1, 0, 1))[:, :, 1:, 1:]
            a, _ = self.run(mod.conv1, x, g, e, f"{prefix}conv1.")
            c, _ = self.run(mod.conv2, shifted, g, e, f"{prefix}conv2.")
            bsz, _, hh, ww = a.shape
            y = torch.cat([a.view(bsz, k * e, -1, hh, ww), c.view(bsz, k * e, -1, hh, ww)], 2).view(bsz, -1, hh, ww)
            return self.norm(mod.bn, y, e, e, f"{prefix}bn."), e
        raise TypeError(f"stacked supernet: no stacked form of {type(mod).__name__}")

    def norm(self, mod: nn.BatchNorm2d | nn.GroupNorm, x: torch.Tensor, g: int, e: int, prefix: str) -> torch.Tensor:
        """`mod`, a BatchNorm or a GroupNorm (`model.norm`), on every client and member."""
        if isinstance(mod, nn.BatchNorm2d):
            return self.bn(mod, x, g, e, prefix)
        weight = bias = None
        if mod.affine:
            if g != e:
                raise ValueError("stacked supernet: an affine norm shared across edges")
            weight = self.params[f"{prefix}weight"].reshape(-1)
            bias = self.params[f"{prefix}bias"].reshape(-1)
        # Channels are laid out client, member, channel, so the K*g*G groups never mix two clients or
        # members: each sample of each (client, member) is normalized over its own groups, as sequentially.
        return F.group_norm(x, self.k * g * mod.num_groups, weight, bias, mod.eps)

    def bn(self, mod: nn.BatchNorm2d, x: torch.Tensor, g: int, e: int, prefix: str) -> torch.Tensor:
        """Training-mode BN per channel (per client, member and channel); the running statistics of each
        (client, member) move only where its sequential step ran the op (`StepUse.buffers`)."""
        k = self.k
        weight = bias = None
        if mod.affine:
            weight = self.params[f"{prefix}weight"].reshape(-1)
            bias = self.params[f"{prefix}bias"].reshape(-1)
            if g != e:
                raise ValueError("stacked supernet: an affine BN shared across edges")
        rm = self.buffers[f"{prefix}running_mean"]
        rv = self.buffers[f"{prefix}running_var"]
        if g == e:  # one native call: its own statistics update, into the scratch copy
            return F.batch_norm(x, rm.view(-1), rv.view(-1), weight, bias, True, self.momentum, mod.eps)
        # One input for every member (after pooling): normalized once; each member's statistics move
        # towards the same batch statistics from its own running values.
        y = F.batch_norm(x, None, None, weight, bias, True, 0.0, mod.eps)
        with torch.no_grad():
            var, mean = torch.var_mean(x.detach(), dim=(0, 2, 3), correction=1)
            rm.lerp_(mean.view(k, g, -1), self.momentum)
            rv.lerp_(var.view(k, g, -1), self.momentum)
        return y


def stacked_op(mod: nn.Module, x: torch.Tensor, k: int, e: int, momentum: float, params: dict[str, torch.Tensor],
               buffers: dict[str, torch.Tensor], relu_first: bool) -> tuple[torch.Tensor, int]:
    """The captured unit `stacked_op` (`fedmetanas.capture`): one op on every client and edge leaving a state,
    from the state's input `x` (its ReLU taken here when the op begins with one: nothing is shared with
    the state's other ops, so the graph is the op's alone and does not depend on the union)."""
    return Members(k, momentum, params, buffers).run(mod, F.relu(x) if relu_first else x, 1, e, "", relu_first)


def _starts_with_relu(mod: nn.Module) -> bool:
    if isinstance(mod, FactorizedReduce):
        return True
    first = next(iter(mod.children()), None) if isinstance(mod, nn.Sequential) else None
    if isinstance(first, nn.Sequential):
        return _starts_with_relu(first)
    return isinstance(first, nn.ReLU)
