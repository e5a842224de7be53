"""Typed, frozen run configuration loaded from YAML, with one-line errors a user can act on.

YAML is data: `build_config` maps it onto the dataclasses below, rejects unknown keys (naming the
nearest valid one), checks types and ranges, and `to_dict` gives back the resolved config that
is stored in every log and checkpoint. This module holds the core sections; each algorithm declares
its own next to it, and `fedmetanas.configure` (`load_config`, `config_from_dict`) joins the two, so
that this module never imports the algorithms, which read it.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A user-caused configuration problem; the message names the field and the fix."""


# The lowest Gumbel-softmax temperature accepted: softmax(logits / tau) below it overflows float32 (or is
# one-hot with zero gradients), so every client update turns non-finite (docs/errors.md).
TAU_FLOOR = 1e-3
# The shortest collective timeout accepted: it also bounds the rendezvous and each round's wait for the
# slowest rank, so a smaller one fails every run at start-up and blames the network.
MIN_COLLECTIVE_TIMEOUT_S = 5.0
# derive_seed mixes the seed as a 32-bit value: a wider one would silently alias another seed.
MAX_SEED = 2**32 - 1
# Longest file name (one path part, in bytes) on the usual file systems (ext4, xfs, btrfs, tmpfs: NAME_MAX).
NAME_MAX = 255


PrimitiveSet = Literal["darts", "metanas"]


@dataclass(frozen=True)
class DataConfig:
    """Which dataset, where it lives, and how it is split over clients."""

    name: Literal["fashion_mnist", "mnist", "cifar10", "cifar100", "digits"] = "fashion_mnist"
    root: str = "data"
    download: bool = False
    partition: Literal["iid", "dirichlet", "shards"] = "dirichlet"
    dirichlet_alpha: float = 0.5
    min_samples: int = 20
    shards_per_client: int = 2
    local_test_fraction: float = 0.2
    augment: bool = False


@dataclass(frozen=True)
class ModelConfig:
    """DARTS-style supernet shape."""

    primitives: PrimitiveSet | tuple[str, ...] = "metanas"
    channels: int = 8
    layers: int = 3
    nodes: int = 3
    stem_multiplier: int = 3
    stem_stride: int = 1  # 2 halves the resolution before the cells: ~3x cheaper steps on a CPU
    reduction_layers: tuple[int, ...] | None = None  # None: DARTS's layers//3 and 2*layers//3
    channels_last: bool = True
    # batch: DARTS's BatchNorm; group: GroupNorm of `norm_groups` groups in every network (search and final),
    # no batch statistics to skew (fedmetanas/search/norms.py; measured in docs/results.md).
    norm: Literal["batch", "group"] = "batch"
    norm_groups: int = 2


@dataclass(frozen=True)
class SearchConfig:
    """Relaxation of the architecture and soft pruning."""

    gumbel: Literal["hard", "soft"] = "hard"
    input_mode: Literal["pairs", "all"] = "pairs"
    tau_max: float = 1.0
    tau_min: float = 0.1
    tau_schedule: Literal["linear", "exponential", "cosine"] = "linear"
    anneal_fraction: float = 1.0  # tau reaches tau_min after this fraction of the rounds, then stays
    pair_prune_threshold: float = 0.01
    op_prune_threshold: float = 0.01
    alpha_init_std: float = 1e-3
    # Warm-up (MetaNAS freezes the architecture for its first epochs): the first fraction of the rounds
    # trains only the weights, the logits frozen, paths drawn by `warmup_gumbel` (hard: one uniformly
    # sampled path per step, cheap); annealing and pruning start after it.
    warmup_fraction: float = 0.0
    warmup_gumbel: Literal["hard", "soft"] = "hard"
    # Hybrid relaxation: from this fraction of the rounds on, hard sampling (1: never switch).
    hard_after_fraction: float = 1.0
    # Cheaper soft relaxation: per edge compute only the `soft_topk` ops with the largest perturbed
    # logits (0: all) and skip ops whose relaxed weight is below `soft_eps` (0: none).
    soft_topk: int = 0
    soft_eps: float = 0.0
    # Evidence-based pruning: an entry is masked only after its annealed probability stayed below the
    # threshold for `prune_patience` consecutive rounds, and never before `prune_start_fraction` of the rounds.
    prune_patience: int = 1
    prune_start_fraction: float = 0.0


