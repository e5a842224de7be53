"""FedAvg's local update on a fixed architecture (McMahan et al. 2017): SGD with momentum on the
client's batches. Used by the FedAvg baseline and by FedNAS's retraining stage; personalization of
both is the same SGD, fine-tuning the weights."""

from __future__ import annotations

import torch

from fedmetanas.algorithms.common import Forward, LocalContext, LocalResult, sgd_steps
from fedmetanas.config import FedAvgConfig, PersonalizeConfig
from fedmetanas.search.discrete import FixedNet


class FedAvgLocal:
    """The client-side learning rule of fixed-architecture training."""

    def __init__(self, cfg: FedAvgConfig, personalize: PersonalizeConfig | None = None) -> None:
        self.cfg = cfg
        self.personalize_cfg = personalize or PersonalizeConfig()

    def local_update(self, model: FixedNet, task: FixedNet, ctx: LocalContext) -> LocalResult:  # noqa: ARG002
        """`local_steps` SGD steps from the global weights (fresh momentum every round)."""
        c = self.cfg
        losses = sgd_steps(model, ctx, c.local_steps, c.batch_size, c.lr * ctx.lr_scale, c.momentum,
                           c.weight_decay, c.grad_clip)
        return LocalResult(loss=float(torch.stack(losses).mean()), steps=c.local_steps)

    def personalize(self, model: FixedNet, task: FixedNet, ctx: LocalContext, steps: int) -> Forward:  # noqa: ARG002
        """Fine-tune the weights of (a client's copy of) the global model for `steps` SGD steps at
        `fedavg.lr * ctx.lr_scale`."""
        c = self.cfg
        sgd_steps(model, ctx, steps, self.personalize_cfg.batch_size, c.lr * ctx.lr_scale, 0.9, c.weight_decay,
                  c.grad_clip)
        return model
