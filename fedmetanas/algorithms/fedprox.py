"""FedProx (Li et al. 2020, "Federated Optimization in Heterogeneous Networks"): FedAvg whose clients
minimize their loss plus a proximal term (mu/2) ||w - w_global||^2 that keeps them near the global model.

Everything else is FedAvg's: the network, local steps, batch, learning-rate schedule, momentum, weight
decay, clipping and personalization are the `fedavg` section's, so a comparison with FedAvg changes only
`algorithm.name` and `fedprox.mu` (and mu 0 is FedAvg to the bit). The proximal gradient
mu (w - w_global) is added to the weights' gradients after clipping, as weight decay is: clipping bounds
the data's gradient, the pull toward the global weights is never cut. Personalization fine-tunes without
it (the fine-tuned model is meant to leave the global one).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedmetanas.algorithms.base import Phase, Span
from fedmetanas.algorithms.common import LocalContext, LocalResult, add_to_grads
from fedmetanas.algorithms.fedavg import FedAvg, FedAvgConfig, FedAvgLocal, fedavg_phase
from fedmetanas.config import ConfigError, PersonalizeConfig
from fedmetanas.search.discrete import FixedNet


@dataclass(frozen=True)
class FedProxConfig:
    """FedProx's proximal coefficient; the rest of its training is the `fedavg` section's."""

    mu: float = 0.01  # weight of (mu/2) ||w - w_global||^2 in each client's objective; 0: FedAvg

    def check(self) -> None:
        if not self.mu >= 0:
            raise ConfigError(f"fedprox.mu: {self.mu!r} is out of range; use a number >= 0 (0: FedAvg)")


class FedProxLocal(FedAvgLocal):
    """FedAvg's SGD on the client's loss plus (mu/2) ||w - w_global||^2, w_global the weights on entry."""

    def __init__(self, cfg: FedAvgConfig, mu: float, personalize: PersonalizeConfig | None = None) -> None:
        super().__init__(cfg, personalize)
        self.mu = mu

    def local_update(self, model: FixedNet, task: FixedNet | None, ctx: LocalContext) -> LocalResult:  # noqa: ARG002
        weights = list(model.weights())
        anchor = [w.detach().clone() for w in weights]  # the global weights, as the client received them

        def proximal() -> None:
            """The gradient of (mu/2) ||w - w_global||^2, added to the loss's."""
            add_to_grads(weights, torch._foreach_sub([w.detach() for w in weights], anchor), self.mu)

        return self.train(model, ctx, proximal)


class FedProx(FedAvg):
    """FedProx: `federated.rounds` of FedAvg's training of `fedavg.architecture` with a proximal term."""

    name = "fedprox"
    sections = {"fedprox": FedProxConfig, "fedavg": FedAvgConfig}

    def phases(self) -> list[Phase]:
        cfg = self.cfg
        span = Span("train", "rounds", 0, cfg.federated.rounds)
        rule = FedProxLocal(cfg.fedavg, cfg.fedprox.mu, cfg.personalize)
        return [fedavg_phase(self, span, cfg.fedavg.architecture, rule)]
