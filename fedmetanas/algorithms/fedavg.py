"""FedAvg (McMahan et al. 2017) on a fixed architecture: SGD with momentum on the client's batches.

The local rule (`FedAvgLocal`) also retrains FedNAS's searched genotype; personalization of both is the
same SGD, fine-tuning the weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar

import torch

from fedmetanas.algorithms.base import Algorithm, Phase, Span
from fedmetanas.algorithms.batched import ClientStack, StackedUpdate, in_equal_batches, steps_stacked
from fedmetanas.algorithms.common import Forward, LocalContext, LocalResult, sgd_steps
from fedmetanas.algorithms.phases import TrainPhase, check_fixed_net
from fedmetanas.config import AT_LEAST_1, NON_NEGATIVE, Config, PersonalizeConfig, Range, check_architecture
from fedmetanas.search.discrete import FixedNet
from fedmetanas.search.relax import lr_factor


@dataclass(frozen=True)
class FedAvgConfig:
    """FedAvg on a fixed architecture: the FedAvg baseline and FedNAS's retraining stage."""

    # The FedAvg baseline's network: cnn (FedAvg paper's CNN), darts_v2, or a genotype string.
    # FedNAS always retrains the genotype its search found.
    architecture: str = "darts_v2"
    local_steps: int = 10  # SGD steps (batches) per client per round
    batch_size: int = 32
    lr: float = 0.025
    lr_min: float = 0.001  # cosine over the training rounds
    momentum: float = 0.9
    weight_decay: float = 3e-4
    grad_clip: float = 5.0
    channels: int = 0  # cells' initial channels; 0: model.channels
    layers: int = 0  # cells; 0: model.layers

    ranges: ClassVar[dict[str, Range]] = {
        **dict.fromkeys(("local_steps", "batch_size"), AT_LEAST_1),
        **dict.fromkeys(("lr", "lr_min", "momentum", "weight_decay", "grad_clip", "channels", "layers"),
                        NON_NEGATIVE)}

    def check(self) -> None:
        check_architecture("fedavg.architecture", self.architecture)


class FedAvgLocal:
    """The client-side learning rule of fixed-architecture training."""

    def __init__(self, cfg: FedAvgConfig, personalize: PersonalizeConfig | None = None) -> None:
        self.cfg = cfg
        self.personalize_cfg = personalize or PersonalizeConfig()

    def loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The loss of a batch, for the sequential and the batched step alike (override it and both change)."""
        return torch.nn.functional.cross_entropy(logits, y)

    def local_update(self, model: FixedNet, task: FixedNet | None, ctx: LocalContext) -> LocalResult:  # noqa: ARG002
        """`local_steps` SGD steps from the global weights (fresh momentum every round)."""
        return self.train(model, ctx)

    def train(self, model: FixedNet, ctx: LocalContext, adjust: Callable[[], None] | None = None) -> LocalResult:
        """The local steps at the round's rate; `adjust` adds a term to the weights' gradients before each step
        (`sgd_steps`): the hook of the rules built on this one (FedProx, SCAFFOLD)."""
        c = self.cfg
        losses = sgd_steps(model, ctx, c.local_steps, c.batch_size, c.lr * ctx.lr_scale, c.momentum,
                           c.weight_decay, c.grad_clip, self.loss, adjust)
        return LocalResult(loss=float(torch.stack(losses).mean()), steps=c.local_steps)

    def local_update_batch(self, model: FixedNet, ctxs: list[LocalContext]) -> StackedUpdate:
        """`local_update` for several clients at once (`runtime.client_batch`), from `model`'s weights."""
        return in_equal_batches(ctxs, (self.cfg.batch_size,), lambda part: self._stacked(model, part))

    def _stacked(self, model: FixedNet, ctxs: list[LocalContext]) -> StackedUpdate:
        c, lr_scale = self.cfg, ctxs[0].lr_scale
        stack = ClientStack(model, len(ctxs))
        opt = torch.optim.SGD(stack.params, lr=c.lr * lr_scale, momentum=c.momentum, weight_decay=c.weight_decay,
                              foreach=True)
        losses = steps_stacked(stack, ctxs, [opt], c.local_steps, c.batch_size, c.grad_clip, self.loss)
        return stack.update(losses, c.local_steps)

    def personalize(self, model: FixedNet, task: FixedNet | None, ctx: LocalContext, steps: int) -> Forward:  # noqa: ARG002
        """Fine-tune the weights of (a client's copy of) the global model for `steps` SGD steps at
        `fedavg.lr * ctx.lr_scale`."""
        c = self.cfg
        sgd_steps(model, ctx, steps, self.personalize_cfg.batch_size, c.lr * ctx.lr_scale, 0.9, c.weight_decay,
                  c.grad_clip, self.loss)
        return model


def fedavg_batches(cfg: Config) -> list[tuple[str, int, int]]:
    """The batches FedAvg training draws: its own and, when clients personalize, personalization's."""
    out = [("fedavg.batch_size", cfg.fedavg.batch_size, 1)]
    if cfg.personalize.steps > 0:
        out.append(("personalize.batch_size", cfg.personalize.batch_size, 1))
    return out


def fedavg_phase(algo: Algorithm, span: Span, architecture: str | None, rule: FedAvgLocal | None = None,
                 phase_class: type[TrainPhase] = TrainPhase) -> TrainPhase:
    """A FedAvg training phase over `span`: cosine learning rate from `lr` to `lr_min` of the rule's settings
    (`rule.cfg`; default FedAvg's own rule on the `fedavg` section). FedProx passes its rule, SCAFFOLD its
    rule and phase class."""
    cfg = algo.cfg
    rule = rule or FedAvgLocal(cfg.fedavg, cfg.personalize)
    f = rule.cfg

    def lr_scale(rnd: int) -> float:
        # The phase's span as it is when the round runs: an earlier phase that ended early moved it.
        s = phase.span
        return lr_factor("cosine", f.lr_min / f.lr if f.lr > 0 else 1.0, rnd - s.first, s.rounds)

    phase = phase_class(cfg, span, rule, architecture=architecture, lr_scale=lr_scale, base_lr=f.lr,
                        channels=f.channels, layers=f.layers)
    return phase


class FedAvg(Algorithm):
    """FedAvg baseline: `federated.rounds` of training `fedavg.architecture`."""

    name = "fedavg"
    sections = {"fedavg": FedAvgConfig}

    @classmethod
    def validate(cls, cfg: Config) -> None:
        check_fixed_net("fedavg", cfg)

    def batch_sizes(self) -> list[tuple[str, int, int]]:
        return fedavg_batches(self.cfg)

    def phases(self) -> list[Phase]:
        span = Span("train", "rounds", 0, self.cfg.federated.rounds)
        return [fedavg_phase(self, span, self.cfg.fedavg.architecture)]
