"""Make real datasets available offline: Fashion-MNIST from Debian's package, MNIST from a folder of .gz files.

Usage: python -m fedmetanas.data.fetch --root data [--mnist-from DIR] [--no-fashion]

torchvision's readers need the IDX files uncompressed under ROOT/<Class>/raw, so this gunzips them
there (each file written to a temporary name, then renamed, so an interrupted run leaves no partial
file) and then loads them once with `load_dataset` to prove they work.
"""

from __future__ import annotations

import argparse
import glob
import gzip
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zlib
from collections.abc import Sequence
from pathlib import Path

from fedmetanas.data.datasets import load_dataset
from fedmetanas.data.errors import DataError

log = logging.getLogger(__name__)

IDX_FILES: tuple[str, ...] = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                              "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
DEBIAN_PACKAGE = "dataset-fashion-mnist"
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")


class FetchError(RuntimeError):
    """A fetch step failed; the message says what to do instead."""


def _run(cmd: Sequence[str], cwd: str | Path | None = None) -> bool:
    """Run a command quietly; True when it succeeded (its output goes to the debug log)."""
    log.info("running: %s", " ".join(cmd))
    try:
        proc = subprocess.run(list(cmd), cwd=cwd, capture_output=True, text=True, check=False)
    except OSError as exc:
        log.debug("%s failed to start: %s", cmd[0], exc)
        return False
    log.debug("%s exited %d\n%s%s", cmd[0], proc.returncode, proc.stdout, proc.stderr)
    return proc.returncode == 0


def _is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def _has_all(folder: Path, suffix: str = "") -> bool:
    return all((folder / (name + suffix)).is_file() for name in IDX_FILES)


def install_idx_files(src_dir: Path, raw_dir: Path) -> None:
    """Gunzip (or copy, if already uncompressed) the four IDX files from src_dir into raw_dir atomically."""
    raw_dir.mkdir(parents=True, exist_ok=True)
    for name in IDX_FILES:
        gz, plain = src_dir / (name + ".gz"), src_dir / name
        if gz.is_file():
            src, opener = gz, gzip.open
        elif plain.is_file():
            src, opener = plain, open
        else:
            raise FetchError(f"{gz} not found; put the four *-ubyte.gz files of the dataset in {src_dir}")
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=raw_dir)
        try:
            with os.fdopen(fd, "wb") as out, opener(src, "rb") as inp:
                shutil.copyfileobj(inp, out, length=1 << 20)
            os.replace(tmp, raw_dir / name)
        except (OSError, EOFError, zlib.error) as exc:
            raise FetchError(f"{src} could not be decompressed ({exc}); replace it with an intact copy") from None
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        log.info("wrote %s", raw_dir / name)


def _debian_source(root: Path, system_dir: Path) -> Path:
    """A folder holding the Fashion-MNIST .gz files, installing or unpacking the Debian package if needed."""
    if _has_all(system_dir, ".gz"):
        return system_dir
    if shutil.which("apt-get") is None:
        raise FetchError(f"{system_dir} is missing and apt-get is not available; copy the four Fashion-MNIST "
                         f"*-ubyte.gz files into {root / 'FashionMNIST' / 'raw'} and gunzip them, "
                         "or set data.download: true")
    if _is_root():
        ok = _run(["apt-get", "install", "-y", DEBIAN_PACKAGE])
        if not ok:  # the package lists may be stale or absent (fresh containers)
            ok = _run(["apt-get", "update"]) and _run(["apt-get", "install", "-y", DEBIAN_PACKAGE])
        if ok and _has_all(system_dir, ".gz"):
            return system_dir
        raise FetchError(f"`apt-get install -y {DEBIAN_PACKAGE}` failed; install it by hand or set data.download: true")
    unpack = root / "_deb"
    unpacked = unpack / system_dir.relative_to(system_dir.anchor)
    if _has_all(unpacked, ".gz"):
        return unpacked
    with tempfile.TemporaryDirectory() as tmp:
        if not _run(["apt-get", "download", DEBIAN_PACKAGE], cwd=tmp):
            raise FetchError(f"`apt-get download {DEBIAN_PACKAGE}` failed; run `sudo apt-get install "
                             f"{DEBIAN_PACKAGE}` or set data.download: true")
        debs = sorted(glob.glob(os.path.join(tmp, "*.deb")))
        if not debs or not _run(["dpkg", "-x", debs[0], str(unpack)]):
            raise FetchError(f"unpacking {DEBIAN_PACKAGE} with `dpkg -x` into {unpack} failed; run "
                             f"`sudo apt-get install {DEBIAN_PACKAGE}` or set data.download: true")
    if not _has_all(unpacked, ".gz"):
        raise FetchError(f"{DEBIAN_PACKAGE} did not contain the expected files under {unpacked}; "
                         f"run `sudo apt-get install {DEBIAN_PACKAGE}` or set data.download: true")
    return unpacked


def fetch_fashion_mnist(root: str | Path, system_dir: Path = DEBIAN_DIR) -> Path:
    """Ensure ROOT/FashionMNIST/raw holds the four uncompressed IDX files; return that folder."""
    root = Path(root)
    raw = root / "FashionMNIST" / "raw"
    if _has_all(raw):
        log.info("Fashion-MNIST already present under %s", raw)
        return raw
    install_idx_files(_debian_source(root, Path(system_dir)), raw)
    return raw


def fetch_mnist_from(src_dir: str | Path, root: str | Path) -> Path:
    """Copy + gunzip MNIST's four IDX files from src_dir into ROOT/MNIST/raw; return that folder."""
    src, raw = Path(src_dir), Path(root) / "MNIST" / "raw"
    if not src.is_dir():
        raise FetchError(f"--mnist-from: folder {src} not found; "
                         "pass the folder holding train-images-idx3-ubyte.gz etc.")
    if _has_all(raw):
        log.info("MNIST already present under %s", raw)
        return raw
    install_idx_files(src, raw)
    return raw


def check_root(root: str | Path) -> None:
    """--root must be a folder, or a path where one can be made: caught before anything is fetched."""
    path = Path(root)
    existing = path if path.exists() else next((p for p in path.parents if p.exists()), Path("."))
    if not existing.is_dir():
        raise FetchError(f"--root: {str(existing)!r} is a file, not a folder; pass the folder to fill "
                         "(data.root), e.g. data")


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the process exit code (0 ok, 2 failure with one `error:` line on stderr)."""
    parser = argparse.ArgumentParser(prog="python -m fedmetanas.data.fetch", description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="data", help="data.root to fill (default: data)")
    parser.add_argument("--mnist-from", metavar="DIR", help="also install MNIST from DIR/*-ubyte.gz")
    parser.add_argument("--no-fashion", action="store_true", help="skip Fashion-MNIST")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    jobs: list[tuple[str, Path]] = []
    try:
        check_root(args.root)
        if not args.no_fashion:
            jobs.append(("fashion_mnist", fetch_fashion_mnist(args.root)))
        if args.mnist_from:
            jobs.append(("mnist", fetch_mnist_from(args.mnist_from, args.root)))
        if not jobs:
            raise FetchError("nothing to do: --no-fashion was given without --mnist-from DIR; drop one of them")
        for name, raw in jobs:
            train, test = load_dataset(name, str(args.root), download=False)
            print(f"{name}: {len(train)} train + {len(test)} test images ready under {raw}")
    except (FetchError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a root that cannot be made or written (/proc, read-only, a full disk)
        where = exc.filename or args.root
        print(f"error: --root: cannot write {str(where)!r} ({exc.strerror or exc}); pass a writable folder "
              "(data.root), e.g. data", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
