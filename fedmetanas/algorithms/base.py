"""What an algorithm is to the round loop: a list of phases, each a span of rounds with one kind of model.

The loop (`federated/loop.py`) never learns an algorithm's name. It asks the current phase for its
model, the round's hyper-parameters (`RoundPlan`), one client's local update, what clients upload and
keep across rounds, the server step from the round's sums, what to evaluate, what to log, how to
personalize and what to save. In the
spirit of Flower's Strategy and pfl-research's Algorithm, but split by phase because one algorithm
(FedNAS) searches and then retrains a different network on the same round counter.

A new algorithm is one file in `algorithms/` with an `Algorithm` subclass and a line in the registry
(`algorithms/__init__.py`); `docs/extending.md` walks through Per-FedAvg's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from fedmetanas.algorithms.batched import StackedUpdate
from fedmetanas.algorithms.common import Forward, LocalContext, LocalResult
from fedmetanas.algorithms.server import RoundSums, ServerOptimizer, aggregate
from fedmetanas.config import Config
from fedmetanas.data.datasets import TensorSplit
from fedmetanas.search.genotypes import Genotype
from fedmetanas.search.relax import RelaxMode


@dataclass(frozen=True)
class Span:
    """Where a phase sits on the run's round counter, and the HDF5 table its rows go to."""

    kind: Literal["search", "train"]
    group: str  # HDF5 table: /rounds, or /retrain for a second phase
    first: int  # first round (global counter)
    rounds: int

    @property
    def end(self) -> int:
        return self.first + self.rounds


@dataclass(frozen=True)
class RoundPlan:
    """A round's hyper-parameters, the same on every rank and every client."""

    tau: float = math.nan  # relaxation temperature; NaN where the phase has no relaxation
    lr_scale: float = 1.0  # factor on the weights' learning rates (the phase's schedule)
    relax_mode: RelaxMode = "expected"  # how a client samples the architecture (ignored by fixed nets)
    train_arch: bool = True  # False: the architecture logits stay frozen this round (a warm-up)
    soft_topk: int = 0  # `soft` computes only the k ops per edge of largest perturbed logit (0: all)
    soft_eps: float = 0.0  # `soft` skips ops whose relaxed weight is below this (0: none)
    round: int = -1  # the global round this plan is for (-1: not a round, e.g. a default plan)


@dataclass
class PhaseOutcome:
    """What a phase hands to the next one (and to the final record): its genotype and a summary."""

    genotype: Genotype | None
    summary: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelInputs:
    """The dataset facts a model is built from (identical on every rank)."""

    in_channels: int
    num_classes: int
    image_size: int

    @classmethod
    def of(cls, split: TensorSplit) -> "ModelInputs":
        return cls(split.in_channels, split.num_classes, split.image_size)


Artifact = str | dict[str, Any]  # a text file's content, or a dict for torch.save


@dataclass(frozen=True)
class Upload:
    """A value each client sends beside its model (`LocalResult.uploads[name]`, `size` numbers), carried by
    the round's one all-reduce: `sum` adds it over the round's clients, `weighted` adds it times the
    client's sample count, `rows` keeps one row per participant (`RoundSums.uploads[name]`, slots x size)."""

    name: str
    size: int
    reduce: Literal["sum", "weighted", "rows"] = "sum"


