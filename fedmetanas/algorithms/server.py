"""The server's side of a round: what it receives (`RoundSums`), the aggregators and the server optimizer
(Reddi et al. 2021, "Adaptive Federated Optimization") as pure functions on flat float64 vectors, and the
small class that keeps the optimizer's state between rounds. An algorithm's phase picks among them in
`Phase.server_step` (in the style of Flower's `aggregate` functions) or writes its own.

Aggregators (from the round's client models x_k with sample counts n_k):

- `weighted_mean`: sum_k n_k x_k / sum_k n_k (FedAvg; the engine hands over the sums, never the rows);
- `coordinate_median`: per coordinate, the median of the x_k (Yin et al. 2018), unweighted;
- `trimmed_mean`: per coordinate, the mean after dropping the `beta` fraction of largest and of smallest
  values (Yin et al. 2018), unweighted.

The two robust ones need every client's vector: a phase that uses them declares `model_rows` and the
round's one all-reduce then carries one row per participant instead of the weighted sum.

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
Aggregator = Literal["mean", "median", "trimmed_mean"]


@dataclass
class RoundSums:
    """What the server step of a round receives, identical on every rank after the all-reduce.

    Slots are the round's participants in the order of `clients` (the sampled ids, ascending); a slot
    whose update was not finite is not `included` and its row is zero.
    """

    n: float  # sum of the included clients' sample counts
    clients: torch.Tensor  # (slots,) client ids
    weights: torch.Tensor  # (slots,) float64 sample count of each slot's client, 0 where not included
    included: torch.Tensor  # (slots,) bool
    num_clients: int  # clients in the federation (sampled or not)
    num_params: int  # the leading entries of a model vector that are parameters (the rest: BN buffers)
    old: torch.Tensor  # the global model before the round, flat float64 (parameters, then float buffers)
    model_sum: torch.Tensor | None = None  # sum_k n_k x_k, unless the phase declared model rows
    model_rows: torch.Tensor | None = None  # (slots, model size) x_k, where the phase declared them
    uploads: dict[str, torch.Tensor] = field(default_factory=dict)  # per declared Upload: its sum or rows

    def rows(self) -> torch.Tensor:
        """The included clients' model rows (model_rows must have been declared)."""
        if self.model_rows is None:
            raise ValueError("RoundSums.rows: the phase did not declare model_rows")
        return self.model_rows[self.included]


def weighted_mean(model_sum: torch.Tensor, n: float) -> torch.Tensor:
    """sum_k n_k x_k / sum_k n_k from the summed buffer (FedAvg's average)."""
    return model_sum / n


def coordinate_median(rows: torch.Tensor) -> torch.Tensor:
    """Per coordinate, the median of the rows (for an even count, the mean of the two middle values, as
    numpy's median; torch.median would take the lower one and bias it)."""
    if rows.shape[0] == 0:
        raise ValueError("coordinate_median: no rows")
    s = rows.sort(dim=0).values
    k = rows.shape[0]
    return s[k // 2] if k % 2 else (s[k // 2 - 1] + s[k // 2]) / 2


def trimmed_mean(rows: torch.Tensor, beta: float) -> torch.Tensor:
    """Per coordinate, the mean of the rows after dropping floor(beta * k) largest and as many smallest."""
    k = rows.shape[0]
    cut = int(beta * k)
    if not 0 <= beta < 0.5 or k - 2 * cut < 1:
        raise ValueError(f"trimmed_mean: beta {beta} leaves no value of {k}")
    return rows.sort(dim=0).values[cut:k - cut].mean(dim=0)


def aggregate(kind: Aggregator, sums: RoundSums, trim: float = 0.1) -> torch.Tensor:
    """The round's new model vector before any server optimizer, by the chosen aggregator."""
    if kind == "mean":
        if sums.model_sum is None:
            raise ValueError("aggregate: mean needs the summed model (the phase declared rows)")
        return weighted_mean(sums.model_sum, sums.n)
    return coordinate_median(sums.rows()) if kind == "median" else trimmed_mean(sums.rows(), trim)


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

    @classmethod
    def of(cls, fed: Any) -> "ServerOptimizer":
        """From the `federated` section's server_* fields."""
        return cls(fed.server_optimizer, fed.server_lr, fed.server_momentum, fed.server_betas, fed.server_eps)

    def state_dict(self) -> dict[str, Any]:
        return dict(self.state)

    def load_state_dict(self, state: dict[str, Any] | None, device: torch.device) -> None:
        self.state = {k: v.to(device=device, dtype=torch.float64) for k, v in (state or {}).items()}
