"""FedMetaNAS's local search: a task learner adapts, a meta learner updates (first order).

For each of `local_steps` meta-steps on a client:
  1. task learner <- copy of the client's model (weights and architecture logits);
  2. the task learner takes `inner_steps` Adam steps on support batches, updating weights and
     alphas/betas jointly through the Gumbel relaxation (MetaNAS: Adam with betas (0, 0.999));
  3. meta learner update, either FOMAML (the task learner's gradient on a query batch, taken at the
     adapted parameters, applied to the client's parameters by the meta optimizer) or Reptile
     (move the client's parameters towards the adapted ones by reptile_lr_w / reptile_lr_alpha).

From `algorithm.plain_after_fraction` of the rounds on, FOMAML's clients take plain steps instead: the
meta optimizer on support batches at the client's own parameters, (inner_steps + 1) per meta-step. A
meta-step's support pass only moves the point where the query gradient is taken; a plain step's pass moves
the parameters, so the same passes give the weights (inner_steps + 1) times the updates.

The meta optimizer starts fresh every round (MetaNAS's clients are tasks; a round here is one), or, with
`algorithm.meta_state: kept`, each client keeps its meta Adam's moments and step counts from its last round
(client state, `Phase.client_state`): a short round then does not restart in Adam's first steps, which move
every coordinate by about the learning rate whatever its gradient's size.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

from fedmetanas.algorithms.common import (  # noqa: F401 - re-exported: the local-update interface
    Forward,
    LocalContext,
    LocalResult,
    clip_weight_grads,
    copy_state,
    draw_batch,
    supervised_step,
)
from fedmetanas.algorithms.base import Algorithm, Phase, Span
from fedmetanas.algorithms.batched import (ClientStack, StackedUpdate, clip_stacked, in_equal_batches, stacked_grads,
                                            stacked_step, steps_stacked)
from fedmetanas.algorithms.flat_optim import MaskedAdam, MaskedOptimizers, MaskedSGD
from fedmetanas.algorithms.phases import NEVER, SearchPhase, SearchSchedule, switch_round
from fedmetanas.config import AlgorithmConfig, PersonalizeConfig
from fedmetanas.data.client_data import iterate_batches
from fedmetanas.search.relax import lr_factor, temperature
from fedmetanas.search.stacked import StackedSuperNet
from fedmetanas.search.supernet import SuperNet, arch_from_genotype, derive_genotype

if TYPE_CHECKING:  # only annotations use it
    from fedmetanas.search.supernet import ArchSample


class Optimizers:
    """Several `torch.optim` optimizers over disjoint parameters, stepped as one: the meta learner when the
    weights and the architecture logits have different rules (`algorithm.meta_optimizer_alpha`)."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]) -> None:
        self.optimizers = optimizers

    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()


