"""The server optimizer (Reddi et al. 2021, "Adaptive Federated Optimization") as pure functions on flat
float64 vectors, and the small class that keeps its state between rounds.

The round's sample-weighted average `x_avg` is turned into a pseudo-gradient `delta = x_old - x_avg`
(over the aggregated *parameters*: weights and architecture logits alike), and the server takes one
step of an optimizer on it:

- `avg`: x = x_avg (plain federated averaging; no step is taken at all, so results are bit-identical to
  a loop without a server optimizer);
- `momentum` (FedAvgM): v = mu * v + delta;  x = x_old - lr * v;
- `adam` (FedAdam):    m = b1 * m + (1 - b1) * delta;  v = b2 * v + (1 - b2) * delta^2;
                       x = x_old - lr * m / (sqrt(v) + eps).

With lr 1 and mu 0, `momentum` is `avg` (to float64 rounding). The floating-point buffers (BN running
statistics) are not parameters and are always just averaged (`ServerOptimizer.step` leaves the tail of
the vector beyond the parameters as it is).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch

ServerKind = Literal["avg", "momentum", "adam"]


def pseudo_gradient(x_old: torch.Tensor, x_avg: torch.Tensor) -> torch.Tensor:
    """delta = x_old - x_avg: the direction the clients moved the model, negated (a gradient)."""
    return x_old - x_avg


def momentum_step(x_old: torch.Tensor, delta: torch.Tensor, v: torch.Tensor, lr: float,
                  momentum: float) -> tuple[torch.Tensor, torch.Tensor]:
    """FedAvgM: v' = momentum * v + delta; x' = x_old - lr * v'. Returns (x', v')."""
    v_new = momentum * v + delta
    return x_old - lr * v_new, v_new


def adam_step(x_old: torch.Tensor, delta: torch.Tensor, m: torch.Tensor, v: torch.Tensor, lr: float,
              betas: tuple[float, float], eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FedAdam: m' = b1 m + (1 - b1) delta; v' = b2 v + (1 - b2) delta^2; x' = x_old - lr m' / (sqrt(v') + eps).

    As in Reddi et al. (Algorithm 2), there is no bias correction of m and v (unlike Adam): the first
    steps are smaller by (1 - b1) / sqrt(1 - b2), and `eps` (their tau, 1e-3 by default) is an adaptivity
    floor, not a mere guard against division by zero. Returns (x', m', v').
    """
    b1, b2 = betas
    m_new = b1 * m + (1.0 - b1) * delta
    v_new = b2 * v + (1.0 - b2) * delta * delta
    return x_old - lr * m_new / (torch.sqrt(v_new) + eps), m_new, v_new


@dataclass
class ServerOptimizer:
    """The server optimizer of one phase and its state (flat float64 moment vectors, created at the first
    step). A new phase (a new model) starts a new one; the state goes into every checkpoint."""

    kind: ServerKind = "avg"
    lr: float = 1.0
    momentum: float = 0.9
    betas: tuple[float, float] = (0.9, 0.99)
    eps: float = 1e-3
    state: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)  # "v" (and "m" for adam)

    @property
    def active(self) -> bool:
        """False for `avg`: the loop writes the average unchanged."""
        return self.kind != "avg"

    def step(self, x_old: torch.Tensor, x_avg: torch.Tensor) -> torch.Tensor:
        """The new global vector: `x_avg` with its first `len(x_old)` entries (the parameters) replaced by
        the optimizer's step from `x_old`; the rest (float buffers) stays averaged.

        Args:
            x_old: the global parameters before the round, flat float64.
            x_avg: the round's average of every aggregated value (parameters, then float buffers).
        """
        if not self.active:
            return x_avg
        n = x_old.numel()
        delta = pseudo_gradient(x_old, x_avg[:n])
        if self.kind == "momentum":
            v = self.state.get("v", torch.zeros_like(delta))
            x_new, self.state["v"] = momentum_step(x_old, delta, v, self.lr, self.momentum)
        else:
            m, v = self.state.get("m", torch.zeros_like(delta)), self.state.get("v", torch.zeros_like(delta))
            x_new, self.state["m"], self.state["v"] = adam_step(x_old, delta, m, v, self.lr, self.betas, self.eps)
        out = x_avg.clone()
        out[:n] = x_new
        return out

    def state_dict(self) -> dict[str, Any]:
        return dict(self.state)

    def load_state_dict(self, state: dict[str, Any] | None, device: torch.device) -> None:
        self.state = {k: v.to(device=device, dtype=torch.float64) for k, v in (state or {}).items()}
