"""Per-FedAvg (Fallah et al. 2020), first order: FedMetaNAS's dual learner on a fixed architecture.

Meta-learning without architecture search. Each client runs `algorithm.local_steps` meta-steps: its task
learner adapts a copy of the weights for `algorithm.inner_steps` steps on support batches, and the meta
learner updates the client's weights with the task learner's gradient on a query batch (first-order
MAML; `algorithm.meta_update: reptile` for Reptile). After training, a client personalizes the global
model with the task learner's steps. The learner's settings are the `algorithm` section's, the same as
FedMetaNAS's, so the two differ only in the architecture search: the ablation that asks what the
search adds over meta-learning alone.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedmetanas.algorithms.base import Algorithm, Phase, Span
from fedmetanas.algorithms.fedmetanas import FedMetaNAS, dual_learner_batches, dual_learner_lr_scale
from fedmetanas.algorithms.phases import TrainPhase, check_fixed_net
from fedmetanas.config import Config, ConfigError, check_architecture


@dataclass(frozen=True)
class PerFedAvgConfig:
    """The network Per-FedAvg trains (the learner is the `algorithm` section's)."""

    architecture: str = "darts_v2"  # cnn (FedAvg paper's CNN), darts_v2, or a genotype string
    channels: int = 0  # cells' initial channels; 0: model.channels
    layers: int = 0  # cells; 0: model.layers

    def check(self) -> None:
        check_architecture("perfedavg.architecture", self.architecture)


class PerFedAvg(Algorithm):
    """Per-FedAvg: `federated.rounds` of first-order MAML on `perfedavg.architecture`."""

    name = "perfedavg"
    sections = {"perfedavg": PerFedAvgConfig}

    @classmethod
    def validate(cls, cfg: Config) -> None:
        check_fixed_net("perfedavg", cfg)
        if cfg.algorithm.plain_after_fraction < 1:  # plain steps on a fixed net are FedAvg, not Per-FedAvg
            raise ConfigError(
                f"algorithm.plain_after_fraction: {cfg.algorithm.plain_after_fraction} is FedMetaNAS's; Per-FedAvg "
                "takes meta-steps every round (plain steps would make it FedAvg); set plain_after_fraction: 1")
        if cfg.algorithm.meta_state == "kept":
            raise ConfigError("algorithm.meta_state: kept is FedMetaNAS's search's (a client's meta Adam state between "
                              "rounds); Per-FedAvg's clients keep none; set meta_state: fresh")

    def batch_sizes(self) -> list[tuple[str, int, int]]:
        return dual_learner_batches(self.cfg.algorithm)

    def phases(self) -> list[Phase]:
        cfg, p = self.cfg, self.cfg.perfedavg
        span = Span("train", "rounds", 0, cfg.federated.rounds)
        return [TrainPhase(cfg, span, FedMetaNAS(cfg.algorithm), architecture=p.architecture,
                           lr_scale=dual_learner_lr_scale(cfg.algorithm, cfg.federated.rounds),
                           base_lr=cfg.algorithm.inner_lr_w, channels=p.channels, layers=p.layers,
                           needs_task=True)]