class FedMetaNAS:
    """The client-side learning rule of FedMetaNAS (the dual learner). On a fixed architecture (no
    architecture parameters, `ctx.masks` None) it is first-order MAML on the weights: Per-FedAvg."""

    def __init__(self, cfg: AlgorithmConfig, personalize: PersonalizeConfig | None = None,
                 plain_from: int = NEVER) -> None:
        self.cfg = cfg
        self.personalize_cfg = personalize or PersonalizeConfig()
        self.plain_from = plain_from  # the first global round of plain steps (FOMAML only)

    def plain(self, ctx: LocalContext) -> bool:
        """Whether this round's local work is plain steps, not meta-steps (`algorithm.plain_after_fraction`)."""
        return self.cfg.meta_update == "fomaml" and ctx.round >= self.plain_from

    def plain_steps(self) -> int:
        """Plain steps a round: a meta-step's passes each (`inner_steps` support and one query pass)."""
        return self.cfg.local_steps * (self.cfg.inner_steps + 1)

    def _meta_optimizer(self, weights: list[torch.Tensor], alphas: list[torch.Tensor],
                        ctx: LocalContext) -> torch.optim.Optimizer | Optimizers:
        """The meta learner's optimizer over a client's weights and logits (or K clients' stacked ones): one
        `torch.optim` optimizer, or one per rule where the logits' rule is not the weights'."""
        cfg = self.cfg
        groups = {cfg.meta_optimizer: [{"params": weights, "lr": cfg.meta_lr_w * ctx.lr_scale,
                                        "weight_decay": cfg.weight_decay}]}
        if alphas and ctx.train_arch:  # a fixed architecture has none; a warm-up freezes them
            groups.setdefault(cfg.alpha_optimizer, []).append(
                {"params": alphas, "lr": cfg.meta_lr_alpha, "weight_decay": 0.0})
        opts = [torch.optim.Adam(g, foreach=True) if rule == "adam"
                else torch.optim.SGD(g, momentum=cfg.meta_momentum, foreach=True) for rule, g in groups.items()]
        return opts[0] if len(opts) == 1 else Optimizers(opts)

    def adapt(self, task: SuperNet, ctx: LocalContext, steps: int) -> list[torch.Tensor]:
        """Task learner: `steps` joint Adam steps on weights and architecture logits (weights only while
        `ctx.train_arch` is False)."""
        betas = self.cfg.inner_betas
        opt_w = torch.optim.Adam(task.weights(), lr=self.cfg.inner_lr_w * ctx.lr_scale, betas=betas,
                                 weight_decay=self.cfg.weight_decay, foreach=True)
        opt_a = torch.optim.Adam(task.alphas(), lr=self.cfg.inner_lr_alpha, betas=betas,
                                 foreach=True) if task.alphas() and ctx.train_arch else None
        losses = []
        for _ in range(steps):
            losses.append(supervised_step(task, ctx, self.cfg.batch_size, self.loss))
            clip_weight_grads(task, self.cfg.grad_clip)
            opt_w.step()
            if opt_a is not None:
                opt_a.step()
        return losses

    def local_update(self, model: SuperNet, task: SuperNet, ctx: LocalContext) -> LocalResult:
        """Run the client's meta-steps; `model` holds the global parameters on entry, the client's after."""
        meta_opt = (self._meta_optimizer(model.weights(), model.alphas(), ctx) if self.cfg.meta_update == "fomaml"
                    else None)
        kept = self.cfg.meta_state == "kept" and meta_opt is not None
        params = [*model.weights(), *model.alphas()]  # the kept state's layout (`MetaSearchPhase`)
        if kept:
            load_adam_state(meta_opt, params, ctx.state[META_STATE])
        if meta_opt is not None and self.plain(ctx):
            result = self._plain_update(model, ctx, meta_opt)
        else:
            result = self._meta_update(model, task, ctx, meta_opt)
        if kept:
            result.state = {META_STATE: dump_adam_state(meta_opt, params, ctx.state[META_STATE])}
        return result

    def _plain_update(self, model: SuperNet, ctx: LocalContext,
                      meta_opt: torch.optim.Optimizer | Optimizers) -> LocalResult:
        """Plain steps (`algorithm.plain_after_fraction`); BN statistics follow the client's own batches."""
        losses = []
        for _ in range(self.plain_steps()):
            losses.append(supervised_step(model, ctx, self.cfg.batch_size, self.loss))
            clip_weight_grads(model, self.cfg.grad_clip)
            meta_opt.step()
        return LocalResult(loss=float(torch.stack(losses).mean()), steps=self.plain_steps())

    def _meta_update(self, model: SuperNet, task: SuperNet, ctx: LocalContext,
                     meta_opt: torch.optim.Optimizer | Optimizers | None) -> LocalResult:
        """The meta-steps: FOMAML through `meta_opt`, Reptile where it is None."""
        cfg = self.cfg
        losses: list[torch.Tensor] = []
        for _ in range(cfg.local_steps):
            copy_state(task, model)
            inner = self.adapt(task, ctx, cfg.inner_steps)
            if meta_opt is not None:
                losses.append(supervised_step(task, ctx, cfg.query_batch_size, self.loss))
                for p_meta, p_task in zip(model.param_list(), task.param_list()):
                    p_meta.grad = p_task.grad
                clip_weight_grads(model, cfg.grad_clip)
                meta_opt.step()
            else:
                losses.extend(inner)
                with torch.no_grad():
                    for p_meta, p_task in zip(model.weights(), task.weights()):
                        p_meta.add_(p_task - p_meta, alpha=cfg.reptile_lr_w)
                    for p_meta, p_task in zip(model.alphas() if ctx.train_arch else [], task.alphas()):
                        p_meta.add_(p_task - p_meta, alpha=cfg.reptile_lr_alpha)
            # BN statistics follow what the task learner saw (they are not learned parameters).
            if model.buffer_list():  # a net without BN (the CNN) has none
                with torch.no_grad():
                    torch._foreach_copy_(model.buffer_list(), task.buffer_list())
        mean_loss = float(torch.stack(losses).mean()) if losses else float("nan")
        return LocalResult(loss=mean_loss, steps=cfg.local_steps * (cfg.inner_steps + (meta_opt is not None)))

    def loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The loss both learners minimize on a batch (the sequential step and, mapped over clients, the
        stacked one: override it and both change)."""
        return nn.functional.cross_entropy(logits, y)

    def local_update_batch(self, model: nn.Module, ctxs: list[LocalContext]) -> StackedUpdate:
        """`local_update` for several clients at once (`runtime.client_batch`): on a supernet under any
        relaxation (`search.stacked`: dense soft, sparse soft, hard, warm-up), or on a fixed network
        (Per-FedAvg, through torch.func): the same meta-steps over the clients' stacked tensors."""
        sizes = (self.cfg.batch_size, self.cfg.query_batch_size)
        if ctxs[0].masks is not None:
            return in_equal_batches(ctxs, sizes, lambda part: self._local_update_stacked(model, part))
        return in_equal_batches(ctxs, sizes, lambda part: self._local_update_fixed(model, part))

    def _local_update_fixed(self, model: nn.Module, ctxs: list[LocalContext]) -> StackedUpdate:
        """Per-FedAvg's meta-steps on a fixed network for K clients through torch.func (`ClientStack`)."""
        cfg, ctx = self.cfg, ctxs[0]
        stack = ClientStack(model, len(ctxs))
        meta_opt = self._meta_optimizer(stack.weights, stack.alphas, ctx) if cfg.meta_update == "fomaml" else None
        losses: list[torch.Tensor] = []
        for _ in range(cfg.local_steps):
            task = stack.clone()
            betas = cfg.inner_betas
            opts = [torch.optim.Adam(task.weights, lr=cfg.inner_lr_w * ctx.lr_scale, betas=betas,
                                     weight_decay=cfg.weight_decay, foreach=True)]
            inner = steps_stacked(task, ctxs, opts, cfg.inner_steps, cfg.batch_size, cfg.grad_clip, self.loss)
            if meta_opt is not None:
                losses.append(stacked_grads(task, ctxs, cfg.query_batch_size, self.loss))
                for p_meta, p_task in zip(stack.params, task.params):
                    p_meta.grad = p_task.grad
                clip_stacked(stack.weights, cfg.grad_clip)
                meta_opt.step()
            else:
                losses.extend(inner)
                with torch.no_grad():
                    for p_meta, p_task in zip(stack.weights, task.weights):
                        p_meta.add_(p_task - p_meta, alpha=cfg.reptile_lr_w)
            with torch.no_grad():  # BN statistics follow what the task learners saw
                for b_meta, b_task in zip(stack.buffers, task.buffers):
                    b_meta.copy_(b_task)
        return stack.update(torch.stack(losses), cfg.local_steps * (cfg.inner_steps + (meta_opt is not None)))

    def _local_update_stacked(self, model: SuperNet, ctxs: list[LocalContext]) -> StackedUpdate:
        """The dual learner on K clients' supernets as one computation (`search.stacked`); the optimizers
        are `torch.optim`'s rules over the flat buffer of every client's parameters, stepping only what each
        client used."""
        cfg, ctx = self.cfg, ctxs[0]
        if cfg.meta_state == "kept":  # `MetaSearchPhase.batch_refusal` keeps the engine from coming here
            raise ValueError("algorithm.meta_state: kept has no stacked step")
        meta, task = StackedSuperNet(model, len(ctxs)), StackedSuperNet(model, len(ctxs))
        meta.load(model)
        member = meta.columns(1.0, 1.0 if ctx.train_arch else 0.0) > 0  # a warm-up's frozen logits: in no optimizer
        wd = meta.columns(cfg.weight_decay, 0.0)
        meta_opt: MaskedAdam | MaskedSGD | MaskedOptimizers | None = None
        if cfg.meta_update == "fomaml":
            lr = meta.columns(cfg.meta_lr_w * ctx.lr_scale, cfg.meta_lr_alpha)
            if cfg.alpha_optimizer == cfg.meta_optimizer:
                rules = [(cfg.meta_optimizer, member)]
            else:  # each rule holds its own entries: the weights', the logits'
                weight = meta.columns(1.0, 0.0) > 0
                rules = [(cfg.meta_optimizer, member & weight), (cfg.alpha_optimizer, member & ~weight)]
            flat_opts = [MaskedAdam(meta.flat, lr, wd, held) if rule == "adam"
                         else MaskedSGD(meta.flat, lr, wd, held, cfg.meta_momentum) for rule, held in rules]
            meta_opt = flat_opts[0] if len(flat_opts) == 1 else MaskedOptimizers(flat_opts)
        losses: list[torch.Tensor] = []
        if meta_opt is not None and self.plain(ctx):  # as `local_update`: the meta optimizer on support batches
            for _ in range(self.plain_steps()):
                loss, grad, used = stacked_step(meta, ctxs, cfg.batch_size, self.loss)
                meta.clip_weights(grad, cfg.grad_clip)
                meta_opt.step(meta.flat, grad, used)
                losses.append(loss)
            return StackedUpdate(meta.member_views(), torch.stack(losses).mean(0).tolist(), self.plain_steps())
        inner_lr = meta.columns(cfg.inner_lr_w * ctx.lr_scale, cfg.inner_lr_alpha)
        reptile = meta.columns(cfg.reptile_lr_w, cfg.reptile_lr_alpha if ctx.train_arch else 0.0)
        for _ in range(cfg.local_steps):
            task.copy_(meta)
            inner_opt = MaskedAdam(task.flat, inner_lr, wd, member, betas=cfg.inner_betas)
            inner = []
            for _ in range(cfg.inner_steps):
                loss, grad, used = stacked_step(task, ctxs, cfg.batch_size, self.loss)
                task.clip_weights(grad, cfg.grad_clip)
                inner_opt.step(task.flat, grad, used)
                inner.append(loss)
            if meta_opt is not None:
                loss, grad, used = stacked_step(task, ctxs, cfg.query_batch_size, self.loss)
                task.clip_weights(grad, cfg.grad_clip)
                meta_opt.step(meta.flat, grad, used)
                losses.append(loss)
            else:
                losses.extend(inner)
                with torch.no_grad():
                    meta.flat.addcmul_(task.flat - meta.flat, reptile)
            with torch.no_grad():
                meta.bflat.copy_(task.bflat)  # BN statistics follow what the task learners saw
        steps = cfg.local_steps * (cfg.inner_steps + (meta_opt is not None))
        return StackedUpdate(meta.member_views(), torch.stack(losses).mean(0).tolist(), steps)

    def personalize(self, model: SuperNet, task: SuperNet, ctx: LocalContext, steps: int) -> Forward:
        """A client's model after `steps` steps on its local train split, from the global one (`model`).

        On a fixed architecture (Per-FedAvg) the task learner adapts the network. On a supernet the client
        keeps the global final net (`personalize.adapt: discrete`: the logits and so the genotype stay) and
        adapts its weights with BN normalizing by the global running statistics (`personalize.bn: frozen`):
        in train mode a batch of one or two classes is normalized by its own statistics, which subtract the
        very feature means that tell its classes apart, and the running statistics move towards them; on
        MNIST Dirichlet 0.1 that lowered 5 of 10 clients, one by 46 points (docs/results.md, issue 23).
        `personalize.holdout` of the train split keeps the global weights where the adapted ones do worse.
        """
        copy_state(task, model)
        if ctx.masks is None:
            self.adapt(task, ctx, steps)
            return task
        p = self.personalize_cfg
        if p.adapt == "supernet":
            self.adapt(task, ctx, steps)
            arch = arch_from_genotype(task, derive_genotype(task, ctx.masks, ctx.tau))
            return lambda x: task(x, arch)
        arch = arch_from_genotype(task, derive_genotype(model, ctx.masks, ctx.tau))
        fit, held = holdout_split(ctx.train_idx, p.holdout, ctx.batch_gen)
        self.adapt_weights(task, arch, dataclasses.replace(ctx, train_idx=fit), steps, frozen_bn=p.bn == "frozen")
        if held.numel():
            won, lost = paired_outcomes(correct(task, arch, ctx, held), correct(model, arch, ctx, held))
            if not adaptation_wins(won, lost, p.holdout_z):
                copy_state(task, model)  # no evidence that adapting helps on data it did not fit: keep the global
        return lambda x: task(x, arch)

    def adapt_weights(self, net: SuperNet, arch: ArchSample, ctx: LocalContext, steps: int,
                      frozen_bn: bool) -> None:
        """`steps` Adam steps (the task learner's rate and betas) on the weights of the fixed net `arch`; the
        logits never move. `frozen_bn`: BN normalizes with, and keeps, the global running statistics (eval
        mode), not with those of the client's batches."""
        opt = torch.optim.Adam(net.weights(), lr=self.cfg.inner_lr_w * ctx.lr_scale, betas=self.cfg.inner_betas,
                               weight_decay=self.cfg.weight_decay, foreach=True)
        net.train(not frozen_bn)
        for _ in range(steps):
            x, y = draw_batch(ctx, ctx.train_idx, self.cfg.batch_size)
            loss = self.loss(net(x, arch), y)
            net.zero_grad(set_to_none=True)
            loss.backward()
            clip_weight_grads(net, self.cfg.grad_clip)
            opt.step()
        net.train()


