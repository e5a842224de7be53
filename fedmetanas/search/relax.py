"""Continuous relaxations of a categorical choice, temperature schedules and soft-pruning masks.

Defined once here and used for both kinds of architecture logits: the op logits of every edge
(alphas) and the input-pair logits of every node (betas). Each function works on a 2-D tensor
of independent categorical rows; masked entries (False) get probability exactly 0.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

RelaxMode = Literal["soft", "hard", "expected", "argmax"]


def temperature(schedule: str, tau_max: float, tau_min: float, step: int, total: int) -> float:
    """Annealed temperature at `step` of `total` (tau_max at the first step, tau_min at the last)."""
    p = min(max(step, 0) / max(total - 1, 1), 1.0)
    if schedule == "linear":
        return tau_max - (tau_max - tau_min) * p
    if schedule == "exponential":
        return tau_max * (tau_min / tau_max) ** p
    if schedule == "cosine":
        return tau_min + 0.5 * (tau_max - tau_min) * (1.0 + math.cos(math.pi * p))
    raise ValueError(f"search.tau_schedule: unknown schedule {schedule!r}; use linear, exponential or cosine")


def lr_factor(schedule: str, min_factor: float, step: int, total: int, warmup: int = 0) -> float:
    """Learning-rate multiplier at `step` of `total`: 1 throughout, or cosine from 1 to `min_factor`.

    With `warmup` > 0 the first `warmup` steps ramp linearly, 1/(warmup+1), 2/(warmup+1), ..., and the
    schedule runs over the remaining `total - warmup` steps from 1: the peak comes right after the ramp.
    """
    if step < warmup:
        return (max(step, 0) + 1) / (warmup + 1)
    step, total = step - warmup, total - warmup
    if schedule == "constant":
        return 1.0
    p = min(max(step, 0) / max(total - 1, 1), 1.0)
    return min_factor + 0.5 * (1.0 - min_factor) * (1.0 + math.cos(math.pi * p))


def gumbel_noise(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Standard Gumbel(0, 1) noise from an explicit generator, returned on the CPU (the host decides which
    ops a hard or sparse sample computes). Drawn where the generator lives: a CPU generator (the loop's:
    the same numbers whatever device trains) or a device's own (a user's, or a benchmark's).

    Elementwise from one uniform draw, so one call for several tensors' noise gives the numbers of
    consecutive calls: `sample_arch` draws a whole step's noise at once.
    """
    u = torch.rand(shape, generator=generator, dtype=torch.float32, device=generator.device).cpu()
    return -torch.log(-torch.log(u.clamp_(1e-10, 1.0 - 1e-7)))


