"""FedNAS's local search: MiLeNAS (He et al. 2020), first order, on a softmax-relaxed supernet.

Each step draws one batch from the client's training half and one from its validation half
(the local train split's even / odd positions) and, as the public FedNAS code does,
  1. updates the alphas (Adam) with  grad_alpha L_val(w, alpha) + lambda * grad_alpha L_train(w, alpha),
  2. then updates the weights (SGD with momentum) with grad_w L_train(w, alpha) at the new alphas,
     clipping the *weights'* gradient norm (the public code clips the alphas': see docs/method.md).
The relaxation is the plain softmax of the logits over every op (no Gumbel noise, no pruning), so
every op of every edge is computed: that is FedNAS's cost.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, ClassVar

import torch
from torch import nn

from fedmetanas.algorithms.base import Algorithm, Phase, Span
from fedmetanas.algorithms.batched import StackedUpdate, draw_stacked, in_equal_batches, stacked_loss_grad
from fedmetanas.algorithms.common import LocalContext, LocalResult, clip_weight_grads, draw_batch
from fedmetanas.algorithms.flat_optim import MaskedAdam, MaskedSGD
from fedmetanas.algorithms.fedavg import FedAvgConfig, fedavg_batches, fedavg_phase
from fedmetanas.algorithms.phases import SearchPhase
from fedmetanas.capture import op_runner
from fedmetanas.config import AT_LEAST_1, NON_NEGATIVE, Config, ConfigError, Range, check_betas, check_norm_groups
from fedmetanas.search.genotypes import cell_kinds
from fedmetanas.search.relax import lr_factor
from fedmetanas.search.stacked import StackedSuperNet
from fedmetanas.search.supernet import SuperNet, sample_arch


@dataclass(frozen=True)
class FedNASConfig:
    """FedNAS (He et al. 2020): local MiLeNAS search with a plain softmax over the ops (search.gumbel,
    tau and pruning do not apply), then `retrain_rounds` of FedAvg on the searched genotype (fedavg section).

    Defaults are the public FedNAS / DARTS settings."""

    local_steps: int = 10  # MiLeNAS steps (one train + one validation batch each) per client per round
    batch_size: int = 32
    lr_w: float = 0.025
    lr_w_min: float = 0.001  # cosine over federated.rounds (the cap on search rounds)
    momentum: float = 0.9
    weight_decay: float = 3e-4
    lr_alpha: float = 3e-4
    alpha_betas: tuple[float, float] = (0.5, 0.999)
    alpha_weight_decay: float = 1e-3
    lambda_train: float = 1.0  # alpha gradient = grad L_val + lambda_train * grad L_train
    grad_clip: float = 5.0  # on the weights' gradients (the public code clips the alphas': a defect)
    retrain_rounds: int = 20
    # The search ends once its genotype has stayed the same for this many rounds in a row (federated.rounds
    # is then the cap on search rounds); 0: search all federated.rounds (docs/method.md).
    stable_rounds: int = 3

    ranges: ClassVar[dict[str, Range]] = {
        "stable_rounds": (lambda v: v >= 0, "an integer >= 0 (0: search all federated.rounds)"),
        **dict.fromkeys(("local_steps", "batch_size", "retrain_rounds"), AT_LEAST_1),
        **dict.fromkeys(("lr_w", "lr_w_min", "momentum", "weight_decay", "lr_alpha", "alpha_weight_decay",
                         "lambda_train", "grad_clip"), NON_NEGATIVE)}

    def check(self) -> None:
        check_betas("fednas.alpha_betas", self.alpha_betas)


def split_train_val(idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A client's local train split halved into MiLeNAS's train and validation parts (alternate items)."""
    if idx.numel() < 2:
        return idx, idx
    return idx[0::2], idx[1::2]


LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def softmax_loss(model: SuperNet, ctx: LocalContext, x: torch.Tensor, y: torch.Tensor,
                 loss: LossFn = nn.functional.cross_entropy) -> torch.Tensor:
    """`loss` (the rule's; cross-entropy) under the softmax relaxation (temperature 1, the run's masks); the
    edges' ops run as `ctx.capture` says (`fedmetanas.capture`)."""
    return loss(model(x, sample_arch(model, ctx.masks, 1.0, "expected"), run_op=op_runner(ctx.capture)), y)