@dataclass(frozen=True)
class AlgorithmConfig:
    """Which algorithm runs (`name`, one of the registry's: `fedmetanas.algorithms.ALGORITHMS`), and the
    dual learner (task + meta learner) that FedMetaNAS searches with and Per-FedAvg trains with. Other
    algorithms' settings are in their own sections (fednas, fedavg, ...), declared next to them."""

    name: str = "fedmetanas"
    meta_update: Literal["fomaml", "reptile"] = "fomaml"
    local_steps: int = 10
    inner_steps: int = 3
    batch_size: int = 32
    query_batch_size: int = 32
    inner_lr_w: float = 3e-3
    inner_lr_alpha: float = 3e-3
    inner_betas: tuple[float, float] = (0.0, 0.999)
    meta_optimizer: Literal["adam", "sgd"] = "adam"
    # The architecture logits' meta optimizer: "same" as the weights', or its own (DARTS: SGD with momentum
    # for the weights, Adam for the logits; docs/method.md).
    meta_optimizer_alpha: Literal["same", "adam", "sgd"] = "same"
    # The meta optimizer's state: "fresh" every round (clients keep no state), or "kept" by each client from
    # its last round to its next (Adam's moments and step counts: client state of 2x the parameters).
    meta_state: Literal["fresh", "kept"] = "fresh"
    meta_momentum: float = 0.0  # the sgd meta optimizer's momentum
    meta_lr_w: float = 3e-3
    meta_lr_alpha: float = 3e-3
    reptile_lr_w: float = 1.0
    reptile_lr_alpha: float = 0.6
    weight_decay: float = 0.0
    grad_clip: float = 5.0
    lr_schedule: Literal["constant", "cosine"] = "constant"  # per round, on the weights' learning rates
    lr_min_factor: float = 0.05  # cosine ends at this fraction of the initial rates (DARTS: 0.001/0.025)
    # The weights' rates ramp up linearly over this fraction of the rounds (0: no warm-up), then follow
    # lr_schedule over the rest: a large momentum-SGD meta rate need not hit a fresh supernet at full size.
    lr_warmup_fraction: float = 0.0
    # From this fraction of the rounds on (1: never), FOMAML's clients take plain steps in place of meta-steps:
    # the meta optimizer on support batches, (inner_steps + 1) of them per meta-step, so a round makes the
    # same forward-backward passes and every pass moves the client's parameters (docs/method.md).
    plain_after_fraction: float = 1.0

    @property
    def alpha_optimizer(self) -> Literal["adam", "sgd"]:
        """The meta optimizer of the architecture logits (`meta_optimizer_alpha`, "same": the weights')."""
        return self.meta_optimizer if self.meta_optimizer_alpha == "same" else self.meta_optimizer_alpha

    def check(self) -> None:
        if self.meta_state == "kept" and (self.meta_update, self.meta_optimizer, self.alpha_optimizer) != (
                "fomaml", "adam", "adam"):
            raise ConfigError(
                f"algorithm.meta_state: kept is the FOMAML meta learner's Adam state (here meta_update: "
                f"{self.meta_update}, meta_optimizer: {self.meta_optimizer}, meta_optimizer_alpha: "
                f"{self.meta_optimizer_alpha}); set meta_state: fresh, or meta_update: fomaml and both meta "
                "optimizers adam")
        if self.plain_after_fraction < 1 and self.meta_update != "fomaml":
            raise ConfigError(
                f"algorithm.plain_after_fraction: {self.plain_after_fraction} needs algorithm.meta_update: fomaml "
                f"(Reptile's steps are plain already); set plain_after_fraction: 1 or meta_update: fomaml")


@dataclass(frozen=True)
class PersonalizeConfig:
    """After training, each client adapts the global model on its local train split and is tested on
    its local test split: FedMetaNAS by Adam on the weights of the final discrete net (`adapt`), the
    baselines by SGD fine-tuning of the weights (momentum 0.9), each at the weights' learning rate of its
    last training round unless `lr` is set."""

    steps: int = 5  # 0: skip personalization
    # FedMetaNAS (a supernet) only. "discrete": Adam on the weights of the global final discrete net, its
    # genotype and logits frozen: the searched net is the one used. "supernet": the task learner on weights
    # and logits, the client's net re-derived from its adapted logits (the old rule; it can swap an op for
    # weights trained at low probability; where pruning left one op per edge, as in the default, the two agree).
    adapt: Literal["discrete", "supernet"] = "discrete"
    # FedMetaNAS's discrete adaptation: BN normalizes with the global running statistics and keeps them
    # ("frozen", eval mode) or with each batch's, updating them ("batch"). Measured (docs/results.md, issue
    # 23): "batch" lowered 5 of 10 MNIST Dirichlet-0.1 clients (98.1% -> 81.8% for a client of one class).
    bn: Literal["frozen", "batch"] = "frozen"
    # FedMetaNAS's discrete adaptation: this fraction of a client's train split is held out (never its test
    # split); a client keeps the global weights unless the adapted ones do better there (`holdout_z`).
    # 0: always adapt on the whole train split.
    holdout: float = 0.2
    # How much better: by at least this many standard errors of McNemar's paired test on the held-out
    # samples the two nets disagree on (1.645: one-sided 5%); 0: whenever they are at least as accurate.
    holdout_z: float = 1.645
    lr: float = 0.0  # weights' learning rate of the adaptation; 0: the algorithm's rate in its last round
    batch_size: int = 32  # the baselines' batches (FedMetaNAS uses algorithm.batch_size)
    # At most this many clients personalize (0: all): a seeded uniform sample of the clients with a local test
    # split, the same on any rank count. Every client of a run of up to 100 does; 10,000 would take hours.
    max_clients: int = 100


