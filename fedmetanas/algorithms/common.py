"""What every local learning rule shares: the client's context, the result record, batches, copies."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from fedmetanas.capture import CaptureMode, fixed_loss, op_runner, unit
from fedmetanas.data.client_data import sample_batch
from fedmetanas.data.datasets import TensorSplit
from fedmetanas.search.relax import RelaxMode
from fedmetanas.search.supernet import ArchMasks, sample_arch


@dataclass
class LocalContext:
    """What a client's local search needs besides its model: data, architecture state, randomness."""

    train: TensorSplit
    train_idx: torch.Tensor
    masks: ArchMasks | None  # None for a fixed architecture
    tau: float
    relax_mode: RelaxMode
    batch_gen: torch.Generator
    gumbel_gen: torch.Generator
    augment: bool = False
    channels_last: bool = False
    lr_scale: float = 1.0  # the round's factor on the weights' learning rates (schedule)
    client_id: int = -1  # for logs and fault reports only: never a source of randomness here
    train_arch: bool = True  # False: leave the architecture logits as they are (warm-up)
    soft_topk: int = 0  # see RoundPlan: which ops a `soft` sample computes
    soft_eps: float = 0.0
    # The client's own state from earlier rounds (`Phase.client_state`; zeros before its first round).
    state: dict[str, torch.Tensor] = field(default_factory=dict)
    # How the step's arithmetic runs (`runtime.capture` resolved, `fedmetanas.capture`): off, compile, graphs.
    capture: CaptureMode = "off"
    round: int = -1  # the global round this context is for (-1: none, e.g. personalization); for rules' schedules


@dataclass
class LocalResult:
    """Summary of one client's local work (the parameters themselves stay in the model)."""

    loss: float
    steps: int
    uploads: dict[str, torch.Tensor] = field(default_factory=dict)  # per `Phase.uploads` declaration
    state: dict[str, torch.Tensor] = field(default_factory=dict)  # the client's new state (`Phase.client_state`)


def copy_state(dst: nn.Module, src: nn.Module) -> None:
    """Copy parameters and buffers in place (no reallocation, keeps optimizer references valid)."""
    with torch.no_grad():
        for dst_list, src_list in ((dst.param_list(), src.param_list()), (dst.buffer_list(), src.buffer_list())):
            if dst_list:  # a net without BN (the CNN) has no buffers
                torch._foreach_copy_(dst_list, src_list)


def draw_batch(ctx: LocalContext, idx: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A training batch from the client's indices `idx`, from its batch generator."""
    x, y = sample_batch(ctx.train, idx, batch_size, ctx.batch_gen, ctx.augment)
    if ctx.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y


def supervised_step(model: nn.Module, ctx: LocalContext, batch_size: int,
                    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Forward + backward of `loss_fn` (the rule's; default cross-entropy) on one sampled batch under one
    relaxed sample (a supernet) or through the network itself (a fixed architecture, `ctx.masks` None)."""
    x, y = draw_batch(ctx, ctx.train_idx, batch_size)
    loss_fn = loss_fn or nn.functional.cross_entropy
    if ctx.masks is None:  # a fixed architecture: nothing to sample
        loss = fixed_step_loss(model, x, y, loss_fn, ctx.capture)
    else:  # the sample is drawn on the host, outside any captured region; the ops run captured or not
        arch = sample_arch(model, ctx.masks, ctx.tau, ctx.relax_mode, ctx.gumbel_gen, topk=ctx.soft_topk,
                           eps=ctx.soft_eps)
        loss = loss_fn(model(x, arch, run_op=op_runner(ctx.capture)), y)
    model.zero_grad(set_to_none=True)
    loss.backward()
    return loss.detach()


def fixed_step_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], capture: CaptureMode) -> torch.Tensor:
    """`loss_fn(model(x), y)` on a fixed network, as the `fixed` unit under `capture` (plainly when off)."""
    return unit("fixed", fixed_loss, capture)(model, x, y, loss_fn)


def clip_weight_grads(model: nn.Module, max_norm: float) -> None:
    """Clip the weights' gradient norm (as DARTS does); architecture gradients are left alone."""
    if max_norm > 0:
        nn.utils.clip_grad_norm_(model.weights(), max_norm)


def add_to_grads(params: list[torch.Tensor], terms: list[torch.Tensor], alpha: float = 1.0) -> None:
    """p.grad += alpha * term for every parameter the loss reached; one it did not reach keeps no gradient,
    so SGD leaves it as it would without the term."""
    pairs = [(p.grad, t) for p, t in zip(params, terms) if p.grad is not None]
    if pairs:
        grads, added = zip(*pairs)
        torch._foreach_add_(list(grads), list(added), alpha=alpha)


Forward = Callable[[torch.Tensor], torch.Tensor]


def sgd_steps(model: nn.Module, ctx: LocalContext, steps: int, batch_size: int, lr: float, momentum: float,
              weight_decay: float, grad_clip: float,
              loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
              adjust: Callable[[], None] | None = None) -> list[torch.Tensor]:
    """Supervised SGD of `loss_fn` (default cross-entropy) on a fixed-architecture net (`model(x)`);
    returns the batch losses. `adjust`, called after clipping and before each step, may add a term to
    the weights' gradients (FedProx's proximal pull, SCAFFOLD's drift correction); like weight decay,
    that term is not clipped."""
    opt = torch.optim.SGD(model.weights(), lr=lr, momentum=momentum, weight_decay=weight_decay, foreach=True)
    losses = []
    for _ in range(steps):
        x, y = draw_batch(ctx, ctx.train_idx, batch_size)
        loss = fixed_step_loss(model, x, y, loss_fn or nn.functional.cross_entropy, ctx.capture)
        model.zero_grad(set_to_none=True)
        loss.backward()
        clip_weight_grads(model, grad_clip)
        if adjust is not None:
            adjust()
        opt.step()
        losses.append(loss.detach())
    return losses
