"""The peer benchmark's workload, defined once so that every system does the same work.

FedAvg on the FedAvg paper's CNN, Fashion-MNIST split over clients by Dirichlet(0.5), a fixed number of
sampled clients per round, a few local SGD steps each, evaluation of the global model on a fixed test
subset after every round and on the full test set at the end. Our simulator runs it from
`configs/fedavg.yaml` plus `ours_overrides`; the peers (Flower, pfl-research) call `prepare` and the
functions below, which reuse our data loading, partition, client sampling, batch generators and model
initialisation, so the client datasets, the batches every client draws and the initial weights are
the same bits on every side. Only the framework around them differs.

This module imports our package but nothing of a peer's, so both venvs can import it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fedmetanas.algorithms.base import ModelInputs
from fedmetanas.algorithms.phases import build_fixed
from fedmetanas.config import Config
from fedmetanas.configure import load_config
from fedmetanas.data.client_data import ClientData, iterate_batches, sample_batch
from fedmetanas.data.datasets import TensorSplit, load_dataset
from fedmetanas.federated.scheduling import sample_clients
from fedmetanas.federated.setup import eval_indices, make_clients
from fedmetanas.search.relax import lr_factor
from fedmetanas.seeding import Purpose, torch_generator

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "fedavg.yaml"


@dataclass(frozen=True)
class Workload:
    """The knobs of the comparison; everything else (lr, momentum, weight decay, clip, batch size,
    cosine schedule) is read from configs/fedavg.yaml so it cannot drift from what our users run."""

    clients: int = 100
    per_round: int = 10
    rounds: int = 5
    local_steps: int = 5
    eval_subset: int = 2000
    min_samples: int = 20  # 1,000 clients of Fashion-MNIST need fewer: `min_samples_for`
    seed: int = 0
    data_root: str = str(REPO / "data")


def min_samples_for(clients: int) -> int:
    """`data.min_samples` for a client count: the config's 20 below 1,000 clients, 16 from 1,000 on.

    At 1,000 clients (60 samples each on average) no Dirichlet(0.5) draw in the partition's 1,000 tries
    gives every client 20 samples; 16 is the largest value that partitions at seed 0 (measured with
    `python benchmarks/peers_workload.py 100 1000`: 20 and 16)."""
    return 20 if clients < 1000 else 16


def ours_overrides(w: Workload) -> list[str]:
    """Our command line's `section.key=value` for the workload (one CPU thread per rank, no extras: no
    personalization, no per-round checkpoint, since the peers do neither)."""
    return [
        "fedavg.architecture=cnn", f"fedavg.local_steps={w.local_steps}",
        f"federated.num_clients={w.clients}", f"federated.clients_per_round={w.per_round}",
        f"federated.rounds={w.rounds}", f"federated.seed={w.seed}",
        f"data.min_samples={w.min_samples}", f"data.root={w.data_root}",
        f"eval.subset={w.eval_subset}", "eval.every=1", "eval.final_full=true",
        "personalize.steps=0", "checkpoint.every=0",
        "runtime.device=cpu", "runtime.threads_per_rank=1",
    ]


def config(w: Workload) -> Config:
    """Our resolved config of the workload: the single source of every hyper-parameter the peers use."""
    return load_config(CONFIG, ours_overrides(w))


@dataclass
class Task:
    """What a peer's server and clients need: our config, the data, the clients, the evaluation subset."""

    cfg: Config
    train: TensorSplit
    test: TensorSplit
    clients: list[ClientData]
    eval_idx: torch.Tensor

    @property
    def inputs(self) -> ModelInputs:
        return ModelInputs.of(self.train)


def prepare(w: Workload) -> Task:
    """Load Fashion-MNIST and partition it exactly as our set-up does (same seed, same functions)."""
    cfg = config(w)
    train, test = load_dataset(cfg.data.name, cfg.data.root, cfg.data.download)
    clients, _, _ = make_clients(cfg, train)
    return Task(cfg, train, test, clients, eval_indices(cfg, len(test)))


def initial_model(task: Task) -> nn.Module:
    """The CNN with our seeded initial weights (channels-last, as our runs hold it)."""
    return build_fixed(task.cfg, None, task.inputs).to(memory_format=_memory_format(task))


