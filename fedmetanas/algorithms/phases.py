"""The two kinds of phase the shipped algorithms are made of.

- `SearchPhase`: a supernet searched with some local rule (FedMetaNAS's dual learner, FedNAS's
  MiLeNAS) under a relaxation, temperature and learning-rate schedule; optionally soft-pruned by the
  server after each average. Evaluates the soft supernet and the discrete net of its genotype.
- `TrainPhase`: a fixed architecture (a genotype, DARTS_V2, the FedAvg paper's CNN, or the genotype
  the previous phase found) trained with some local rule (FedAvg's SGD, Per-FedAvg's dual learner).

An algorithm is a small file that picks its phases and fills in their rules (see `fedavg.py`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch
from torch import nn

from fedmetanas.algorithms.base import Artifact, ModelInputs, Phase, PhaseOutcome, RoundPlan, Span
from fedmetanas.algorithms.batched import StackedUpdate, batched_form
from fedmetanas.algorithms.common import Forward, LocalContext, LocalResult
from fedmetanas.config import Config, SearchConfig, check_architecture_cells, check_norm_groups, to_dict
from fedmetanas.search.discrete import CNN, DiscreteNet, FixedNet
from fedmetanas.search.norms import apply_norm
from fedmetanas.search.genotypes import DARTS_V2, Genotype, resolve_primitives
from fedmetanas.search.relax import RelaxMode, entropy, prune_on_evidence
from fedmetanas.search.supernet import ArchMasks, SuperNet, arch_from_genotype, derive_genotype, sample_arch
from fedmetanas.seeding import Purpose, derive_seed, torch_generator


class LocalRule(Protocol):
    """A client-side learning rule: what FedMetaNAS, MiLeNAS, FedAvg's SGD have in common."""

    def local_update(self, model: nn.Module, task: nn.Module | None, ctx: LocalContext) -> LocalResult: ...


class PersonalizingRule(LocalRule, Protocol):
    def personalize(self, model: nn.Module, task: nn.Module | None, ctx: LocalContext, steps: int) -> Forward: ...


Schedule = Callable[[int], float]  # global round -> value


def build_supernet(cfg: Config, in_channels: int, num_classes: int) -> SuperNet:
    """The initial supernet, identical on every rank (seeded, built on the CPU)."""
    m = cfg.model
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(cfg.federated.seed, Purpose.INIT))
        net = SuperNet(in_channels, num_classes, m.channels, m.layers, m.nodes, resolve_primitives(m.primitives),
                       m.stem_multiplier, m.reduction_layers, cfg.search.input_mode, cfg.search.alpha_init_std,
                       generator=torch_generator(cfg.federated.seed, Purpose.INIT, 1), stem_stride=m.stem_stride)
    return apply_norm(net, m.norm, m.norm_groups)


def parse_architecture(text: str) -> Genotype | None:
    """`cnn` (None: the FedAvg paper's CNN), `darts_v2`, or a genotype string."""
    if text == "cnn":
        return None
    return DARTS_V2 if text == "darts_v2" else Genotype.from_string(text)


def build_fixed(cfg: Config, genotype: Genotype | None, inputs: ModelInputs, channels: int = 0,
                layers: int = 0) -> FixedNet:
    """A fresh fixed-architecture network, identical on every rank (seeded, built on the CPU).
    `channels` / `layers` 0: the model section's."""
    m = cfg.model
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(cfg.federated.seed, Purpose.INIT, 2))
        if genotype is None:
            return CNN(inputs.in_channels, inputs.num_classes, inputs.image_size)
        net = DiscreteNet.from_genotype(genotype, inputs.in_channels, inputs.num_classes, channels or m.channels,
                                        layers or m.layers, m.stem_multiplier,
                                        m.reduction_layers if not layers else None, m.stem_stride)
    return apply_norm(net, m.norm, m.norm_groups)


