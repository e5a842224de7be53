"""FedMetaNAS's local search: a task learner adapts, a meta learner updates (first order).

For each of `local_steps` meta-steps on a client:
  1. task learner <- copy of the client's model (weights and architecture logits);
  2. the task learner takes `inner_steps` Adam steps on support batches, updating weights and
     alphas/betas jointly through the Gumbel relaxation (MetaNAS: Adam with betas (0, 0.999));
  3. meta learner update, either FOMAML (the task learner's gradient on a query batch, taken at the
     adapted parameters, applied to the client's parameters by the meta optimizer) or Reptile
     (move the client's parameters towards the adapted ones by reptile_lr_w / reptile_lr_alpha).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fedmetanas.config import AlgorithmConfig
from fedmetanas.data.client_data import sample_batch
from fedmetanas.data.datasets import TensorSplit
from fedmetanas.search.relax import RelaxMode
from fedmetanas.search.supernet import ArchMasks, SuperNet, sample_arch


@dataclass
class LocalContext:
    """What a client's local search needs besides its model: data, architecture state, randomness."""

    train: TensorSplit
    train_idx: torch.Tensor
    masks: ArchMasks
    tau: float
    relax_mode: RelaxMode
    batch_gen: torch.Generator
    gumbel_gen: torch.Generator
    augment: bool = False
    channels_last: bool = False
    lr_scale: float = 1.0  # the round's factor on the weights' learning rates (schedule)
    client_id: int = -1  # for logs and fault reports only: never a source of randomness here


@dataclass
class LocalResult:
    """Summary of one client's local work (the parameters themselves stay in the model)."""

    loss: float
    steps: int


def copy_state(dst: SuperNet, src: SuperNet) -> None:
    """Copy parameters and buffers in place (no reallocation, keeps optimizer references valid)."""
    with torch.no_grad():
        torch._foreach_copy_(dst.param_list(), src.param_list())
        torch._foreach_copy_(dst.buffer_list(), src.buffer_list())


def supervised_step(model: SuperNet, ctx: LocalContext, batch_size: int) -> torch.Tensor:
    """Forward + backward of the cross-entropy on one sampled batch under one relaxed sample."""
    x, y = sample_batch(ctx.train, ctx.train_idx, batch_size, ctx.batch_gen, ctx.augment)
    if ctx.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    arch = sample_arch(model, ctx.masks, ctx.tau, ctx.relax_mode, ctx.gumbel_gen)
    loss = nn.functional.cross_entropy(model(x, arch), y)
    model.zero_grad(set_to_none=True)
    loss.backward()
    return loss.detach()


def clip_weight_grads(model: SuperNet, max_norm: float) -> None:
    """Clip the weights' gradient norm (as DARTS does); architecture gradients are left alone."""
    if max_norm > 0:
        nn.utils.clip_grad_norm_(model.weights(), max_norm)


class FedMetaNAS:
    """The client-side learning rule of FedMetaNAS."""

    def __init__(self, cfg: AlgorithmConfig) -> None:
        self.cfg = cfg

    def _meta_optimizer(self, model: SuperNet, lr_scale: float) -> torch.optim.Optimizer:
        groups = [{"params": model.weights(), "lr": self.cfg.meta_lr_w * lr_scale,
                   "weight_decay": self.cfg.weight_decay},
                  {"params": model.alphas(), "lr": self.cfg.meta_lr_alpha, "weight_decay": 0.0}]
        if self.cfg.meta_optimizer == "adam":
            return torch.optim.Adam(groups, foreach=True)
        return torch.optim.SGD(groups, foreach=True)

    def adapt(self, task: SuperNet, ctx: LocalContext, steps: int) -> list[torch.Tensor]:
        """Task learner: `steps` joint Adam steps on weights and architecture logits."""
        betas = self.cfg.inner_betas
        opt_w = torch.optim.Adam(task.weights(), lr=self.cfg.inner_lr_w * ctx.lr_scale, betas=betas,
                                 weight_decay=self.cfg.weight_decay, foreach=True)
        opt_a = torch.optim.Adam(task.alphas(), lr=self.cfg.inner_lr_alpha, betas=betas, foreach=True)
        losses = []
        for _ in range(steps):
            losses.append(supervised_step(task, ctx, self.cfg.batch_size))
            clip_weight_grads(task, self.cfg.grad_clip)
            opt_w.step()
            opt_a.step()
        return losses

    def local_update(self, model: SuperNet, task: SuperNet, ctx: LocalContext) -> LocalResult:
        """Run the client's meta-steps; `model` holds the global parameters on entry, the client's after."""
        cfg = self.cfg
        meta_opt = self._meta_optimizer(model, ctx.lr_scale) if cfg.meta_update == "fomaml" else None
        losses: list[torch.Tensor] = []
        for _ in range(cfg.local_steps):
            copy_state(task, model)
            inner = self.adapt(task, ctx, cfg.inner_steps)
            if meta_opt is not None:
                losses.append(supervised_step(task, ctx, cfg.query_batch_size))
                for p_meta, p_task in zip(model.param_list(), task.param_list()):
                    p_meta.grad = p_task.grad
                clip_weight_grads(model, cfg.grad_clip)
                meta_opt.step()
            else:
                losses.extend(inner)
                with torch.no_grad():
                    for p_meta, p_task in zip(model.weights(), task.weights()):
                        p_meta.add_(p_task - p_meta, alpha=cfg.reptile_lr_w)
                    for p_meta, p_task in zip(model.alphas(), task.alphas()):
                        p_meta.add_(p_task - p_meta, alpha=cfg.reptile_lr_alpha)
            # BN statistics follow what the task learner saw (they are not learned parameters).
            with torch.no_grad():
                torch._foreach_copy_(model.buffer_list(), task.buffer_list())
        mean_loss = float(torch.stack(losses).mean()) if losses else float("nan")
        return LocalResult(loss=mean_loss, steps=cfg.local_steps * (cfg.inner_steps + (meta_opt is not None)))
