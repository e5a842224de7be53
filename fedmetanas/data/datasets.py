"""Datasets held as whole uint8 tensors so every rank can keep them on its device and batch by index.

torchvision reads the files (`.data` / `.targets`, no per-sample transforms, no DataLoader); this
module turns them into a `TensorSplit` and turns every way a user can get the files wrong into one
`DataError` line that names `data.root` / `data.name` / the file and the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from fedmetanas.data.errors import DataError
from fedmetanas.runtime import to_device

log = logging.getLogger(__name__)

DATASET_NAMES: tuple[str, ...] = ("fashion_mnist", "mnist", "cifar10", "cifar100", "digits")

# Published per-channel statistics on the 0..1 scale (digits has none: computed from its train split).
_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "mnist": ((0.1307,), (0.3081,)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
_NUM_CLASSES = {"mnist": 10, "fashion_mnist": 10, "cifar10": 10, "cifar100": 100, "digits": 10}
_PRETTY = {"mnist": "MNIST", "fashion_mnist": "Fashion-MNIST", "cifar10": "CIFAR-10",
           "cifar100": "CIFAR-100", "digits": "digits"}
_IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
              "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
_IDX_MAGIC = {3: 2051, 1: 2049}  # ndim -> magic number of uint8 IDX image / label files
_CROP_PAD = 4


@dataclass
class TensorSplit:
    """One split (train or test) as uint8 images plus labels and the normalisation it needs."""

    images: torch.Tensor  # uint8, N x C x H x W: 4x smaller than float so the whole set fits per rank
    labels: torch.Tensor  # int64, N
    mean: tuple[float, ...]  # per channel, 0..1 scale
    std: tuple[float, ...]
    num_classes: int
    # mean and std as 1 x C x 1 x 1 float32 tensors on the images' device, made once (not per batch)
    _mean: torch.Tensor = field(init=False, repr=False, compare=False)
    _std: torch.Tensor = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        """Catch shape/dtype mistakes where the split is built, not deep inside a training step."""
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(f"images must be uint8 N x C x H x W, got {self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.dtype != torch.int64 or self.labels.shape != (self.images.shape[0],):
            raise ValueError(f"labels must be int64 of shape ({self.images.shape[0]},), got "
                             f"{self.labels.dtype} {tuple(self.labels.shape)}")
        if len(self.mean) != self.images.shape[1] or len(self.std) != self.images.shape[1]:
            raise ValueError(f"mean/std need one value per channel ({self.images.shape[1]})")
        device = self.images.device
        self._mean = torch.tensor(self.mean, dtype=torch.float32).view(1, -1, 1, 1).to(device)
        self._std = torch.tensor(self.std, dtype=torch.float32).view(1, -1, 1, 1).to(device)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def in_channels(self) -> int:
        """Number of image channels (1 for the MNISTs and digits, 3 for CIFAR)."""
        return int(self.images.shape[1])

    @property
    def image_size(self) -> int:
        """Side length in pixels; every supported dataset has square images."""
        return int(self.images.shape[2])

    def to(self, device: torch.device | str) -> TensorSplit:
        """A copy of this split with images and labels on `device` (still uint8)."""
        return dataclasses.replace(self, images=self.images.to(device), labels=self.labels.to(device))

    def batch(self, idx: torch.Tensor, augment: bool = False,
              generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Gather rows `idx` as normalised float images (optionally flip + crop augmented) and labels.

        Args:
            idx: int64 row indices (any device; moved to the split's device without a host sync).
            augment: random horizontal flip and 4-pixel zero-padded random crop; only applied to RGB
                data, since flipping digits or letters changes what they are.
            generator: the only source of randomness for augmentation (required when augmenting).

        Returns:
            (x, y): float32 N x C x H x W normalised with mean/std, and int64 labels, on the split's device.
        """
        idx = to_device(idx.to(torch.long), self.images.device)
        x = self.images.index_select(0, idx).float().div_(255.0)
        if augment and self.in_channels == 3:
            if generator is None:
                raise ValueError("batch(augment=True) needs an explicit torch.Generator")
            x = _flip_and_crop(x, generator)
        x = (x - self._mean) / self._std
        return x, self.labels.index_select(0, idx)


