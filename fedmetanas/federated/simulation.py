"""The round loop: partition -> clients -> local work -> one all-reduce -> server -> log.

Every rank runs this same function. Each rank hosts the clients the schedule gives it, adds their
sample-weighted parameters (and per-client losses, flags and the rank's timings) into one flat
float64 buffer, and a single all-reduce makes every rank's copy of the global model identical.

A run is one or two *stages* on one round counter: FedMetaNAS searches; FedAvg trains a fixed
architecture; FedNAS searches, then retrains the genotype it found from scratch with FedAvg. Every
stage uses the same engine (executors, all-reduce, checkpoints, HDF5 log); only the model, the local
learning rule and the server's pruning differ.
"""

from __future__ import annotations

import json
import logging
import math
import resource
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
import torch
import yaml

from fedmetanas.algorithms.common import LocalContext, copy_state
from fedmetanas.algorithms.fedavg import FedAvgLocal
from fedmetanas.algorithms.fedmetanas import FedMetaNAS
from fedmetanas.algorithms.fednas import MiLeNAS
from fedmetanas.checkpoint import CheckpointError, check_compatible, load_latest, save_checkpoint
from fedmetanas.config import Config, ConfigError, to_dict
from fedmetanas.data.client_data import ClientData, build_clients
from fedmetanas.data.datasets import TensorSplit, load_dataset
from fedmetanas.data.partition import class_counts, make_partition, partition_hash, split_local
from fedmetanas.dist import DistContext
from fedmetanas.federated.aggregation import add_weighted, aggregated_tensors, numel, write_flat
from fedmetanas.federated.evaluation import evaluate, shard
from fedmetanas.federated.executor import ClientExecutor, make_executors, run_clients
from fedmetanas.federated.personalization import summarize
from fedmetanas.federated.scheduling import assign_to_ranks, clients_per_round, sample_clients
from fedmetanas.reporting.hdf5 import NullLog, TrajectoryLog, logged_rounds
from fedmetanas.rundir import LOG_NAME, RunDirError, check_run_dir, prepare_run_dir
from fedmetanas.search.discrete import CNN, DiscreteNet, FixedNet
from fedmetanas.search.genotypes import DARTS_V2, Genotype, resolve_primitives
from fedmetanas.search.relax import entropy, lr_factor, temperature, update_mask
from fedmetanas.search.supernet import ArchMasks, SuperNet, arch_from_genotype, derive_genotype, sample_arch
from fedmetanas.seeding import Purpose, derive_seed, torch_generator

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    """What a finished run reports (identical on every rank)."""

    genotype: Genotype | None  # the final model's cells; None for FedAvg's plain CNN
    discrete_acc: float  # the final model's test accuracy
    supernet_acc: float  # the soft supernet's (NaN without a search)
    discrete_loss: float
    seconds: float
    run_dir: Path | None
    algorithm: str = "fedmetanas"
    search_seconds: float = 0.0
    personalization: dict[str, float] | None = None


@dataclass(frozen=True)
class Stage:
    """A span of rounds with one kind of model: `search` (supernet) or `train` (fixed architecture)."""

    kind: Literal["search", "train"]
    group: str  # the HDF5 table its rows go to
    first: int  # first round (global counter)
    rounds: int

    @property
    def end(self) -> int:
        return self.first + self.rounds


def plan_stages(cfg: Config) -> list[Stage]:
    """FedMetaNAS: search. FedAvg: train. FedNAS: search, then retrain (its rows in /retrain)."""
    rounds = cfg.federated.rounds
    if cfg.algorithm.name == "fedmetanas":
        return [Stage("search", "rounds", 0, rounds)]
    if cfg.algorithm.name == "fednas":
        return [Stage("search", "rounds", 0, rounds), Stage("train", "retrain", rounds, cfg.fednas.retrain_rounds)]
    return [Stage("train", "rounds", 0, rounds)]


def fixed_architecture(cfg: Config) -> Genotype | None:
    """The FedAvg baseline's network: a genotype, or None for the plain CNN."""
    arch = cfg.fedavg.architecture
    if arch == "cnn":
        return None
    return DARTS_V2 if arch == "darts_v2" else Genotype.from_string(arch)