META_STATE = "meta_adam"  # a client's kept meta Adam state (`algorithm.meta_state: kept`)


def adam_state_size(params: list[torch.Tensor]) -> int:
    """Values of a kept Adam state over `params`: first and second moments per entry, then a step count per
    tensor (torch's Adam steps a tensor whole or not at all)."""
    return 2 * sum(p.numel() for p in params) + len(params)


def _adam_parts(params: list[torch.Tensor], flat: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
    """(m, v, step) views of `flat` for each of `params`."""
    sizes = [p.numel() for p in params]
    n = sum(sizes)
    m, v, t = flat.split([n, n, len(params)])
    return list(zip(m.split(sizes), v.split(sizes), t.split(1)))


def load_adam_state(opt: torch.optim.Optimizer, params: list[torch.Tensor], flat: torch.Tensor) -> None:
    """Give `opt` the state `flat` (`dump_adam_state`'s layout) holds for `params`; a tensor whose step count
    is 0 (never stepped, or a client's first round: the table starts at zeros) starts fresh, as torch would."""
    for p, (m, v, t) in zip(params, _adam_parts(params, flat)):
        if float(t) > 0:
            opt.state[p] = {"step": torch.tensor(float(t)), "exp_avg": m.view_as(p).to(p, copy=True),
                            "exp_avg_sq": v.view_as(p).to(p, copy=True)}


def dump_adam_state(opt: torch.optim.Optimizer, params: list[torch.Tensor], previous: torch.Tensor) -> torch.Tensor:
    """The state of `opt` over `params` as one flat tensor: every tensor's m, then its v, then the step counts.
    A tensor the optimizer holds no state for (not stepped this round, or not in it: a warm-up's frozen
    logits) keeps its `previous` state."""
    out = previous.clone()
    for p, (m, v, t) in zip(params, _adam_parts(params, out)):
        state = opt.state.get(p)
        if state:
            m.copy_(state["exp_avg"].reshape(-1))
            v.copy_(state["exp_avg_sq"].reshape(-1))
            t.fill_(float(state["step"]))
    return out


def holdout_split(idx: torch.Tensor, fraction: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """`idx` split into (fit, held): a random `fraction` of it held out (none when that rounds to no sample or
    leaves none to fit), drawn from `generator` (the client's personalization stream: rank-invariant)."""
    n_held = int(fraction * idx.numel())
    if n_held == 0 or n_held >= idx.numel():
        return idx, idx[:0]
    order = torch.randperm(idx.numel(), generator=generator, device=generator.device).to(idx.device)
    return idx[order[n_held:]], idx[order[:n_held]]


@torch.no_grad()
def correct(net: SuperNet, arch: ArchSample, ctx: LocalContext, idx: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """Which of the samples `idx` of the client's train split the fixed net `arch` classifies right (eval
    mode): a bool per sample, so that two nets can be compared sample by sample."""
    was_training = net.training
    net.eval()
    right = [net(x.contiguous(memory_format=torch.channels_last) if ctx.channels_last else x, arch).argmax(dim=1) == y
             for x, y in iterate_batches(ctx.train, idx, batch_size)]
    net.train(was_training)
    return torch.cat(right).cpu()


def paired_outcomes(adapted: torch.Tensor, global_: torch.Tensor) -> tuple[int, int]:
    """On the same samples: how many only the adapted net gets right, and how many only the global one."""
    return int((adapted & ~global_).sum()), int((global_ & ~adapted).sum())


def adaptation_wins(won: int, lost: int, z: float) -> bool:
    """Whether a client keeps its adapted weights: McNemar's one-sided test on the held-out samples where
    the two nets disagree (`won` only the adapted right, `lost` only the global), adapting when the margin
    is at least `z` of its standard errors, won - lost >= z * sqrt(won + lost), and is a win at all.

    Why a test and not "at least as accurate": with no gain to find (IID clients) the hold-out's sampling
    noise decided, and a client of Fashion-MNIST IID kept weights that lost it 1.3 points on its test split
    (docs/results.md). Under label skew adaptation wins by far more than its noise and still adapts.
    `z` 0 is the plain comparison (adapt unless the adapted net does worse)."""
    if z == 0:
        return won >= lost
    return won > lost and won - lost >= z * (won + lost) ** 0.5


class MetaSearchPhase(SearchPhase):
    """FedMetaNAS's search phase: with `algorithm.meta_state: kept` each client keeps its meta Adam state
    between rounds (client state), and its clients are stepped one after another."""

    def on_model(self, model: SuperNet) -> None:
        super().on_model(model)
        self.state_size = adam_state_size([*model.weights(), *model.alphas()])

    def _kept(self) -> bool:
        return self.cfg.algorithm.meta_state == "kept"

    def client_state(self) -> dict[str, int]:
        return {META_STATE: self.state_size} if self._kept() else {}

    def batch_refusal(self) -> str | None:
        if self._kept():
            return "algorithm.meta_state: kept has no batched form (its stacked step keeps no client state)"
        return super().batch_refusal()


def dual_learner_batches(cfg: AlgorithmConfig) -> list[tuple[str, int, int]]:
    """The dual learner's support and query batches."""
    return [("algorithm.batch_size", cfg.batch_size, 1), ("algorithm.query_batch_size", cfg.query_batch_size, 1)]


def dual_learner_lr_scale(cfg: AlgorithmConfig, rounds: int) -> Callable[[int], float]:
    """The dual learner's per-round factor on the weights' rates (`algorithm.lr_schedule` over `rounds`, after
    `algorithm.lr_warmup_fraction` of them ramping up)."""
    warmup = switch_round(cfg.lr_warmup_fraction, rounds)  # the first round after the ramp (fraction < 1)
    return lambda rnd: lr_factor(cfg.lr_schedule, cfg.lr_min_factor, rnd, rounds, warmup)


class FedMetaNASAlgorithm(Algorithm):
    """FedMetaNAS: one search phase; Gumbel relaxation (`search.gumbel`) at an annealed temperature,
    the dual learner on each client, soft pruning by the server; the final net is not retrained."""

    name = "fedmetanas"
    sections: dict[str, type] = {}  # its settings are the `algorithm` and `search` sections

    def batch_sizes(self) -> list[tuple[str, int, int]]:
        return dual_learner_batches(self.cfg.algorithm)

    def phases(self) -> list[Phase]:
        cfg, s = self.cfg, self.cfg.search
        rounds = cfg.federated.rounds
        schedule = SearchSchedule.of(s, rounds)
        # The temperature stays at tau_max through the warm-up, then anneals over anneal_fraction of the rest.
        anneal_rounds = max(1, round(s.anneal_fraction * (rounds - schedule.warmup_rounds)))

        def tau(rnd: int) -> float:
            return temperature(s.tau_schedule, s.tau_max, s.tau_min, rnd - schedule.warmup_rounds, anneal_rounds)

        rule = FedMetaNAS(cfg.algorithm, cfg.personalize, switch_round(cfg.algorithm.plain_after_fraction, rounds))
        return [MetaSearchPhase(cfg, Span("search", "rounds", 0, rounds), rule, tau=tau,
                            lr_scale=dual_learner_lr_scale(cfg.algorithm, rounds), relax_mode=s.gumbel, prune=True,
                            base_lr=cfg.algorithm.inner_lr_w, schedule=schedule)]
