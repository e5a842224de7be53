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

import torch

from fedmetanas.algorithms.common import (  # noqa: F401 - re-exported: the local-update interface
    Forward,
    LocalContext,
    LocalResult,
    clip_weight_grads,
    copy_state,
    supervised_step,
)
from fedmetanas.config import AlgorithmConfig
from fedmetanas.search.supernet import SuperNet, arch_from_genotype, derive_genotype


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

    def personalize(self, model: SuperNet, task: SuperNet, ctx: LocalContext, steps: int) -> Forward:
        """The task learner adapts a copy of the global model (weights at `inner_lr_w * ctx.lr_scale`,
        alphas at `inner_lr_alpha`) for `steps` steps on the client's data; the client's model is then the
        discrete net of its adapted alphas."""
        copy_state(task, model)
        self.adapt(task, ctx, steps)
        arch = arch_from_genotype(task, derive_genotype(task, ctx.masks, ctx.tau))
        return lambda x: task(x, arch)
