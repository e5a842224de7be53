"""Command line entry point: parse arguments, report user errors in one line, run the search."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from typing import Sequence

from fedmetanas.checkpoint import CheckpointError
from fedmetanas.config import ConfigError
from fedmetanas.configure import load_config
from fedmetanas.data.errors import DataError
from fedmetanas.dist import CollectiveError, DistError, init_distributed, leave, placement_from_env, shutdown
from fedmetanas.reporting.hdf5 import close_open_logs
from fedmetanas.rundir import OutOfSpaceError, RunDirError
from fedmetanas.signals import EXIT_INTERRUPTED, SETUP_STOPPED, exit_code

USER_ERRORS = (ConfigError, DataError, DistError, RunDirError, CheckpointError)
EXIT_USER_ERROR = 2
EXIT_NUMERICAL_FAULT = 3
EXIT_COLLECTIVE = 4
# Stopped by a signal (fedmetanas.signals): 130 after Ctrl-C, 75 after SIGTERM / SIGUSR1; resume with --resume.
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


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
    p.add_argument("--log-level", default="INFO", help=f"logging level on rank 0 ({', '.join(LOG_LEVELS)})")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    return p.parse_intermixed_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    rank = env_rank()
    level = str(args.log_level).upper()
    if level not in LOG_LEVELS:
        if rank == 0:
            print(f"error: --log-level: {args.log_level!r} is not a level; use one of {', '.join(LOG_LEVELS)}",
                  file=sys.stderr)
        return EXIT_USER_ERROR
    logging.basicConfig(level=getattr(logging, level) if rank == 0 else logging.ERROR,
                        format="%(message)s", stream=sys.stderr)
    overrides = list(args.overrides)
    if args.name is not None:  # "" too: the config refuses an empty name instead of using the default
        overrides.append(f"output.name={json.dumps(args.name)}")  # quoted: a name of digits stays text
    if args.overwrite:
        overrides.append("output.overwrite=true")
    if args.resume:
        overrides.append("output.resume=true")
    try:
        cfg = load_config(args.config, overrides)
        rt = cfg.runtime
        ctx = init_distributed(rt.device, rt.threads_per_rank, rt.collective_timeout_s, rt.devices,
                               rt.deterministic, rt.master_addr)
        from fedmetanas.federated.loop import run  # noqa: PLC0415 - heavy
        from fedmetanas.federated.stopping import NumericalFault, Preempted  # noqa: PLC0415

        try:
            result = run(cfg, ctx)
        except Preempted as stop:
            if rank == 0:
                print(f"stopped: {stop}", file=sys.stderr)
            # The loop names the signal (Preempted.signal_name; older loops only in the message). Every
            # rank stopped after the same round, but only those signalled know which signal: agree, so
            # all exit alike (mpirun ORs the ranks' codes: 130 | 75 would read 203).
            name = getattr(stop, "signal_name", "") or ("SIGINT" if "SIGINT" in str(stop) else "")
            if ctx.world_size > 1:
                with contextlib.suppress(RuntimeError):
                    name = "SIGINT" if "SIGINT" in ctx.all_gather_objects(name) else name
                leave(exit_code(name))  # the files are closed: skip the interpreter's slow teardown
            return exit_code(name)
        except KeyboardInterrupt:
            # A second Ctrl-C: end now. The log is closed (a plain h5py reader can open it); the last
            # checkpoint written is kept. Other ranks may sit in a collective: leave without MPI_Finalize.
            close_open_logs()
            if rank == 0:
                print("stopped: interrupted by Ctrl-C inside a round; the last checkpoint written is kept, "
                      "continue with --resume", file=sys.stderr, flush=True)
            if ctx.world_size > 1:
                sys.stdout.flush()
                os._exit(EXIT_INTERRUPTED)
            return EXIT_INTERRUPTED
        except CollectiveError as err:
            # Another rank is dead or hung: MPI_Finalize would wait for it forever, so leave now and
            # let the launcher end the job. Every survivor says what it saw (after closing its log:
            # os._exit skips HDF5's own clean-up).
            close_open_logs()
            print(f"error: {err}", file=sys.stderr, flush=True)
            os._exit(EXIT_COLLECTIVE)
        except NumericalFault as fault:
            if rank == 0:
                print(f"error: {fault}", file=sys.stderr)
            return EXIT_NUMERICAL_FAULT
        finally:
            shutdown()
    except OutOfSpaceError as err:
        # A write failed mid-run (a full disk). Leave at once: HDF5 crashes collecting a file whose writes
        # failed at interpreter exit, and under MPI the other ranks wait in the next round's all-reduce
        # (the launcher ends them). What was written is on disk; --resume continues from the last checkpoint.
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(EXIT_USER_ERROR)
    except USER_ERRORS as err:
        if rank == 0:
            print(f"error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:  # Ctrl-C before the run began: nothing was written
        if rank == 0:
            print(SETUP_STOPPED, file=sys.stderr)
        return EXIT_INTERRUPTED
    if rank == 0:
        for line in result.lines:
            print(line)
        if result.personalization:
            p = result.personalization
            print(f"personalized accuracy ({p['personal_clients']} clients), mean / worst 10%: "
                  f"{p['personal_before_mean']:.4f} / "
                  f"{p['personal_before_worst10']:.4f} before, {p['personal_after_mean']:.4f} / "
                  f"{p['personal_after_worst10']:.4f} after adaptation")
        print(f"total time: {result.seconds:.1f} s; run directory: {result.run_dir}")
        if result.fault:
            print(f"error: {result.fault}", file=sys.stderr)
    return EXIT_NUMERICAL_FAULT if result.fault else 0
