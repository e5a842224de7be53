"""Loading datasets from their real on-disk formats, the errors users meet, batching, and the fetch CLI."""

import gzip
import os
import pickle
import struct
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.datasets.cifar

from fedmetanas.data import fetch
from fedmetanas.data.datasets import DATASET_NAMES, TensorSplit, load_dataset
from fedmetanas.data.errors import DataError

IDX_NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


# ---------------------------------------------------------------------------------------------
# Writers for the real formats (tiny contents)


def _idx_bytes(array: np.ndarray) -> bytes:
    """An uncompressed uint8 IDX file: magic 0x0000 08 ndim (2051 images, 2049 labels), big-endian dims."""
    magic = 0x0800 | array.ndim
    return struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape) + array.astype(np.uint8).tobytes()


def _write_idx_dataset(raw: Path, n_train: int = 30, n_test: int = 10, gz: bool = False) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test),
    }
    raw.mkdir(parents=True, exist_ok=True)
    for name, arr in arrays.items():
        data = _idx_bytes(arr)
        if gz:
            (raw / (name + ".gz")).write_bytes(gzip.compress(data))
        else:
            (raw / name).write_bytes(data)
    return arrays


def _write_cifar(root: Path, hundred: bool, n_per_file: int = 4) -> None:
    rng = np.random.default_rng(1)
    num_classes = 100 if hundred else 10
    label_key = "fine_labels" if hundred else "labels"
    if hundred:
        folder, files, meta = root / "cifar-100-python", ["train", "test"], ("meta", "fine_label_names")
    else:
        folder = root / "cifar-10-batches-py"
        files, meta = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"], ("batches.meta", "label_names")
    folder.mkdir(parents=True)
    for name in files:
        entry = {"data": rng.integers(0, 256, (n_per_file, 3072)).astype(np.uint8),
                 label_key: rng.integers(0, num_classes, n_per_file).tolist()}
        if hundred:
            entry["coarse_labels"] = [0] * n_per_file
        (folder / name).write_bytes(pickle.dumps(entry, protocol=2))
    (folder / meta[0]).write_bytes(pickle.dumps({meta[1]: [f"c{i}" for i in range(num_classes)]}, protocol=2))


@pytest.fixture
def skip_cifar_md5(monkeypatch):
    """torchvision checks CIFAR files against the md5s of the real archives, which synthetic files cannot
    match; in tests only, accept any existing file so the real reading code path still runs."""
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity",
                        lambda fpath, md5=None: os.path.isfile(fpath))


# ---------------------------------------------------------------------------------------------
# IDX (MNIST, Fashion-MNIST)


@pytest.mark.parametrize(("name", "folder", "mean"),
                         [("mnist", "MNIST", 0.1307), ("fashion_mnist", "FashionMNIST", 0.2860)])
def test_idx_files_load_as_uint8_splits_with_published_stats(tmp_path, name, folder, mean):
    # Prepare
    arrays = _write_idx_dataset(tmp_path / folder / "raw")
    # Execute
    train, test = load_dataset(name, str(tmp_path), download=False)
    # Assert
    assert (len(train), len(test)) == (30, 10)
    assert train.images.shape == (30, 1, 28, 28) and train.images.dtype == torch.uint8
    assert train.labels.dtype == torch.int64
    assert np.array_equal(train.images[:, 0].numpy(), arrays["train-images-idx3-ubyte"])
    assert np.array_equal(test.labels.numpy(), arrays["t10k-labels-idx1-ubyte"])
    assert train.mean == (mean,) and train.num_classes == 10
    assert (train.in_channels, train.image_size) == (1, 28)


def test_missing_fashion_mnist_names_data_root_and_the_fix(tmp_path):
    with pytest.raises(DataError) as info:
        load_dataset("fashion_mnist", str(tmp_path), download=False)
    msg = str(info.value)
    assert msg.startswith("data.root: Fashion-MNIST not found under ")
    assert str(tmp_path / "FashionMNIST" / "raw") in msg
    assert "make data" in msg and "data.download: true" in msg and "\n" not in msg


def test_gzipped_idx_files_get_a_gunzip_hint(tmp_path):
    _write_idx_dataset(tmp_path / "MNIST" / "raw", gz=True)
    with pytest.raises(DataError, match=r"data\.root: .*gunzip"):
        load_dataset("mnist", str(tmp_path), download=False)


