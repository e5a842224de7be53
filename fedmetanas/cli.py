"""Command line entry point: parse arguments, report user errors in one line, run the search."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Sequence

from fedmetanas.checkpoint import CheckpointError
from fedmetanas.config import ConfigError, load_config
from fedmetanas.data.errors import DataError
from fedmetanas.dist import CollectiveError, DistError, init_distributed, placement_from_env, shutdown
from fedmetanas.rundir import RunDirError

USER_ERRORS = (ConfigError, DataError, DistError, RunDirError, CheckpointError)
EXIT_USER_ERROR = 2
EXIT_NUMERICAL_FAULT = 3
EXIT_COLLECTIVE = 4
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped by a signal after writing a checkpoint; resume with --resume


def env_rank() -> int:
    """This process's rank as the launcher tells it (before any MPI call)."""
    try:
        return placement_from_env().rank
    except DistError:  # garbled launcher variables: init_distributed reports them inside the try
        return 0


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="fedmetanas", description="Federated neural architecture search (FedMetaNAS).")
    p.add_argument("--config", help="YAML config file (defaults apply to what it leaves out)")
    p.add_argument("--name", help="run name: output goes to <output.dir>/<name> (same as output.name=...)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run directory of the same name")
    p.add_argument("--resume", action="store_true",
                   help="continue the run from its newest valid checkpoint (a new run if there is none)")
    p.add_argument("--log-level", default="INFO", help="logging level on rank 0 (DEBUG, INFO, WARNING)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    return p.parse_intermixed_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    rank = env_rank()
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.INFO) if rank == 0 else logging.ERROR,
                        format="%(message)s", stream=sys.stderr)
    overrides = list(args.overrides)
    if args.name:
        overrides.append(f"output.name={args.name}")
    if args.overwrite:
        overrides.append("output.overwrite=true")
    if args.resume:
        overrides.append("output.resume=true")
    try:
        cfg = load_config(args.config, overrides)
        rt = cfg.runtime
        ctx = init_distributed(rt.device, rt.threads_per_rank, rt.collective_timeout_s, rt.devices,
                               rt.deterministic, rt.master_addr)
        from fedmetanas.federated.loop import NumericalFault, Preempted, run  # noqa: PLC0415 - heavy

        try:
            result = run(cfg, ctx)
        except Preempted as stop:
            if rank == 0:
                print(f"stopped: {stop}", file=sys.stderr)
            return EXIT_PREEMPTED
        except CollectiveError as err:
            # Another rank is dead or hung: MPI_Finalize would wait for it forever, so leave now and
            # let the launcher end the job. Every survivor says what it saw.
            print(f"error: {err}", file=sys.stderr, flush=True)
            os._exit(EXIT_COLLECTIVE)
        except NumericalFault as fault:
            if rank == 0:
                print(f"error: {fault}", file=sys.stderr)
            return EXIT_NUMERICAL_FAULT
        finally:
            shutdown()
    except USER_ERRORS as err:
        if rank == 0:
            print(f"error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    if rank == 0:
        for line in result.lines:
            print(line)
        if result.personalization:
            p = result.personalization
            print(f"personalized accuracy, mean / worst 10%: {p['personal_before_mean']:.4f} / "
                  f"{p['personal_before_worst10']:.4f} before, {p['personal_after_mean']:.4f} / "
                  f"{p['personal_after_worst10']:.4f} after adaptation")
        print(f"total time: {result.seconds:.1f} s; run directory: {result.run_dir}")
    return 0
