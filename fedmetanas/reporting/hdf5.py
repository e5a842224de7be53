"""The run's trajectory log: one HDF5 file, written by rank 0, readable while the run goes on.

Static facts (resolved config, partition) are attributes and datasets written at creation; every
round appends one row to each dataset under /rounds (created on the first append, then the file
switches to SWMR mode and is flushed after every round, so another process can read it with
`h5py.File(path, "r", swmr=True)`). The layout is documented in docs/hdf5.md.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import sys
import threading
import time
import weakref
from pathlib import Path
from typing import Any, Callable, Mapping, TypeVar

import h5py
import numpy as np

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: per-round client columns per participant (/rounds/clients); 1: one entry per client
_STR = h5py.string_dtype(encoding="utf-8")


def _as_array(value: Any) -> np.ndarray:
    if isinstance(value, str):
        return np.array(value, dtype=object)
    arr = np.asarray(value)
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8)
    return arr


def _written_once(arr: np.ndarray) -> dict[str, Any]:
    """Storage options of a dataset written whole (static facts, personalization): gzip for large numeric
    arrays. Those are the per-client arrays, written once but O(clients): at 10,000 clients they were ~1.3 MB
    of small integer counts and NaN (clients not personalized), most of the log; compressed, ~20x smaller.
    Small arrays and text stay plain; h5py and h5dump read both alike."""
    if arr.dtype == object or arr.nbytes < 2**16:
        return {}
    return {"compression": "gzip", "compression_opts": 4, "shuffle": True}


_OPEN: weakref.WeakSet[TrajectoryLog] = weakref.WeakSet()  # logs not closed yet, for close_open_logs
_EXIT_HOOK = False  # close_open_logs registered with atexit (on the first log, not at import)


_FULL_DISK = ("errno = 27,", "errno = 28,", "errno = 122,")  # EFBIG, ENOSPC, EDQUOT as HDF5 words them


def _failed_write_dealloc(error: object) -> bool:
    """Whether `error` is h5py failing to free an object of a file whose writes failed for want of room
    (HDF5 tries to flush each one again; h5py prints each failure, traceback and "Exception ignored")."""
    text = str(error)
    return "decrement id ref count" in text and any(code in text for code in _FULL_DISK)


def _quiet_failed_write_deallocs() -> None:
    """Drop those messages (the run reports the full disk once, in one line: fedmetanas.rundir.out_of_space);
    every other error goes to the hooks that were there before."""
    unraisable, excepthook = sys.unraisablehook, sys.excepthook

    def on_unraisable(info: Any) -> None:
        if not _failed_write_dealloc(getattr(info, "exc_value", "")):
            unraisable(info)

    def on_exception(kind: Any, value: BaseException, tb: Any) -> None:
        if not _failed_write_dealloc(value):
            excepthook(kind, value, tb)

    sys.unraisablehook, sys.excepthook = on_unraisable, on_exception


def close_open_logs() -> None:
    """Close every log this process still has open, so none is left in SWMR-write state.

    A file closed while SWMR writing is on is marked consistent again; one left open when the process
    dies keeps its "open for writing" flag, and a plain `h5py.File(path, "r")` then refuses it. Called
    at interpreter exit, and by the CLI before it leaves with os._exit (which skips exit handlers).
    """
    for log_ in list(_OPEN):
        try:
            log_.close()
        except Exception as err:  # noqa: BLE001 - closing the others matters more than this one's error
            log.warning("could not close %s: %s", log_.path, err)


class TrajectoryLog:
    """Append-only per-round log in HDF5 (use only on the main rank)."""

    def __init__(self, path: str | Path, attrs: Mapping[str, Any], static: Mapping[str, Any]) -> None:
        """Create the file with its attributes and static datasets (e.g. partition counts).

        Args:
            path: file to create; must not exist.
            attrs: root attributes (strings, numbers; dicts are stored as JSON text).
            static: dataset path -> array, written once (e.g. "partition/class_counts").
        """
        self.path = Path(path)
        self._file = h5py.File(self.path, "w-", libver="latest")
        self._file.attrs["format_version"] = FORMAT_VERSION
        for key, value in attrs.items():
            self._file.attrs[key] = json.dumps(value) if isinstance(value, (dict, list, tuple)) else value
        for name, value in static.items():
            arr = _as_array(value)
            self._file.create_dataset(name, data=arr, dtype=_STR if arr.dtype == object else arr.dtype,
                                      **_written_once(arr))
        self._rows: dict[str, int] = {}
        self._names: dict[str, tuple[str, ...]] = {}
        self._file.flush()
        global _EXIT_HOOK
        if not _EXIT_HOOK:
            _EXIT_HOOK = True
            atexit.register(close_open_logs)
            _quiet_failed_write_deallocs()
        _OPEN.add(self)

    @property
    def rounds_written(self) -> int:
        return self._rows.get("rounds", 0)

    def _create(self, group_name: str, record: Mapping[str, Any]) -> None:
        if self._file.swmr_mode:
            # SWMR forbids new objects: a second table (FedNAS's /retrain) is added after reopening.
            self._file.close()
            self._file = h5py.File(self.path, "a", libver="latest")
        group = self._file.require_group(group_name)
        for name, value in record.items():
            arr = _as_array(value)
            dtype = _STR if arr.dtype == object else arr.dtype
            group.create_dataset(name, shape=(0, *arr.shape), maxshape=(None, *arr.shape), dtype=dtype,
                                 chunks=(max(1, min(64, 2**20 // max(arr.nbytes, 1))), *arr.shape) if arr.shape else (64,))
        self._names[group_name] = tuple(record)
        self._rows[group_name] = 0
        # From here on only existing datasets grow, which SWMR allows; readers see every flush.
        self._file.swmr_mode = True

    def append(self, record: Mapping[str, Any], group: str = "rounds") -> None:
        """Append one row to table `group` (/rounds by default): every key must be the same (and same
        shape) as in the table's first row."""
        if group not in self._names:
            self._create(group, record)
        names = self._names[group]
        if set(record) != set(names):
            missing = set(names) ^ set(record)
            raise KeyError(f"round record keys changed: {sorted(missing)}")
        table, row = self._file[group], self._rows[group]
        for name in names:
            ds = table[name]
            ds.resize(row + 1, axis=0)
            ds[row] = _as_array(record[name])
        self._rows[group] = row + 1
        self._file.flush()

    def rename(self, path: str | Path) -> None:
        """Move the open file (e.g. a log rebuilt under a temporary name onto the real one)."""
        os.replace(self.path, path)
        self.path = Path(path)

    def close(self, final: Mapping[str, Any] | None = None,
              datasets: Mapping[str, Any] | None = None, attrs: Mapping[str, Any] | None = None) -> None:
        """Close the file; `final` (name -> scalar or string) is stored as attributes of /final,
        `datasets` (path -> array, e.g. "personalization/acc_after") as datasets, and `attrs` replace
        root attributes."""
        if self._file is None:
            return
        _OPEN.discard(self)
        file, self._file = self._file, None  # type: ignore[assignment]
        file.close()  # if this fails (a full disk), the file is not closed again at exit
        if final or datasets or attrs:
            # SWMR forbids new objects, so the summary is added after reopening normally.
            with h5py.File(self.path, "a") as f:
                for key, value in (attrs or {}).items():
                    f.attrs[key] = value
                group = f.require_group("final")
                for key, value in (final or {}).items():
                    group.attrs[key] = value
                for name, value in (datasets or {}).items():
                    arr = _as_array(value)
                    f.create_dataset(name, data=arr, dtype=_STR if arr.dtype == object else arr.dtype,
                                     **_written_once(arr))