def check_fixed_net(section: str, cfg: Config) -> None:
    """`<section>.architecture` has every cell kind of the network `<section>.layers` (0: model.layers)
    builds, as `build_fixed` lays it out (config load time: a missing cell fails before any data loads)."""
    net, m = getattr(cfg, section), cfg.model
    check_architecture_cells(f"{section}.architecture", net.architecture, net.layers or m.layers,
                             None if net.layers else m.reduction_layers, f"{section}.layers / model.layers")
    check_norm_groups(f"{section}.channels", net.channels, cfg)


NEVER = 1 << 30  # a round no search reaches: "this step of the schedule does not happen"


def switch_round(fraction: float, rounds: int) -> int:
    """The first round of a switch made after `fraction` of `rounds` rounds; 1 (or more): `NEVER`."""
    return int(round(fraction * rounds)) if fraction < 1 else NEVER


@dataclass(frozen=True)
class SearchSchedule:
    """When a search phase does what, in rounds from its first: the warm-up (logits frozen, paths drawn
    by `warmup_mode`), the switch to hard sampling, the sparse soft sample, and pruning's start and
    patience. The defaults are a plain search: no warm-up, no switch, every op, prune at once."""

    warmup_rounds: int = 0
    warmup_mode: RelaxMode = "hard"
    hard_from: int = NEVER
    soft_topk: int = 0
    soft_eps: float = 0.0
    prune_from: int = 0
    patience: int = 1

    @classmethod
    def of(cls, s: SearchConfig, rounds: int) -> "SearchSchedule":
        """The `search` section's fractions as round counts of a `rounds`-round search."""
        warm = int(round(s.warmup_fraction * rounds))
        return cls(warm, s.warmup_gumbel, switch_round(s.hard_after_fraction, rounds), s.soft_topk, s.soft_eps,
                   max(warm, int(round(s.prune_start_fraction * rounds))), s.prune_patience)


