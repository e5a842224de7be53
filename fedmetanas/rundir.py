"""Each run writes into its own directory, and a previous run is never overwritten silently.

Two guards keep a user's files safe. A run directory is *marked* (`.fedmetanas-run`) when a run creates
it, and `--overwrite` clears only a marked directory: a mistyped name never deletes something that is
not a run. And the main rank holds an exclusive lock (`flock` on `.lock` inside the directory) for the
run's whole life, taken before anything else is written: a second start of the same name fails at
once, naming the running one, instead of sharing its files.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import shutil
import socket
import time
from datetime import datetime, timezone
from pathlib import Path

from fedmetanas.config import OutputConfig

LOG_NAME = "trajectory.h5"
MARKER = ".fedmetanas-run"  # written when a run creates its directory: --overwrite clears only these
LOCK = ".lock"  # flock-ed by the main rank while the run lives; its text names the holder
LOCK_WAIT_S = 2.0  # how long a start retries a held lock (another start may be probing it right now)


class RunDirError(ValueError):
    """The output directory cannot be used as asked; the message names the fix."""


def run_dir(cfg: OutputConfig) -> Path:
    return Path(cfg.dir) / cfg.name


def _os_error(path: Path, err: OSError) -> RunDirError:
    if err.errno == errno.ENAMETOOLONG:
        return RunDirError(f"output.name: the run directory path ({len(str(path))} characters) is longer than the "
                           "file system allows; choose a shorter output.name or output.dir")
    return RunDirError(f"output.dir: {str(path)!r} cannot be used ({err.strerror}); choose a writable output.dir")


# A write that failed for want of room: a full disk, a quota, a file size limit (`ulimit -f`; Python ignores
# SIGXFSZ, so the write fails with EFBIG instead of killing the process).
_FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


class OutOfSpaceError(RunDirError):
    """A write into the run directory failed for want of room; the message names the file and the fix."""


def out_of_space(err: BaseException, path: Path) -> OutOfSpaceError | None:
    """The one-line error for a write into run directory `path` that failed for want of room (None when
    `err` is something else). HDF5 reports it as a RuntimeError whose text holds the errno."""
    code = getattr(err, "errno", None)
    if code not in _FULL:
        code = next((c for c in _FULL if f"errno = {c}," in str(err)), None)
    if code is None:
        return None
    name = getattr(err, "filename", None)
    if name is None:  # HDF5 names the file inside its message
        found = re.search(r"filename = '([^']+)'", str(err))
        name = found.group(1) if found else None
    what = f"writing {name}" if name else f"writing into {path}"
    return OutOfSpaceError(f"output.dir: {what} failed ({os.strerror(code)}: the disk is full, a quota or a file size "
                       "limit (ulimit -f) is reached); the last checkpoint written is kept: free space, then "
                       "continue with --resume")


def running_holder(path: Path) -> str | None:
    """Who holds the run directory's lock ("pid N on HOST since T"), or None when no run holds it.

    Probes with a shared lock released at once (writes nothing); `acquire_run_dir` retries for
    LOCK_WAIT_S, so a probe never makes a real start fail.
    """
    try:
        fd = os.open(path / LOCK, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError:
        return None  # unreadable lock file: whoever writes next reports it
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "another process"
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def is_run_dir(path: Path) -> bool:
    """True when a run created `path` (it holds the marker)."""
    return (path / MARKER).is_file()


def _has_content(path: Path) -> bool:
    return path.is_dir() and any(p.name != LOCK for p in path.iterdir())


def check_run_dir(cfg: OutputConfig) -> Path:
    """Validate (without writing) that the run directory may be used; every rank may call it."""
    path = run_dir(cfg)
    try:
        holder = running_holder(path)
        if holder is not None:
            raise RunDirError(f"output.name: run directory {str(path)!r} is in use by a running run ({holder}); "
                              "wait for it to end or choose another output.name")
        if (path / LOG_NAME).exists() and not (cfg.overwrite or cfg.resume):
            raise RunDirError(
                f"output: run directory {str(path)!r} already holds a run; choose another output.name, "
                "--resume to continue it, or --overwrite (output.overwrite: true) to replace it")
        _check_usable(path, cfg)
        parent = path if path.exists() else next((p for p in path.parents if p.exists()), Path("."))
    except OSError as err:
        raise _os_error(path, err) from None
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise RunDirError(f"output.dir: {str(parent)!r} is not a writable directory; choose a writable output.dir")
    return path


def _check_usable(path: Path, cfg: OutputConfig) -> None:
    """A run writes only into a new or empty directory or a run's own (marked) one: a folder of the user's
    that happens to carry the name is never written into (its config.yaml, genotype.txt replaced)."""
    if cfg.overwrite and not cfg.resume:
        _check_overwritable(path)
    elif _has_content(path) and not is_run_dir(path):
        raise RunDirError(
            f"output.name: {str(path)!r} holds files but is not a fedmetanas run directory (no {MARKER} marker), "
            "so a run will not write into it; choose another output.name, or move its files away")


def _check_overwritable(path: Path) -> None:
    if path.exists() and not path.is_dir():
        raise RunDirError(f"output.name: {str(path)!r} is a file, not a run directory; --overwrite replaces only "
                          "run directories; choose another output.name")
    if _has_content(path) and not is_run_dir(path):
        raise RunDirError(
            f"output.overwrite: {str(path)!r} is not a fedmetanas run directory (no {MARKER} marker), so "
            "--overwrite will not delete it; choose another output.name, or remove it yourself")


class RunLock:
    """The main rank's exclusive hold on a run directory, from before its first file to `release()`."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Let another run use the directory (closing the file drops the flock; the file stays)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _lock(path: Path) -> RunLock:
    """Create the directory and take its lock, retrying for LOCK_WAIT_S; the lock file names the holder."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd = os.open(path / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as err:
        raise _os_error(path, err) from None
    deadline = time.monotonic() + LOCK_WAIT_S
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() > deadline:
                holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "another process"
                os.close(fd)
                raise RunDirError(f"output.name: run directory {str(path)!r} is in use by a running run "
                                  f"({holder}); wait for it to end or choose another output.name") from None
            time.sleep(0.05)
    since = datetime.now(timezone.utc).isoformat(timespec="seconds")
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {since}\n".encode(), 0)
    return RunLock(path, fd)


def _take_over(lock: RunLock, cfg: OutputConfig) -> None:
    """With the lock held: clear an old run when overwriting (only a marked one), then mark the directory."""
    path = lock.path
    try:
        _check_usable(path, cfg)  # again: the directory may have changed before the lock was ours
        if cfg.overwrite and not cfg.resume:
            for entry in path.iterdir():
                if entry.name == LOCK:
                    continue
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
        (path / MARKER).write_text("a fedmetanas run directory: --overwrite may replace it\n")
    except OSError as err:
        raise _os_error(path, err) from None


def acquire_run_dir(cfg: OutputConfig) -> RunLock:
    """Main rank only: lock the run directory (created if needed), then clear an old run when overwriting,
    and mark it as a run's. Hold the returned lock until the run ends (`release()`, or a `with` block).

    Raises:
        RunDirError: another run holds the directory, it is not a run's and would be overwritten, or the
            path cannot be used; the message names the fix.
    """
    check_run_dir(cfg)
    lock = _lock(run_dir(cfg))
    try:
        _take_over(lock, cfg)
    except BaseException:
        lock.release()
        raise
    return lock
