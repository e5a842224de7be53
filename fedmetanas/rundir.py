"""Each run writes into its own directory, and a previous run is never overwritten silently."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from fedmetanas.config import OutputConfig

LOG_NAME = "trajectory.h5"


class RunDirError(ValueError):
    """The output directory cannot be used as asked; the message names the fix."""


def run_dir(cfg: OutputConfig) -> Path:
    return Path(cfg.dir) / cfg.name


def check_run_dir(cfg: OutputConfig) -> Path:
    """Validate (without writing) that the run directory may be used; every rank may call it."""
    path = run_dir(cfg)
    if (path / LOG_NAME).exists() and not (cfg.overwrite or cfg.resume):
        raise RunDirError(
            f"output: run directory {str(path)!r} already holds a run; choose another output.name, "
            "--resume to continue it, or --overwrite (output.overwrite: true) to replace it")
    parent = path if path.exists() else next((p for p in path.parents if p.exists()), Path("."))
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise RunDirError(f"output.dir: {str(parent)!r} is not a writable directory; choose a writable output.dir")
    return path


def prepare_run_dir(cfg: OutputConfig) -> Path:
    """Create the run directory (main rank only), clearing an old run only when overwrite is set."""
    path = check_run_dir(cfg)
    if path.exists() and cfg.overwrite and not cfg.resume:
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    return path
