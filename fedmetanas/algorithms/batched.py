"""Several clients stepped together as one batched computation (`runtime.client_batch`).

The sequential path trains a lane's clients one after another on one model replica. Here K clients'
copies of the parameters (weights and, on a supernet, architecture logits) and BN statistics are stacked
along a new leading dimension and the network runs on all of them at once through
`torch.func.functional_call` under `torch.func.vmap`: a convolution with per-client weights becomes one
grouped convolution, a linear layer one batched matmul. What a client computes is unchanged — its own
batches and Gumbel noise from its own generators, its own loss and gradient — so the result equals the
sequential one to float rounding (the kernels differ, so not to the bit):

- the K losses are independent, so the gradient of their *sum* with respect to the stacked tensors is
  each client's own gradient in its slice;
- SGD (momentum, weight decay) and Adam act elementwise, so one optimizer over the stacked tensors is K
  optimizers, one per client, each with fresh state as in the sequential rules;
- gradient clipping is per client (`clip_stacked`): each client's norm over its own slices;
- a tensor no client's forward used (a masked op) gets no gradient at all, as in the sequential step.

What can be batched: fixed networks, and a supernet whose clients all compute the same op set — the
dense relaxations (`soft` with every unmasked op, `expected`). Each client keeps its own Gumbel weights;
the op set is the masks', shared by all. A `hard` or sparse soft (top-k / eps) sample makes each client
compute different ops: stacking them would compute the union, and an op a client did not compute must
get no optimizer step (its gradient is None, not 0: Adam's weight decay and moments would still move
it), so those samples run one client after another (docs/batched.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, vmap

from fedmetanas.algorithms.common import LocalContext, draw_batch
from fedmetanas.search.relax import RelaxMode
from fedmetanas.search.supernet import ArchMasks, ArchSample, CellArch, sample_arch

BATCHED_MODES: tuple[RelaxMode, ...] = ("soft", "expected")  # every client computes the masks' op set


def batchable_sample(mode: RelaxMode, topk: int, eps: float) -> bool:
    """Whether a supernet's clients all compute the same op set under this relaxation (see the module)."""
    return mode in BATCHED_MODES and topk == 0 and eps == 0


@dataclass
class StackedUpdate:
    """What a batch of clients hands back: every aggregated tensor stacked over the clients (leading
    dimension K, in `aggregation.aggregated_tensors` order: parameters, then floating-point buffers), and
    each client's mean training loss and step count."""

    tensors: list[torch.Tensor]
    losses: list[float]
    steps: int

    def client(self, k: int) -> list[torch.Tensor]:
        """Client k's tensors (views into the stacks)."""
        return [t[k] for t in self.tensors]


class ClientStack:
    """K clients' copies of `model`'s parameters and buffers, stacked; `model` is only the template
    `functional_call` runs (its own tensors are never changed)."""

    def __init__(self, model: nn.Module, k: int) -> None:
        self.model, self.k = model, k
        named = list(model.named_parameters())
        self.param_names = [n for n, _ in named]
        self.buffer_names = [n for n, _ in model.named_buffers()]
        is_alpha = getattr(model, "_is_alpha", lambda name: False)
        self.alpha_at = [i for i, (n, _) in enumerate(named) if is_alpha(n)]
        self.params = [stack_copies(p, k).requires_grad_() for _, p in named]
        self.buffers = [stack_copies(b, k) for b in model.buffers()]
        self._static: Any = None  # a supernet step's op / input index lists (the same for every client)
        self._forward = vmap(self._one, in_dims=(0, 0, 0, 0), randomness="error")

    @property
    def weights(self) -> list[torch.Tensor]:
        alphas = set(self.alpha_at)
        return [p for i, p in enumerate(self.params) if i not in alphas]

    @property
    def alphas(self) -> list[torch.Tensor]:
        """The stacked architecture logits, in `named_parameters` order (none on a fixed network)."""
        return [self.params[i] for i in self.alpha_at]

    def _one(self, params: list[torch.Tensor], buffers: list[torch.Tensor], x: torch.Tensor,
             arch: tuple[Any, ...]) -> torch.Tensor:
        state = dict(zip(self.param_names, params)) | dict(zip(self.buffer_names, buffers))
        args = (x,) if self._static is None else (x, _rebuild(arch, self._static))
        return functional_call(self.model, state, args, tie_weights=False, strict=True)

    def __call__(self, x: torch.Tensor, arch: "StackedArch | None" = None) -> torch.Tensor:
        """Logits (K, batch, classes) of inputs (K, batch, ...): client k's input through client k's
        parameters (and, on a supernet, its relaxed architecture). In training mode BN statistics are
        updated in place, per client."""
        self._static = None if arch is None else arch.static
        return self._forward(self.params, self.buffers, x, () if arch is None else arch.tensors)

    def clone(self) -> "ClientStack":
        """A copy with its own tensors (a task learner's starting point)."""
        other = object.__new__(ClientStack)
        other.__dict__.update(self.__dict__)
        other.params = [p.detach().clone().requires_grad_() for p in self.params]
        other.buffers = [b.clone() for b in self.buffers]
        other._forward = vmap(other._one, in_dims=(0, 0, 0, 0), randomness="error")
        return other

    def update(self, losses: torch.Tensor, steps: int) -> StackedUpdate:
        """The stacks as the clients' update; `losses` (steps, K): each client's mean over its steps."""
        floating = [b for b in self.buffers if b.is_floating_point()]
        return StackedUpdate([p.detach() for p in self.params] + floating, losses.mean(0).tolist(), steps)


