"""SCAFFOLD (Karimireddy et al. 2020, "Stochastic Controlled Averaging for Federated Learning"), option II
control variates, on a fixed architecture: each client's steps are corrected for its drift from the others.

The server keeps a control variate c, each client i its own c_i (zeros at first). A client's update from
the global weights x: K plain SGD steps y <- y - lr (g(y) - c_i + c); then c_i+ = c_i - c + (x - y)/(K lr),
and it uploads delta_c = c_i+ - c_i. The server: the model as for every algorithm, then
c <- c + (1/N) sum over the round's clients of delta_c (N: all clients, `RoundSums.num_clients`).

Choices:

- **Plain SGD, no momentum**, as in the paper: option II's (x - y)/(K lr) is the mean of the steps'
  directions only for plain steps. The rates are the `scaffold` section's (cosine from `lr` to `lr_min`
  over the rounds): plain SGD at FedAvg's 0.025 would move ~5x less in 15 steps than FedAvg's SGD with
  momentum 0.9 does. The network, steps, batch, weight decay, clipping and personalization are the
  `fedavg` section's; `fedavg.momentum` does not apply.
- g is the clipped loss gradient plus weight decay (part of every client's objective); the correction
  c - c_i is added after clipping, so c_i+ is exactly the mean of the client's own step directions.
- **The model's server step is the engine's default** (`federated.aggregator`: the sample-weighted mean,
  then `federated.server_optimizer`). The paper takes x <- x + eta_g * (unweighted mean of y - x); the
  sample-weighted mean with eta_g = 1 is what FedAvg and FedProx do here, so a comparison differs only in
  the correction. eta_g != 1: `federated.server_optimizer: momentum`, `server_momentum: 0`,
  `server_lr: eta_g`.
- c is the phase's (float32, as the parameters; in checkpoints under `scaffold_server_c`), handed to the
  rule as `ScaffoldLocal.c`: the server step runs alike on every rank, so every rank's c is the same.
  c_i is client state (`Phase.client_state`): the engine keeps every client's on every rank and in every
  checkpoint, so a client may run on any rank in any round.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from fedmetanas.algorithms.base import Phase, RoundPlan, Span, Upload
from fedmetanas.algorithms.common import LocalContext, LocalResult, add_to_grads
from fedmetanas.algorithms.fedavg import FedAvg, FedAvgConfig, FedAvgLocal, fedavg_phase
from fedmetanas.algorithms.phases import TrainPhase
from fedmetanas.algorithms.server import RoundSums
from fedmetanas.config import ConfigError, PersonalizeConfig
from fedmetanas.search.discrete import FixedNet

CONTROL = "c"  # the client state: c_i
DELTA = "delta_c"  # the upload: c_i+ - c_i
SERVER_KEY = "scaffold_server_c"  # the server's c in a checkpoint (beside 'model', 'client_state', ...)


@dataclass(frozen=True)
class ScaffoldConfig:
    """SCAFFOLD's plain-SGD learning rates; the rest of its training is the `fedavg` section's."""

    lr: float = 0.1
    lr_min: float = 0.004  # cosine over the rounds

    def check(self) -> None:
        for name in ("lr", "lr_min"):
            value = getattr(self, name)
            if not value > 0:
                raise ConfigError(f"scaffold.{name}: {value!r} is out of range; use a number > 0 (the control "
                                  "variate is (x - y) / (local_steps * lr))")


def _flat(weights: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([w.detach().reshape(-1) for w in weights])


class ScaffoldLocal(FedAvgLocal):
    """Plain SGD corrected by the control variates (`cfg.momentum` must be 0: `Scaffold` sets it); returns
    the client's new c_i as its state and the change as its upload."""

    def __init__(self, cfg: FedAvgConfig, personalize: PersonalizeConfig | None = None) -> None:
        super().__init__(cfg, personalize)
        self.c: torch.Tensor | None = None  # the server's control variate, set by the phase (flat, float32)

    def local_update(self, model: FixedNet, task: FixedNet | None, ctx: LocalContext) -> LocalResult:  # noqa: ARG002
        weights = list(model.weights())
        x, c_i = _flat(weights), ctx.state[CONTROL]
        correction = [t.view_as(w) for t, w in zip((self.c - c_i).split([w.numel() for w in weights]), weights)]
        result = self.train(model, ctx, lambda: add_to_grads(weights, correction))
        lr = self.cfg.lr * ctx.lr_scale
        c_new = c_i - self.c + (x - _flat(weights)) / (self.cfg.local_steps * lr)
        result.uploads, result.state = {DELTA: c_new - c_i}, {CONTROL: c_new}
        return result


class ScaffoldPhase(TrainPhase):
    """A fixed network trained by `ScaffoldLocal`; keeps the server's control variate c."""

    rule: ScaffoldLocal

    def on_model(self, model: FixedNet) -> None:
        self.size = sum(w.numel() for w in model.weights())
        self.rule.c = torch.zeros(self.size, device=next(model.parameters()).device)

    def uploads(self) -> tuple[Upload, ...]:
        return (Upload(DELTA, self.size, "sum"),)

    def client_state(self) -> dict[str, int]:
        return {CONTROL: self.size}

    def server_step(self, sums: RoundSums, plan: RoundPlan) -> torch.Tensor:
        """The model by the default step; c <- c + (1/N) sum of the clients' delta_c (one float32 rounding)."""
        new = super().server_step(sums, plan)
        c = self.rule.c
        self.rule.c = (c.to(torch.float64) + sums.uploads[DELTA].to(c.device) / sums.num_clients).to(c.dtype)
        return new

    def state_dict(self) -> dict[str, Any]:
        return {SERVER_KEY: self.rule.c.cpu()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state.get(SERVER_KEY)
        if saved is None:
            return
        if saved.shape != self.rule.c.shape:
            raise ValueError(f"{SERVER_KEY}: checkpoint {tuple(saved.shape)}, run {tuple(self.rule.c.shape)}")
        self.rule.c = saved.to(self.rule.c)


class Scaffold(FedAvg):
    """SCAFFOLD: `federated.rounds` of drift-corrected plain SGD on `fedavg.architecture`."""

    name = "scaffold"
    sections = {"scaffold": ScaffoldConfig, "fedavg": FedAvgConfig}

    def phases(self) -> list[Phase]:
        cfg, s = self.cfg, self.cfg.scaffold
        span = Span("train", "rounds", 0, cfg.federated.rounds)
        settings = dataclasses.replace(cfg.fedavg, lr=s.lr, lr_min=s.lr_min, momentum=0.0)
        return [fedavg_phase(self, span, cfg.fedavg.architecture, ScaffoldLocal(settings, cfg.personalize),
                             ScaffoldPhase)]
