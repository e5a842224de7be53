"""Everything the round loop receives ready: data on the device, the client partition and splits,
the evaluation indices, and how many clients take part per round.

Every rank computes the same set-up from the config alone (seeded), so no rank waits for another.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fedmetanas.algorithms.base import ModelInputs
from fedmetanas.config import Config, ConfigError
from fedmetanas.data.client_data import ClientIndex, Rows, build_clients
from fedmetanas.data.datasets import TensorSplit, load_dataset
from fedmetanas.data.partition import class_counts, make_partition, partition_hash, split_local
from fedmetanas.dist import DistContext
from fedmetanas.federated.scheduling import clients_per_round
from fedmetanas.rundir import check_run_dir
from fedmetanas.seeding import Purpose, derive_seed, torch_generator


@dataclass
class Setup:
    """A rank's view of the run's data and clients."""

    run_path: Path
    train: TensorSplit  # on the rank's device
    test: TensorSplit
    clients: ClientIndex  # clients[i]: client i's ClientData (views made on demand; sizes as arrays)
    train_idx: Rows  # train_idx[i]: client i's local train rows, on the device
    counts: np.ndarray  # clients x classes
    partition_hash: str
    eval_idx: torch.Tensor  # the per-round evaluation subset of the test set
    per_round: int  # clients sampled per round

    @property
    def inputs(self) -> ModelInputs:
        return ModelInputs.of(self.train)


def make_clients(cfg: Config, train: TensorSplit) -> tuple[ClientIndex, np.ndarray, str]:
    """Partition the training set over clients and split each into local train / local test."""
    d, f = cfg.data, cfg.federated
    labels = train.labels.cpu().numpy()
    try:
        parts = make_partition(labels, d.partition, f.num_clients, derive_seed(f.seed, Purpose.PARTITION),
                               alpha=d.dirichlet_alpha, min_samples=d.min_samples,
                               shards_per_client=d.shards_per_client)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    splits = split_local(parts, d.local_test_fraction, derive_seed(f.seed, Purpose.PARTITION, 1))
    return build_clients(splits), class_counts(labels, parts, train.num_classes), partition_hash(parts)


def eval_indices(cfg: Config, n_test: int) -> torch.Tensor:
    """The per-round evaluation subset: a fixed seeded sample of the test set (or all of it)."""
    if cfg.eval.subset == 0 or cfg.eval.subset >= n_test:
        return torch.arange(n_test)
    g = torch_generator(cfg.federated.seed, Purpose.EVAL)
    return torch.randperm(n_test, generator=g)[: cfg.eval.subset].sort().values


def prepare(cfg: Config, ctx: DistContext) -> Setup:
    """Check the run directory may be used (writing nothing), load the data, partition it."""
    fed = cfg.federated
    if ctx.world_size > fed.num_clients:
        raise ConfigError(
            f"federated.num_clients ({fed.num_clients}) is smaller than the number of ranks "
            f"({ctx.world_size}); start at most {fed.num_clients} ranks or add clients")
    run_path = check_run_dir(cfg.output)
    train, test = load_dataset(cfg.data.name, cfg.data.root, cfg.data.download)
    clients, counts, phash = make_clients(cfg, train)
    train, test = train.to(ctx.device), test.to(ctx.device)
    return Setup(run_path, train, test, clients, clients.train.to(ctx.device), counts, phash,
                 eval_indices(cfg, len(test)), clients_per_round(fed.num_clients, fed.clients_per_round,
                                                                 fed.participation))
