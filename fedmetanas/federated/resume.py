"""What a checkpoint holds (`snapshot`) and where a resumed run stands (`find`, `restore`).

All randomness is derived from (seed, round, client), so a checkpoint holds no RNG state: the global
model, the phase's own state (masks, counters, server-side variables), the server optimizer's moments,
every client's kept state, the phases' ends and the log's rows are enough to continue bit-identically.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedmetanas.algorithms.base import PhaseOutcome
from fedmetanas.checkpoint import CheckpointError, resumable_state
from fedmetanas.config import Config, to_dict
from fedmetanas.federated.local_work import PhaseRun
from fedmetanas.federated.setup import Setup
from fedmetanas.federated.stages import Stages
from fedmetanas.search.genotypes import Genotype


@dataclass
class Resume:
    """A checkpoint to continue from, checked against the config and the phases' spans."""

    state: dict[str, Any]
    path: Path
    next_round: int
    index: int  # the phase it was saved in
    switch_pending: bool  # saved at the end of a phase whose successor was not entered (the run stopped there)

    @property
    def rows(self) -> list[tuple[str, dict[str, Any]]]:
        """The log's rows so far; a row of a checkpoint written before `runtime.capture` existed reads `off`
        (nothing of that run was captured)."""
        rows = [tuple(r) for r in self.state["rows"]]
        for _, row in rows:
            row.setdefault("capture", "off")
        return rows  # type: ignore[return-value]

    @property
    def previous(self) -> PhaseOutcome:
        """The outcome the saved phase started from (the genotype and summary of the phase before it)."""
        genotype = self.state.get("genotype")
        return PhaseOutcome(Genotype.from_string(genotype) if genotype else None, self.state.get("search_final") or {})


def find(cfg: Config, setup: Setup, stages: Stages) -> Resume | None:
    """The newest valid checkpoint of the run when `output.resume` is set (None: start afresh); replays
    its phases' ends onto `stages`."""
    if not cfg.output.resume:
        return None
    found = resumable_state(setup.run_path, to_dict(cfg), setup.partition_hash)
    if found is None:
        return None
    state, path = found
    stages.restore(state.get("phase_ends") or [])
    nxt, index = int(state["next_round"]), int(state.get("stage", 0))
    pending = index < len(stages.ends) and stages.ends[index] == nxt
    if index + pending != stages.of(nxt):
        raise CheckpointError(f"{path}: saved in stage {index} at round {nxt}, which this config places in "
                              f"stage {stages.of(nxt)}; resume with the run's federated.rounds")
    return Resume(state, path, nxt, index, pending)


def restore(run: PhaseRun, state: dict[str, Any], device: torch.device) -> None:
    """The saved phase's model, its own state, its server optimizer and its clients' state into `run`."""
    run.net.load_state_dict(state["model"])
    run.phase.load_state_dict(state)
    run.phase.server.load_state_dict(state.get("server_optimizer"), device)
    run.client_states.load_state_dict(state.get("client_state"))


def snapshot(cfg: Config, setup: Setup, stages: Stages, run: PhaseRun, previous: PhaseOutcome | None,
             rows: list[tuple[str, dict[str, Any]]], next_round: int, wall_time: float) -> dict[str, Any]:
    """What a checkpoint holds: enough to continue bit-identically."""
    return {"next_round": next_round, "model": run.net.state_dict(), **run.phase.state_dict(),
            "stage": stages.index, "search_final": previous.summary if previous else None,
            "genotype": previous.genotype.to_string() if previous and previous.genotype is not None else None,
            "phase_ends": list(stages.ends), "server_optimizer": run.phase.server.state_dict(),
            "client_state": run.client_states.state_dict(), "rows": rows, "wall_time": wall_time,
            "config": to_dict(cfg), "partition_hash": setup.partition_hash}