def _flip_and_crop(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random horizontal flip + random crop from a zero-padded copy, as one vectorised gather."""
    n, _, h, w = x.shape
    pad = _CROP_PAD
    # Draw on the generator's device (CPU) so results do not depend on where the data lives; send the
    # three draws to the data's device in one non-blocking copy.
    flip = torch.rand(n, generator=generator, device=generator.device) < 0.5
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=generator.device)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=generator.device)
    flip, dy, dx = to_device(torch.stack([flip.to(dy.dtype), dy, dx]), x.device)
    flip = flip.bool()
    # Zero padding in pixel space (before normalisation), like torchvision's RandomCrop(padding=4).
    padded = F.pad(x, (pad, pad, pad, pad)).permute(0, 2, 3, 1)  # N x H' x W' x C
    ar_h = torch.arange(h, device=x.device)
    ar_w = torch.arange(w, device=x.device)
    rows = dy[:, None] + ar_h[None, :]  # N x H
    cols_fwd = ar_w[None, :].expand(n, w)
    cols = dx[:, None] + torch.where(flip[:, None], w - 1 - cols_fwd, cols_fwd)  # N x W
    batch = torch.arange(n, device=x.device)[:, None, None]
    out = padded[batch, rows[:, :, None], cols[:, None, :]]  # N x H x W x C
    return out.permute(0, 3, 1, 2).contiguous()


# ---------------------------------------------------------------------------------------------
# Loading


def load_dataset(name: str, root: str, download: bool) -> tuple[TensorSplit, TensorSplit]:
    """Load dataset `name` from `root` (downloading only if asked) as (train, test) CPU splits.

    Args:
        name: one of DATASET_NAMES (config field `data.name`).
        root: folder holding the torchvision layout (`data.root`), e.g. root/FashionMNIST/raw.
        download: let torchvision fetch missing files (`data.download`); off by default for offline runs.

    Returns:
        (train, test) TensorSplits on the CPU.
    """
    if name not in DATASET_NAMES:
        hint = difflib.get_close_matches(str(name), DATASET_NAMES, n=1)
        extra = f"did you mean {hint[0]!r}? " if hint else ""
        raise DataError(f"data.name: unknown dataset {name!r}; {extra}valid names are {', '.join(DATASET_NAMES)}")
    train, test = _LOADERS[name](name, str(root), bool(download))
    log.info("loaded %s: %d train / %d test images of %dx%dx%d, %d classes", name, len(train), len(test),
             train.in_channels, train.image_size, train.image_size, train.num_classes)
    return train, test


def _make_split(name: str, images: torch.Tensor, labels: torch.Tensor, where: str) -> TensorSplit:
    """Wrap raw tensors, rejecting labels outside the dataset's classes (a sign of a wrong file)."""
    num_classes = _NUM_CLASSES[name]
    labels = labels.to(torch.int64)
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise DataError(f"{where}: labels outside 0..{num_classes - 1}; these are not {_PRETTY[name]} files, "
                        "replace them with the right ones")
    mean, std = _STATS[name]
    return TensorSplit(images.contiguous(), labels.contiguous(), mean, std, num_classes)


def _torchvision_class(name: str) -> Any:
    """The torchvision dataset class for `name` (imported lazily: importing this module stays cheap)."""
    from torchvision import datasets as tvd  # noqa: PLC0415

    return {"mnist": tvd.MNIST, "fashion_mnist": tvd.FashionMNIST,
            "cifar10": tvd.CIFAR10, "cifar100": tvd.CIFAR100}[name]


def _download_failed(name: str, root: str, folder: str, exc: BaseException) -> DataError:
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return DataError(f"data.download: fetching {_PRETTY[name]} into {root} failed ({reason}); check network "
                     f"access, or place the files under {folder} yourself and set data.download: false")


def _check_idx_file(path: str, ndim: int) -> int:
    """Validate an uncompressed IDX file's magic number and size; return its item count."""
    size = os.path.getsize(path)
    header = 4 * (1 + ndim)
    with open(path, "rb") as f:
        head = f.read(header)
    if len(head) < header:
        raise DataError(f"{path}: truncated or corrupt ({size} bytes, shorter than its header); "
                        "delete it and fetch it again")
    magic = int.from_bytes(head[:4], "big")
    dims = [int.from_bytes(head[4 * (i + 1): 4 * (i + 2)], "big") for i in range(ndim)]
    if magic != _IDX_MAGIC[ndim]:
        gz = " (it looks gzip-compressed: gunzip it)" if head[:2] == b"\x1f\x8b" else ""
        raise DataError(f"{path}: not an uncompressed IDX file (bad magic number){gz}; "
                        "replace it with the original file")
    expected = header + int(np.prod(dims))
    if size != expected:
        raise DataError(f"{path}: truncated or corrupt ({size} bytes, header says {expected}); "
                        "delete it and fetch it again")
    return dims[0]


def _load_idx(name: str, root: str, download: bool) -> tuple[TensorSplit, TensorSplit]:
    """MNIST / Fashion-MNIST from uncompressed IDX files under root/<Class>/raw."""
    cls = _torchvision_class(name)
    raw = os.path.join(root, cls.__name__, "raw")
    if download:
        try:
            cls(root=root, train=True, download=True)  # fetches all four files
        except (RuntimeError, OSError) as exc:
            raise _download_failed(name, root, raw, exc) from None
    missing = [f for f in _IDX_FILES if not os.path.isfile(os.path.join(raw, f))]
    legacy = all(os.path.isfile(os.path.join(root, cls.__name__, "processed", f))
                 for f in ("training.pt", "test.pt"))
    if missing and not legacy:
        gz = [f for f in missing if os.path.isfile(os.path.join(raw, f + ".gz"))]
        hint = f"gunzip the .gz copies of {', '.join(gz)} there, or " if gz else ""
        fetch = ("run `make data` for the offline copy" if name == "fashion_mnist" else
                 f"run `python -m fedmetanas.data.fetch --root {root} --no-fashion --mnist-from DIR` "
                 "on a folder of the .gz files")
        which = "" if len(missing) == len(_IDX_FILES) else f", missing {', '.join(missing)}"
        raise DataError(f"data.root: {_PRETTY[name]} not found under {raw} (uncompressed IDX files expected"
                        f"{which}); {hint}{fetch}, or set data.download: true")
    if not missing:
        counts = {f: _check_idx_file(os.path.join(raw, f), 3 if "images" in f else 1) for f in _IDX_FILES}
        for split in ("train", "t10k"):
            n_img, n_lab = counts[f"{split}-images-idx3-ubyte"], counts[f"{split}-labels-idx1-ubyte"]
            if n_img != n_lab:
                raise DataError(f"{raw}: {split}-images has {n_img} images but {split}-labels has {n_lab} labels; "
                                "replace both files with a matching pair")
    splits = []
    for train in (True, False):
        try:
            ds = cls(root=root, train=train, download=False)
        except (RuntimeError, AssertionError, ValueError, TypeError, OSError) as exc:
            if missing:
                raise _legacy_unreadable(name, root, cls.__name__, train, exc) from None
            # The files passed the checks above, so this is damage the header checks cannot see.
            raise DataError(f"{raw}: could not read {_PRETTY[name]} ({type(exc).__name__}: {exc}); "
                            "delete the files and fetch them again") from None
        except Exception as exc:  # noqa: BLE001 - unpickling a damaged legacy .pt can raise almost anything
            if not missing:
                raise
            raise _legacy_unreadable(name, root, cls.__name__, train, exc) from None
        images = torch.as_tensor(ds.data, dtype=torch.uint8).unsqueeze(1)  # N x 1 x 28 x 28
        labels = torch.as_tensor(ds.targets, dtype=torch.int64)
        splits.append(_make_split(name, images, labels, raw))
    return splits[0], splits[1]


def _legacy_unreadable(name: str, root: str, folder: str, train: bool, exc: BaseException) -> DataError:
    """torchvision's old processed/{training,test}.pt (used when raw/ is absent) could not be unpickled:
    name the file, in one line (torch's unpickling errors span many lines)."""
    path = os.path.join(root, folder, "processed", "training.pt" if train else "test.pt")
    return DataError(f"{path}: could not read {_PRETTY[name]} ({type(exc).__name__}); "
                     f"it is truncated or corrupt: delete {os.path.dirname(path)} and run `make data`, or set "
                     "data.download: true")


def _load_cifar(name: str, root: str, download: bool) -> tuple[TensorSplit, TensorSplit]:
    """CIFAR-10 / CIFAR-100 from the extracted python pickle batches (torchvision checks their md5s)."""
    cls = _torchvision_class(name)
    folder = os.path.join(root, cls.base_folder)
    splits = []
    for train in (True, False):
        try:
            ds = cls(root=root, train=train, download=download)
        except (RuntimeError, OSError) as exc:
            if download:  # no network, a failed md5 after downloading, or an unwritable root
                raise _download_failed(name, root, folder, exc) from None
            if isinstance(exc, RuntimeError):  # torchvision: "Dataset not found or corrupted"
                raise _cifar_missing(name, cls, root, folder) from None
            raise DataError(f"{folder}: could not read {_PRETTY[name]} ({exc}); delete it and fetch it again") from None
        except Exception as exc:  # noqa: BLE001 - unpickling a damaged file can raise almost anything
            raise DataError(f"{folder}: could not read {_PRETTY[name]} ({type(exc).__name__}: {exc}); "
                            "delete the folder and extract the archive again") from None
        images = torch.from_numpy(np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2)))  # HWC -> CHW
        labels = torch.as_tensor(ds.targets, dtype=torch.int64)
        splits.append(_make_split(name, images, labels, folder))
    return splits[0], splits[1]