@dataclass
class StackedArch:
    """K clients' relaxed architectures of one step: the per-client tensors of each cell kind's `CellArch`
    stacked (op weights, and per-node input coefficients with pairwise inputs), and the index lists of
    what is computed, which a dense relaxation shares across clients."""

    tensors: tuple[Any, ...]  # per cell kind: (op_weights (K, edges, ops), coefficients (K, inputs) per node or ())
    static: tuple[tuple[list[list[int]], list[list[int]]], ...]  # per cell kind: (op_index, input_index)


def _rebuild(tensors: tuple[Any, ...], static: tuple[Any, ...]) -> ArchSample:
    cells = [CellArch(w, op_index, list(coeff) if coeff else None, input_index)
             for (w, coeff), (op_index, input_index) in zip(tensors, static)]
    return ArchSample(*cells)


def sample_stacked(model: nn.Module, stack: ClientStack, ctxs: list[LocalContext], masks: ArchMasks,
                   tau: float, mode: RelaxMode, topk: int = 0, eps: float = 0.0) -> StackedArch:
    """Each client's relaxed architecture from its own slice of the stacked logits and its own Gumbel
    generator — `sample_arch` as the sequential step calls it —, stacked. The gradient flows back into
    the stacked logits."""
    if not batchable_sample(mode, topk, eps):
        raise ValueError(f"a {mode!r} sample (top-k {topk}, eps {eps:g}) computes different ops per client: "
                         "it cannot be batched")
    names = [stack.param_names[i] for i in stack.alpha_at]
    samples = []
    for k, ctx in enumerate(ctxs):
        view = SimpleNamespace(nodes=model.nodes, pair_incidence=model.pair_incidence,
                               **{n: a[k] for n, a in zip(names, stack.alphas)})
        samples.append(sample_arch(view, masks, tau, mode, ctx.gumbel_gen))
    tensors, static = [], []
    for kind in ("normal", "reduce"):
        cells: list[CellArch] = [getattr(s, kind) for s in samples]
        coeff = () if cells[0].input_coeff is None else tuple(  # () not None: vmap maps over tensors only
            torch.stack([c.input_coeff[j] for c in cells]) for j in range(len(cells[0].input_coeff)))
        tensors.append((torch.stack([c.op_weights for c in cells]), coeff))
        static.append((cells[0].op_index, cells[0].input_index))
    return StackedArch(tuple(tensors), tuple(static))


def stack_copies(t: torch.Tensor, k: int) -> torch.Tensor:
    """K copies of `t` along a new leading dimension (contiguous, its own memory)."""
    return t.detach().unsqueeze(0).expand(k, *t.shape).clone()


def draw_stacked(ctxs: list[LocalContext], batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch per client, each from the client's own generator exactly as the sequential rule draws
    it, stacked to (K, batch, ...)."""
    xs, ys = zip(*(draw_batch(ctx, ctx.train_idx, batch_size) for ctx in ctxs))
    return torch.stack(xs), torch.stack(ys)


def stacked_grads(stack: ClientStack, ctxs: list[LocalContext], batch_size: int) -> torch.Tensor:
    """`common.supervised_step` for K clients: a batch each (and, on a supernet, a relaxed sample each
    under `ctxs[0]`'s masks, temperature and mode), then every stacked parameter's `.grad` set to the
    clients' own gradients (None where no client's forward used it). Returns the K losses."""
    x, y = draw_stacked(ctxs, batch_size)
    ctx = ctxs[0]
    arch = None if ctx.masks is None else sample_stacked(stack.model, stack, ctxs, ctx.masks, ctx.tau,
                                                         ctx.relax_mode, ctx.soft_topk, ctx.soft_eps)
    logits = stack(x, arch)
    per_sample = nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none")
    losses = per_sample.view(stack.k, -1).mean(1)
    grads = torch.autograd.grad(losses.sum(), stack.params, allow_unused=True)
    for p, g in zip(stack.params, grads):
        p.grad = g
    return losses.detach()


def clip_stacked(params: list[torch.Tensor], max_norm: float) -> None:
    """`clip_grad_norm_` applied to each client on its own: client k's gradient norm over its slices of
    every tensor, scaled down to `max_norm` where it is larger (the same formula, with its 1e-6)."""
    grads = [p.grad for p in params if p.grad is not None]
    if max_norm <= 0 or not grads:
        return
    norms = torch.stack([torch.linalg.vector_norm(g.flatten(1), dim=1) for g in grads], dim=1)  # (K, tensors)
    total = torch.linalg.vector_norm(norms, dim=1)
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(coef.view(-1, *([1] * (g.dim() - 1))))


def steps_stacked(stack: ClientStack, ctxs: list[LocalContext], optimizers: list[torch.optim.Optimizer],
                  steps: int, batch_size: int, grad_clip: float) -> torch.Tensor:
    """`steps` supervised steps of K clients at once, each stepping `optimizers` after clipping the
    weights' gradients (FedAvg's SGD: as `common.sgd_steps`; the task learner's Adam on weights and
    logits: as `FedMetaNAS.adapt`); returns the losses, shape (steps, K)."""
    losses = []
    for _ in range(steps):
        losses.append(stacked_grads(stack, ctxs, batch_size))
        clip_stacked(stack.weights, grad_clip)
        for opt in optimizers:
            opt.step()
    return torch.stack(losses)
