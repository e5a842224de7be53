"""Several clients stepped together as one batched computation (`runtime.client_batch`).

The sequential path trains a lane's clients one after another on one model replica. Here K clients'
copies of the parameters and BN statistics are stacked along a new leading dimension and computed at once.
What a client computes is unchanged — its own batches and Gumbel noise from its own generators, its own
loss and gradient — so the result equals the sequential one to float rounding (the kernels differ, so not
to the bit). Two forms:

- **Fixed networks** (`ClientStack`): the network runs on all K through `torch.func.functional_call` under
  `torch.func.vmap` (a convolution with per-client weights becomes one grouped convolution). SGD and Adam
  act elementwise, so one `torch.optim` optimizer over the stacked tensors is K optimizers; clipping is per
  client (`clip_stacked`).
- **Supernets** (`stacked_step` over `search.stacked.StackedSuperNet`), under every relaxation — dense
  soft, sparse soft (top-k / eps), hard, a warm-up's frozen logits: the union of the clients' ops is
  computed, each client's weight exactly 0 on the ops it did not sample, and the masked optimizers of
  `flat_optim` step only what each client's sequential step gave a gradient (None is not zero for Adam).

Either way the loss is the rule's own function, mapped over the clients with `vmap`, so a rule that
overrides its loss changes its sequential and its batched step alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.func import functional_call, vmap

from fedmetanas.algorithms.common import LocalContext, draw_batch
from fedmetanas.capture import CaptureMode, unit
from fedmetanas.data.client_data import sample_rows
from fedmetanas.search.relax import RelaxMode
from fedmetanas.search.stacked import StackedSuperNet, sample_stacked, step_use

def batched_form(rule: object) -> str | None:
    """None where `rule`'s batched form is its own; else why the rule cannot be batched: it has none, or a
    subclass changed the sequential step (`local_update`) and would silently inherit a batched step that
    computes something else (e.g. FedProx over FedAvg's SGD: the proximal term would be dropped). A rule
    that changes only its `loss` keeps both forms: both call it."""
    cls = type(rule)
    batch_owner = next((c for c in cls.__mro__ if "local_update_batch" in c.__dict__), None)
    if batch_owner is None:
        return f"{cls.__name__} has no batched form (local_update_batch)"
    seq_owner = next((c for c in cls.__mro__ if "local_update" in c.__dict__), None)
    if seq_owner is not None and seq_owner is not batch_owner and issubclass(seq_owner, batch_owner):
        return (f"{seq_owner.__name__} overrides local_update but inherits local_update_batch from "
                f"{batch_owner.__name__}, which would compute the parent's step")
    return None


LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (logits, labels) -> the batch's scalar loss


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
        self._forward = vmap(self._one, in_dims=(0, 0, 0), randomness="error")

    @property
    def weights(self) -> list[torch.Tensor]:
        alphas = set(self.alpha_at)
        return [p for i, p in enumerate(self.params) if i not in alphas]

    @property
    def alphas(self) -> list[torch.Tensor]:
        """The stacked architecture logits, in `named_parameters` order (none on a fixed network)."""
        return [self.params[i] for i in self.alpha_at]

    def _one(self, params: list[torch.Tensor], buffers: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        state = dict(zip(self.param_names, params)) | dict(zip(self.buffer_names, buffers))
        return functional_call(self.model, state, (x,), tie_weights=False, strict=True)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (K, batch, classes) of inputs (K, batch, ...): client k's input through client k's
        parameters. In training mode BN statistics are updated in place, per client."""
        return self._forward(self.params, self.buffers, x)

    def losses(self, x: torch.Tensor, y: torch.Tensor, loss: LossFn, capture: CaptureMode = "off") -> torch.Tensor:
        """Each client's `loss` of its batch ((K, batch, ...) inputs, (K, batch) labels): shape (K,). Under
        `capture` as the `fixed_batched` unit (`fedmetanas.capture`), the same computation compiled."""
        if capture == "off":
            return vmap(loss)(self(x), y)
        return unit("fixed_batched", stacked_losses, capture)(self.model, self.param_names, self.buffer_names,
                                                               self.params, self.buffers, x, y, loss)

    def clone(self) -> "ClientStack":
        """A copy with its own tensors (a task learner's starting point)."""
        other = object.__new__(ClientStack)
        other.__dict__.update(self.__dict__)
        other.params = [p.detach().clone().requires_grad_() for p in self.params]
        other.buffers = [b.clone() for b in self.buffers]
        other._forward = vmap(other._one, in_dims=(0, 0, 0), randomness="error")
        return other

    def update(self, losses: torch.Tensor, steps: int) -> StackedUpdate:
        """The stacks as the clients' update; `losses` (steps, K): each client's mean over its steps."""
        floating = [b for b in self.buffers if b.is_floating_point()]
        return StackedUpdate([p.detach() for p in self.params] + floating, losses.mean(0).tolist(), steps)


def stacked_losses(model: nn.Module, param_names: list[str], buffer_names: list[str], params: list[torch.Tensor],
                   buffers: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor, loss: LossFn) -> torch.Tensor:
    """The captured unit `fixed_batched`: `ClientStack.losses` as one function of the stacked tensors (a
    module-level function: one code object, so the unit's graphs do not depend on which stack calls it)."""
    def one(p: list[torch.Tensor], b: list[torch.Tensor], xi: torch.Tensor) -> torch.Tensor:
        state = dict(zip(param_names, p)) | dict(zip(buffer_names, b))
        return functional_call(model, state, (xi,), tie_weights=False, strict=True)

    return vmap(loss)(vmap(one, in_dims=(0, 0, 0), randomness="error")(params, buffers, x), y)


def in_equal_batches(ctxs: list[LocalContext], batch_sizes: tuple[int, ...],
                     run: Callable[[list[LocalContext]], StackedUpdate],
                     rows: Callable[[LocalContext], tuple[int, ...]] | None = None) -> StackedUpdate:
    """`run` on groups of clients whose batches have the same shapes (a client with fewer rows than a batch
    draws all of them, as sequentially), the updates put back in the clients' order. `rows(ctx)`: the rows
    each batch draws from (default: the client's train split for every batch)."""
    def shape(c: LocalContext) -> tuple[int, ...]:
        have = rows(c) if rows is not None else (int(c.train_idx.numel()),) * len(batch_sizes)
        return tuple(min(n, b) for n, b in zip(have, batch_sizes))

    shapes = [shape(c) for c in ctxs]
    if len(set(shapes)) == 1:
        return run(ctxs)
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, sh in enumerate(shapes):
        groups.setdefault(sh, []).append(i)
    parts = {tuple(at): run([ctxs[i] for i in at]) for at in groups.values()}
    order = [(at, j) for at in parts for j in range(len(at))]
    where = {at[j]: (at, j) for at, j in order}
    rows = [where[i] for i in range(len(ctxs))]
    first = next(iter(parts.values()))
    tensors = [torch.stack([parts[at].tensors[t][j] for at, j in rows]) for t in range(len(first.tensors))]
    return StackedUpdate(tensors, [parts[at].losses[j] for at, j in rows], first.steps)


def stack_copies(t: torch.Tensor, k: int) -> torch.Tensor:
    """K copies of `t` along a new leading dimension (contiguous, its own memory)."""
    return t.detach().unsqueeze(0).expand(k, *t.shape).clone()


def draw_stacked(ctxs: list[LocalContext], batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch per client, each from the client's own generator exactly as the sequential rule draws
    it, stacked to (K, batch, ...). Without augmentation the rows are drawn per client and gathered and
    normalized in one call (the same values: `TensorSplit.batch` works row by row)."""
    split = ctxs[0].train
    if any(c.augment for c in ctxs) and split.in_channels == 3:  # augmentation draws per client, after its rows
        xs, ys = zip(*(draw_batch(ctx, ctx.train_idx, batch_size) for ctx in ctxs))
        return torch.stack(xs), torch.stack(ys)
    rows = [sample_rows(ctx.train_idx, batch_size, ctx.batch_gen) for ctx in ctxs]
    x, y = split.batch(torch.cat(rows))
    return x.view(len(ctxs), -1, *x.shape[1:]), y.view(len(ctxs), -1)


def stacked_grads(stack: ClientStack, ctxs: list[LocalContext], batch_size: int,
                  loss: LossFn | None = None) -> torch.Tensor:
    """`common.supervised_step` for K clients of a fixed network: a batch each, then every stacked
    parameter's `.grad` set to the clients' own gradients (None where no client's forward used it);
    `loss` (the rule's own; default cross-entropy) mapped over the clients. Returns the K losses."""
    x, y = draw_stacked(ctxs, batch_size)
    losses = stack.losses(x, y, loss or nn.functional.cross_entropy, ctxs[0].capture)
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
                  steps: int, batch_size: int, grad_clip: float, loss: LossFn | None = None) -> torch.Tensor:
    """`steps` supervised steps of K clients at once, each stepping `optimizers` after clipping the
    weights' gradients (FedAvg's SGD: as `common.sgd_steps`; the task learner's Adam on weights and
    logits: as `FedMetaNAS.adapt`); returns the losses, shape (steps, K)."""
    losses = []
    for _ in range(steps):
        losses.append(stacked_grads(stack, ctxs, batch_size, loss))
        clip_stacked(stack.weights, grad_clip)
        for opt in optimizers:
            opt.step()
    return torch.stack(losses)



def stacked_step(net: StackedSuperNet, ctxs: list[LocalContext], batch_size: int,
                 loss: LossFn) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`common.supervised_step` for K clients' supernets at once (`search.stacked`): a batch and a relaxed
    sample each, from the client's own generators under `ctxs[0]`'s masks, temperature and mode; `loss`
    is the rule's own (logits, labels) -> scalar, mapped over the clients with `torch.func.vmap`.

    Returns the K losses, the gradient in the flat buffer's layout, and which of its entries each client's
    sequential step would have given a gradient at all (bool; the others are zero)."""
    x, y = draw_stacked(ctxs, batch_size)
    c = ctxs[0]
    return stacked_loss_grad(net, ctxs, x, y, c.tau, c.relax_mode, loss)


def stacked_loss_grad(net: StackedSuperNet, ctxs: list[LocalContext], x: torch.Tensor, y: torch.Tensor,
                      tau: float, mode: RelaxMode, loss: LossFn,
                      wrt: str = "all") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The K clients' losses on their batches `x`, `y` ((K, batch, ...)) under a relaxed sample each
    (`ctxs[0]`'s masks and sparsity, each client's own Gumbel generator), and the gradient of the summed
    losses in the flat buffer's layout — of every tensor, or (`wrt` "alphas") of the architecture logits
    alone, the buffer's tail `flat[n_weight:]` — with what each client's step used (see `stacked_step`)."""
    c = ctxs[0]
    sample = sample_stacked(net.template, net.logits, c.masks, tau, mode, [x.gumbel_gen for x in ctxs],
                            c.soft_topk, c.soft_eps)
    use = step_use(net.plan, sample, net.k)
    losses = vmap(loss)(net(x, sample, use, c.capture), y)
    if wrt == "alphas":  # the logits' part of the buffer only (they lead no weight: they follow them)
        alphas = [net.views[g] for g in net.plan.alphas.values()]
        got = torch.autograd.grad(losses.sum(), alphas, allow_unused=True, materialize_grads=True)
        return losses.detach(), torch.cat([g.reshape(-1) for g in got]), net.use_columns(use.params)[net.n_weight:]
    grads = torch.autograd.grad(losses.sum(), net.views, allow_unused=True, materialize_grads=True)
    grad = torch.cat([g.reshape(-1) for g in grads])  # a compiled backward may hand back other strides
    return losses.detach(), grad, net.use_columns(use.params)