def new_model(task: Task) -> nn.Module:
    """A CNN to load weights into (its own initial weights are overwritten)."""
    return initial_model(task)


def round_clients(task: Task, rnd: int) -> list[int]:
    """Round `rnd`'s (0-based) participants as our loop samples them."""
    f = task.cfg.federated
    return [int(c) for c in sample_clients(f.num_clients, f.clients_per_round, f.seed, rnd)]


def round_lr(task: Task, rnd: int) -> float:
    """fedavg.lr on our cosine schedule down to fedavg.lr_min over the run's rounds."""
    f = task.cfg.fedavg
    return f.lr * lr_factor("cosine", f.lr_min / f.lr if f.lr > 0 else 1.0, rnd, task.cfg.federated.rounds)


def local_train(task: Task, model: nn.Module, cid: int, rnd: int) -> tuple[float, int]:
    """Client `cid`'s local work in round `rnd` (0-based) in plain PyTorch: `fedavg.local_steps` SGD steps
    (momentum, weight decay, gradient clipping; fresh optimizer state) on batches drawn from the client's
    own generator, as our clients draw them.

    Returns:
        (mean batch loss, the client's local train size: its weight in the average).
    """
    f, seed = task.cfg.fedavg, task.cfg.federated.seed
    idx = task.clients[cid].train_idx
    gen = torch_generator(seed, Purpose.BATCHES, rnd, cid)
    opt = torch.optim.SGD(model.parameters(), lr=round_lr(task, rnd), momentum=f.momentum,
                          weight_decay=f.weight_decay, foreach=True)
    model.train()
    losses = []
    for _ in range(f.local_steps):
        x, y = sample_batch(task.train, idx, f.batch_size, gen)
        x = x.contiguous(memory_format=_memory_format(task))
        loss = nn.functional.cross_entropy(model(x), y)
        model.zero_grad(set_to_none=True)
        loss.backward()
        if f.grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), f.grad_clip)
        opt.step()
        losses.append(loss.detach())
    return float(torch.stack(losses).mean()), int(idx.numel())


@torch.no_grad()
def evaluate(task: Task, model: nn.Module, full: bool = False) -> tuple[float, float]:
    """(loss, accuracy) of `model` on the per-round evaluation subset, or on the full test set."""
    idx = torch.arange(len(task.test)) if full else task.eval_idx
    model.eval()
    loss_sum, correct = 0.0, 0
    for x, y in iterate_batches(task.test, idx, task.cfg.eval.batch_size):
        logits = model(x.contiguous(memory_format=_memory_format(task)))
        loss_sum += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(1) == y).sum())
    model.train()
    n = int(idx.numel())
    return loss_sum / n, correct / n


def _memory_format(task: Task) -> torch.memory_format:
    return torch.channels_last if task.cfg.model.channels_last else torch.contiguous_format


def largest_min_samples(clients: int, alpha: float = 0.5, seed: int = 0, start: int = 20) -> int:
    """The largest `data.min_samples` (counting down from `start`) for which our Dirichlet partition of
    Fashion-MNIST over `clients` clients succeeds at `seed` (how `min_samples_for` was chosen)."""
    from fedmetanas.config import ConfigError  # noqa: PLC0415 - only this probe needs it

    w = Workload(clients=clients, per_round=min(10, clients), seed=seed)
    train, _ = load_dataset("fashion_mnist", w.data_root, False)
    for value in range(start, 0, -1):
        cfg = load_config(CONFIG, [*ours_overrides(Workload(clients=clients, per_round=w.per_round, seed=seed,
                                                            min_samples=value)), f"data.dirichlet_alpha={alpha}"])
        try:
            make_clients(cfg, train)
        except ConfigError:
            continue
        return value
    return 0


if __name__ == "__main__":  # python benchmarks/peers_workload.py 1000: the probe behind min_samples_for
    import sys

    for n in [int(a) for a in sys.argv[1:]] or [100, 1000]:
        print(f"{n} clients: largest data.min_samples that partitions: {largest_min_samples(n)}")