@dataclass(frozen=True)
class FederatedConfig:
    """Clients, participation and rounds."""

    num_clients: int = 8
    clients_per_round: int = 0  # 0: use participation
    participation: float = 1.0
    rounds: int = 20
    seed: int = 0
    nonfinite: Literal["exclude", "stop"] = "exclude"  # a client update with NaN/Inf: drop it, or stop
    # The server's step on the round's average (Reddi et al. 2021; fedmetanas/algorithms/server.py):
    # avg = the plain sample-weighted average; momentum = FedAvgM; adam = FedAdam (no bias correction).
    server_optimizer: Literal["avg", "momentum", "adam"] = "avg"
    server_lr: float = 1.0
    server_momentum: float = 0.9  # FedAvgM's mu
    server_betas: tuple[float, float] = (0.9, 0.99)  # FedAdam's beta1, beta2
    server_eps: float = 1e-3  # FedAdam's tau (adaptivity floor)
    # How the round's client models are combined before the server optimizer's step: mean = sample-weighted
    # (FedAvg); median / trimmed_mean = per coordinate, unweighted (robust to outlying clients; the round's
    # all-reduce then carries every participant's model, clients_per_round x the model's size).
    aggregator: Literal["mean", "median", "trimmed_mean"] = "mean"
    trim_fraction: float = 0.1  # trimmed_mean: the share of largest and of smallest values dropped, each
    # Stop at the first round boundary where the run's training time (wall time minus the rounds'
    # evaluation time) reaches this many seconds, and finalize as if that round were the last; 0: no budget.
    time_budget_s: float = 0.0

    def check(self) -> None:
        check_betas("federated.server_betas", self.server_betas)


@dataclass(frozen=True)
class EvalConfig:
    """How often and on how much of the test set the global model is evaluated."""

    every: int = 1
    subset: int = 2000  # 0: the full test set every time
    batch_size: int = 500
    final_full: bool = True


