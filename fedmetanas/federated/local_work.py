"""A rank's share of a round's local work: the current phase's model, lanes and buffer (`PhaseRun`), and
running this rank's clients of the round into that buffer (`LocalWork`), one after another (on GPU
streams where there are several) or in batches of `runtime.client_batch`.

Every client's randomness comes from (seed, round, client) alone and a batch is a fixed group of the
round's participants handed whole to one rank, so what a rank computes does not depend on the rank
count.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from fedmetanas.algorithms.base import Phase, RoundPlan
from fedmetanas.algorithms.common import LocalContext, LocalResult, copy_state
from fedmetanas.capture import CaptureChoice, choose_capture
from fedmetanas.config import Config
from fedmetanas.dist import DistContext
from fedmetanas.federated.aggregation import aggregated_tensors, flatten64, numel, write_flat
from fedmetanas.federated.batching import BatchChoice, choose
from fedmetanas.federated.client_state import ClientStates
from fedmetanas.federated.executor import ClientExecutor, close_executors, make_executors, run_clients
from fedmetanas.federated.round_buffer import RoundBuffer
from fedmetanas.federated.scheduling import assign_to_ranks, sample_clients
from fedmetanas.federated.setup import Setup
from fedmetanas.seeding import Purpose, torch_generator

log = logging.getLogger(__name__)


@dataclass
class PhaseRun:
    """What the current phase runs with on this rank: its global model (and the tensors the server
    writes), the lanes its clients run on, the round's buffer and every client's kept state."""

    index: int
    phase: Phase
    net: nn.Module
    global_tensors: list[torch.Tensor]
    num_params: int  # the global tensors' leading parameters (the rest: float buffers)
    buffer: RoundBuffer
    executors: list[ClientExecutor]
    client_states: ClientStates

    @classmethod
    def enter(cls, cfg: Config, setup: Setup, ctx: DistContext, index: int, phase: Phase,
              previous_lanes: list[ClientExecutor]) -> PhaseRun:
        """Build phase `index`'s model, buffer and lanes (worker + task replica each: O(lanes x model)
        memory), freeing the previous phase's lanes first."""
        device = ctx.device
        fmt = torch.channels_last if cfg.model.channels_last else torch.contiguous_format

        def build() -> nn.Module:
            return phase.build_model(setup.inputs).to(device, memory_format=fmt)

        net = build()
        phase.on_model(net)
        tensors = aggregated_tensors(net)
        f = cfg.federated
        buffer = RoundBuffer(phase, numel(tensors), f.num_clients, setup.per_round, ctx.world_size)
        states = ClientStates(phase.client_state(), f.num_clients, device)
        close_executors(previous_lanes)  # free the previous phase's lanes (and their threads) first
        lanes = make_executors(cfg.runtime.streams_per_rank, build, buffer.layout.size, device,
                               with_task=phase.needs_task)
        return cls(index, phase, net, tensors, numel(net.parameters()), buffer, lanes, states)

    def server_step(self, seg: dict[str, torch.Tensor], clients: list[int], included: list[bool], sizes: list[int],
                    plan: RoundPlan) -> None:
        """After the all-reduce: the phase's server step on the round's sums (`seg`) becomes the global
        model; the included participants' new client state is kept. `clients`: the participants
        (ascending), `sizes` their sample counts."""
        inc = torch.tensor(included, dtype=torch.bool)
        weights = torch.where(inc, torch.tensor(sizes, dtype=torch.float64), 0.0)
        old = flatten64(self.global_tensors, self.buffer.model_size)
        sums = self.buffer.sums(seg, clients, inc, weights, float(seg["n"][0]), old, self.num_params)
        write_flat(self.global_tensors, self.phase.server_step(sums, plan))
        if self.client_states:
            keep = [i for i, ok in enumerate(included) if ok]
            self.client_states.write([clients[i] for i in keep],
                                     {k: v[keep] for k, v in self.buffer.states(seg).items()})


