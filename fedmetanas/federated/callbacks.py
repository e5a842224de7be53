"""Side effects of a run, on rank 0 only: the HDF5 trajectory log, checkpoints, console lines, files.

The round loop computes; it hands each event to its callbacks and never writes a file itself. On a
resume the checkpoint's rows are fed back through `on_round(..., replay=True)`, the same path a live
round takes, so the rebuilt log is the log an uninterrupted run would have written.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
import yaml

from fedmetanas.algorithms.base import Artifact
from fedmetanas.checkpoint import save_checkpoint, to_cpu
from fedmetanas.config import Config, to_dict
from fedmetanas.reporting.hdf5 import TrajectoryLog
from fedmetanas.rundir import LOG_NAME, out_of_space

log = logging.getLogger(__name__)


class Callback:
    """Hooks of the round loop; every method is optional."""

    def on_start(self, rows: list[tuple[str, dict[str, Any]]]) -> None:
        """The run directory exists; `rows` are a resumed run's earlier rounds (replayed next)."""

    def on_round(self, group: str, row: dict[str, Any], replay: bool = False) -> None:
        """A round's log row for HDF5 table `group` (`replay`: from a checkpoint, not computed now)."""

    def on_round_end(self, next_round: int, wall_time: float, stopping: bool, last: bool) -> None:
        """After the round and any phase change: the state the next round starts from is final."""

    def on_phase_end(self, files: Mapping[str, Artifact]) -> None:
        """A phase's files (also the last phase's, just before `on_finish`)."""

    def on_finish(self, final: dict[str, Any], datasets: dict[str, np.ndarray] | None) -> None:
        """The run's final record and per-client datasets (personalization)."""

    def on_stop(self) -> None:
        """The run stops early (a signal): release files so they stay readable."""


class TrajectoryCallback(Callback):
    """The HDF5 trajectory log: a fresh file, or on resume the file rebuilt from the checkpoint's rows
    (a killed run's file may hold rounds after the checkpoint, or be torn; those are recomputed).
    `stages` gives the root attribute `stages` as run, rewritten when the run finishes (a phase may
    have ended early, the run may have stopped before its last planned round)."""

    def __init__(self, out_dir: Path, attrs: dict[str, Any], static: dict[str, Any],
                 stages: Callable[[], str] | None = None) -> None:
        self.out_dir, self.attrs, self.static, self.stages = out_dir, attrs, static, stages
        self.log: TrajectoryLog | None = None

    def on_start(self, rows: list[tuple[str, dict[str, Any]]]) -> None:
        tmp = self.out_dir / (LOG_NAME + ".tmp")
        tmp.unlink(missing_ok=True)
        self.log = TrajectoryLog(tmp, self.attrs, self.static)
        for group, row in rows:
            self.log.append(row, group)
        self.log.rename(self.out_dir / LOG_NAME)

    def on_round(self, group: str, row: dict[str, Any], replay: bool = False) -> None:
        if not replay:  # replayed rows were written in on_start, before the file took its final name
            self.log.append(row, group)

    def on_finish(self, final: dict[str, Any], datasets: dict[str, np.ndarray] | None) -> None:
        self.log.close(final=final, datasets=datasets,
                       attrs=None if self.stages is None else {"stages": self.stages()})

    def on_stop(self) -> None:
        if self.log is not None:
            self.log.close()


class CheckpointCallback(Callback):
    """A checkpoint every `checkpoint.every` rounds, at the end, and when a signal stops the run."""

    def __init__(self, cfg: Config, directory: Path, snapshot: Callable[[int, float], dict[str, Any]]) -> None:
        self.every, self.keep = cfg.checkpoint.every, cfg.checkpoint.keep
        self.directory, self.snapshot = directory, snapshot

    def on_round_end(self, next_round: int, wall_time: float, stopping: bool, last: bool) -> None:
        if stopping or (self.every and next_round % self.every == 0) or last:
            save_checkpoint(self.directory, self.snapshot(next_round, wall_time), self.keep)


class ArtifactsCallback(Callback):
    """The run directory's files: the resolved config at the start, each phase's files at its end."""

    def __init__(self, cfg: Config, out_dir: Path) -> None:
        self.cfg, self.out_dir = cfg, out_dir

    def on_start(self, rows: list[tuple[str, dict[str, Any]]]) -> None:
        (self.out_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(self.cfg), sort_keys=False))

    def on_phase_end(self, files: Mapping[str, Artifact]) -> None:
        for name, content in files.items():
            if isinstance(content, str):
                (self.out_dir / name).write_text(content)
            else:
                torch.save(to_cpu(content), self.out_dir / name)  # loads on a host without a GPU


class ConsoleCallback(Callback):
    """One line per round and a summary of personalization."""

    def __init__(self, total_rounds: Callable[[], int], describe: Callable[[dict[str, Any], float], str],
                 personalize_steps: int) -> None:
        self.total, self.describe, self.steps = total_rounds, describe, personalize_steps  # total: as it stands

    def on_round(self, group: str, row: dict[str, Any], replay: bool = False) -> None:
        if replay:
            return
        loss = row["client_loss"]
        mean_loss = float(np.nanmean(loss)) if np.isfinite(loss).any() else float("nan")
        log.info("round %3d/%d %s  local %.1fs comm %.3fs eval %.1fs", row["round"] + 1, self.total(),
                 self.describe(row, mean_loss), row["time_local"], row["time_allreduce"], row["time_eval"])

    def on_finish(self, final: dict[str, Any], datasets: dict[str, np.ndarray] | None) -> None:
        if "personal_after_mean" in final:
            log.info("personalization (%d steps, %d clients): mean accuracy %.4f -> %.4f, worst 10%% %.4f -> %.4f",
                     self.steps, final["personal_clients"], final["personal_before_mean"], final["personal_after_mean"],
                     final["personal_before_worst10"], final["personal_after_worst10"])


class Callbacks:
    """The run's callbacks (none on ranks other than 0), each event handed to each in turn.

    A write that fails for want of disk space becomes `OutOfSpaceError` (one line for the user) after the
    log is closed if it still closes (a reader then opens it plainly; one whose close fails too is left as
    it is, for --resume to rebuild)."""

    def __init__(self, run_path: Path) -> None:
        self.run_path = run_path
        self.items: list[Callback] = []

    def emit(self, method: str, *args: Any, **kwargs: Any) -> None:
        for cb in self.items:
            try:
                getattr(cb, method)(*args, **kwargs)
            except (OSError, RuntimeError) as err:
                full = out_of_space(err, self.run_path)
                if full is None:
                    raise
                self._abandon_log()
                raise full from None

    def _abandon_log(self) -> None:
        for cb in self.items:
            if isinstance(cb, TrajectoryCallback):
                try:
                    cb.on_stop()
                except (OSError, RuntimeError) as err:
                    log.debug("the log could not be closed after a failed write: %s", err)
