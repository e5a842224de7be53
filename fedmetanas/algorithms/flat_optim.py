"""Optimizers over K clients' parameters held as one flat tensor, stepping only what each client used.

`torch.optim.Adam` / `SGD` skip a parameter whose `.grad` is None: no weight decay, no moment update, no
step count. In a stacked step a client's unused tensor (an op it did not compute) has a zero gradient
instead, and a zero gradient *does* move Adam's moments and SGD's momentum. These optimizers take a
`used` mask (the parameter's shape) and leave every unused entry — parameter, moments, step count — exactly as it was, so
each row follows what `torch.optim` does for that client alone (to float rounding: the same formulas,
evaluated over the whole buffer). A handful of ops per step, whatever the number of parameter tensors.

Per-entry learning rates and weight decays stand for the param groups (weights vs architecture logits);
`member` says which entries the optimizer holds at all (a frozen logit: not in any group).
"""

from __future__ import annotations

import torch


class MaskedAdam:
    """`torch.optim.Adam` (no amsgrad) for every client's entries of a flat parameter tensor at once."""

    def __init__(self, like: torch.Tensor, lr: torch.Tensor, weight_decay: torch.Tensor, member: torch.Tensor,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        self.lr, self.wd, self.member = lr, weight_decay, member  # the parameter's shape each
        self.b1, self.b2, self.eps = float(betas[0]), float(betas[1]), eps
        self.m = torch.zeros_like(like)
        self.v = torch.zeros_like(like)
        self.t = torch.zeros_like(like)  # each entry's own step count (skipped steps do not count)

    @torch.no_grad()
    def step(self, param: torch.Tensor, grad: torch.Tensor, used: torch.Tensor) -> None:
        u = used & self.member
        uf = u.to(param.dtype)
        self.t.add_(uf)
        g = torch.addcmul(grad, param, self.wd)  # grad + weight_decay * param (L2, as Adam's weight_decay)
        self.m.lerp_(g, uf * (1.0 - self.b1))  # unused: weight 0, m unchanged
        self.v.copy_(torch.where(u, torch.addcmul(self.v * self.b2, g, g, value=1.0 - self.b2), self.v))
        t = self.t.clamp(min=1.0)  # an entry never stepped has t = 0: its update is masked out below
        step_size = self.lr / (1.0 - torch.pow(self.b1, t))
        denom = (self.v.sqrt() / torch.sqrt(1.0 - torch.pow(self.b2, t))).add_(self.eps)
        param.sub_(torch.where(u, step_size * self.m / denom, torch.zeros((), device=param.device)))


class MaskedSGD:
    """`torch.optim.SGD` (momentum, no dampening, no Nesterov) for every client's entries at once."""

    def __init__(self, like: torch.Tensor, lr: torch.Tensor, weight_decay: torch.Tensor, member: torch.Tensor,
                 momentum: float = 0.0) -> None:
        self.lr, self.wd, self.member, self.momentum = lr, weight_decay, member, float(momentum)
        self.buf = torch.zeros_like(like) if self.momentum else None
        self.has_buf = torch.zeros(like.shape, dtype=torch.bool, device=like.device) if self.momentum else None

    @torch.no_grad()
    def step(self, param: torch.Tensor, grad: torch.Tensor, used: torch.Tensor) -> None:
        u = used & self.member
        g = torch.addcmul(grad, param, self.wd)
        if self.buf is not None:  # torch: the first step's buffer is the gradient itself, then mu * buf + g
            moved = torch.where(self.has_buf, torch.add(g, self.buf, alpha=self.momentum), g)
            self.buf.copy_(torch.where(u, moved, self.buf))
            self.has_buf |= u
            g = self.buf
        param.sub_(torch.where(u, self.lr * g, torch.zeros((), device=param.device)))


class MaskedOptimizers:
    """Masked optimizers over disjoint entries of one flat tensor (their `member`s do not overlap), stepped as
    one: the weights under one rule and the architecture logits under another (`algorithm.meta_optimizer_alpha`)."""

    def __init__(self, optimizers: list[MaskedAdam | MaskedSGD]) -> None:
        self.optimizers = optimizers

    def step(self, param: torch.Tensor, grad: torch.Tensor, used: torch.Tensor) -> None:
        for opt in self.optimizers:
            opt.step(param, grad, used)