class LocalWork:
    """Runs this rank's clients of a round; remembers how each phase and relaxation batches them."""

    def __init__(self, cfg: Config, setup: Setup, ctx: DistContext) -> None:
        self.cfg, self.setup, self.ctx = cfg, setup, ctx
        self._choices: dict[tuple[int, str], BatchChoice] = {}
        self.batching: BatchChoice | None = None  # how the last round ran its clients (logged on change)
        self.capture: CaptureChoice = choose_capture(cfg.runtime.capture, ctx.device)  # how their steps run
        self._slots: dict[int, int] = {}
        # Entered around the clients' computation on one lane (`StopFlag.droppable`: a Ctrl-C drops the
        # round there); the batch probe's collective stays outside it.
        self.droppable: Callable[[], AbstractContextManager[None]] = nullcontext

    def context(self, run: PhaseRun, cid: int, plan: RoundPlan, *coords: int) -> LocalContext:
        """Client `cid`'s context; its randomness comes from (seed, coords, cid) alone."""
        cfg, s = self.cfg, self.setup
        return LocalContext(s.train, s.train_idx[cid], run.phase.masks(), plan.tau, plan.relax_mode,
                            torch_generator(cfg.federated.seed, Purpose.BATCHES, *coords, cid),
                            torch_generator(cfg.federated.seed, Purpose.GUMBEL, *coords, cid),
                            cfg.data.augment, cfg.model.channels_last, plan.lr_scale, cid, plan.train_arch,
                            plan.soft_topk, plan.soft_eps, run.client_states.of(cid), self.capture.mode, plan.round)

    def __call__(self, run: PhaseRun, rnd: int, plan: RoundPlan) -> torch.Tensor:
        """Run this rank's clients of round `rnd` (concurrently on GPU streams, in batches of
        `runtime.client_batch` where the phase can); return their summed buffer."""
        fed = self.cfg.federated
        selected = [int(c) for c in sample_clients(fed.num_clients, self.setup.per_round, fed.seed, rnd)]
        self._slots = {cid: slot for slot, cid in enumerate(selected)}  # ascending ids: the same on every rank
        choice = self._client_batch(run, rnd, plan, selected)
        if choice != self.batching:
            log.info("round %d: %s (%s); %s", rnd + 1, f"clients in batches of {choice.k}" if choice.k > 1
                     else "clients one after another", choice.why, self._capture_line(run, choice.k))
        self.batching = choice
        # On several lanes the clients run on threads the main thread's Ctrl-C cannot stop: finish there.
        with self.droppable() if len(run.executors) == 1 else nullcontext():
            if choice.k > 1:
                return self._batched(run, rnd, plan, selected, choice.k)
            return self._one_by_one(run, rnd, plan, selected)

    def _one_by_one(self, run: PhaseRun, rnd: int, plan: RoundPlan, selected: list[int]) -> torch.Tensor:
        """The round's clients one after another on a lane (concurrently on several lanes)."""
        fed = self.cfg.federated
        ranks = assign_to_ranks(selected, [1.0] * fed.num_clients, self.ctx.world_size)

        def client(ex: ClientExecutor, cid: int) -> None:
            copy_state(ex.worker, run.net)
            result = run.phase.local_update(ex.worker, ex.task, self.context(run, cid, plan, rnd))
            self._add(run, run.buffer.layout.split(ex.buffer), cid, result.loss, aggregated_tensors(ex.worker),
                      result)

        return run_clients(run.executors, ranks[self.ctx.rank], client, deterministic=self.cfg.runtime.deterministic)

    def _capture_line(self, run: PhaseRun, k: int) -> str:
        """What the console says of the captured step: the unit (`fedmetanas.capture`) and why."""
        if not self.capture.captured:
            return f"step not captured ({self.capture.why})"
        supernet = run.phase.masks() is not None
        unit = ("stacked_op" if k > 1 else "op") if supernet else ("fixed_batched" if k > 1 else "fixed")
        return f"step captured: {self.capture.mode}, unit {unit} ({self.capture.why})"

    def _client_batch(self, run: PhaseRun, rnd: int, plan: RoundPlan, selected: list[int]) -> BatchChoice:
        """`runtime.client_batch` resolved for this phase and relaxation (`batching.choose`; a GPU's probe
        runs once per phase and relaxation, on the round's first clients, its results discarded)."""
        key = (run.index, plan.relax_mode)
        if key not in self._choices:
            device = self.ctx.device

            def probe(k: int) -> int:
                ex = run.executors[0]
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
                copy_state(ex.worker, run.net)
                run.phase.local_update_batch(ex.worker, [self.context(run, c, plan, rnd) for c in selected[:k]])
                torch.cuda.synchronize(device)
                return int(torch.cuda.max_memory_allocated(device))

            def agree(k: int) -> int:
                return int(min(self.ctx.all_gather_objects(k)))

            self._choices[key] = choose(self.cfg.runtime.client_batch, device, run.phase.batches_clients(plan),
                                        len(selected), probe, agree)
        return self._choices[key]

    def _batched(self, run: PhaseRun, rnd: int, plan: RoundPlan, selected: list[int], k: int) -> torch.Tensor:
        """The round's clients in batches of k consecutive participants, whole batches to a rank: a batch is
        the same computation whatever the rank count, so results stay rank-invariant."""
        batches = [tuple(selected[i:i + k]) for i in range(0, len(selected), k)]
        ranks = assign_to_ranks(range(len(batches)), [float(len(b)) for b in batches], self.ctx.world_size)

        def work(ex: ClientExecutor, batch: tuple[int, ...]) -> None:
            copy_state(ex.worker, run.net)
            update = run.phase.local_update_batch(ex.worker, [self.context(run, cid, plan, rnd) for cid in batch])
            seg = run.buffer.layout.split(ex.buffer)
            for j, cid in enumerate(batch):
                self._add(run, seg, cid, update.losses[j], update.client(j))

        return run_clients(run.executors, [batches[i] for i in ranks[self.ctx.rank]], work,
                           deterministic=self.cfg.runtime.deterministic)

    def _add(self, run: PhaseRun, seg: dict[str, torch.Tensor], cid: int, loss: float, tensors: list[torch.Tensor],
             result: LocalResult | None = None) -> None:
        """Client `cid`'s update into a lane's buffer (`RoundBuffer.add`), or its exclusion if not finite."""
        run.buffer.add(seg, cid, self._slots[cid], self.setup.clients[cid].num_train, loss, tensors, result)