class SearchPhase(Phase):
    """A supernet searched by `rule`; the server soft-prunes after averaging when `prune` is set; with
    `stable_rounds` k > 0 the search ends early (`end_early`) once its genotype has stayed the same for k
    consecutive rounds."""

    eval_names = ("supernet", "discrete")

    def __init__(self, cfg: Config, span: Span, rule: PersonalizingRule | LocalRule, *, tau: Schedule,
                 lr_scale: Schedule, relax_mode: RelaxMode, prune: bool, base_lr: float,
                 needs_task: bool = True, stable_rounds: int = 0, schedule: SearchSchedule | None = None) -> None:
        super().__init__(cfg, span)
        self.rule, self.tau, self.lr_scale, self.relax_mode = rule, tau, lr_scale, relax_mode
        self.prune, self.base_lr = prune, base_lr
        self.schedule = schedule or SearchSchedule()
        self.needs_task = needs_task  # type: ignore[misc] - per instance: MiLeNAS needs no task learner
        self._masks: ArchMasks | None = None
        self._below: dict[str, torch.Tensor] = {}  # pruning evidence: rounds each entry stayed below threshold
        self._genotype: Genotype | None = None  # of the current logits and masks; None: derive anew
        # The stability rule (0: none): rounds in a row whose genotype equalled the previous round's.
        self.stable_rounds, self._unchanged, self._last_genotype = stable_rounds, 0, ""

    def build_model(self, inputs: ModelInputs) -> SuperNet:
        return build_supernet(self.cfg, inputs.in_channels, inputs.num_classes)

    def on_model(self, model: SuperNet) -> None:
        self._masks, self._genotype = model.initial_masks(), None
        self._below = {name: torch.zeros(m.shape, dtype=torch.int64) for name, m in self._masks.items()}

    def model_attrs(self, model: SuperNet) -> dict[str, Any]:
        return {"primitives": list(model.primitives), "nodes": model.nodes,
                "num_params": sum(p.numel() for p in model.weights())}

    def round_plan(self, rnd: int) -> RoundPlan:
        """The round's relaxation: the warm-up's (logits frozen), then the phase's, then hard sampling
        from the schedule's switch round on."""
        sch = self.schedule
        warm = rnd < self.span.first + sch.warmup_rounds
        mode = sch.warmup_mode if warm else ("hard" if rnd >= self.span.first + sch.hard_from else self.relax_mode)
        return RoundPlan(self.tau(rnd), self.lr_scale(rnd), mode, train_arch=not warm, soft_topk=sch.soft_topk,
                         soft_eps=sch.soft_eps, round=rnd)

    def masks(self) -> ArchMasks | None:
        return self._masks

    def local_update(self, model: nn.Module, task: nn.Module | None, ctx: LocalContext) -> LocalResult:
        return self.rule.local_update(model, task, ctx)

    def batch_refusal(self) -> str | None:
        """Clients step together where the rule has a batched form of its own (any relaxation)."""
        return batched_form(self.rule)

    def local_update_batch(self, model: nn.Module, ctxs: list[LocalContext]) -> StackedUpdate:
        return self.rule.local_update_batch(model, ctxs)

    def server_update(self, model: SuperNet, plan: RoundPlan) -> None:
        """Soft pruning: the masks follow the annealed distributions of the averaged logits. Not while the
        logits are frozen (warm-up); evidence counts from then on; masks shrink from `prune_from` on."""
        if self.prune and plan.train_arch:
            s, sch = self.cfg.search, self.schedule
            patience = sch.patience if plan.round >= self.span.first + sch.prune_from else NEVER  # counts only
            masks: dict[str, torch.Tensor] = {}
            for name, mask in self._masks.items():
                threshold = s.op_prune_threshold if name.startswith("alpha_") else s.pair_prune_threshold
                masks[name], self._below[name] = prune_on_evidence(getattr(model, name), mask, plan.tau, threshold,
                                                                   self._below[name], patience)
            m = self._masks
            self._masks = ArchMasks({k: masks[f"alpha_{k}"] for k in m.ops},
                                    None if m.pairs is None else {k: masks[f"beta_{k}"] for k in m.pairs})
        self._genotype = None  # the averaged logits decode anew

    def current_genotype(self, model: SuperNet, plan: RoundPlan) -> Genotype:
        """The discrete cells of the current logits and masks at the round's temperature: derived once
        after each server update (or resume) and shared by the log, evaluation and the phase's files."""
        if self._genotype is None:
            self._genotype = derive_genotype(model, self._masks, plan.tau)
        return self._genotype

    def forwards(self, model: SuperNet, plan: RoundPlan) -> dict[str, Forward]:
        expected = sample_arch(model, self._masks, plan.tau, "expected")
        discrete = arch_from_genotype(model, self.current_genotype(model, plan))
        return {"supernet": lambda x: model(x, expected), "discrete": lambda x: model(x, discrete)}

    def record(self, model: SuperNet, plan: RoundPlan) -> dict[str, Any]:
        rec: dict[str, Any] = {"tau": plan.tau, "genotype": self.current_genotype(model, plan).to_string()}
        for (name, p), (_, m) in zip(model.named_alphas(), self._masks.items()):
            rec[name] = p.detach().cpu().numpy().copy()  # a copy: the parameter keeps training
            rec[f"mask_{name}"] = m.numpy().copy()
            rec[f"entropy_{name}"] = entropy(p, m, plan.tau).numpy()
        return rec

    def describe_round(self, row: dict[str, Any], mean_loss: float) -> str:
        return (f"search  tau {row['tau']:.3f}  loss {mean_loss:.3f}  acc supernet {row['supernet_acc']:.4f} "
                f"discrete {row['discrete_acc']:.4f}")

    def end_early(self, rnd: int, row: dict[str, Any]) -> bool:
        """The stability rule: True once the round's genotype (`row["genotype"]`, decoded once per round by
        `record`) has equalled the previous round's for `stable_rounds` rounds in a row. The first round
        has no previous one (the initial genotype is the random logits'), so a search runs at least
        `stable_rounds + 1` rounds."""
        if self.stable_rounds <= 0:
            return False
        text = row["genotype"]
        self._unchanged = self._unchanged + 1 if text == self._last_genotype else 0
        self._last_genotype = text
        return self._stable()

    def _stable(self) -> bool:
        return 0 < self.stable_rounds <= self._unchanged

    def outcome(self, model: SuperNet, plan: RoundPlan, last_row: dict[str, Any]) -> PhaseOutcome:
        genotype = self.current_genotype(model, plan)
        return PhaseOutcome(genotype, {"genotype": genotype.to_string(),
                                       "supernet_acc": float(last_row["supernet_acc"]),
                                       "supernet_loss": float(last_row["supernet_loss"]),
                                       "discrete_acc_not_retrained": float(last_row["discrete_acc"]),
                                       "search_seconds": float(last_row["wall_time"]),
                                       "search_stopped_by": "stable_genotype" if self._stable() else "cap",
                                       "search_rounds": int(last_row["round"]) + 1 - self.span.first})

    def final_forward(self, model: SuperNet, plan: RoundPlan) -> Forward:
        arch = arch_from_genotype(model, self.current_genotype(model, plan))
        return lambda x: model(x, arch)

    def final_record(self, metrics: dict[str, float], previous: PhaseOutcome | None,
                     elapsed: float) -> dict[str, Any]:
        return {**metrics, "search_seconds": elapsed}

    def describe_final(self, final: dict[str, Any]) -> list[str]:
        return [f"final genotype: {final['genotype']}",
                f"discrete net (pruned, not retrained) test accuracy: {final['discrete_acc']:.4f} "
                f"(loss {final['discrete_loss']:.4f}); soft supernet: {final['supernet_acc']:.4f}"]

    def arch_text(self, model: SuperNet, plan: RoundPlan) -> str:
        return self.current_genotype(model, plan).to_string()

    def artifacts(self, model: SuperNet, plan: RoundPlan, last: bool) -> dict[str, Artifact]:
        genotype = self.current_genotype(model, plan)
        files: dict[str, Artifact] = {
            "supernet.pt": {"state_dict": model.state_dict(), "masks": dict(self._masks.items()), "tau": plan.tau,
                            "config": to_dict(self.cfg)}}
        if last:
            discrete = DiscreteNet.from_supernet(model, genotype)
            files["genotype.txt"] = genotype.to_string() + "\n"
            files["discrete_model.pt"] = {"genotype": genotype.to_string(), "state_dict": discrete.state_dict(),
                                          "config": to_dict(self.cfg)}
        else:
            files["search_genotype.txt"] = genotype.to_string() + "\n"
        return files

    def personalize_base_lr(self) -> float:
        return self.base_lr

    def personalize(self, model: nn.Module, task: nn.Module | None, ctx: LocalContext, steps: int) -> Forward:
        return self.rule.personalize(model, task, ctx, steps)

    def state_dict(self) -> dict[str, Any]:
        return {"masks": {"ops": self._masks.ops, "pairs": self._masks.pairs}, "prune_below": dict(self._below),
                "stable_unchanged": self._unchanged, "stable_last_genotype": self._last_genotype}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("masks") is not None:
            self._masks, self._genotype = ArchMasks(state["masks"]["ops"], state["masks"]["pairs"]), None
        if state.get("prune_below") is not None:
            self._below = {k: v.clone() for k, v in state["prune_below"].items()}
        self._unchanged = int(state.get("stable_unchanged", 0))
        self._last_genotype = str(state.get("stable_last_genotype", ""))