@dataclass(frozen=True)
class RuntimeConfig:
    """Where and how each rank computes."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads_per_rank: int = 1
    collective_timeout_s: float = 600.0
    streams_per_rank: int = 1  # concurrent clients per rank on a GPU (one CUDA stream each); 1 on a CPU
    # Clients stepped together as one batched computation (docs/batched.md): every relaxation of a FedMetaNAS
    # search (search/stacked.py) and fixed networks (torch.func). auto: on a GPU as many as memory holds, on
    # a CPU one after another (measured faster there); 1: always one after another; K: batches of K.
    client_batch: int | Literal["auto"] = "auto"
    # The local step's arithmetic compiled once per shape and replayed (docs/batched.md, the captured step):
    # compile (torch.compile, inductor), graphs (plus CUDA graphs: CUDA only), off. auto: off on a CPU (it did
    # not pay there: measured) and, until measured on a GPU, off there too.
    capture: Literal["auto", "off", "compile", "graphs"] = "auto"
    # GPU id for each local rank (index into the visible GPUs); None: local rank % visible GPUs
    devices: tuple[int, ...] | None = None
    # Bit-identical results on a GPU whatever the number of lanes: deterministic cuDNN/cuBLAS kernels, no
    # TF32, clients assigned to lanes by a fixed rule (docs/reliability.md). False: PyTorch's defaults.
    deterministic: bool = True
    # Where the other ranks reach rank 0's rendezvous store (overrides MASTER_ADDR); None: derived
    master_addr: str | None = None


@dataclass(frozen=True)
class OutputConfig:
    """Where a run writes its files."""

    dir: str = "runs"
    name: str = "default"
    overwrite: bool = False
    resume: bool = False  # continue from the newest valid checkpoint in the run directory, if any


@dataclass(frozen=True)
class CheckpointConfig:
    """How often the server state is saved (also on SIGTERM / SIGUSR1), and how many are kept."""

    every: int = 1  # rounds; 0 = only on a signal and at the end
    keep: int = 2


@dataclass(frozen=True)
class Config:
    """The whole resolved configuration of one run: the core sections below and the sections of the
    algorithm that runs, nothing else, so that it says exactly what determines the run.

    `Config()` holds the core defaults and no algorithm section: the default run while the default
    algorithm (fedmetanas) declares none. `fedmetanas.configure` builds configs with the registry's
    sections (`load_config`, `config_from_dict`, `default_config`)."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    personalize: PersonalizeConfig = field(default_factory=PersonalizeConfig)
    federated: FederatedConfig = field(default_factory=FederatedConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    # The active algorithm's own sections (FedNAS: fednas, fedavg) by YAML key: read them as attributes
    # (`cfg.fednas`). Other algorithms' sections are checked when a config is loaded but not kept.
    sections: dict[str, Any] = field(default_factory=dict)

    def __getattr__(self, name: str) -> Any:
        sections = self.__dict__.get("sections")
        if sections is not None and name in sections:
            return sections[name]
        algorithm = self.__dict__.get("algorithm")
        held = ""
        if sections is not None and algorithm is not None:  # not while copy or pickle rebuilds the object
            held = (f" (a config holds only its algorithm's sections; {algorithm.name!r} has "
                    f"{', '.join(sections) or 'none'})")
        raise AttributeError(f"{type(self).__name__!r} has no attribute or config section {name!r}{held}")


def all_sections(algorithm_sections: typing.Mapping[str, type]) -> dict[str, type]:
    """Every top-level config section (YAML key -> dataclass) in the order of a resolved config file: the
    core ones, and `algorithm_sections` (the algorithms' own) after `algorithm`."""
    hints = typing.get_type_hints(Config)
    out: dict[str, type] = {}
    for f in dataclasses.fields(Config):
        if f.name == "sections":
            continue
        out[f.name] = hints[f.name]
        if f.name == "algorithm":
            out.update(algorithm_sections)
    return out


# ---------------------------------------------------------------------------------------------
# Range checks: (section, field) -> (predicate, what the value must be)
Range = tuple[typing.Callable[[Any], bool], str]  # (predicate, what the value must be)
AT_LEAST_1: Range = (lambda v: v >= 1, "an integer >= 1")
NON_NEGATIVE: Range = (lambda v: v >= 0, "a number >= 0")

# The core sections' ranges. An algorithm's section declares its own next to it, as a class attribute
# `ranges: ClassVar[dict[str, Range]]` (field -> range), read by the same check.
_RANGES: dict[tuple[str, str], Range] = {
    ("data", "dirichlet_alpha"): (lambda v: v > 0, "a number > 0 (smaller is more non-IID)"),
    ("data", "min_samples"): (lambda v: v >= 1, "an integer >= 1"),
    ("data", "shards_per_client"): (lambda v: v >= 1, "an integer >= 1"),
    ("data", "local_test_fraction"): (lambda v: 0 <= v < 1, "a fraction in [0, 1)"),
    ("model", "channels"): (lambda v: v >= 1, "an integer >= 1"),
    ("model", "layers"): (lambda v: v >= 1, "an integer >= 1"),
    ("model", "nodes"): (lambda v: v >= 1, "an integer >= 1"),
    ("model", "stem_multiplier"): (lambda v: v >= 1, "an integer >= 1"),
    ("model", "stem_stride"): (lambda v: v in (1, 2), "1 or 2"),
    ("model", "norm_groups"): (lambda v: v >= 1, "an integer >= 1 (GroupNorm's groups)"),
    ("search", "tau_max"): (lambda v: v >= TAU_FLOOR, f"a number >= {TAU_FLOOR:g} (lower overflows the softmax)"),
    ("search", "tau_min"): (lambda v: v >= TAU_FLOOR, f"a number >= {TAU_FLOOR:g} (lower overflows the softmax)"),
    ("search", "anneal_fraction"): (lambda v: 0 < v <= 1, "a fraction in (0, 1]"),
    ("search", "pair_prune_threshold"): (lambda v: 0 <= v < 1, "a probability in [0, 1)"),
    ("search", "op_prune_threshold"): (lambda v: 0 <= v < 1, "a probability in [0, 1)"),
    ("search", "alpha_init_std"): (lambda v: v >= 0, "a number >= 0"),
    ("search", "warmup_fraction"): (lambda v: 0 <= v < 1, "a fraction in [0, 1)"),
    ("search", "hard_after_fraction"): (lambda v: 0 <= v <= 1, "a fraction in [0, 1] (1: never hard)"),
    ("search", "soft_topk"): (lambda v: v >= 0, "an integer >= 0 (0: every op)"),
    ("search", "soft_eps"): (lambda v: 0 <= v < 1, "a weight in [0, 1) (0: skip nothing)"),
    ("search", "prune_patience"): (lambda v: v >= 1, "an integer >= 1 (rounds below the threshold)"),
    ("search", "prune_start_fraction"): (lambda v: 0 <= v <= 1, "a fraction in [0, 1]"),
    ("algorithm", "meta_momentum"): (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    ("algorithm", "lr_warmup_fraction"): (lambda v: 0 <= v < 1, "a fraction in [0, 1) (0: no warm-up)"),
    ("algorithm", "local_steps"): (lambda v: v >= 1, "an integer >= 1"),
    ("algorithm", "inner_steps"): (lambda v: v >= 1, "an integer >= 1"),
    ("algorithm", "batch_size"): (lambda v: v >= 1, "an integer >= 1"),
    ("algorithm", "query_batch_size"): (lambda v: v >= 1, "an integer >= 1"),
    ("algorithm", "grad_clip"): (lambda v: v >= 0, "a number >= 0 (0 disables clipping)"),
    ("algorithm", "lr_min_factor"): (lambda v: 0 <= v <= 1, "a fraction in [0, 1]"),
    ("algorithm", "plain_after_fraction"): (lambda v: 0 <= v <= 1, "a fraction in [0, 1] (1: never plain)"),
    ("personalize", "max_clients"): (lambda v: v >= 0, "an integer >= 0 (0: every client)"),
    ("personalize", "holdout"): (lambda v: 0 <= v < 1, "a fraction in [0, 1) (0: no held-out check)"),
    ("personalize", "holdout_z"): (lambda v: 0 <= v < float("inf"), "a number >= 0 (standard errors; 0: plain comparison)"),
    ("federated", "num_clients"): (lambda v: v >= 1, "an integer >= 1"),
    ("federated", "clients_per_round"): (lambda v: v >= 0, "an integer >= 0 (0: use participation)"),
    ("federated", "participation"): (lambda v: 0 < v <= 1, "a fraction in (0, 1]"),
    ("federated", "rounds"): (lambda v: v >= 1, "an integer >= 1"),
    ("federated", "seed"): (lambda v: 0 <= v <= MAX_SEED, f"an integer in 0..{MAX_SEED} (32 bits)"),
    ("federated", "server_lr"): (lambda v: v > 0, "a number > 0 (e.g. 1.0)"),
    ("federated", "server_momentum"): (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    ("federated", "server_eps"): (lambda v: v > 0, "a number > 0 (FedAdam's tau, e.g. 1e-3)"),
    ("federated", "trim_fraction"): (lambda v: 0 <= v < 0.5, "a fraction in [0, 0.5) (of each end)"),
    ("federated", "time_budget_s"): (lambda v: v >= 0, "a number of seconds >= 0 (0: no budget)"),
    ("eval", "every"): (lambda v: v >= 1, "an integer >= 1"),
    ("eval", "subset"): (lambda v: v >= 0, "an integer >= 0 (0: full test set)"),
    ("eval", "batch_size"): (lambda v: v >= 1, "an integer >= 1"),
    ("checkpoint", "every"): (lambda v: v >= 0, "an integer >= 0 (0: only on a signal and at the end)"),
    ("checkpoint", "keep"): (lambda v: v >= 1, "an integer >= 1"),
    ("runtime", "threads_per_rank"): (lambda v: v >= 1, "an integer >= 1"),
    ("runtime", "streams_per_rank"): (lambda v: v >= 1, "an integer >= 1"),
    ("runtime", "client_batch"): (lambda v: v == "auto" or v >= 1,
                                  "auto or an integer >= 1 (1: clients one after another)"),
    ("runtime", "collective_timeout_s"): (lambda v: v >= MIN_COLLECTIVE_TIMEOUT_S,
                                          f"a number of seconds >= {MIN_COLLECTIVE_TIMEOUT_S:g} (the start-up "
                                          "rendezvous and every round's wait for the slowest rank need it)"),
    ("runtime", "devices"): (lambda v: v is None or (len(v) > 0 and min(v) >= 0),
                             "null or a non-empty list of GPU ids >= 0, one per rank on a node"),
    ("runtime", "master_addr"): (lambda v: v is None or (v.strip() != "" and not any(c.isspace() for c in v)),
                                 "null or rank 0's host name or address (no spaces)"),
}
for _section, _names in (("personalize", ("batch_size",)),):
    for _name in _names:
        _RANGES[(_section, _name)] = AT_LEAST_1
for _section, _names in (("personalize", ("steps", "lr")),):
    for _name in _names:
        _RANGES[(_section, _name)] = NON_NEGATIVE
for _name in ("inner_lr_w", "inner_lr_alpha", "meta_lr_w", "meta_lr_alpha", "reptile_lr_w",
              "reptile_lr_alpha", "weight_decay"):
    _RANGES[("algorithm", _name)] = (lambda v: v >= 0, "a number >= 0")


# Text a user may have meant as a boolean (a quoted `"false"`, YAML 1.1's yes/no/on/off): the word to write.
_BOOL_WORDS = {"true": "true", "false": "false", "yes": "true", "no": "false", "on": "true", "off": "false"}

# What a non-finite value of a field was probably meant to say.
_NONFINITE_HINTS = {"data.dirichlet_alpha": " (for IID clients set data.partition: iid)",
                    "federated.time_budget_s": " (0: no budget)"}


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is tuple:
        return "a list"
    if tp is type(None):
        return "null"
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert a YAML value to the annotated type or raise ConfigError naming `where`."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if isinstance(value, bool) and ("off" if not value else "on") in choices:
            return "off" if not value else "on"  # YAML 1.1 reads an unquoted off / on as a boolean
        if value in choices:
            return value
        hint = [] if value is None else difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        extra = f"; did you mean {hint[0]!r}?" if hint else ""
        shown = "null" if value is None else repr(value)  # as the user wrote it in YAML, not Python's None
        raise ConfigError(f"{where}: {shown} is not valid; use {_type_name(tp)}{extra}")
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, where)
            except ConfigError as err:
                errors.append(err)
        # Report the first member's message when it is the more specific one (a Literal choice).
        if isinstance(value, str) and any(typing.get_origin(a) is Literal for a in typing.get_args(tp)):
            raise errors[0]
        raise ConfigError(f"{where}: {value!r} is not valid; use {_type_name(tp)}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{where}: expected a list of {len(args)} values, got {len(value)}")
        return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{where}: expected null, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _BOOL_WORDS:
            # `data.download="false"` reaches here as text: say so, or the message reads as a contradiction.
            raise ConfigError(f"{where}: expected true or false, got the text {value!r} (in quotes); write "
                              f"{_BOOL_WORDS[value.strip().lower()]} without quotes")
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        number: float | None = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                number = float(value)
            except OverflowError:
                raise ConfigError(f"{where}: {value!r} is too large for a number") from None
        elif isinstance(value, str):  # YAML reads 1e-3 (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if not math.isfinite(number):
            # No setting means anything at NaN or infinity; caught here, a run never trains on one.
            raise ConfigError(f"{where}: {value!r} is not a finite number; use a finite value"
                              f"{_NONFINITE_HINTS.get(where, '')}")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    raise TypeError(f"unsupported config type {tp!r} at {where}")  # a bug in this module


def _build(cls: type, data: Any, where: str, algorithm_sections: typing.Mapping[str, type] | None = None) -> Any:
    """Build dataclass `cls` from a mapping, rejecting unknown keys with a suggestion. For `Config`,
    `algorithm_sections` are the algorithms' own sections, every one built (defaults where `data` has none)."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping of keys, got {data!r}")
    top = cls is Config  # its keys are the core sections and the algorithms' sections
    algorithm_sections = algorithm_sections or {}
    hints = all_sections(algorithm_sections) if top else typing.get_type_hints(cls)
    names = list(hints) if top else [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        full = f"{where}.{key}" if where else str(key)
        if key not in names:
            hint = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
            extra = f"; did you mean '{(where + '.') if where else ''}{hint[0]}'?" if hint else (
                f"; valid keys are: {', '.join(names)}")
            raise ConfigError(f"unknown config key '{full}'{extra}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, full)
        else:
            kwargs[key] = _coerce(value, tp, full)
            check = _RANGES.get((where, key)) or getattr(cls, "ranges", {}).get(key)
            if check is not None and not check[0](kwargs[key]):
                raise ConfigError(f"{full}: {kwargs[key]!r} is out of range; use {check[1]}")
    if top:
        kwargs["sections"] = {k: kwargs.pop(k) if k in kwargs else c() for k, c in algorithm_sections.items()}
    out = cls(**kwargs)
    check = getattr(out, "check", None)  # a section's checks across its own fields
    if check is not None:
        check()
    return out


def _validate(cfg: Config, algorithm: typing.Callable[[Config], Config]) -> Config:
    """Checks that involve several fields; `algorithm(cfg)` checks `algorithm.name` and the algorithm's own
    sections and returns the config that keeps only them (see `build_config`)."""
    if cfg.search.tau_min > cfg.search.tau_max:
        raise ConfigError(
            f"search.tau_min ({cfg.search.tau_min}) exceeds search.tau_max ({cfg.search.tau_max});"
            " set tau_min <= tau_max")
    if cfg.federated.clients_per_round > cfg.federated.num_clients:
        raise ConfigError(
            f"federated.clients_per_round ({cfg.federated.clients_per_round}) exceeds "
            f"federated.num_clients ({cfg.federated.num_clients}); lower it or add clients")
    if cfg.model.reduction_layers is not None:
        bad = [i for i in cfg.model.reduction_layers if not 0 <= i < cfg.model.layers]
        if bad:
            raise ConfigError(
                f"model.reduction_layers: {bad} outside 0..{cfg.model.layers - 1}; "
                "use layer indices smaller than model.layers")
    m = cfg.model
    if not norm_groups_fit(m.channels, m):
        raise ConfigError(
            f"model.norm_groups: {m.norm_groups} groups do not divide model.channels ({m.channels}) and the stem's "
            f"{m.stem_multiplier * m.channels} channels; use a divisor of both (e.g. 2)")
    check_betas("algorithm.inner_betas", cfg.algorithm.inner_betas)
    cfg = algorithm(cfg)
    _validate_run_name(cfg.output.name)
    if not cfg.output.dir.strip():
        # An empty output.dir would put the run in the current folder, unasked (an empty --name is refused too).
        raise ConfigError(f"output.dir: {cfg.output.dir!r} is empty; name the folder that holds runs, e.g. runs "
                          "(write . for the current folder)")
    if cfg.data.local_test_fraction == 0 and cfg.personalize.steps > 0:
        raise ConfigError(
            f"data.local_test_fraction is 0, so personalization (personalize.steps: {cfg.personalize.steps}) has "
            "no local test split to measure; set data.local_test_fraction > 0 (e.g. 0.2) or personalize.steps: 0")
    if not isinstance(cfg.model.primitives, str):
        from fedmetanas.search.operations import OPS  # noqa: PLC0415 - leaf import, avoids a cycle

        for name in cfg.model.primitives:
            if name not in OPS:
                hint = difflib.get_close_matches(name, list(OPS), n=1)
                extra = f"; did you mean {hint[0]!r}?" if hint else f"; known: {', '.join(OPS)}"
                raise ConfigError(f"model.primitives: unknown primitive {name!r}{extra}")
        if len(set(cfg.model.primitives)) != len(cfg.model.primitives) or not cfg.model.primitives:
            raise ConfigError("model.primitives: list each primitive once, at least one")
        if all(name == "none" for name in cfg.model.primitives):
            raise ConfigError("model.primitives: needs at least one op other than 'none' (a cell cannot be all zeros)")
    return cfg


def check_betas(where: str, betas: tuple[float, float]) -> None:
    """Adam's betas must lie in [0, 1)."""
    if not all(0.0 <= b < 1.0 for b in betas):
        raise ConfigError(f"{where}: {list(betas)} must lie in [0, 1)")


def check_architecture(where: str, arch: str) -> None:
    """`cnn`, `darts_v2` or a genotype string (as in a run's genotype.txt) whose ops exist and whose
    inputs lie inside their cells (checked at load, so a typo fails before the data is loaded)."""
    if arch in ("cnn", "darts_v2"):
        return
    from fedmetanas.search.genotypes import Genotype, validate_genotype  # noqa: PLC0415 - leaf imports
    from fedmetanas.search.operations import OPS  # noqa: PLC0415

    try:
        genotype = Genotype.from_string(arch)
    except (ValueError, SyntaxError, KeyError, TypeError, MemoryError, RecursionError):
        raise ConfigError(f"{where}: {arch[:60]!r} is not cnn, darts_v2 or a genotype string "
                          "(as in a run's genotype.txt)") from None
    try:
        validate_genotype(genotype, OPS)
    except ValueError as err:
        raise ConfigError(f"{where}: {err}; fix the genotype string (as in a run's genotype.txt)") from None


def norm_groups_fit(channels: int, m: ModelConfig) -> bool:
    """Whether a network of `channels` (and its stem's `stem_multiplier` times as many) splits into whole
    `model.norm_groups` groups; always under BatchNorm. Later layers have multiples of these (reductions
    double the channels), so these two decide."""
    return m.norm != "group" or not (channels % m.norm_groups or m.stem_multiplier * channels % m.norm_groups)


def check_norm_groups(field: str, channels: int, cfg: Config) -> None:
    """Under `model.norm: group`, a fixed net's own `channels` (`field`; 0: model.channels, checked with the
    model section) splits into `model.norm_groups` groups."""
    m = cfg.model
    if channels and not norm_groups_fit(channels, m):
        raise ConfigError(
            f"{field}: {channels} channels (stem: {m.stem_multiplier * channels}) do not split into model.norm_groups "
            f"({m.norm_groups}) groups; use a multiple of {m.norm_groups} channels, or other model.norm_groups")


def check_architecture_cells(where: str, arch: str, layers: int, reduction_layers: tuple[int, ...] | None,
                             layers_field: str) -> None:
    """A genotype string (already checked by `check_architecture`) has every cell kind a network of
    `layers` layers (reductions at `reduction_layers`, None: DARTS's) is made of."""
    if arch in ("cnn", "darts_v2"):
        return
    from fedmetanas.search.genotypes import Genotype, cell_kinds  # noqa: PLC0415 - leaf import

    missing = [k for k in cell_kinds(layers, reduction_layers) if k not in Genotype.from_string(arch).cells]
    if missing:
        raise ConfigError(
            f"{where}: the genotype has no {missing[0]} cell, but a network of {layers} layers has one "
            f"({layers_field}, model.reduction_layers); add the cell or change the layers")


def _validate_run_name(name: str) -> None:
    """output.name is a relative path that stays inside output.dir: `.`, `..` or an absolute path would
    make --overwrite delete something that is not this run."""
    fix = "use a relative name such as demo or sweep/alpha-0.5 (no '.', '..', empty parts or leading '/')"
    if not name:
        raise ConfigError(f"output.name (--name): the run name is empty; {fix}")
    control = next((c for c in name if ord(c) < 32 or ord(c) == 127), None)
    if control is not None:
        # A newline or tab makes a folder no one can type or list cleanly (and breaks `ls` and logs).
        raise ConfigError(f"output.name (--name): {name[:80]!r} holds a control character ({control!r}); {fix}")
    parts = name.split("/")
    if name.startswith("/") or "\0" in name or any(part in ("", ".", "..") for part in parts):
        raise ConfigError(f"output.name (--name): {name[:80]!r} is not a run name inside output.dir; {fix}")
    longest = max(parts, key=lambda part: len(part.encode()))
    if len(longest.encode()) > NAME_MAX:
        raise ConfigError(f"output.name (--name): a part of {len(longest.encode())} bytes is longer than a file "
                          f"name may be ({NAME_MAX}); choose a shorter name")


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, but a key repeated in one mapping is an error (YAML keeps the last one silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` may be overridden on purpose
                continue
            key, line = self.construct_object(key_node, deep=True), key_node.start_mark.line + 1
            try:
                if key in seen:
                    raise _DuplicateKey(key, seen[key], line)
                seen[key] = line
            except TypeError:  # an unhashable key: the base class reports it
                continue
        return super().construct_mapping(node, deep)


class _DuplicateKey(ValueError):
    def __init__(self, key: Any, first: int, again: int) -> None:
        super().__init__(f"key {key!r} appears twice in one mapping (lines {first} and {again}); keep one")


def _yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass


def _field_type(path: list[str], sections: typing.Mapping[str, type]) -> Any:
    """The annotated type of the config field at `path` among the top-level `sections` (None if there is none)."""
    tp: Any = sections.get(path[0]) if path else None
    for part in path[1:]:
        if not dataclasses.is_dataclass(tp):
            return None
        tp = typing.get_type_hints(tp).get(part)
    return tp


def _parse_override(text: str, sections: typing.Mapping[str, type]) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r}: write it as section.key=value, e.g. federated.rounds=5")
    key, raw = text.split("=", 1)
    path = key.strip().split(".")
    try:
        value = _yaml_load(raw)
    except _DuplicateKey as err:
        raise ConfigError(f"override {text!r}: {err}") from None
    except yaml.YAMLError:
        value = _NOT_YAML
    tp = _field_type(path, sections)
    text_field = tp is str or (typing.get_origin(tp) in (typing.Union, types.UnionType) and str in typing.get_args(tp))
    if text_field and not isinstance(value, str) and not (value is None and tp is not str):
        # A text field takes the text as typed: a genotype string (commas, brackets), a run name of digits.
        return path, raw
    if value is _NOT_YAML:
        raise ConfigError(f"override {text!r}: the value is not valid YAML; quote it or fix the brackets")
    return path, value


_NOT_YAML = object()


def _merged(base: Any, update: dict[str, Any]) -> dict[str, Any]:
    """`base` (a section as read from the file) with the keys of `update` set, nested mappings merged."""
    out = dict(base) if isinstance(base, dict) else {}
    for key, value in update.items():
        out[key] = _merged(out.get(key), value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _yaml_problem(err: yaml.YAMLError) -> str:
    """What is wrong with a YAML text, and the fix, from the parser's error (its line numbers are 0-based)."""
    mark = getattr(err, "problem_mark", None)
    at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    problem = str(getattr(err, "problem", "") or "")
    if isinstance(err, yaml.composer.ComposerError) and "another document" in problem:
        return f"holds more than one YAML document (a second one starts{at}); keep one, without '---' lines"
    if isinstance(err, yaml.constructor.ConstructorError) and "tag" in problem:
        tag = problem.rsplit(" ", 1)[-1].replace("tag:yaml.org,2002:", "!!")
        return (f"the tag {tag}{at} is not allowed: a config is plain data (numbers, text, true/false, lists, "
                "mappings); remove the tag")
    return f"malformed YAML{at}; fix the syntax (indentation, ':' after keys)"


def build_config(data: dict[str, Any] | None, overrides: typing.Sequence[str],
                 algorithm_sections: typing.Mapping[str, type], algorithm: typing.Callable[[Config], Config]) -> Config:
    """Build a validated Config from a mapping (as read from YAML) plus `a.b=value` overrides.

    This module knows no algorithm; whoever knows the registry hands in what it adds
    (`fedmetanas.configure.config_from_dict` does):

    Args:
        algorithm_sections: every section an algorithm declares (YAML key -> frozen dataclass): each one is
            accepted, type- and range-checked, and given its defaults where the input has none.
        algorithm: `algorithm(cfg)` checks `cfg.algorithm.name` and the active algorithm's own checks
            (raising ConfigError) and returns `cfg` keeping only that algorithm's sections.
    """
    sections = all_sections(algorithm_sections)
    merged: dict[str, Any] = dict(data or {})
    for text in overrides:
        path, value = _parse_override(text, sections)
        node = merged
        for i, part in enumerate(path[:-1]):
            above = _field_type(path[: i + 1], sections)
            if above is not None and not dataclasses.is_dataclass(above):
                # `federated.rounds.x=1` would replace a value with a mapping and be blamed on its type.
                raise ConfigError(f"unknown config key '{'.'.join(path)}': {'.'.join(path[: i + 1])} is a value, "
                                  "not a section; write it as " f"{'.'.join(path[: i + 1])}=value")
            child = node.get(part)
            node[part] = dict(child) if isinstance(child, dict) else {}
            node = node[part]
        if dataclasses.is_dataclass(_field_type(path, sections)):
            # `federated={seed: 1}` sets the keys it names; replacing the whole section would silently drop
            # the file's other values of it (rounds, clients) for the defaults.
            if not isinstance(value, dict):
                raise ConfigError(f"override {text!r}: {'.'.join(path)} is a section; set its keys, e.g. "
                                  f"{'.'.join(path)}.<key>=value or {'.'.join(path)}={{<key>: value}}")
            value = _merged(node.get(path[-1]), value)
        node[path[-1]] = value
    return _validate(_build(Config, merged, "", algorithm_sections), algorithm)


def read_config_file(path: str | Path | None) -> dict[str, Any] | None:
    """The mapping a YAML config file holds ({} for no file, None for an empty one), or a ConfigError naming it."""
    data: Any = {}
    if path is not None:
        p = Path(path)
        if p.is_dir():
            raise ConfigError(f"--config: {str(p)!r} is a folder, not a file; pass the path of a YAML file such as "
                              "configs/default.yaml")
        if p.exists() and not p.is_file():
            raise ConfigError(f"--config: {str(p)!r} is not a regular file (a device or a pipe); pass the path of a "
                              "YAML file such as configs/default.yaml")
        if not p.is_file():
            raise ConfigError(f"--config: file {str(p)!r} not found; pass the path of a YAML file such as configs/default.yaml")
        try:
            data = _yaml_load(p.read_bytes().decode("utf-8"))
        except OSError as err:
            raise ConfigError(f"--config: {p} cannot be read ({err.strerror}); check its permissions") from None
        except UnicodeDecodeError as err:
            raise ConfigError(f"{p}: not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset {err.start}); "
                              "save the config as UTF-8") from None
        except _DuplicateKey as err:
            raise ConfigError(f"{p}: {err}") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"{p}: {_yaml_problem(err)}") from None
        if data is not None and not isinstance(data, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of sections (data:, model:, ...)")
    return data


def to_dict(cfg: Any) -> dict[str, Any]:
    """The resolved config as plain YAML-able data (tuples become lists). Of a Config: the core sections and
    the active algorithm's, all that determines the run (what config.yaml, checkpoints and the log hold)."""

    def plain(v: Any) -> Any:
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    data = plain(dataclasses.asdict(cfg))
    if isinstance(cfg, Config):  # the algorithms' sections sit beside the core ones, after `algorithm`
        sections = data.pop("sections")
        data = {k: v for name, value in data.items()
                for k, v in ([(name, value)] + (list(sections.items()) if name == "algorithm" else []))}
    return data
