"""The round loop: partition -> clients -> local search -> one all-reduce -> server -> log.

Every rank runs this same function. Each rank hosts the clients the schedule gives it, adds their
sample-weighted parameters (and per-client losses, flags and the rank's timings) into one flat
float64 buffer, and a single all-reduce makes every rank's copy of the global model identical.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from fedmetanas.algorithms.fedmetanas import FedMetaNAS, LocalContext, copy_state
from fedmetanas.config import Config, ConfigError, to_dict
from fedmetanas.data.client_data import ClientData, build_clients
from fedmetanas.data.datasets import TensorSplit, load_dataset
from fedmetanas.data.partition import class_counts, make_partition, partition_hash, split_local
from fedmetanas.dist import DistContext
from fedmetanas.federated.aggregation import add_weighted, aggregated_tensors, numel, write_flat
from fedmetanas.federated.evaluation import evaluate, shard
from fedmetanas.federated.scheduling import assign_to_ranks, clients_per_round, sample_clients
from fedmetanas.reporting.hdf5 import NullLog, TrajectoryLog
from fedmetanas.rundir import LOG_NAME, check_run_dir, prepare_run_dir
from fedmetanas.search.discrete import DiscreteNet
from fedmetanas.search.genotypes import Genotype, resolve_primitives
from fedmetanas.search.relax import entropy, lr_factor, temperature, update_mask
from fedmetanas.search.supernet import ArchMasks, SuperNet, arch_from_genotype, derive_genotype, sample_arch
from fedmetanas.seeding import Purpose, derive_seed, torch_generator

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    """What a finished run reports (identical on every rank)."""

    genotype: Genotype
    discrete_acc: float
    supernet_acc: float
    discrete_loss: float
    seconds: float
    alphas: dict[str, np.ndarray]
    run_dir: Path | None
    history: list[dict[str, Any]] = field(default_factory=list)


def build_supernet(cfg: Config, in_channels: int, num_classes: int) -> SuperNet:
    """The initial global model, identical on every rank (seeded, built on the CPU)."""
    m = cfg.model
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(cfg.federated.seed, Purpose.INIT))
        net = SuperNet(in_channels, num_classes, m.channels, m.layers, m.nodes, resolve_primitives(m.primitives),
                       m.stem_multiplier, m.reduction_layers, cfg.search.input_mode, cfg.search.alpha_init_std,
                       generator=torch_generator(cfg.federated.seed, Purpose.INIT, 1), stem_stride=m.stem_stride)
    return net


def make_clients(cfg: Config, train: TensorSplit) -> tuple[list[ClientData], np.ndarray, str]:
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


class Evaluator:
    """Evaluates the soft supernet and the discrete (pruned, not retrained) net on this rank's shard."""

    def __init__(self, cfg: Config, ctx: DistContext, test: TensorSplit) -> None:
        self.cfg, self.ctx, self.test = cfg, ctx, test

    def __call__(self, net: SuperNet, masks: ArchMasks, tau: float, genotype: Genotype,
                 idx: torch.Tensor) -> dict[str, float]:
        mine = shard(idx, self.ctx.rank, self.ctx.world_size).to(self.test.labels.device)
        cl = self.cfg.model.channels_last
        net.eval()
        expected = sample_arch(net, masks, tau, "expected")
        discrete = arch_from_genotype(net, genotype)
        sums = torch.cat([
            evaluate(lambda x: net(x, expected), self.test, mine, self.cfg.eval.batch_size, cl),
            evaluate(lambda x: net(x, discrete), self.test, mine, self.cfg.eval.batch_size, cl),
        ])
        net.train()
        self.ctx.all_reduce_sum(sums)
        s = sums.cpu().tolist()
        return {"supernet_loss": s[0] / s[2], "supernet_acc": s[1] / s[2],
                "discrete_loss": s[3] / s[5], "discrete_acc": s[4] / s[5]}


def _arch_record(net: SuperNet, masks: ArchMasks, tau: float) -> dict[str, Any]:
    rec: dict[str, Any] = {}
    for (name, p), (_, m) in zip(net.named_alphas(), masks.items()):
        rec[name] = p.detach().cpu().numpy()
        rec[f"mask_{name}"] = m.numpy()
        rec[f"entropy_{name}"] = entropy(p, m, tau).numpy()
    return rec