class NullLog:
    """What the non-main ranks hold instead of a log: accepts everything, writes nothing."""

    rounds_written = 0

    def rename(self, path: str | Path) -> None:  # noqa: D102
        pass

    def append(self, record: Mapping[str, Any], group: str = "rounds") -> None:  # noqa: D102
        pass

    def close(self, final: Mapping[str, Any] | None = None,  # noqa: D102
              datasets: Mapping[str, Any] | None = None, attrs: Mapping[str, Any] | None = None) -> None:
        pass


READ_TIMEOUT_S = 60.0  # longest wait for an SWMR read (a live run's log); a torn file would stall it forever
T = TypeVar("T")


class TornLogError(OSError):
    """The log is cut short (truncated) or could not be read in time; the message says which."""


class UnstartedLogError(OSError):
    """The log is flagged as being written but was never switched to SWMR, which happens with its first
    table: its writer was killed before it logged a round (so it holds none)."""


def _stored_eof(path: Path) -> int | None:
    """The file size an HDF5 superblock (version 2 or 3, at offset 0) records, or None if not that layout."""
    with open(path, "rb") as fh:
        head = fh.read(48)
    if len(head) < 48 or head[:8] != b"\x89HDF\r\n\x1a\n" or head[8] not in (2, 3) or head[9] != 8:
        return None
    return int.from_bytes(head[28:36], "little")  # after base and extension addresses (8 bytes each)