def masked_logits(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Logits with pruned entries set to -inf, so they get zero probability."""
    return logits.masked_fill(~mask.to(logits.device), float("-inf"))


def sampled_onehot(logits_cpu: torch.Tensor, mask_cpu: torch.Tensor, noise_cpu: torch.Tensor | None) -> torch.Tensor:
    """The host half of `hard` and `argmax`: a one-hot bool row per row at the argmax of the masked logits
    (plus noise). Decided on a CPU copy, so the choice depends only on the logits' values and the noise,
    and the host knows at once which ops to compute."""
    z = masked_logits(logits_cpu.detach(), mask_cpu)
    if noise_cpu is not None:
        z = z + noise_cpu
    return torch.nn.functional.one_hot(z.argmax(dim=-1), logits_cpu.shape[-1]).to(torch.bool)


def sparse_active(logits_cpu: torch.Tensor, mask_cpu: torch.Tensor, noise_cpu: torch.Tensor, tau: float,
                  topk: int, eps: float) -> torch.Tensor:
    """The host half of a sparse `soft` sample: which entries of each row to compute.

    An entry is computed if it is unmasked, among the `topk` largest perturbed logits of its row (0: any)
    and its Gumbel-softmax weight is at least `eps`; each row's largest entry always is. The entries left
    out get weight exactly 0 in the forward pass, so a sparse sample differs from the plain soft one by the
    left-out terms alone: at most `eps` times an op's output each, and nothing where nothing is left out.
    """
    z = masked_logits(logits_cpu.detach(), mask_cpu) + noise_cpu
    active = mask_cpu.clone()
    if eps > 0:
        active &= torch.softmax(z / tau, dim=-1) >= eps
    if 0 < topk < z.shape[-1]:
        top = torch.zeros_like(active)
        top.scatter_(-1, z.topk(topk, dim=-1).indices, True)
        active &= top
    active.scatter_(-1, z.argmax(dim=-1, keepdim=True), True)
    return active


def relaxed_weights(logits: torch.Tensor, mask: torch.Tensor, tau: float, mode: RelaxMode,
                    noise: torch.Tensor | None = None, onehot: torch.Tensor | None = None) -> torch.Tensor:
    """The device half of `relax`: every argument already on the logits' device, so no host sync.

    `noise` is required for `soft` and `hard`, `onehot` (from `sampled_onehot`) for `hard` and `argmax`;
    for `soft` an optional `onehot` is the active set of a sparse sample (`sparse_active`): the entries
    outside it get weight 0 (the others keep their Gumbel-softmax weight, not renormalized, so gradients
    still reach every logit through the softmax).
    """
    if mode == "argmax":
        return onehot.to(logits.dtype)
    z = masked_logits(logits, mask)
    if mode in ("soft", "hard"):
        z = z + noise
    soft = torch.softmax(z / tau, dim=-1)
    if mode == "hard":
        return onehot.to(soft.dtype) - soft.detach() + soft
    return soft if onehot is None else soft * onehot.to(soft.dtype)


def relax(logits: torch.Tensor, mask: torch.Tensor, tau: float, mode: RelaxMode,
          noise: torch.Tensor | None = None, topk: int = 0, eps: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Relaxed one-hot weights for each row of `logits`, and which entries must be computed.

    The definition, for one tensor; `supernet.sample_arch` computes the same for all of a step's logits
    with one transfer each way.

    Args:
        logits: (rows, k) architecture logits (may require grad).
        mask: (rows, k) bool, False where pruned; at least one True per row.
        tau: softmax temperature.
        mode: `soft` Gumbel-softmax sample (all unmasked entries active); `hard` straight-through
            Gumbel sample (forward value one-hot, gradient of the soft sample; only the sampled
            entry is active, as in GDAS); `expected` noise-free softmax; `argmax` a constant one-hot.
        noise: Gumbel noise of the same shape, required for `soft` and `hard`.
        topk, eps: `soft` only: compute just the entries `sparse_active` keeps (0, 0: all unmasked).

    Returns:
        weights (rows, k) on the logits' device, and active (rows, k) bool on the CPU.
    """
    if mode in ("soft", "hard") and noise is None:
        raise ValueError("relax: Gumbel modes need noise")
    device = logits.device
    mask_cpu = mask.to("cpu", torch.bool)
    onehot = None
    if mode in ("hard", "argmax"):
        onehot = sampled_onehot(logits.detach().cpu(), mask_cpu, noise.cpu() if mode == "hard" else None)
    elif mode == "soft" and (topk > 0 or eps > 0):
        onehot = sparse_active(logits.detach().cpu(), mask_cpu, noise.cpu(), tau, topk, eps)
    weights = relaxed_weights(logits, mask_cpu.to(device), tau, mode,
                              None if noise is None else noise.to(device),
                              None if onehot is None else onehot.to(device))
    return weights, (mask_cpu.clone() if onehot is None else onehot)


def probabilities(logits: torch.Tensor, mask: torch.Tensor, tau: float) -> torch.Tensor:
    """The annealed, noise-free distribution softmax(logits / tau) over unmasked entries."""
    return torch.softmax(masked_logits(logits.detach().float().cpu(), mask.cpu()) / tau, dim=-1)


def update_mask(logits: torch.Tensor, mask: torch.Tensor, tau: float, threshold: float) -> torch.Tensor:
    """Soft pruning: drop entries whose annealed probability fell below `threshold`.

    Masks only shrink (a pruned entry never returns), and each row's most likely entry is kept.
    `prune_on_evidence` with patience 1: one round below the threshold is evidence enough.
    """
    return prune_on_evidence(logits, mask, tau, threshold, torch.zeros(mask.shape, dtype=torch.int64), 1)[0]


def prune_on_evidence(logits: torch.Tensor, mask: torch.Tensor, tau: float, threshold: float,
                      below: torch.Tensor, patience: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Soft pruning that waits for evidence: an entry is dropped once its annealed probability has been
    below `threshold` for `patience` consecutive calls (rounds); `below` counts them per entry.

    Returns the new mask and counts (`update_mask` is patience 1). One noisy round
    cannot lock an op out: under strong label skew the averaged logits swing from round to round.
    """
    if threshold <= 0:
        return mask.clone(), torch.zeros_like(below)
    probs = probabilities(logits, mask, tau)
    low = (probs < threshold) & mask.cpu()
    below = torch.where(low, below + 1, torch.zeros_like(below))
    keep = mask.cpu() & (below < patience)
    keep.scatter_(-1, probs.argmax(dim=-1, keepdim=True), True)
    return keep, torch.where(keep, below, torch.zeros_like(below))


def entropy(logits: torch.Tensor, mask: torch.Tensor, tau: float) -> torch.Tensor:
    """Per-row entropy (nats) of the annealed distribution; 0 once a row is one-hot."""
    p = probabilities(logits, mask, tau)
    return -(p * torch.log(p.clamp_min(1e-30))).sum(dim=-1)