class PhaseReport:
    """What a phase shows of itself, apart from what it computes: the log's per-round values and model
    facts, the console lines, the final record and the files of the run directory. Nothing here changes
    a number of the run; a phase may take these defaults and write only the computation (`Phase`)."""

    def model_attrs(self, model: nn.Module) -> dict[str, Any]:
        """Facts about the model for the log's attributes (primitives, nodes, num_params)."""
        return {"primitives": [], "nodes": 0, "num_params": sum(p.numel() for p in model.weights())}

    def record(self, model: nn.Module, plan: RoundPlan) -> dict[str, Any]:  # noqa: ARG002
        """Extra per-round values for the log (the architecture's state). Default: none."""
        return {}

    def describe_round(self, row: dict[str, Any], mean_loss: float) -> str:
        """The middle of the console line of a round."""
        return f"train  loss {mean_loss:.3f}  acc {row['discrete_acc']:.4f}"

    def final_record(self, metrics: dict[str, float], previous: PhaseOutcome | None,
                     elapsed: float) -> dict[str, Any]:
        """The final metrics plus what the log's /final keeps of earlier phases (the shipped phases add a
        search's `supernet_acc`, `supernet_loss`, `search_seconds`: docs/hdf5.md). Default: the metrics."""
        return dict(metrics)

    def describe_final(self, final: dict[str, Any]) -> list[str]:
        """What the command line prints about the final model (`final` holds the final record and
        `genotype`, the architecture's text). Default: every evaluated accuracy."""
        return [f"final {k}: {v:.4f}" for k, v in final.items() if k.endswith("_acc")]

    def arch_text(self, model: nn.Module, plan: RoundPlan) -> str:
        """The final architecture as text (genotype.txt). Default: the model's class name."""
        return type(model).__name__

    def artifacts(self, model: nn.Module, plan: RoundPlan, last: bool) -> dict[str, Artifact]:
        """Files to write (rank 0) into the run directory at the end of the phase; `last`: of the run."""
        return {}


