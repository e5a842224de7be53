"""The run's trajectory log: one HDF5 file, written by rank 0, readable while the run goes on.

Static facts (resolved config, partition) are attributes and datasets written at creation; every
round appends one row to each dataset under /rounds (created on the first append, then the file
switches to SWMR mode and is flushed after every round, so another process can read it with
`h5py.File(path, "r", swmr=True)`). The layout is documented in docs/hdf5.md.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Mapping

import h5py
import numpy as np

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
_STR = h5py.string_dtype(encoding="utf-8")


def _as_array(value: Any) -> np.ndarray:
    if isinstance(value, str):
        return np.array(value, dtype=object)
    arr = np.asarray(value)
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8)
    return arr


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
            self._file.create_dataset(name, data=arr, dtype=_STR if arr.dtype == object else arr.dtype)
        self._rows: dict[str, int] = {}
        self._names: dict[str, tuple[str, ...]] = {}
        self._file.flush()

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
              datasets: Mapping[str, Any] | None = None) -> None:
        """Close the file; `final` (name -> scalar or string) is stored as attributes of /final and
        `datasets` (path -> array, e.g. "personalization/acc_after") as datasets."""
        if self._file is None:
            return
        self._file.close()
        self._file = None  # type: ignore[assignment]
        if final or datasets:
            # SWMR forbids new objects, so the summary is added after reopening normally.
            with h5py.File(self.path, "a") as f:
                group = f.require_group("final")
                for key, value in (final or {}).items():
                    group.attrs[key] = value
                for name, value in (datasets or {}).items():
                    arr = _as_array(value)
                    f.create_dataset(name, data=arr, dtype=_STR if arr.dtype == object else arr.dtype)


class NullLog:
    """What the non-main ranks hold instead of a log: accepts everything, writes nothing."""

    rounds_written = 0

    def rename(self, path: str | Path) -> None:  # noqa: D102
        pass

    def append(self, record: Mapping[str, Any], group: str = "rounds") -> None:  # noqa: D102
        pass

    def close(self, final: Mapping[str, Any] | None = None,  # noqa: D102
              datasets: Mapping[str, Any] | None = None) -> None:
        pass


def read_rounds(path: str | Path, group: str = "rounds") -> dict[str, np.ndarray]:
    """All per-round datasets of a table (/rounds, or FedNAS's /retrain) of a (possibly still running)
    log, as arrays."""
    with h5py.File(path, "r", swmr=True) as f:
        if group not in f:
            return {}
        return {name: ds[()] for name, ds in f[group].items()}


def logged_rounds(path: str | Path) -> int | None:
    """Rounds a log holds: 0 if there is no file (or no round yet), None if it cannot be read."""
    if not Path(path).exists():
        return 0
    try:
        with h5py.File(path, "r", swmr=True) as f:
            return int(f["rounds/round"].shape[0]) if "rounds/round" in f else 0
    except (OSError, KeyError, ValueError):
        return None