def read_log(path: str | Path, read: Callable[[h5py.File], T], timeout_s: float = READ_TIMEOUT_S) -> T:
    """`read(file)` on the log opened for reading, never hanging on a torn file.

    A closed log is opened plainly, so HDF5 itself checks that the file is whole: a truncated one fails
    at once. A log still flagged as being written (a running run, or one killed before it closed the
    file) can only be read in SWMR mode, where HDF5 retries metadata it cannot verify, on a torn file
    forever: that read runs in a helper thread and is given up after `timeout_s`.

    Raises:
        TornLogError: the file is cut short, or the SWMR read did not finish within `timeout_s`.
        BlockingIOError: a writer holds the file and has not switched to SWMR yet (no round written).
        OSError: not a readable HDF5 file.
    """
    path = Path(path)
    try:
        f = h5py.File(path, "r")
    except BlockingIOError:
        raise
    except OSError as err:
        if "truncated file" in str(err):
            stored = _stored_eof(path)
            whole = f" of the {stored} its header records" if stored else ""
            raise TornLogError(f"truncated: {path.stat().st_size} bytes{whole}") from None
        if "already open" not in str(err):  # "file is already open for write": flagged as being written
            raise
    else:
        with f:
            return read(f)
    stored, size = _stored_eof(path), path.stat().st_size
    if stored is not None and stored > size:
        time.sleep(0.5)  # a live writer may be between growing the file and writing its header: look again
        stored, size = _stored_eof(path), path.stat().st_size
        if stored is not None and stored > size:
            raise TornLogError(f"truncated: {size} bytes of the {stored} its header records (cut short while "
                               "it was being written)")
    outcome: dict[str, Any] = {}

    def work() -> None:
        try:
            with h5py.File(path, "r", swmr=True) as live:
                outcome["value"] = read(live)
        except BaseException as err:  # noqa: BLE001 - handed to the caller's thread
            outcome["error"] = err

    worker = threading.Thread(target=work, name=f"swmr-read {path.name}", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        raise TornLogError(f"not readable within {timeout_s:g} s: the file is flagged as being written and "
                           "HDF5's SWMR read is stuck, so it is torn (cut short, or its writer died mid-write)")
    if "error" in outcome:
        if "not already open for SWMR writing" in str(outcome["error"]):
            raise UnstartedLogError("its run was killed before it logged a round (the file is still flagged as "
                                    "being written, and holds no round)") from None
        raise outcome["error"]
    return outcome["value"]


def read_rounds(path: str | Path, group: str = "rounds") -> dict[str, np.ndarray]:
    """All per-round datasets of a table (/rounds, or FedNAS's /retrain) of a (possibly still running)
    log, as arrays."""

    def read(f: h5py.File) -> dict[str, np.ndarray]:
        if group not in f:
            return {}
        return {name: ds[()] for name, ds in f[group].items()}

    return read_log(path, read)


def logged_rounds(path: str | Path, timeout_s: float = READ_TIMEOUT_S) -> int | None:
    """Rounds a log holds: 0 if there is no file (or no round yet), None if it cannot be read (torn)."""
    if not Path(path).exists():
        return 0
    try:
        return read_log(path, lambda f: int(f["rounds/round"].shape[0]) if "rounds/round" in f else 0, timeout_s)
    except UnstartedLogError:
        return 0
    except (OSError, KeyError, ValueError, RuntimeError):
        return None