def test_truncated_idx_file_raises_data_error_naming_the_file(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    _write_idx_dataset(raw)
    victim = raw / "train-images-idx3-ubyte"
    victim.write_bytes(victim.read_bytes()[:1000])
    with pytest.raises(DataError, match="truncated") as info:
        load_dataset("mnist", str(tmp_path), download=False)
    assert str(victim) in str(info.value)


def test_idx_file_with_wrong_magic_raises_data_error_naming_the_file(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    _write_idx_dataset(raw)
    victim = raw / "t10k-labels-idx1-ubyte"
    victim.write_bytes(b"\x00\x00\x08\x03" + victim.read_bytes()[4:])
    with pytest.raises(DataError, match="magic") as info:
        load_dataset("mnist", str(tmp_path), download=False)
    assert str(victim) in str(info.value)


def test_unknown_dataset_name_suggests_the_closest_one(tmp_path):
    with pytest.raises(DataError, match=r"data\.name: .*did you mean 'fashion_mnist'") as info:
        load_dataset("fashon_mnist", str(tmp_path), download=False)
    assert all(name in str(info.value) for name in DATASET_NAMES)


# ---------------------------------------------------------------------------------------------
# CIFAR


def test_cifar10_pickle_batches_load_as_chw_uint8(tmp_path, skip_cifar_md5):
    _write_cifar(tmp_path, hundred=False)
    train, test = load_dataset("cifar10", str(tmp_path), download=False)
    raw = pickle.loads((tmp_path / "cifar-10-batches-py" / "data_batch_1").read_bytes())
    assert (len(train), len(test)) == (20, 4)
    assert train.images.shape == (20, 3, 32, 32) and train.images.is_contiguous()
    assert np.array_equal(train.images[0].numpy().reshape(-1), raw["data"][0])  # CHW like the pickle rows
    assert train.labels[:4].tolist() == raw["labels"]
    assert train.mean == (0.4914, 0.4822, 0.4465) and train.num_classes == 10


def test_cifar100_reads_fine_labels(tmp_path, skip_cifar_md5):
    _write_cifar(tmp_path, hundred=True)
    train, test = load_dataset("cifar100", str(tmp_path), download=False)
    raw = pickle.loads((tmp_path / "cifar-100-python" / "test").read_bytes())
    assert (len(train), len(test)) == (4, 4) and train.num_classes == 100
    assert test.labels.tolist() == raw["fine_labels"]


def test_missing_cifar_names_data_root_and_the_missing_files(tmp_path):
    with pytest.raises(DataError, match=r"^data\.root: CIFAR-10 not found under .*data\.download: true"):
        load_dataset("cifar10", str(tmp_path), download=False)
    _write_cifar(tmp_path, hundred=False)
    (tmp_path / "cifar-10-batches-py" / "test_batch").unlink()
    with pytest.raises(DataError, match=r"missing test_batch\)"):
        load_dataset("cifar10", str(tmp_path), download=False)


def test_cifar_file_failing_its_md5_is_named(tmp_path):
    # No md5 patch here: the synthetic files are exactly what a corrupt download looks like.
    _write_cifar(tmp_path, hundred=False)
    with pytest.raises(DataError, match="md5") as info:
        load_dataset("cifar10", str(tmp_path), download=False)
    assert str(tmp_path / "cifar-10-batches-py" / "data_batch_1") in str(info.value)


def test_unreadable_cifar_pickle_raises_data_error_naming_the_folder(tmp_path, skip_cifar_md5):
    _write_cifar(tmp_path, hundred=False)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"\x80\x02}q\x00(X")
    with pytest.raises(DataError, match="could not read CIFAR-10") as info:
        load_dataset("cifar10", str(tmp_path), download=False)
    assert str(tmp_path / "cifar-10-batches-py") in str(info.value)


# ---------------------------------------------------------------------------------------------
# digits (optional scikit-learn)


def test_digits_without_scikit_learn_says_how_to_install_it(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(DataError, match=r"pip install scikit-learn"):
        load_dataset("digits", str(tmp_path), download=False)


def test_digits_are_8x8_uint8_split_80_20_with_train_stats(monkeypatch, tmp_path):
    # A stand-in for sklearn.datasets.load_digits with the same shapes and 0..16 value range.
    rng = np.random.default_rng(0)
    data, target = rng.integers(0, 17, (100, 64)).astype(np.float64), rng.integers(0, 10, 100)
    fake = types.ModuleType("sklearn.datasets")
    fake.load_digits = lambda: types.SimpleNamespace(data=data, target=target)
    monkeypatch.setitem(sys.modules, "sklearn", types.ModuleType("sklearn"))
    monkeypatch.setitem(sys.modules, "sklearn.datasets", fake)
    train, test = load_dataset("digits", str(tmp_path), download=False)
    assert (len(train), len(test)) == (80, 20)
    assert train.images.shape == (80, 1, 8, 8) and train.images.dtype == torch.uint8
    assert int(train.images.max()) <= 255 and (data.max() < 16 or int(train.images.max()) == 255)
    assert sorted(torch.cat([train.labels, test.labels]).tolist()) == sorted(target.tolist())
    assert train.mean[0] == pytest.approx(train.images.float().div(255).mean().item(), rel=1e-5)
    x, _ = train.batch(torch.arange(80))
    assert x.mean().item() == pytest.approx(0.0, abs=1e-4)
    assert x.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-3)


def test_real_digits_load_when_scikit_learn_is_installed(tmp_path):
    pytest.importorskip("sklearn")
    train, test = load_dataset("digits", str(tmp_path), download=False)
    assert len(train) + len(test) == 1797 and train.image_size == 8


# ---------------------------------------------------------------------------------------------
# TensorSplit.batch


def _rgb_split(n: int = 64, size: int = 8) -> TensorSplit:
    images = torch.randint(0, 256, (n, 3, size, size), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    scaled = images.double() / 255
    mean = tuple(scaled.mean(dim=(0, 2, 3)).tolist())
    std = tuple(scaled.std(dim=(0, 2, 3), unbiased=False).tolist())
    return TensorSplit(images, torch.arange(n) % 10, mean, std, num_classes=10)


def test_batch_normalises_to_zero_mean_unit_std_with_the_splits_own_stats():
    split = _rgb_split()
    x, y = split.batch(torch.arange(len(split)))
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.allclose(x.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5)
    assert torch.allclose(x.std(dim=(0, 2, 3), unbiased=False), torch.ones(3), atol=1e-4)


def test_augment_keeps_shape_and_is_reproducible_under_the_same_seed():
    split, idx = _rgb_split(), torch.arange(32)
    before = torch.get_rng_state()
    a, _ = split.batch(idx, augment=True, generator=torch.Generator().manual_seed(5))
    b, _ = split.batch(idx, augment=True, generator=torch.Generator().manual_seed(5))
    c, _ = split.batch(idx, augment=True, generator=torch.Generator().manual_seed(6))
    plain, _ = split.batch(idx)
    assert torch.equal(torch.get_rng_state(), before)
    assert a.shape == plain.shape and torch.equal(a, b)
    assert not torch.equal(a, c) and not torch.equal(a, plain)


def test_augmented_images_are_flipped_windows_of_the_zero_padded_original():
    split, pad = _rgb_split(n=6), 4
    raw = split.images.float() / 255
    mean = torch.tensor(split.mean).view(1, 3, 1, 1)
    std = torch.tensor(split.std).view(1, 3, 1, 1)
    x, _ = split.batch(torch.arange(6), augment=True, generator=torch.Generator().manual_seed(0))
    pixels = x * std + mean
    padded = torch.nn.functional.pad(raw, (pad, pad, pad, pad))
    for i in range(6):
        candidates = [w.flip(-1) if flip else w
                      for dy in range(2 * pad + 1) for dx in range(2 * pad + 1) for flip in (False, True)
                      for w in [padded[i, :, dy:dy + 8, dx:dx + 8]]]
        assert any(torch.allclose(pixels[i], c, atol=1e-5) for c in candidates)


def test_augment_leaves_grayscale_images_alone():
    images = torch.randint(0, 256, (4, 1, 8, 8), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    split = TensorSplit(images, torch.zeros(4, dtype=torch.int64), (0.5,), (0.5,), 10)
    a, _ = split.batch(torch.arange(4), augment=True, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, split.batch(torch.arange(4))[0])


def test_to_returns_a_new_split_and_bad_tensors_are_rejected():
    split = _rgb_split()
    moved = split.to("cpu")
    assert moved is not split and torch.equal(moved.images, split.images) and moved.mean == split.mean
    with pytest.raises(ValueError, match="uint8"):
        TensorSplit(split.images.float(), split.labels, split.mean, split.std, 10)


# ---------------------------------------------------------------------------------------------
# fetch


def test_fetch_mnist_from_a_gz_folder_installs_loadable_uncompressed_files(tmp_path, capsys):
    src = tmp_path / "gz"
    _write_idx_dataset(src, gz=True)
    root = tmp_path / "root"
    code = fetch.main(["--root", str(root), "--no-fashion", "--mnist-from", str(src)])
    assert code == 0
    raw = root / "MNIST" / "raw"
    assert sorted(os.listdir(raw)) == sorted(IDX_NAMES)  # no leftover temporary files
    assert "mnist: 30 train + 10 test" in capsys.readouterr().out


def test_fetch_failure_exits_2_with_one_line_on_stderr(tmp_path, capsys):
    code = fetch.main(["--root", str(tmp_path), "--no-fashion", "--mnist-from", str(tmp_path / "nope")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "--mnist-from" in err


@pytest.mark.parametrize("root", ["a-file", "a-file/below", "/proc/self/x"])
def test_fetch_into_a_root_that_is_not_a_folder_is_one_error_line(tmp_path, capsys, root):
    """Issue 21: a file as --root was a NotADirectoryError traceback, /proc/self/x a FileNotFoundError one."""
    (tmp_path / "a-file").write_text("not a folder")
    path = root if root.startswith("/") else str(tmp_path / root)

    code = fetch.main(["--root", path, "--no-fashion", "--mnist-from", str(tmp_path)])

    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: --root: "), err
    assert (tmp_path / "a-file").read_text() == "not a folder"


def test_fetch_reports_a_truncated_gz_by_name_and_leaves_no_partial_file(tmp_path):
    src = tmp_path / "gz"
    _write_idx_dataset(src, gz=True)
    victim = src / "t10k-images-idx3-ubyte.gz"
    victim.write_bytes(victim.read_bytes()[:-20])
    with pytest.raises(fetch.FetchError, match=str(victim)):
        fetch.fetch_mnist_from(src, tmp_path / "root")
    assert "t10k-images-idx3-ubyte" not in os.listdir(tmp_path / "root" / "MNIST" / "raw")
    assert all(not f.endswith(".tmp") for f in os.listdir(tmp_path / "root" / "MNIST" / "raw"))


def test_fetch_fashion_uses_the_system_folder_and_then_does_nothing(tmp_path, monkeypatch):
    system = tmp_path / "usr-share"
    _write_idx_dataset(system, gz=True)
    monkeypatch.setattr(fetch, "_run", lambda *a, **k: pytest.fail("no apt-get when the files exist"))
    raw = fetch.fetch_fashion_mnist(tmp_path / "root", system_dir=system)
    stamp = os.stat(raw / IDX_NAMES[0]).st_mtime_ns
    fetch.fetch_fashion_mnist(tmp_path / "root", system_dir=tmp_path / "absent")
    assert os.stat(raw / IDX_NAMES[0]).st_mtime_ns == stamp
    assert len(load_dataset("fashion_mnist", str(tmp_path / "root"), False)[0]) == 30


def test_fetch_fashion_as_root_updates_apt_only_after_a_failed_install(tmp_path, monkeypatch):
    system, calls = tmp_path / "usr-share", []

    def fake_run(cmd, cwd=None):
        calls.append(cmd[:2])
        if cmd[:2] == ["apt-get", "install"] and ["apt-get", "update"] in calls:
            _write_idx_dataset(system, gz=True)
            return True
        return cmd[:2] == ["apt-get", "update"]

    monkeypatch.setattr(fetch, "_run", fake_run)
    monkeypatch.setattr(fetch, "_is_root", lambda: True)
    monkeypatch.setattr(fetch.shutil, "which", lambda name: "/usr/bin/" + name)
    fetch.fetch_fashion_mnist(tmp_path / "root", system_dir=system)
    assert calls == [["apt-get", "install"], ["apt-get", "update"], ["apt-get", "install"]]


def test_fetch_fashion_without_root_unpacks_the_deb_under_root(tmp_path, monkeypatch):
    system, root, calls = tmp_path / "usr" / "share" / "fm", tmp_path / "root", []

    def fake_run(cmd, cwd=None):
        calls.append(cmd[:2])
        if cmd[:2] == ["apt-get", "download"]:
            (Path(cwd) / "dataset-fashion-mnist_1.0_all.deb").write_bytes(b"deb")
        if cmd[0] == "dpkg":
            _write_idx_dataset(Path(cmd[3]) / system.relative_to(system.anchor), gz=True)
        return True

    monkeypatch.setattr(fetch, "_run", fake_run)
    monkeypatch.setattr(fetch, "_is_root", lambda: False)
    monkeypatch.setattr(fetch.shutil, "which", lambda name: "/usr/bin/" + name)
    raw = fetch.fetch_fashion_mnist(root, system_dir=system)
    assert calls == [["apt-get", "download"], ["dpkg", "-x"]]
    assert sorted(os.listdir(raw)) == sorted(IDX_NAMES)


# ---------------------------------------------------------------------------------------------
# The real data the repository's set-up provides (`make data`; conftest's data_root)


def test_the_repositorys_fashion_mnist_has_60000_train_10000_test_and_the_published_mean(data_root):
    train, test = load_dataset("fashion_mnist", str(data_root), download=False)
    assert (len(train), len(test)) == (60000, 10000)
    assert train.images.float().mean().item() / 255 == pytest.approx(0.2860, abs=5e-4)
    assert sorted(train.labels.unique().tolist()) == list(range(10))
