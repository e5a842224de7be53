"""Atomic checkpoints of the server state, and the checks that a resumed run is the same run.

A checkpoint holds everything the next round depends on: the global model (weights, architecture
logits, BN statistics), the pruning masks and other phase state, the server optimizer's moments, the
round each ended phase ended at, the round to run next, the resolved config, the
partition's hash and every per-round log row so far (so the HDF5 log can be rebuilt exactly).
No RNG state is needed: all randomness derives from (seed, round, client) (see seeding.py).
Files are written to a temporary name, fsynced and renamed, so a kill never leaves a torn file.
Every tensor is saved as a CPU copy (`to_cpu`), so a checkpoint or model file from a GPU run loads on
a host without a GPU, with or without `map_location`.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

_NAME = re.compile(r"^round-(\d{6})\.pt$")
FORMAT_VERSION = 1
# Fields that may change between a run and its resumption without changing the search (output.*: a run
# directory may be moved or renamed and resumed where it now lies; data.root / data.download: where the
# data is found is not what it is; the partition's hash, checked separately, is the data's identity;
# federated.time_budget_s, like federated.rounds, only says where the run ends: a larger one continues it).
RESUMABLE_CHANGES = ("output.", "runtime.", "eval.", "federated.rounds", "federated.time_budget_s",
                     "checkpoint.", "personalize.", "data.root", "data.download")


class CheckpointError(ValueError):
    """A checkpoint cannot be used for this run; the message names the file or fields."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def to_cpu(obj: Any) -> Any:
    """`obj` with every tensor in it (in dicts, lists, tuples) replaced by a detached CPU copy; the rest kept.

    CPU tensors are copied too, so what is saved never aliases a parameter that keeps training.
    """
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return type(obj)((k, to_cpu(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):  # not a namedtuple
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def cpu_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """`module.state_dict()` as CPU copies: what to put in a saved file."""
    return to_cpu(module.state_dict())


def checkpoint_path(directory: Path, next_round: int) -> Path:
    return directory / f"round-{next_round:06d}.pt"


def save_checkpoint(directory: Path, state: dict[str, Any], keep: int) -> Path:
    """Write `state` atomically as round-NNNNNN.pt (NNNNNN = next round) and keep the newest `keep`."""
    directory.mkdir(parents=True, exist_ok=True)
    final = checkpoint_path(directory, int(state["next_round"]))
    tmp = final.with_suffix(".pt.tmp")
    try:
        with open(tmp, "wb") as fh:
            torch.save({"format_version": FORMAT_VERSION, **to_cpu(state)}, fh)
            fh.flush()
            os.fsync(fh.fileno())
    except (OSError, RuntimeError) as err:  # a full disk: leave no partial file, name the one that failed
        tmp.unlink(missing_ok=True)
        if isinstance(err, OSError) and err.filename is None:
            raise OSError(err.errno, err.strerror, str(final)) from None
        raise
    os.replace(tmp, final)
    _fsync_dir(directory)
    for old in list_checkpoints(directory)[keep:]:
        old.unlink(missing_ok=True)
    return final


def list_checkpoints(directory: Path) -> list[Path]:
    """Checkpoint files in `directory`, newest first."""
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if _NAME.match(p.name)]
    return sorted(found, key=lambda p: p.name, reverse=True)


def load_latest(directory: Path) -> tuple[dict[str, Any], Path] | None:
    """The newest checkpoint that loads; unreadable ones are reported and skipped (older ones kept)."""
    for path in list_checkpoints(directory):
        try:
            state = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as err:  # noqa: BLE001 - any unreadable file is skipped, and said so
            log.warning("checkpoint %s is unreadable (%s); trying an older one", path, type(err).__name__)
            continue
        if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
            log.warning("checkpoint %s is not a fedmetanas checkpoint; trying an older one", path)
            continue
        return state, path
    return None


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _run_sections(saved: dict[str, Any], current: dict[str, Any]) -> dict[str, Any]:
    """`saved` without the top-level sections `current` lacks. The current config holds the core sections and
    its algorithm's own (`config.to_dict`): what determines the run. A saved section beyond them belongs to
    another algorithm (checkpoints written before this rule hold every registered one), so it is ignored;
    were the algorithm itself another, `algorithm.name` differs."""
    return {k: v for k, v in saved.items() if k in current}


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Config fields that differ and would change the search (those in RESUMABLE_CHANGES may differ), over
    the core sections and the active algorithm's own: an algorithm added since the checkpoint, or one that
    does not run, changes nothing."""
    a, b = _flatten(_run_sections(saved, current)), _flatten(current)
    keys = sorted(set(a) | set(b))
    return [k for k in keys if a.get(k) != b.get(k) and not any(
        k == r or (r.endswith(".") and k.startswith(r)) for r in RESUMABLE_CHANGES)]


def check_compatible(state: dict[str, Any], path: Path, config: dict[str, Any], partition_hash: str) -> None:
    """Refuse a checkpoint from a different search, naming what differs."""
    diffs = config_differences(state["config"], config)
    if diffs:
        shown = ", ".join(f"{k} (checkpoint {_flatten(state['config']).get(k)!r}, now {_flatten(config).get(k)!r})"
                          for k in diffs[:4])
        more = f" and {len(diffs) - 4} more" if len(diffs) > 4 else ""
        raise CheckpointError(
            f"checkpoint {path} belongs to a different search: {shown}{more}; resume with the same config "
            "or start a new run (another --name)")
    saved_rounds = int(state["config"].get("federated", {}).get("rounds", 0))
    done = min(int(state["next_round"]), saved_rounds) if saved_rounds else int(state["next_round"])
    rounds = int(config["federated"]["rounds"])
    if rounds < done:
        # Accepted, the log would keep `done` rounds under a config saying fewer, and the final
        # temperature would be that of an earlier round.
        raise CheckpointError(
            f"federated.rounds: {rounds} is below the {done} rounds this run has already done (checkpoint "
            f"{path}); resume with federated.rounds >= {done}, or start a new run (another --name)")
    if state["partition_hash"] != partition_hash:
        raise CheckpointError(
            f"checkpoint {path} was made on a different client partition (data or partition settings changed); "
            "resume with the same data, or start a new run")


def resumable_state(run_path: Path, config: dict[str, Any], partition_hash: str) -> tuple[dict[str, Any], Path] | None:
    """The newest readable checkpoint of the run in `run_path`, checked against the current config and
    partition; None when there is none and starting afresh loses nothing.

    Raises:
        CheckpointError: checkpoint files of which none loads (damaged), or a checkpoint of a different search.
    """
    from fedmetanas.reporting.hdf5 import logged_rounds  # noqa: PLC0415 - h5py only when resuming
    from fedmetanas.rundir import LOG_NAME  # noqa: PLC0415

    ckpt_dir = run_path / "checkpoints"
    found = load_latest(ckpt_dir)
    if found is None:
        if list_checkpoints(ckpt_dir):
            # Checkpoints were written but none loads: something damaged them; starting afresh would
            # replace the run's record of what they held, so refuse.
            raise CheckpointError(
                f"output.resume: {ckpt_dir} holds no readable checkpoint, so the run in {run_path} cannot be "
                "continued; start a new run with another --name")
        # None was ever completed (killed in round 1, or a full disk stopped the first one: at most a
        # `.pt.tmp` is there): starting afresh loses nothing, since every round it logged is recomputed
        # identically from (seed, round, client).
        logged = logged_rounds(run_path / LOG_NAME)
        if logged:
            log.warning("no checkpoint in %s: starting the run afresh; the %d round(s) its log holds are recomputed",
                        ckpt_dir, logged)
        else:
            log.info("no checkpoint in %s: starting a new run", ckpt_dir)
        return None
    check_compatible(found[0], found[1], config, partition_hash)
    return found