def milenas_alpha_grads(model: SuperNet, ctx: LocalContext, train: tuple[torch.Tensor, torch.Tensor],
                        val: tuple[torch.Tensor, torch.Tensor], lambda_train: float,
                        loss: LossFn = nn.functional.cross_entropy) -> list[torch.Tensor]:
    """grad_alpha L_val + lambda_train * grad_alpha L_train, both at the current (w, alpha)."""
    alphas = model.alphas()
    # allow_unused: a net with no normal cell (2 layers, both reductions) never uses alpha_normal.
    g_train = torch.autograd.grad(softmax_loss(model, ctx, *train, loss), alphas, allow_unused=True)
    g_val = torch.autograd.grad(softmax_loss(model, ctx, *val, loss), alphas, allow_unused=True)
    return [torch.zeros_like(a) if gv is None else gv + lambda_train * gt
            for a, gv, gt in zip(alphas, g_val, g_train)]


class MiLeNAS:
    """The client-side learning rule of FedNAS's search stage."""

    def __init__(self, cfg: FedNASConfig) -> None:
        self.cfg = cfg

    def loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The loss of a batch, for the sequential and the batched step alike (override it and both change)."""
        return nn.functional.cross_entropy(logits, y)

    def local_update(self, model: SuperNet, task: SuperNet | None, ctx: LocalContext) -> LocalResult:  # noqa: ARG002
        """`local_steps` MiLeNAS steps; `model` holds the global parameters on entry, the client's after.

        The optimizers start afresh every round (momentum and Adam moments are not kept per client:
        a simulator's memory must not grow with the number of clients).
        """
        c = self.cfg
        train_idx, val_idx = split_train_val(ctx.train_idx)
        opt_w = torch.optim.SGD(model.weights(), lr=c.lr_w * ctx.lr_scale, momentum=c.momentum,
                                weight_decay=c.weight_decay, foreach=True)
        opt_a = torch.optim.Adam(model.alphas(), lr=c.lr_alpha, betas=c.alpha_betas,
                                 weight_decay=c.alpha_weight_decay, foreach=True)
        losses = []
        for _ in range(c.local_steps):
            train = draw_batch(ctx, train_idx, c.batch_size)
            val = draw_batch(ctx, val_idx, c.batch_size)
            if ctx.train_arch:  # a warm-up freezes the logits
                grads = milenas_alpha_grads(model, ctx, train, val, c.lambda_train, self.loss)
                for a, g in zip(model.alphas(), grads):
                    a.grad = g
                opt_a.step()
            loss = softmax_loss(model, ctx, *train, self.loss)
            model.zero_grad(set_to_none=True)
            loss.backward()
            for a in model.alphas():
                a.grad = None  # the weight step must not move the alphas
            clip_weight_grads(model, c.grad_clip)
            opt_w.step()
            losses.append(loss.detach())
        return LocalResult(loss=float(torch.stack(losses).mean()), steps=c.local_steps)

    def local_update_batch(self, model: SuperNet, ctxs: list[LocalContext]) -> StackedUpdate:
        """`local_update` for several clients at once (`search.stacked`): the same MiLeNAS steps over the
        clients' stacked supernets, with `torch.optim`'s Adam and SGD rules over the flat buffer."""
        c = self.cfg

        def rows(ctx: LocalContext) -> tuple[int, int]:
            train, val = split_train_val(ctx.train_idx)
            return int(train.numel()), int(val.numel())

        return in_equal_batches(ctxs, (c.batch_size, c.batch_size), lambda part: self._stacked(model, part), rows)

    def _stacked(self, model: SuperNet, ctxs: list[LocalContext]) -> StackedUpdate:
        c, ctx = self.cfg, ctxs[0]
        net = StackedSuperNet(model, len(ctxs))
        net.load(model)
        halves = [split_train_val(x.train_idx) for x in ctxs]
        trains = [dataclasses.replace(x, train_idx=h[0]) for x, h in zip(ctxs, halves)]
        vals = [dataclasses.replace(x, train_idx=h[1]) for x, h in zip(ctxs, halves)]
        weights, alphas = net.flat[: net.n_weight], net.flat[net.n_weight:]  # views: each optimizer its part
        every_w, every_a = torch.ones_like(weights, dtype=torch.bool), torch.ones_like(alphas, dtype=torch.bool)
        opt_w = MaskedSGD(weights, torch.full_like(weights, c.lr_w * ctx.lr_scale),
                          torch.full_like(weights, c.weight_decay), every_w, c.momentum)
        opt_a = MaskedAdam(alphas, torch.full_like(alphas, c.lr_alpha), torch.full_like(alphas, c.alpha_weight_decay),
                           every_a, betas=c.alpha_betas)
        losses = []
        for _ in range(c.local_steps):
            train = draw_stacked(trains, c.batch_size)  # each client: its train batch, then its validation one
            val = draw_stacked(vals, c.batch_size)
            if ctx.train_arch:
                _, g_train, _ = stacked_loss_grad(net, ctxs, *train, 1.0, "expected", self.loss, "alphas")
                _, g_val, _ = stacked_loss_grad(net, ctxs, *val, 1.0, "expected", self.loss, "alphas")
                # Every logit steps, as sequentially (an unused one's gradient is zero-filled there too).
                opt_a.step(alphas, g_val.add_(g_train, alpha=c.lambda_train), every_a)
            loss, grad, used = stacked_loss_grad(net, ctxs, *train, 1.0, "expected", self.loss)
            net.clip_weights(grad, c.grad_clip)
            opt_w.step(weights, grad[: net.n_weight], used[: net.n_weight])
            losses.append(loss)
        return StackedUpdate(net.member_views(), torch.stack(losses).mean(0).tolist(), c.local_steps)


class FedNAS(Algorithm):
    """FedNAS: MiLeNAS search (softmax, temperature 1, no pruning) until its genotype has been stable for
    `fednas.stable_rounds` rounds, at most `federated.rounds`, then `fednas.retrain_rounds` of FedAvg
    training the searched genotype from scratch (rows in /retrain)."""

    name = "fednas"
    sections = {"fednas": FedNASConfig, "fedavg": FedAvgConfig}

    @classmethod
    def validate(cls, cfg: Config) -> None:
        """The retrained network (fedavg.layers) needs only cell kinds the searched one has."""
        m, f = cfg.model, cfg.fedavg
        layers = f.layers or m.layers
        searched = cell_kinds(m.layers, m.reduction_layers)
        missing = [k for k in cell_kinds(layers, None if f.layers else m.reduction_layers) if k not in searched]
        if missing:
            raise ConfigError(
                f"fedavg.layers: the retrained network ({layers} layers) needs a {missing[0]} cell, which the "
                f"searched network (model.layers: {m.layers}) does not have; search with more model.layers or "
                "retrain with fewer fedavg.layers")
        check_norm_groups("fedavg.channels", f.channels, cfg)

    def batch_sizes(self) -> list[tuple[str, int, int]]:
        """MiLeNAS draws its train and validation batches from halves of a client's split."""
        return [("fednas.batch_size", self.cfg.fednas.batch_size, 2), *fedavg_batches(self.cfg)]

    def phases(self) -> list[Phase]:
        cfg, c = self.cfg, self.cfg.fednas
        search = Span("search", "rounds", 0, cfg.federated.rounds)

        def lr_scale(rnd: int) -> float:
            return lr_factor("cosine", c.lr_w_min / c.lr_w if c.lr_w > 0 else 1.0, rnd - search.first, search.rounds)

        # Personalization happens after retraining, so the search phase's base rate is never used for it.
        return [SearchPhase(cfg, search, MiLeNAS(c), tau=lambda rnd: 1.0, lr_scale=lr_scale, relax_mode="expected",
                            prune=False, base_lr=c.lr_w, needs_task=False, stable_rounds=c.stable_rounds),
                fedavg_phase(self, Span("train", "retrain", search.end, c.retrain_rounds), None)]