class TrainPhase(Phase):
    """A fixed architecture trained by `rule`: `architecture` is `cnn`, `darts_v2`, a genotype string,
    or None for the genotype the previous phase found."""

    def __init__(self, cfg: Config, span: Span, rule: PersonalizingRule, *, architecture: str | None,
                 lr_scale: Schedule, base_lr: float, channels: int = 0, layers: int = 0,
                 needs_task: bool = False) -> None:
        super().__init__(cfg, span)
        self.rule, self.lr_scale, self.base_lr = rule, lr_scale, base_lr
        self.architecture, self.channels, self.layers = architecture, channels, layers
        self.needs_task = needs_task  # type: ignore[misc] - per instance: depends on the rule
        self.genotype: Genotype | None = None if architecture is None else parse_architecture(architecture)

    def enter(self, previous: PhaseOutcome | None) -> None:
        if self.architecture is None:
            if previous is None or previous.genotype is None:
                raise ValueError("a phase that trains the previous phase's genotype needs a previous phase")
            self.genotype = previous.genotype

    def build_model(self, inputs: ModelInputs) -> FixedNet:
        return build_fixed(self.cfg, self.genotype, inputs, self.channels, self.layers)

    def model_attrs(self, model: FixedNet) -> dict[str, Any]:
        nodes = len(self.genotype.normal) if self.genotype is not None else 0
        return {"primitives": [], "nodes": nodes, "num_params": sum(p.numel() for p in model.weights())}

    def round_plan(self, rnd: int) -> RoundPlan:
        return RoundPlan(math.nan, self.lr_scale(rnd), "expected")

    def local_update(self, model: nn.Module, task: nn.Module | None, ctx: LocalContext) -> LocalResult:
        return self.rule.local_update(model, task, ctx)

    def batch_refusal(self) -> str | None:
        """A fixed network can step its clients together when its rule has a batched form of its own."""
        return batched_form(self.rule)

    def local_update_batch(self, model: nn.Module, ctxs: list[LocalContext]) -> StackedUpdate:
        return self.rule.local_update_batch(model, ctxs)

    def outcome(self, model: FixedNet, plan: RoundPlan, last_row: dict[str, Any]) -> PhaseOutcome:
        return PhaseOutcome(self.genotype, {})

    def final_record(self, metrics: dict[str, float], previous: PhaseOutcome | None,
                     elapsed: float) -> dict[str, Any]:
        """A retraining phase reports its search's soft supernet and time; a lone one NaN and 0."""
        sf = previous.summary if previous is not None else {}
        out = {**metrics, "supernet_acc": sf.get("supernet_acc", math.nan),
               "supernet_loss": sf.get("supernet_loss", math.nan), "search_seconds": sf.get("search_seconds", 0.0)}
        if sf:
            out.update({"search_genotype": sf["genotype"],
                        "search_discrete_acc_not_retrained": sf["discrete_acc_not_retrained"]})
            out.update({k: sf[k] for k in ("search_stopped_by", "search_rounds") if k in sf})
        return out

    def describe_final(self, final: dict[str, Any]) -> list[str]:
        searched = f"; searched in {final['search_seconds']:.1f} s" if "search_genotype" in final else ""
        arch = (f"final genotype: {final['genotype']}" if self.genotype is not None
                else "final architecture: cnn (FedAvg paper's CNN)")
        return [arch, f"trained net test accuracy: {final['discrete_acc']:.4f} "
                      f"(loss {final['discrete_loss']:.4f}){searched}"]

    def arch_text(self, model: FixedNet, plan: RoundPlan) -> str:
        return self.genotype.to_string() if self.genotype is not None else "cnn"

    def artifacts(self, model: FixedNet, plan: RoundPlan, last: bool) -> dict[str, Artifact]:
        if not last:
            return {}
        text = self.arch_text(model, plan)
        return {"genotype.txt": text + "\n",
                "model.pt": {"architecture": text, "state_dict": model.state_dict(), "config": to_dict(self.cfg)}}

    def personalize_base_lr(self) -> float:
        return self.base_lr

    def personalize(self, model: nn.Module, task: nn.Module | None, ctx: LocalContext, steps: int) -> Forward:
        return self.rule.personalize(model, task, ctx, steps)