def build_fixed(cfg: Config, genotype: Genotype | None, train: TensorSplit) -> FixedNet:
    """A fresh fixed-architecture network, identical on every rank (seeded, built on the CPU)."""
    m, f = cfg.model, cfg.fedavg
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(cfg.federated.seed, Purpose.INIT, 2))
        if genotype is None:
            return CNN(train.in_channels, train.num_classes, train.image_size)
        return DiscreteNet.from_genotype(genotype, train.in_channels, train.num_classes, f.channels or m.channels,
                                         f.layers or m.layers, m.stem_multiplier,
                                         m.reduction_layers if not f.layers else None, m.stem_stride)


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

    def __call__(self, net: SuperNet, masks: ArchMasks | None, tau: float, genotype: Genotype,
                 idx: torch.Tensor) -> dict[str, float]:
        expected = sample_arch(net, masks, tau, "expected")
        discrete = arch_from_genotype(net, genotype)
        return self._metrics(net, idx, {"supernet": lambda x: net(x, expected),
                                        "discrete": lambda x: net(x, discrete)})

    def fixed(self, net: FixedNet, idx: torch.Tensor) -> dict[str, float]:
        """A fixed-architecture net's test loss and accuracy (named like the discrete net's)."""
        return self._metrics(net, idx, {"discrete": net})

    def _metrics(self, net: torch.nn.Module, idx: torch.Tensor,
                 forwards: dict[str, Callable[[torch.Tensor], torch.Tensor]]) -> dict[str, float]:
        """`{name}_loss` and `{name}_acc` of each forward on this rank's shard of `idx`, summed over ranks
        with one all-reduce (`net` in eval mode meanwhile)."""
        mine = shard(idx, self.ctx.rank, self.ctx.world_size).to(self.test.labels.device)
        cl = self.cfg.model.channels_last
        net.eval()
        sums = torch.cat([evaluate(f, self.test, mine, self.cfg.eval.batch_size, cl) for f in forwards.values()])
        net.train()
        self.ctx.all_reduce_sum(sums)
        s = sums.cpu().tolist()
        out = {}
        for i, name in enumerate(forwards):
            loss, correct, count = s[3 * i : 3 * i + 3]
            out[f"{name}_loss"], out[f"{name}_acc"] = loss / count, correct / count
        return out


def _arch_record(net: SuperNet, masks: ArchMasks, tau: float) -> dict[str, Any]:
    rec: dict[str, Any] = {}
    for (name, p), (_, m) in zip(net.named_alphas(), masks.items()):
        rec[name] = p.detach().cpu().numpy().copy()  # a copy: the parameter keeps training
        rec[f"mask_{name}"] = m.numpy().copy()
        rec[f"entropy_{name}"] = entropy(p, m, tau).numpy()
    return rec


class Preempted(RuntimeError):
    """A signal (SIGTERM / SIGUSR1) asked the run to stop; a checkpoint of the last round was written."""


class NumericalFault(RuntimeError):
    """A client's update held NaN/Inf and `federated.nonfinite: stop` was set."""


class _StopFlag:
    """Set from a signal handler; read once per round and shared with the other ranks via the all-reduce."""

    def __init__(self) -> None:
        self.requested = False
        self.signal_name = ""

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:  # noqa: ARG002 - signal handler signature
        self.requested = True
        self.signal_name = signal.Signals(signum).name