class Phase(PhaseReport):
    """One span of rounds with one kind of model: what it computes (its presentation: `PhaseReport`).
    Subclasses implement the methods that raise.

    A phase object lives for the whole run; `enter` is called when its rounds begin (or when a resume
    lands in it) with the previous phase's outcome, and must leave it ready to `build_model`.
    """

    needs_task: ClassVar[bool] = True  # a second replica per lane for a task learner

    def __init__(self, cfg: Config, span: Span) -> None:
        self.cfg, self.span = cfg, span
        self.server = ServerOptimizer.of(cfg.federated)  # its state goes into every checkpoint

    # -- set-up ----------------------------------------------------------------------------------
    def enter(self, previous: PhaseOutcome | None) -> None:
        """Receive the previous phase's outcome (None for the first phase)."""

    def build_model(self, inputs: ModelInputs) -> nn.Module:
        """A fresh global model, identical on every rank (seeded; built on the CPU)."""
        raise NotImplementedError

    def on_model(self, model: nn.Module) -> None:
        """Called once the phase's global model exists (e.g. to create pruning masks)."""

    # -- one round -------------------------------------------------------------------------------
    def round_plan(self, rnd: int) -> RoundPlan:
        """The hyper-parameters of global round `rnd`."""
        return RoundPlan()

    def masks(self) -> Any:
        """The architecture masks clients search under (None: a fixed architecture)."""
        return None

    def local_update(self, model: nn.Module, task: nn.Module | None, ctx: LocalContext) -> LocalResult:
        """One client's local work: `model` holds the global parameters on entry, the client's after."""
        raise NotImplementedError

    def batch_refusal(self) -> str | None:
        """None where this phase's clients can be stepped together by `local_update_batch`
        (`runtime.client_batch`); else why not. Default: it has no batched form."""
        return f"{type(self).__name__} has no batched form"

    def batches_clients(self, plan: RoundPlan) -> bool:  # noqa: ARG002
        """Whether this round's clients can be stepped together (every relaxation can: `search.stacked`)."""
        return self.batch_refusal() is None

    def local_update_batch(self, model: nn.Module, ctxs: list[LocalContext]) -> StackedUpdate:
        """Several clients' local work as one batched computation, all from `model`'s parameters (which stay
        as they are); results equal `local_update`'s client by client to float rounding."""
        raise NotImplementedError

    # -- what clients send, what they keep, what the server does with it ---------------------------
    def uploads(self) -> tuple[Upload, ...]:
        """Values each client sends beside its model (e.g. SCAFFOLD's control-variate change). Default: none."""
        return ()

    def client_state(self) -> dict[str, int]:
        """State each client keeps across rounds (name -> number of values, zeros at first): handed to its
        update in `LocalContext.state`, replaced by `LocalResult.state`. The engine keeps every client's
        state on every rank (so it does not matter which rank hosts a client) and in every checkpoint.
        Default: none."""
        return {}

    @property
    def model_rows(self) -> bool:
        """Whether `server_step` needs every participant's model (`RoundSums.model_rows`) rather than their
        sample-weighted sum: the robust aggregators do. Default: as `federated.aggregator` says."""
        return self.cfg.federated.aggregator != "mean"

    def server_step(self, sums: RoundSums, plan: RoundPlan) -> torch.Tensor:  # noqa: ARG002
        """The new global model vector (flat float64: parameters, then float buffers) from the round's sums.
        Default: `federated.aggregator`, then the server optimizer (`federated.server_optimizer`) on the
        parameters; float buffers (BN statistics) are only aggregated."""
        f = self.cfg.federated
        new = aggregate(f.aggregator, sums, f.trim_fraction)
        return self.server.step(sums.old[:sums.num_params], new) if self.server.active else new

    def server_update(self, model: nn.Module, plan: RoundPlan) -> None:
        """After the new global model is written (e.g. pruning). Default: nothing."""

    def end_early(self, rnd: int, row: dict[str, Any]) -> bool:  # noqa: ARG002
        """Asked once after every round of the phase (`row`: its log row), on every rank alike: True ends
        the phase at this round when a later phase exists (the loop moves the later phases' spans to
        start at the next round). Keeps any state it needs in `state_dict`. Default: never."""
        return False

    eval_names: ClassVar[tuple[str, ...]] = ("discrete",)

    def forwards(self, model: nn.Module, plan: RoundPlan) -> dict[str, Forward]:  # noqa: ARG002
        """What to evaluate, by name (`eval_names`, in order): each gives `{name}_loss` and `{name}_acc`."""
        return {"discrete": model}

    # -- end of the phase / of the run -------------------------------------------------------------
    def outcome(self, model: nn.Module, plan: RoundPlan, last_row: dict[str, Any]) -> PhaseOutcome:
        """What the next phase starts from."""
        raise NotImplementedError

    def final_forward(self, model: nn.Module, plan: RoundPlan) -> Forward:  # noqa: ARG002
        """The run's final model as a function (evaluated at the end, and before personalization)."""
        return model

    # -- personalization -------------------------------------------------------------------------
    def personalize_base_lr(self) -> float:
        """The weights' learning rate `personalize.lr` is relative to."""
        raise NotImplementedError

    def personalize(self, model: nn.Module, task: nn.Module | None, ctx: LocalContext, steps: int) -> Forward:
        """Adapt (a client's copy of) the final model on the client's data; return the adapted model."""
        raise NotImplementedError

    # -- checkpoint ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Phase state beyond the model (masks, counters) for checkpoints."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` saved."""


class Algorithm:
    """A registered algorithm: its name, the config sections it owns, and its phases."""

    name: ClassVar[str]
    # Config sections this algorithm declares (YAML key -> frozen dataclass); several algorithms may
    # list the same section (FedNAS retrains with the fedavg section).
    sections: ClassVar[dict[str, type]] = {}

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg

    @classmethod
    def validate(cls, cfg: Config) -> None:
        """Checks across its sections and the model's, at config load (raise ConfigError). Default: none."""

    def batch_sizes(self) -> list[tuple[str, int, int]]:
        """(field, batch size, share of a client's local train split it draws from) of every batch the
        run draws, checked against the clients' splits once they exist (`check_batch_sizes`)."""
        return []

    def phases(self) -> list[Phase]:
        """The phases in order, with their spans on the round counter."""
        raise NotImplementedError
