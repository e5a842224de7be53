"""The round loop: sample clients -> local work -> one all-reduce -> the phase's server step -> the phase's
server update -> evaluation -> the round's record to the callbacks -> the stop rules.

Every rank runs this same code. Each rank hosts the clients the schedule gives it and encodes their
updates (the sample-weighted model, or what the phase declared: model rows, uploads, client state;
`round_buffer`) with per-client losses, flags and the rank's timings into one flat float64 buffer, and a
single all-reduce makes every rank's copy of the round's sums identical; the phase's `server_step` turns
them into the new global model on every rank alike. What the model is, how a client learns and what the
server does belong to the algorithm's phases (`algorithms/`): this module names no algorithm. Its
helpers have modules of their own: `local_work` (a rank's clients), `stages` (the phases on one round
counter), `resume` (checkpoints), `stopping` (the stop rules), `personalization`, `callbacks` (files).

Stop rules, asked after every round with the same answer on every rank: the phase may end early
(`Phase.end_early`; the later phases' spans then follow it), and the run ends at the last round of the
last phase (`stopped_by: rounds`) or once its training time reaches `federated.time_budget_s`
(`stopped_by: time_budget`), finalizing in the phase it is in as if that round had been the last.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NoReturn

import numpy as np
import torch
import yaml

from fedmetanas.algorithms import get_algorithm
from fedmetanas.algorithms.base import Phase, PhaseOutcome, RoundPlan
from fedmetanas.capture import log_compiled, refuse_capture
from fedmetanas.checkpoint import CheckpointError, checkpoint_path, list_checkpoints
from fedmetanas.config import Config, ConfigError, to_dict
from fedmetanas.dist import DistContext
from fedmetanas.federated.batching import refuse_unbatchable
from fedmetanas.federated.callbacks import (ArtifactsCallback, Callbacks, CheckpointCallback, ConsoleCallback,
                                            TrajectoryCallback)
from fedmetanas.federated.evaluation import evaluate_forwards
from fedmetanas.federated.executor import close_executors
from fedmetanas.federated.layout import client_columns
from fedmetanas.federated.local_work import LocalWork, PhaseRun
from fedmetanas.federated.personalization import personalize_final
from fedmetanas.federated import resume
from fedmetanas.federated.setup import Setup, prepare
from fedmetanas.federated.stages import Stages
from fedmetanas.federated.stopping import Preempted, log_stop_rule, nonfinite_fault, training_seconds
from fedmetanas.data.client_data import check_batch_sizes
from fedmetanas.rundir import RunDirError, RunLock, acquire_run_dir
from fedmetanas.runtime import peak_memory_mib, synchronize
from fedmetanas.signals import RoundDropped, StopFlag

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    """What a finished run reports (identical on every rank)."""

    final: dict[str, Any]  # the log's /final record: accuracies, genotype, algorithm, times
    seconds: float
    run_dir: Any  # Path on rank 0, None elsewhere
    personalization: dict[str, float] | None = None
    lines: tuple[str, ...] = ()  # what the command line prints about the final model
    fault: str | None = None  # a part of the result is no result (personalization diverged): exit non-zero


class Loop:
    """All state of one federated run on one rank, and the round loop over it."""

    def __init__(self, cfg: Config, ctx: DistContext) -> None:
        self.cfg, self.ctx = cfg, ctx
        refuse_capture(cfg.runtime.capture, ctx.device)  # before the data loads: a device error, not a data one
        self.setup: Setup = prepare(cfg, ctx)
        algorithm = get_algorithm(cfg.algorithm.name)(cfg)
        # Every rank checks the same clients: all fail alike, none waits for another.
        check_batch_sizes(algorithm.batch_sizes(), self.setup.clients.train_sizes.tolist())
        self.stages = Stages(algorithm.phases())
        refuse_unbatchable(cfg.runtime.client_batch, self.stages.phases)
        self.previous: PhaseOutcome | None = None  # the outcome the current phase started from
        self.start_round, self.wall_offset = 0, 0.0
        self.end_round = 0  # one past the last round run so far
        self.stopped_by = "rounds"  # or "time_budget": which rule ended the run
        self.training_seconds = 0.0  # rank 0's, as of the last budget check
        self.switch_pending = False  # resumed from a phase that had ended, the next not yet entered
        self.rows: list[tuple[str, dict[str, Any]]] = []  # (HDF5 table, row): replayed on resume
        self.stop = StopFlag()
        self.lock: RunLock | None = None  # rank 0's hold on the run directory
        self.callbacks = Callbacks(self.setup.run_path)
        self.work = LocalWork(cfg, self.setup, ctx)
        self.work.droppable = self.stop.droppable
        self.cur: PhaseRun | None = None
        self._enter(0, None)
        # The log's model facts are the first phase's, also after a resume in a later one.
        self.model_attrs = self.phase.model_attrs(self.cur.net)

    # -- phases ----------------------------------------------------------------------------------
    def _enter(self, index: int, previous: PhaseOutcome | None) -> None:
        """Make phase `index` current: its global model, lanes (worker + task replicas) and buffer layout."""
        self.stages.index, self.previous = index, previous
        self.stages.phases[index].enter(previous)
        self.cur = PhaseRun.enter(self.cfg, self.setup, self.ctx, index, self.stages.phases[index],
                                  self.cur.executors if self.cur is not None else [])
        self.work.batching = None  # a new phase says how it runs its clients again

    @property
    def phase(self) -> Phase:
        return self.stages.current

    # -- start: resume, run directory, callbacks ---------------------------------------------------
    def _agree(self, step: Callable[[], None]) -> None:
        """Run a set-up step on every rank; if it fails anywhere, fail everywhere with the same error
        (so no rank waits forever for one that gave up, and rank 0 reports the first rank's message)."""
        error: Exception | None = None
        try:
            step()
        except (ConfigError, CheckpointError, RunDirError) as err:
            error = err
        errors = self.ctx.all_gather_objects(None if error is None else (type(error), str(error)))
        failed = [e for e in errors if e is not None]
        if failed:
            kind, message = failed[0]
            raise kind(message)

    def _resume(self) -> None:
        """Load the newest valid checkpoint, if resuming and one exists (every rank reads it)."""
        found = resume.find(self.cfg, self.setup, self.stages)
        if found is None:
            return
        self.switch_pending = found.switch_pending
        if found.index != self.stages.index:
            self._enter(found.index, found.previous)
        resume.restore(self.cur, found.state, self.ctx.device)
        self.start_round = self.end_round = found.next_round
        self.wall_offset = float(found.state["wall_time"])
        self.rows = found.rows
        log.info("resumed from %s at round %d", found.path, self.start_round + 1)

    def _snapshot(self, next_round: int, wall_time: float) -> dict[str, Any]:
        return resume.snapshot(self.cfg, self.setup, self.stages, self.cur, self.previous, self.rows, next_round,
                               wall_time)

    def _resume_and_lock(self) -> None:
        """Every rank reads the checkpoint, if resuming (a refused resume writes nothing); then rank 0
        locks the run directory before anything is written (a second start of the same run fails here)."""
        self._resume()
        if self.ctx.is_main:
            self.lock = acquire_run_dir(self.cfg.output)

    def _start(self) -> None:
        """Rank 0: the callbacks; the log is rebuilt from a resumed run's rows."""
        if not self.ctx.is_main:
            return
        out_dir = self.lock.path
        s, cfg = self.setup, self.cfg
        attrs = {"config_yaml": yaml.safe_dump(to_dict(cfg), sort_keys=False), **self.model_attrs,
                 "world_size": self.ctx.world_size, "algorithm": cfg.algorithm.name,
                 # The planned spans; rewritten at the end with those run (`_stages`).
                 "stages": json.dumps(self.stages.planned()),
                 "partition_hash": s.partition_hash}
        static = {"partition/class_counts": s.counts,
                  "partition/train_sizes": s.clients.train_sizes, "partition/test_sizes": s.clients.test_sizes}
        stages = lambda: json.dumps(self.stages.run_so_far(self.end_round))  # noqa: E731
        self.callbacks.items = [ArtifactsCallback(cfg, out_dir), TrajectoryCallback(out_dir, attrs, static, stages),
                                CheckpointCallback(cfg, s.run_path / "checkpoints", self._snapshot),
                                ConsoleCallback(lambda: self.stages.total,
                                                lambda row, loss: self.phase.describe_round(row, loss),
                                                cfg.personalize.steps)]
        self.callbacks.emit("on_start", self.rows)
        for group, row in self.rows:
            self.callbacks.emit("on_round", group, row, replay=True)
        log.info("run directory %s; %s: %d clients (%d per round) on %d rank(s); %d aggregated values", out_dir,
                 cfg.algorithm.name, cfg.federated.num_clients, s.per_round, self.ctx.world_size,
                 self.cur.buffer.model_size)

    # -- the loop --------------------------------------------------------------------------------
    def run(self) -> RunResult:
        """The round loop; returns the final evaluation (identical on every rank)."""
        try:
            with self.stop:  # SIGTERM / SIGUSR1: finish the round, checkpoint, stop; Ctrl-C: drop it (signals)
                return self._run()
        finally:
            close_executors(self.cur.executors)
            if self.lock is not None:
                self.lock.release()

    def _run(self) -> RunResult:
        t_start = time.perf_counter()
        # Every rank decides from the same files before rank 0 writes any (no rank sees rank 0's new log).
        self._agree(self._resume_and_lock)
        self._start()
        t_start -= self.wall_offset
        rnd = self.start_round
        if 0 < rnd < self.stages.total and self._over_budget(self.wall_offset):
            self.stopped_by = "time_budget"  # a resumed run whose budget was already spent only finishes
        elif self.switch_pending:
            self._switch_phase(self.phase.round_plan(rnd - 1), self.rows[-1][1])
        while self.stopped_by == "rounds" and rnd < self.stages.total:
            plan = self.phase.round_plan(rnd)
            row, stopping = self.run_round(rnd, plan, t_start)
            if row is None:
                self._stop_dropped(rnd)
            self.end_round = rnd + 1
            early = self.phase.end_early(rnd, row)  # asked every round: the phase may count something
            phase_ends = self.stages.has_next and (early or rnd == self.phase.span.end - 1)
            if phase_ends and rnd < self.phase.span.end - 1:
                log.info("phase %d ends early, after round %d of its planned %d (its own stop rule)",
                         self.stages.index + 1, rnd + 1, self.phase.span.end)
            if phase_ends:
                self.stages.end_current(rnd + 1)
            last = rnd == self.stages.total - 1
            if not last and self._over_budget(row["wall_time"]):
                self.stopped_by, last = "time_budget", True  # finalize in this phase, as if its last round
            if phase_ends and not last:
                self._switch_phase(plan, row)
            self.callbacks.emit("on_round_end", rnd + 1, row["wall_time"], stopping, last)
            if stopping and not last:
                self.callbacks.emit("on_stop")
                raise Preempted(f"stopped by {self.stop.signal_name or 'a signal on another rank'} after round "
                                f"{rnd + 1}; checkpoint written, continue with --resume", self.stop.signal_name)
            rnd += 1
        return self._finish(t_start)

    def _stop_dropped(self, rnd: int) -> NoReturn:
        """A Ctrl-C dropped round `rnd` on some rank: the run stops as of the round before. Its checkpoint
        is written unless it already is (`checkpoint.every` 1); before any round there is none, and
        --resume starts the run afresh."""
        written = [p.name for p in list_checkpoints(self.setup.run_path / "checkpoints")[:1]]
        if rnd > 0 and written != [checkpoint_path(Path(), rnd).name]:  # (the callback is rank 0's)
            self.callbacks.emit("on_round_end", rnd, self.rows[-1][1]["wall_time"], True, False)
        self.callbacks.emit("on_stop")
        after = f"round {rnd} is the last one kept" if rnd > 0 else "no round had finished: it starts afresh"
        raise Preempted(f"stopped by SIGINT in round {rnd + 1}, which is dropped ({after}); continue with --resume",
                        "SIGINT")

    def _over_budget(self, wall_time: float) -> bool:
        """Whether the run's training time (wall time less the rounds' evaluation time: how often the
        model is measured is not the method's cost) has reached `federated.time_budget_s`. Rank 0's clock
        decides for every rank (one small collective, only when a budget is set)."""
        budget = self.cfg.federated.time_budget_s
        if budget <= 0:
            return False
        spent = training_seconds(wall_time, self.rows)
        self.training_seconds = float(self.ctx.all_gather_objects(spent)[0])
        return self.training_seconds >= budget

    def _switch_phase(self, plan: RoundPlan, row: dict[str, Any]) -> None:
        """Between phases: keep the outcome, write the phase's files, build the next phase's model."""
        outcome = self.phase.outcome(self.cur.net, plan, row)
        self.callbacks.emit("on_phase_end", self.phase.artifacts(self.cur.net, plan, last=False))
        index = self.stages.index + 1
        nxt = self.stages.phases[index]
        log.info("phase %d finished after %.1f s (%s); %s for %d rounds", index, row["wall_time"],
                 outcome.genotype.to_string() if outcome.genotype else "no genotype", nxt.span.kind, nxt.span.rounds)
        self._enter(index, outcome)

    def run_round(self, rnd: int, plan: RoundPlan, t_start: float) -> tuple[dict[str, Any] | None, bool]:
        """One round: local work, one all-reduce, server update, evaluation, log row.

        Returns the round's log row and whether any rank was asked to stop (signal); no row where a
        Ctrl-C dropped the round on any rank (nothing of it was applied, on any rank).
        """
        cfg, phase, lay, net = self.cfg, self.phase, self.cur.buffer.layout, self.cur.net
        t_round = time.perf_counter()
        try:
            buf, dropped = self.work(self.cur, rnd, plan), False
        except RoundDropped:  # this rank's clients cut short: its share is void, the others learn it below
            buf, dropped = lay.zeros(self.ctx.device), True
        synchronize(self.ctx.device)
        t_local = time.perf_counter() - t_round
        seg = lay.split(buf)
        seg["rank_seconds"][self.ctx.rank] = t_local
        seg["rank_mib"][self.ctx.rank], seg["rank_gpu_mib"][self.ctx.rank] = peak_memory_mib(self.ctx.device)
        seg["stop"][0] = float(self.stop.requested)
        seg["dropped"][0] = float(dropped)
        t_comm = self.ctx.timed_all_reduce_sum(buf)

        out = {k: v.cpu().numpy() for k, v in lay.split(buf).items() if k != "params"}
        if out["dropped"][0] > 0:
            return None, True
        flags, excluded = out["flag"] > 0, out["excluded"] > 0
        fault = nonfinite_fault(rnd, flags, excluded, cfg.federated.nonfinite)
        if fault is not None:
            if cfg.federated.nonfinite != "stop":  # every update excluded: the log is closed first
                self.callbacks.emit("on_stop")
            raise fault
        if float(out["n"][0]) > 0:  # else every client was excluded: keep the previous model
            clients = np.flatnonzero(flags).tolist()
            self.cur.server_step(seg, clients, [not excluded[c] for c in clients],
                                 [self.setup.clients[c].num_train for c in clients], plan)
        phase.server_update(net, plan)

        t0 = time.perf_counter()
        if (rnd - phase.span.first) % cfg.eval.every == 0 or rnd == phase.span.end - 1:
            metrics = self._evaluate(phase.forwards(net, plan), self.setup.eval_idx)
        else:
            metrics = {f"{n}_{m}": float("nan") for n in phase.eval_names for m in ("loss", "acc")}
        t_eval = time.perf_counter() - t0

        rank_seconds = out["rank_seconds"]
        row: dict[str, Any] = {
            "round": rnd, **metrics, **client_columns(out["flag"], out["excluded"], out["loss"]),
            "time_local_rank": rank_seconds,
            "time_local": float(rank_seconds.max()), "memory_rank_mib": out["rank_mib"],
            "memory_gpu_rank_mib": out["rank_gpu_mib"], "time_allreduce": t_comm,
            "time_eval": t_eval, "time_round": time.perf_counter() - t_round,
            "wall_time": time.perf_counter() - t_start, "bytes_allreduced": buf.numel() * buf.element_size(),
            # What a real deployment moves: each participant downloads and uploads the model (float32).
            "bytes_clients": int(2 * int(flags.sum()) * lay.length("params") * 4),
            "client_batch": self.work.batching.k if self.work.batching is not None else 1,  # 1: one at a time
            "capture": self.work.capture.mode,  # how the step's arithmetic ran: off, compile, graphs
            **phase.record(net, plan)}
        self.rows.append((phase.span.group, row))
        self.callbacks.emit("on_round", phase.span.group, row)
        return row, float(out["stop"][0]) > 0

    def _evaluate(self, forwards: dict[str, Callable[[torch.Tensor], torch.Tensor]],
                  idx: torch.Tensor) -> dict[str, float]:
        return evaluate_forwards(self.ctx, self.cur.net, forwards, self.setup.test, idx, self.cfg.eval.batch_size,
                                 self.cfg.model.channels_last)

    # -- the end ---------------------------------------------------------------------------------
    def _finish(self, t_start: float) -> RunResult:
        """Final evaluation on the full test set, personalization, saved models, the log's summary."""
        cfg, phase, s = self.cfg, self.phase, self.setup
        final_idx = torch.arange(len(s.test)) if cfg.eval.final_full else s.eval_idx
        end = self.end_round  # the run's last round is `end - 1` (the last planned one unless stopped early)
        plan = phase.round_plan(end - 1)
        log_stop_rule(self.stopped_by, end, self.stages.total, self.training_seconds, cfg.federated.time_budget_s,
                      self.stages.index + 1)
        log_compiled()
        net = self.cur.net
        metrics = self._evaluate(phase.forwards(net, plan), final_idx)
        final = phase.final_record(metrics, self.previous, time.perf_counter() - t_start)
        personal, summary, fault = personalize_final(cfg, self.ctx, s, phase, net, self.cur.executors, plan,
                                                     lambda cid, pl: self.work.context(self.cur, cid, pl, end, 1))
        seconds = time.perf_counter() - t_start
        arch_text = phase.arch_text(net, plan)
        record = {"genotype": arch_text, "algorithm": cfg.algorithm.name, "seconds": seconds,
                  "eval_count": int(final_idx.numel()), "stopped_by": self.stopped_by, **final, **summary}
        self.callbacks.emit("on_phase_end", phase.artifacts(net, plan, last=True))
        self.callbacks.emit("on_finish", record, personal)
        return RunResult(record, seconds, s.run_path if self.ctx.is_main else None, summary or None,
                         tuple(phase.describe_final(record)), fault)


def run(cfg: Config, ctx: DistContext) -> RunResult:
    """Run (or resume) a whole federated run; rank 0 writes the run directory and the HDF5 log."""
    return Loop(cfg, ctx).run()