def run(cfg: Config, ctx: DistContext) -> RunResult:
    """Run a whole federated search; rank 0 writes the run directory and the HDF5 log."""
    t_start = time.perf_counter()
    fed = cfg.federated
    if ctx.world_size > fed.num_clients:
        raise ConfigError(
            f"federated.num_clients ({fed.num_clients}) is smaller than the number of ranks "
            f"({ctx.world_size}); start at most {fed.num_clients} ranks or add clients")
    check_run_dir(cfg.output)

    train, test = load_dataset(cfg.data.name, cfg.data.root, cfg.data.download)
    clients, counts, part_hash = make_clients(cfg, train)
    train, test = train.to(ctx.device), test.to(ctx.device)
    train_idx = [c.train_idx.to(ctx.device) for c in clients]

    net = build_supernet(cfg, train.in_channels, train.num_classes).to(ctx.device)
    memory_format = torch.channels_last if cfg.model.channels_last else torch.contiguous_format
    net = net.to(memory_format=memory_format)
    worker = build_supernet(cfg, train.in_channels, train.num_classes).to(ctx.device, memory_format=memory_format)
    task = build_supernet(cfg, train.in_channels, train.num_classes).to(ctx.device, memory_format=memory_format)
    masks = net.initial_masks()
    algo = FedMetaNAS(cfg.algorithm)
    evaluator = Evaluator(cfg, ctx, test)
    eval_idx = eval_indices(cfg, len(test))

    global_tensors = aggregated_tensors(net)
    n_params = numel(global_tensors)
    n_clients, world = fed.num_clients, ctx.world_size
    # Flat buffer layout: [sum n*params | sum n | per-client loss | per-client flag | per-rank seconds]
    off_n, off_loss = n_params, n_params + 1
    off_flag, off_time = off_loss + n_clients, off_loss + 2 * n_clients
    buf_len = off_time + world
    per_round = clients_per_round(n_clients, fed.clients_per_round, fed.participation)

    out_dir: Path | None = None
    trajectory: TrajectoryLog | NullLog = NullLog()
    if ctx.is_main:
        out_dir = prepare_run_dir(cfg.output)
        (out_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        trajectory = TrajectoryLog(
            out_dir / LOG_NAME,
            attrs={"config_yaml": yaml.safe_dump(to_dict(cfg), sort_keys=False),
                   "primitives": list(net.primitives), "nodes": net.nodes, "world_size": world,
                   "algorithm": cfg.algorithm.name, "partition_hash": part_hash,
                   "num_params": sum(p.numel() for p in net.weights())},
            static={"partition/class_counts": counts,
                    "partition/train_sizes": np.array([c.num_train for c in clients]),
                    "partition/test_sizes": np.array([c.test_idx.numel() for c in clients])})
        log.info("run directory %s; %d clients (%d per round) on %d rank(s); %d aggregated values",
                 out_dir, n_clients, per_round, world, n_params)

    history: list[dict[str, Any]] = []
    metrics: dict[str, float] = {}
    genotype = derive_genotype(net, masks)
    for rnd in range(fed.rounds):
        t_round = time.perf_counter()
        tau = temperature(cfg.search.tau_schedule, cfg.search.tau_max, cfg.search.tau_min, rnd,
                          max(1, round(cfg.search.anneal_fraction * fed.rounds)))
        lr_scale = lr_factor(cfg.algorithm.lr_schedule, cfg.algorithm.lr_min_factor, rnd, fed.rounds)
        selected = sample_clients(n_clients, per_round, fed.seed, rnd)
        plan = assign_to_ranks(selected, [1.0] * n_clients, world)

        buf = torch.zeros(buf_len, dtype=torch.float64, device=ctx.device)
        for cid in plan[ctx.rank]:
            copy_state(worker, net)
            local = LocalContext(train, train_idx[cid], masks, tau, cfg.search.gumbel,
                                 torch_generator(fed.seed, Purpose.BATCHES, rnd, cid),
                                 torch_generator(fed.seed, Purpose.GUMBEL, rnd, cid),
                                 cfg.data.augment, cfg.model.channels_last, lr_scale)
            result = algo.local_update(worker, task, local)
            n = clients[cid].num_train
            add_weighted(buf, aggregated_tensors(worker), float(n))
            buf[off_n] += n
            buf[off_loss + cid] = result.loss
            buf[off_flag + cid] = 1.0
        if ctx.device.type == "cuda":
            torch.cuda.synchronize(ctx.device)
        t_local = time.perf_counter() - t_round
        buf[off_time + ctx.rank] = t_local

        t0 = time.perf_counter()
        ctx.all_reduce_sum(buf)
        t_comm = time.perf_counter() - t0

        write_flat(global_tensors, buf[:n_params] / buf[off_n])
        # Soft pruning: masks follow the annealed distributions of the new global logits.
        masks = ArchMasks(
            {k: update_mask(getattr(net, f"alpha_{k}"), m, tau, cfg.search.op_prune_threshold)
             for k, m in masks.ops.items()},
            None if masks.pairs is None else
            {k: update_mask(getattr(net, f"beta_{k}"), m, tau, cfg.search.pair_prune_threshold)
             for k, m in masks.pairs.items()})
        genotype = derive_genotype(net, masks, tau)

        t0 = time.perf_counter()
        last = rnd == fed.rounds - 1
        if rnd % cfg.eval.every == 0 or last:
            metrics = evaluator(net, masks, tau, genotype, eval_idx)
        else:
            metrics = {k: float("nan") for k in ("supernet_loss", "supernet_acc", "discrete_loss", "discrete_acc")}
        t_eval = time.perf_counter() - t0

        tail = buf[off_loss:].cpu().numpy()
        flags = tail[n_clients : 2 * n_clients] > 0
        client_loss = np.where(flags, tail[:n_clients], np.nan)
        rank_seconds = tail[2 * n_clients :]
        row = {"round": rnd, "tau": tau, "genotype": genotype.to_string(), **metrics,
               "client_loss": client_loss, "participants": flags,
               "time_local_rank": rank_seconds, "time_local": float(rank_seconds.max()),
               "time_allreduce": t_comm, "time_eval": t_eval,
               "time_round": time.perf_counter() - t_round, "wall_time": time.perf_counter() - t_start,
               "bytes_allreduced": buf.numel() * buf.element_size(), **_arch_record(net, masks, tau)}
        trajectory.append(row)
        history.append({k: v for k, v in row.items() if np.isscalar(v) or isinstance(v, str)})
        if ctx.is_main:
            log.info("round %3d/%d  tau %.3f  loss %.3f  acc supernet %.4f discrete %.4f  local %.1fs comm %.3fs eval %.1fs",
                     rnd + 1, fed.rounds, tau, float(np.nanmean(client_loss)), metrics["supernet_acc"],
                     metrics["discrete_acc"], row["time_local"], t_comm, t_eval)

    # Final: the discrete network with the searched weights, no retraining, on the full test set.
    final_idx = torch.arange(len(test)) if cfg.eval.final_full else eval_idx
    final = evaluator(net, masks, tau, genotype, final_idx)
    discrete = DiscreteNet.from_supernet(net, genotype)
    seconds = time.perf_counter() - t_start
    if ctx.is_main and out_dir is not None:
        (out_dir / "genotype.txt").write_text(genotype.to_string() + "\n")
        torch.save({"genotype": genotype.to_string(), "state_dict": discrete.state_dict(),
                    "config": to_dict(cfg)}, out_dir / "discrete_model.pt")
        torch.save({"state_dict": net.state_dict(), "masks": dict(masks.items()), "tau": tau,
                    "config": to_dict(cfg)}, out_dir / "supernet.pt")
        trajectory.close(final={"genotype": genotype.to_string(), "seconds": seconds,
                                "eval_count": int(final_idx.numel()), **final})
    alphas = {name: p.detach().cpu().numpy().copy() for name, p in net.named_alphas()}
    return RunResult(genotype, final["discrete_acc"], final["supernet_acc"], final["discrete_loss"],
                     seconds, alphas, out_dir, history)
