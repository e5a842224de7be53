"""Signals that ask a run to stop: write a checkpoint, exit (resume with --resume).

SIGTERM and SIGUSR1 (a scheduler's preemption notice) only set a flag that the round loop reads once
per round and shares with the other ranks through its all-reduce, so every rank stops after the same
round: a scheduler's notice leaves time (slurm/launch.sh asks for 120 s), and the round's work is kept.

Ctrl-C (SIGINT) is a user at a terminal who wants the prompt back. While a rank runs its clients
(`StopFlag.droppable`, the loop's local work on one lane) the first Ctrl-C raises `RoundDropped` there
and then: the rank stops computing, the round's all-reduce tells every rank that the round is dropped,
and the run stops as of the round before (its checkpoint), which `--resume` reruns bit-identically
because every draw comes from (seed, round, client). A Ctrl-C that lands elsewhere (the all-reduce,
the evaluation) sets the flag like the other signals. Why drop rather than finish: a round of the
default search is tens of seconds on a CPU, and a user who sees nothing happen presses again; under
MPICH's `mpiexec` a second Ctrl-C is its "force abort", which kills the ranks before they can close
the log. Every rank stops in the same round either way: the flag travels in the all-reduce, and a
rank that was not signalled finishes its clients and learns it there. A second Ctrl-C still raises
KeyboardInterrupt at once (the CLI exits 130; the last checkpoint written is kept).

Before the loop takes over, Ctrl-C is not turned into an exception at all (`exit_on_ctrl_c`, installed
by `launch/main.py` before torch loads): an asynchronous KeyboardInterrupt inside an import can leave a
module half-registered (seen in CI: numpy.linalg, then a RecursionError instead of a clean stop). The
set-up writes nothing, so exiting at once loses nothing.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

from fedmetanas.placement import DistError, placement_from_env  # torch-free: usable before torch loads

STOP_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a job ended by Ctrl-C
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: SIGTERM / SIGUSR1; slurm/launch.sh requeues on it


def exit_code(signal_name: str) -> int:
    """The CLI's exit code for a run stopped by `signal_name` ("SIGINT", "SIGTERM", "SIGUSR1", or "")."""
    return EXIT_INTERRUPTED if signal_name == "SIGINT" else EXIT_PREEMPTED


SETUP_STOPPED = "stopped: interrupted by Ctrl-C before the first round"


def _exit_now(signum: int, frame: FrameType | None) -> None:  # noqa: ARG001 - handler signature
    try:
        loud = placement_from_env().rank == 0
    except DistError:  # garbled launcher variables: say it rather than stay silent
        loud = True
    if loud:
        os.write(2, (SETUP_STOPPED + "\n").encode())
    os._exit(EXIT_INTERRUPTED)


def exit_on_ctrl_c() -> None:
    """Until the round loop installs its StopFlag, Ctrl-C exits 130 at once with one line (rank 0's).

    For the program's entry point only (never a library caller's process: it replaces the handler).
    When the loop's StopFlag is removed again, SIGINT goes back to Python's default, not to this:
    by then the run has written files.
    """
    signal.signal(signal.SIGINT, _exit_now)


class RoundDropped(BaseException):
    """The first Ctrl-C while a rank runs its clients: the round in progress is dropped.

    A BaseException, as KeyboardInterrupt is, so that no `except Exception` in a local rule swallows it."""


class StopFlag:
    """Set from a signal handler; the round loop reads `requested` once per round.

    Use as a context manager around the round loop (installs the handlers, restores the previous
    ones on exit), or call `install()` / `uninstall()`.
    """

    def __init__(self, signals: tuple[signal.Signals, ...] = STOP_SIGNALS) -> None:
        self.signals = signals
        self.requested = False
        self.signal_name = ""  # the first signal received here ("" until one arrives)
        self.interrupts = 0  # SIGINTs received
        self.dropped = False  # a Ctrl-C has dropped a round (raised RoundDropped)
        self._droppable = False
        self._previous: dict[signal.Signals, Any] = {}

    def install(self) -> None:
        """Handle the stop signals from now on (main thread only: Python delivers signals there)."""
        if threading.current_thread() is not threading.main_thread():
            return  # signal.signal would raise; a run driven from a thread (tests) just has no handler
        for sig in self.signals:
            if sig not in self._previous:
                self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        """Put back the handlers that were there before `install`."""
        while self._previous:
            sig, handler = self._previous.popitem()
            signal.signal(sig, signal.default_int_handler if handler is _exit_now else handler)

    @contextmanager
    def droppable(self) -> Iterator[None]:
        """Within it, Ctrl-C drops the round at once: `RoundDropped` is raised from the handler, or on
        entry when a Ctrl-C came before (between the all-reduce and here) and has not dropped one yet.

        Only code that writes nothing shared may run inside: no collective (a rank leaving one half-way
        would desynchronize the ranks), no file, no global model; a rank's own clients on one lane."""
        if self.interrupts and not self.dropped:
            self.dropped = True
            raise RoundDropped
        self._droppable = True
        try:
            yield
        finally:
            self._droppable = False

    def __enter__(self) -> StopFlag:
        self.install()
        return self

    def __exit__(self, *exc: object) -> None:
        self.uninstall()

    def _handle(self, signum: int, frame: FrameType | None) -> None:  # noqa: ARG002 - handler signature
        name = signal.Signals(signum).name
        if name == "SIGINT":
            self.interrupts += 1
            if self.interrupts > 1:
                raise KeyboardInterrupt  # the second Ctrl-C: stop now, without finishing the round
        self.requested = True
        if not self.signal_name:
            self.signal_name = name
        if name == "SIGINT" and self._droppable:
            self._droppable, self.dropped = False, True
            raise RoundDropped