def _cifar_missing(name: str, cls: Any, root: str, folder: str) -> DataError:
    """Name the first missing or corrupt CIFAR file, since torchvision only says 'not found or corrupted'."""
    from torchvision.datasets.utils import check_integrity  # noqa: PLC0415

    entries = [*map(tuple, cls.train_list + cls.test_list), (cls.meta["filename"], cls.meta["md5"])]
    missing = [f for f, _ in entries if not os.path.isfile(os.path.join(folder, f))]
    if missing:
        which = "" if len(missing) == len(entries) else f", missing {', '.join(missing)}"
        return DataError(f"data.root: {_PRETTY[name]} not found under {folder} (python pickle batches expected"
                         f"{which}); extract {cls.filename} into {root}, or set data.download: true")
    bad = next((f for f, md5 in entries if not check_integrity(os.path.join(folder, f), md5)), None)
    path = os.path.join(folder, bad) if bad else folder
    return DataError(f"{path}: {_PRETTY[name]} file fails its md5 check (truncated or corrupt); "
                     f"extract {cls.filename} into {root} again, or set data.download: true")


def _load_digits(name: str, root: str, download: bool) -> tuple[TensorSplit, TensorSplit]:
    """scikit-learn's bundled 8x8 digits (no files, no download), split 80/20 with a fixed seed."""
    del root, download  # bundled with scikit-learn
    try:
        from sklearn.datasets import load_digits  # noqa: PLC0415 - optional dependency
    except ImportError:
        raise DataError("data.name: 'digits' needs scikit-learn, which is not installed; "
                        "run `pip install scikit-learn` or choose another data.name") from None
    bunch = load_digits()
    values = np.asarray(bunch.data, dtype=np.float64).reshape(-1, 1, 8, 8)
    images = np.clip(np.rint(values * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    labels = np.asarray(bunch.target, dtype=np.int64)
    order = np.random.default_rng(0).permutation(len(labels))  # fixed: the split is part of the dataset
    n_train = round(0.8 * len(labels))
    tr, te = order[:n_train], order[n_train:]
    scaled = images[tr].astype(np.float64) / 255.0
    mean, std = (float(scaled.mean()),), (float(scaled.std()),)

    def split(rows: np.ndarray) -> TensorSplit:
        return TensorSplit(torch.from_numpy(images[rows].copy()), torch.from_numpy(labels[rows].copy()),
                           mean, std, _NUM_CLASSES[name])

    return split(tr), split(te)


_LOADERS: dict[str, Callable[[str, str, bool], tuple[TensorSplit, TensorSplit]]] = {
    "mnist": _load_idx,
    "fashion_mnist": _load_idx,
    "cifar10": _load_cifar,
    "cifar100": _load_cifar,
    "digits": _load_digits,
}