class Simulation:
    """All state of one federated run on one rank, and the round loop over it."""

    def __init__(self, cfg: Config, ctx: DistContext) -> None:
        fed = cfg.federated
        if ctx.world_size > fed.num_clients:
            raise ConfigError(
                f"federated.num_clients ({fed.num_clients}) is smaller than the number of ranks "
                f"({ctx.world_size}); start at most {fed.num_clients} ranks or add clients")
        self.cfg, self.ctx = cfg, ctx
        self.run_path = check_run_dir(cfg.output)
        train, test = load_dataset(cfg.data.name, cfg.data.root, cfg.data.download)
        self.clients, self.counts, self.partition_hash = make_clients(cfg, train)
        self.train, self.test = train.to(ctx.device), test.to(ctx.device)
        self.train_idx = [c.train_idx.to(ctx.device) for c in self.clients]
        self.evaluator = Evaluator(cfg, ctx, self.test)
        self.eval_idx = eval_indices(cfg, len(test))
        self.per_round = clients_per_round(fed.num_clients, fed.clients_per_round, fed.participation)
        self.stages = plan_stages(cfg)
        self.search_final: dict[str, Any] | None = None  # FedNAS: the search stage's outcome
        self.start_round = 0
        self.rows: list[tuple[str, dict[str, Any]]] = []  # (HDF5 table, row), to rebuild the log on resume
        self.wall_offset = 0.0
        self.stop = _StopFlag()
        self.trajectory: TrajectoryLog | NullLog = NullLog()
        self.ckpt_dir = self.run_path / "checkpoints"
        self._enter(0, fixed_architecture(cfg) if self.stages[0].kind == "train" else None)
        self.log_model_attrs = self._model_attrs()  # of the first stage's model, also after a resume in a later one

    # -- stages --------------------------------------------------------------------------------
    @property
    def stage(self) -> Stage:
        return self.stages[self.stage_index]

    def _enter(self, index: int, genotype: Genotype | None) -> None:
        """Build the stage's global model, its local rule, the executors and the flat-buffer layout."""
        cfg, ctx = self.cfg, self.ctx
        self.stage_index = index
        fmt = torch.channels_last if cfg.model.channels_last else torch.contiguous_format
        self.genotype_trained = genotype  # the fixed architecture a train stage trains
        build: Callable[[], torch.nn.Module]
        if self.stage.kind == "search":
            def build() -> torch.nn.Module:
                net = build_supernet(cfg, self.train.in_channels, self.train.num_classes)
                return net.to(ctx.device, memory_format=fmt)

            self.algo: Any = FedMetaNAS(cfg.algorithm) if cfg.algorithm.name == "fedmetanas" else MiLeNAS(cfg.fednas)
        else:
            def build() -> torch.nn.Module:
                return build_fixed(cfg, genotype, self.train).to(ctx.device, memory_format=fmt)

            self.algo = FedAvgLocal(cfg.fedavg, cfg.personalize)
        self.net = build()
        self.masks: ArchMasks | None = self.net.initial_masks() if self.stage.kind == "search" else None
        self.global_tensors = aggregated_tensors(self.net)
        # Flat buffer: [sum n*params | sum n | stop | client loss | client flag | client excluded |
        #               rank seconds | rank peak memory]
        k = cfg.federated.num_clients
        self.n_params = numel(self.global_tensors)
        self.off_n, self.off_stop = self.n_params, self.n_params + 1
        self.off_loss = self.n_params + 2
        self.off_flag, self.off_excl, self.off_time = self.off_loss + k, self.off_loss + 2 * k, self.off_loss + 3 * k
        self.off_mem = self.off_time + ctx.world_size
        self.buf_len = self.off_mem + ctx.world_size
        self.executors: list[ClientExecutor] = []  # free the previous stage's lanes first
        # Per lane a worker and a task-learner replica: memory is O(lanes x model), never O(clients).
        self.executors = make_executors(cfg.runtime.streams_per_rank, build, self.buf_len, ctx.device)

    def _stage_index_of(self, rnd: int) -> int:
        return next((i for i, st in enumerate(self.stages) if rnd < st.end), len(self.stages) - 1)

    def _end_search(self, row: dict[str, Any]) -> None:
        """FedNAS between its stages: keep the search's outcome, then build the genotype afresh for retraining."""
        tau = 1.0
        genotype = derive_genotype(self.net, self.masks, tau)
        self.search_final = {"genotype": genotype.to_string(), "supernet_acc": float(row["supernet_acc"]),
                             "supernet_loss": float(row["supernet_loss"]),
                             "discrete_acc_not_retrained": float(row["discrete_acc"]),
                             "search_seconds": float(row["wall_time"])}
        if self.ctx.is_main:
            (self.run_path / "search_genotype.txt").write_text(genotype.to_string() + "\n")
            self._save_supernet(tau)
        log.info("search finished after %.1f s: genotype %s; retraining it from scratch for %d rounds",
                 row["wall_time"], genotype.to_string(), self.stages[self.stage_index + 1].rounds)
        self._enter(self.stage_index + 1, genotype)

    def _save_supernet(self, tau: float) -> None:
        """Rank 0: the searched supernet (weights, logits, masks, temperature) as runs/<name>/supernet.pt."""
        torch.save({"state_dict": self.net.state_dict(), "masks": dict(self.masks.items()), "tau": tau,
                    "config": to_dict(self.cfg)}, self.run_path / "supernet.pt")

    # -- setup -------------------------------------------------------------------------------
    def _model_attrs(self) -> dict[str, Any]:
        net = self.net
        primitives = list(net.primitives) if isinstance(net, SuperNet) else []
        nodes = net.nodes if isinstance(net, SuperNet) else (
            len(self.genotype_trained.normal) if self.genotype_trained is not None else 0)
        return {"primitives": primitives, "nodes": nodes, "num_params": sum(p.numel() for p in net.weights())}

    def _log_attrs(self) -> tuple[dict[str, Any], dict[str, Any]]:
        cfg_yaml = yaml.safe_dump(to_dict(self.cfg), sort_keys=False)
        attrs = {"config_yaml": cfg_yaml, **self.log_model_attrs,
                 "world_size": self.ctx.world_size, "algorithm": self.cfg.algorithm.name,
                 "stages": json.dumps([asdict(st) for st in self.stages]),
                 "partition_hash": self.partition_hash}
        static = {"partition/class_counts": self.counts,
                  "partition/train_sizes": np.array([c.num_train for c in self.clients]),
                  "partition/test_sizes": np.array([c.test_idx.numel() for c in self.clients])}
        return attrs, static

    def _resume(self) -> None:
        """Load the newest valid checkpoint, if resuming and one exists (every rank reads it)."""
        found = load_latest(self.ckpt_dir) if self.cfg.output.resume else None
        if found is None:
            if self.cfg.output.resume and logged_rounds(self.run_path / LOG_NAME) != 0:
                # Starting afresh would replace a log holding rounds (or an unreadable one): refuse
                # rather than lose it. A log with no rounds (killed in round 1) holds nothing to lose.
                raise CheckpointError(
                    f"output.resume: {self.ckpt_dir} holds no readable checkpoint, so the run in "
                    f"{self.run_path} cannot be continued; start a new run with another --name")
            if self.cfg.output.resume:
                log.info("no checkpoint in %s: starting a new run", self.ckpt_dir)
            return
        state, path = found
        check_compatible(state, path, to_dict(self.cfg), self.partition_hash)
        stage = int(state.get("stage", 0))
        if stage != self._stage_index_of(int(state["next_round"])):
            raise CheckpointError(
                f"{path}: saved in stage {stage} at round {state['next_round']}, which this config places in "
                f"stage {self._stage_index_of(int(state['next_round']))}; resume with the run's federated.rounds")
        if stage != self.stage_index:
            self.search_final = state.get("search_final")
            self._enter(stage, Genotype.from_string(state["genotype"]) if state.get("genotype") else None)
        self.net.load_state_dict(state["model"])
        if state.get("masks") is not None:
            self.masks = ArchMasks(state["masks"]["ops"], state["masks"]["pairs"])
        self.start_round = int(state["next_round"])
        # Checkpoints written before the baselines existed hold bare /rounds rows.
        self.rows = [("rounds", r) if isinstance(r, dict) else tuple(r) for r in state["rows"]]
        self.wall_offset = float(state["wall_time"])
        log.info("resumed from %s at round %d", path, self.start_round + 1)

    def open_log(self) -> None:
        """Rank 0: a fresh log, or on resume the log rebuilt from the checkpoint's rows (a killed run's
        file may hold rounds after the checkpoint, or be torn; those rounds are recomputed)."""
        if not self.ctx.is_main:
            return
        out_dir = prepare_run_dir(self.cfg.output)
        (out_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(self.cfg), sort_keys=False))
        attrs, static = self._log_attrs()
        final = out_dir / LOG_NAME
        tmp = out_dir / (LOG_NAME + ".tmp")
        tmp.unlink(missing_ok=True)
        self.trajectory = TrajectoryLog(tmp, attrs, static)
        for group, row in self.rows:
            self.trajectory.append(row, group)
        self.trajectory.rename(final)
        log.info("run directory %s; %s: %d clients (%d per round) on %d rank(s); %d aggregated values",
                 out_dir, self.cfg.algorithm.name, self.cfg.federated.num_clients, self.per_round,
                 self.ctx.world_size, self.n_params)

    def _checkpoint(self, next_round: int, wall_time: float) -> None:
        if not self.ctx.is_main:
            return
        masks = None if self.masks is None else {"ops": self.masks.ops, "pairs": self.masks.pairs}
        state = {"next_round": next_round, "model": self.net.state_dict(), "masks": masks,
                 "stage": self.stage_index, "search_final": self.search_final,
                 "genotype": None if self.genotype_trained is None else self.genotype_trained.to_string(),
                 "rows": self.rows, "wall_time": wall_time, "config": to_dict(self.cfg),
                 "partition_hash": self.partition_hash}
        save_checkpoint(self.ckpt_dir, state, self.cfg.checkpoint.keep)

    # -- one round -----------------------------------------------------------------------------
    def _local_context(self, cid: int, tau: float, lr_scale: float, *coords: int) -> LocalContext:
        cfg = self.cfg
        mode = cfg.search.gumbel if cfg.algorithm.name == "fedmetanas" else "expected"
        return LocalContext(self.train, self.train_idx[cid], self.masks, tau, mode,
                            torch_generator(cfg.federated.seed, Purpose.BATCHES, *coords, cid),
                            torch_generator(cfg.federated.seed, Purpose.GUMBEL, *coords, cid),
                            cfg.data.augment, cfg.model.channels_last, lr_scale, cid)

    def _local_work(self, rnd: int, tau: float, lr_scale: float) -> torch.Tensor:
        """Run this rank's clients of the round (concurrently on GPU streams); return their summed buffer."""
        fed = self.cfg.federated
        selected = sample_clients(fed.num_clients, self.per_round, fed.seed, rnd)
        plan = assign_to_ranks(selected, [1.0] * fed.num_clients, self.ctx.world_size)

        def client(ex: ClientExecutor, cid: int) -> None:
            copy_state(ex.worker, self.net)
            result = self.algo.local_update(ex.worker, ex.task, self._local_context(cid, tau, lr_scale, rnd))
            tensors = aggregated_tensors(ex.worker)
            buf = ex.buffer
            buf[self.off_flag + cid] = 1.0
            if not (math.isfinite(result.loss) and all(bool(torch.isfinite(t).all()) for t in tensors)):
                buf[self.off_excl + cid] = 1.0  # excluded: contributes nothing to the average
                return
            n = self.clients[cid].num_train
            add_weighted(buf, tensors, float(n))
            buf[self.off_n] += n
            buf[self.off_loss + cid] = result.loss

        return run_clients(self.executors, plan[self.ctx.rank], client)

    def _update_server(self, buf: torch.Tensor, tau: float) -> None:
        """Average, then (FedMetaNAS) soft-prune: masks follow the annealed distributions of the new logits."""
        if float(buf[self.off_n]) > 0:  # else every client was excluded: keep the previous model
            write_flat(self.global_tensors, buf[: self.n_params] / buf[self.off_n])
        if self.masks is None or self.cfg.algorithm.name != "fedmetanas":
            return  # FedNAS does not prune; fixed nets have nothing to prune
        s = self.cfg.search
        self.masks = ArchMasks(
            {k: update_mask(getattr(self.net, f"alpha_{k}"), m, tau, s.op_prune_threshold)
             for k, m in self.masks.ops.items()},
            None if self.masks.pairs is None else
            {k: update_mask(getattr(self.net, f"beta_{k}"), m, tau, s.pair_prune_threshold)
             for k, m in self.masks.pairs.items()})

    def _agree(self, step: Callable[[], None]) -> None:
        """Run a setup step on every rank; if it fails anywhere, fail everywhere with the same error
        (so no rank waits forever for one that gave up, and rank 0 reports the first rank's message)."""
        error: Exception | None = None
        try:
            step()
        except (ConfigError, CheckpointError, RunDirError) as err:
            error = err
        errors = self.ctx.all_gather_objects(None if error is None else (type(error), str(error)))
        failed = [(r, e) for r, e in enumerate(errors) if e is not None]
        if failed:
            kind, message = failed[0][1]
            raise kind(message)

    def run(self) -> RunResult:
        """The round loop; returns the final evaluation (identical on every rank)."""
        t_start = time.perf_counter()
        # Every rank decides from the same files before rank 0 writes any (no rank sees rank 0's new log).
        self._agree(self._resume)
        self.open_log()
        self.stop.install()
        t_start -= self.wall_offset
        total = self.stages[-1].end
        for rnd in range(self.start_round, total):
            row, stopping = self.run_round(rnd, t_start)
            if rnd == self.stage.end - 1 and self.stage_index + 1 < len(self.stages):
                self._end_search(row)
            every = self.cfg.checkpoint.every
            if stopping or (every and (rnd + 1) % every == 0) or rnd == total - 1:
                self._checkpoint(rnd + 1, row["wall_time"])
            if stopping and rnd < total - 1:
                self.trajectory.close()
                raise Preempted(f"stopped by {self.stop.signal_name or 'a signal on another rank'} after round "
                                f"{rnd + 1}; checkpoint written, continue with --resume")
        return self._finish(t_start)

    def _lr_scale(self, rnd: int) -> float:
        """The round's factor on the weights' learning rate (cosine within a stage, per its config)."""
        cfg, st = self.cfg, self.stage
        if st.kind == "search" and cfg.algorithm.name == "fedmetanas":
            return lr_factor(cfg.algorithm.lr_schedule, cfg.algorithm.lr_min_factor, rnd, cfg.federated.rounds)
        lr, lr_min = (cfg.fednas.lr_w, cfg.fednas.lr_w_min) if st.kind == "search" else (cfg.fedavg.lr, cfg.fedavg.lr_min)
        return lr_factor("cosine", lr_min / lr if lr > 0 else 1.0, rnd - st.first, st.rounds)

    def run_round(self, rnd: int, t_start: float) -> tuple[dict[str, Any], bool]:
        """One round: local work, one all-reduce, server update, evaluation, log row.

        Returns the round's log row and whether any rank was asked to stop (signal).
        """
        cfg, fed, k = self.cfg, self.cfg.federated, self.cfg.federated.num_clients
        st = self.stage
        search = st.kind == "search"
        t_round = time.perf_counter()
        tau = self._tau(rnd)
        buf = self._local_work(rnd, tau, self._lr_scale(rnd))
        if self.ctx.device.type == "cuda":
            torch.cuda.synchronize(self.ctx.device)
        t_local = time.perf_counter() - t_round
        buf[self.off_time + self.ctx.rank] = t_local
        buf[self.off_mem + self.ctx.rank] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # MiB
        buf[self.off_stop] = float(self.stop.requested)

        t0 = time.perf_counter()
        self.ctx.all_reduce_sum(buf)
        t_comm = time.perf_counter() - t0

        tail = buf[self.off_loss :].cpu().numpy()
        flags, excluded = tail[k : 2 * k] > 0, tail[2 * k : 3 * k] > 0
        if excluded.any() and fed.nonfinite == "stop":
            raise NumericalFault(
                f"round {rnd + 1}: the update of client(s) {np.flatnonzero(excluded).tolist()} holds NaN/Inf; "
                "lower the learning rates, or set federated.nonfinite: exclude to drop such updates")
        if excluded.any():
            log.warning("round %d: excluded non-finite update(s) of client(s) %s", rnd + 1,
                        np.flatnonzero(excluded).tolist())
        self._update_server(buf, tau)
        genotype = derive_genotype(self.net, self.masks, tau) if search else None

        t0 = time.perf_counter()
        evaluated = (rnd - st.first) % cfg.eval.every == 0 or rnd == st.end - 1
        if evaluated and search:
            metrics = self.evaluator(self.net, self.masks, tau, genotype, self.eval_idx)
        elif evaluated:
            metrics = self.evaluator.fixed(self.net, self.eval_idx)
        else:
            keys = ("supernet_loss", "supernet_acc", "discrete_loss", "discrete_acc") if search else (
                "discrete_loss", "discrete_acc")
            metrics = dict.fromkeys(keys, float("nan"))
        t_eval = time.perf_counter() - t0

        client_loss = np.where(flags & ~excluded, tail[:k], np.nan)
        world = self.ctx.world_size
        rank_seconds, rank_mib = tail[3 * k : 3 * k + world], tail[3 * k + world :]
        row: dict[str, Any] = {"round": rnd, **metrics,
               "client_loss": client_loss, "participants": flags, "excluded": excluded,
               "time_local_rank": rank_seconds, "time_local": float(rank_seconds.max()), "memory_rank_mib": rank_mib,
               "time_allreduce": t_comm, "time_eval": t_eval,
               "time_round": time.perf_counter() - t_round, "wall_time": time.perf_counter() - t_start,
               "bytes_allreduced": buf.numel() * buf.element_size(),
               # What a real deployment moves: each participant downloads and uploads the model (float32).
               "bytes_clients": int(2 * int(flags.sum()) * self.n_params * 4)}
        if search:
            row.update({"tau": tau, "genotype": genotype.to_string(), **_arch_record(self.net, self.masks, tau)})
        self.rows.append((st.group, row))
        self.trajectory.append(row, st.group)
        mean_loss = float(np.nanmean(client_loss)) if np.isfinite(client_loss).any() else float("nan")
        if search:
            log.info("round %3d/%d search  tau %.3f  loss %.3f  acc supernet %.4f discrete %.4f  "
                     "local %.1fs comm %.3fs eval %.1fs", rnd + 1, self.stages[-1].end, tau, mean_loss,
                     metrics["supernet_acc"], metrics["discrete_acc"], row["time_local"], t_comm, t_eval)
        else:
            log.info("round %3d/%d train  loss %.3f  acc %.4f  local %.1fs comm %.3fs eval %.1fs", rnd + 1,
                     self.stages[-1].end, mean_loss, metrics["discrete_acc"], row["time_local"], t_comm, t_eval)
        return row, float(buf[self.off_stop]) > 0

    def _tau(self, rnd: int) -> float:
        """FedMetaNAS's annealed temperature; FedNAS's softmax has temperature 1; NaN without a search."""
        if self.stage.kind != "search":
            return float("nan")
        if self.cfg.algorithm.name == "fednas":
            return 1.0
        s = self.cfg.search
        anneal_rounds = max(1, round(s.anneal_fraction * self.cfg.federated.rounds))
        return temperature(s.tau_schedule, s.tau_max, s.tau_min, rnd, anneal_rounds)

    def _final_forward(self, net: torch.nn.Module, genotype: Genotype | None) -> Callable[[torch.Tensor], torch.Tensor]:
        """The final model as a function: the genotype's discrete net inside a supernet, or the fixed net."""
        if isinstance(net, SuperNet):
            arch = arch_from_genotype(net, genotype)
            return lambda x: net(x, arch)
        return net

    def _personalize(self, tau: float, genotype: Genotype | None) -> dict[str, np.ndarray] | None:
        """Every client adapts the final global model on its local train split (the algorithm's rule) and
        is tested on its local test split, before and after; clients spread over ranks, one all-reduce."""
        p, k = self.cfg.personalize, self.cfg.federated.num_clients
        if p.steps == 0:
            return None
        mine = assign_to_ranks(list(range(k)), [1.0] * k, self.ctx.world_size)[self.ctx.rank]
        sums = torch.zeros(6 * k, dtype=torch.float64, device=self.ctx.device)
        ex, cl, bs = self.executors[0], self.cfg.model.channels_last, self.cfg.eval.batch_size
        before = self._final_forward(self.net, genotype)
        total = self.stages[-1].end
        # The weights' rate: the algorithm's own in its last round, or personalize.lr.
        base = self.cfg.algorithm.inner_lr_w if isinstance(self.algo, FedMetaNAS) else self.cfg.fedavg.lr
        lr_scale = p.lr / base if p.lr > 0 and base > 0 else self._lr_scale(total - 1)
        for cid in mine:
            test_idx = self.clients[cid].test_idx.to(self.ctx.device)
            if test_idx.numel() == 0:
                continue
            self.net.eval()
            sums[cid * 3 : cid * 3 + 3] = evaluate(before, self.train, test_idx, bs, cl)
            self.net.train()
            copy_state(ex.worker, self.net)
            adapted = self.algo.personalize(ex.worker, ex.task, self._local_context(cid, tau, lr_scale, total, 1),
                                          p.steps)
            ex.worker.eval()
            ex.task.eval()
            sums[3 * k + cid * 3 : 3 * k + cid * 3 + 3] = evaluate(adapted, self.train, test_idx, bs, cl)
            ex.worker.train()
            ex.task.train()
        self.ctx.all_reduce_sum(sums)
        s = sums.cpu().numpy().reshape(2, k, 3)
        with np.errstate(invalid="ignore", divide="ignore"):
            acc, loss = s[:, :, 1] / s[:, :, 2], s[:, :, 0] / s[:, :, 2]
        return {"personalization/acc_before": acc[0], "personalization/acc_after": acc[1],
                "personalization/loss_before": loss[0], "personalization/loss_after": loss[1],
                "personalization/test_sizes": s[0, :, 2].astype(np.int64)}

    def _finish(self, t_start: float) -> RunResult:
        """Final evaluation on the full test set, personalization, saved models, the log's summary."""
        cfg = self.cfg
        final_idx = torch.arange(len(self.test)) if cfg.eval.final_full else self.eval_idx
        tau = self._tau(self.stages[-1].end - 1)
        out_dir = self.run_path if self.ctx.is_main else None
        if self.stage.kind == "search":
            genotype: Genotype | None = derive_genotype(self.net, self.masks, tau)
            final = self.evaluator(self.net, self.masks, tau, genotype, final_idx)
            search_seconds = time.perf_counter() - t_start
        else:
            genotype = self.genotype_trained
            final = self.evaluator.fixed(self.net, final_idx)
            sf = self.search_final or {}
            final["supernet_acc"] = sf.get("supernet_acc", float("nan"))
            final["supernet_loss"] = sf.get("supernet_loss", float("nan"))
            search_seconds = sf.get("search_seconds", 0.0)
        personal = self._personalize(tau, genotype)
        summary: dict[str, float] = {}
        if personal is not None:
            summary = {**summarize(personal["personalization/acc_before"], "personal_before"),
                       **summarize(personal["personalization/acc_after"], "personal_after")}
        seconds = time.perf_counter() - t_start
        arch_text = genotype.to_string() if genotype is not None else cfg.fedavg.architecture
        if out_dir is not None:
            (out_dir / "genotype.txt").write_text(arch_text + "\n")
            if isinstance(self.net, SuperNet):
                discrete = DiscreteNet.from_supernet(self.net, genotype)
                torch.save({"genotype": arch_text, "state_dict": discrete.state_dict(),
                            "config": to_dict(cfg)}, out_dir / "discrete_model.pt")
                self._save_supernet(tau)
            else:
                torch.save({"architecture": arch_text, "state_dict": self.net.state_dict(),
                            "config": to_dict(cfg)}, out_dir / "model.pt")
            extra = {} if self.search_final is None else {
                "search_genotype": self.search_final["genotype"],
                "search_discrete_acc_not_retrained": self.search_final["discrete_acc_not_retrained"]}
            self.trajectory.close(
                final={"genotype": arch_text, "algorithm": cfg.algorithm.name, "seconds": seconds,
                       "search_seconds": search_seconds, "eval_count": int(final_idx.numel()),
                       **final, **summary, **extra},
                datasets=personal)
        if summary:
            log.info("personalization (%d steps): mean accuracy %.4f -> %.4f, worst 10%% %.4f -> %.4f",
                     cfg.personalize.steps, summary["personal_before_mean"], summary["personal_after_mean"],
                     summary["personal_before_worst10"], summary["personal_after_worst10"])
        return RunResult(genotype, final["discrete_acc"], final["supernet_acc"], final["discrete_loss"],
                         seconds, out_dir, cfg.algorithm.name, search_seconds, summary or None)


def run(cfg: Config, ctx: DistContext) -> RunResult:
    """Run (or resume) a whole federated run; rank 0 writes the run directory and the HDF5 log."""
    return Simulation(cfg, ctx).run()
