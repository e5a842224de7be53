"""Helpers for tests that run the launcher as a user would (plain python or under mpirun): the package's
own launcher (`fedmetanas.launcher`, shared with the benchmarks) and what only tests need."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from torch import nn

from fedmetanas.algorithms.common import LocalContext
from fedmetanas.data.datasets import TensorSplit
from fedmetanas.launcher import MPIRUN, REPO, launch, start, tiny_overrides, wait_for  # noqa: F401 - re-exported
from fedmetanas.search.discrete import FixedNet

# What a log measures of the machine or of the rank count, not of the run: left out of `logged_numbers`.
_NOT_RESULTS = ("time", "wall", "seconds", "memory", "mib", "bytes_allreduced")


def logged_numbers(run_dir: Path) -> dict[str, np.ndarray]:
    """Every dataset of a run's HDF5 log that is a result (timings, memory and the all-reduce's size, which
    depends on the rank count, left out), by path: equal between two runs that computed the same."""
    out: dict[str, np.ndarray] = {}

    def visit(name: str, obj: object) -> None:
        if isinstance(obj, h5py.Dataset) and not any(m in name.split("/")[-1] for m in _NOT_RESULTS):
            out[name] = obj[()]

    with h5py.File(run_dir / "trajectory.h5", "r") as f:
        f.visititems(visit)
    return out


def trained_model(run_dir: Path, file: str = "model.pt") -> dict[str, torch.Tensor]:
    """The final model a run saved: model.pt (a fixed network), supernet.pt (a search)."""
    return torch.load(run_dir / file, weights_only=False)["state_dict"]


# A round's test loss, summed by each rank over its shard of the evaluation set in float32 batches: another
# rank count evaluates other batches, so it agrees to float rounding only (the model and accuracy to the bit).
EVAL_LOSS = "rounds/discrete_loss"


def assert_same_run(run_dir: Path, reference: Path, rounding: tuple[str, ...] = (), model: str = "model.pt") -> None:
    """The two runs logged the same numbers and saved the same model (file `model`), to the bit; the
    datasets in `rounding` to float32 rounding."""
    got, want = logged_numbers(run_dir), logged_numbers(reference)
    assert got.keys() == want.keys()
    for name, value in want.items():
        if name in rounding:
            np.testing.assert_allclose(got[name], value, rtol=1e-6, err_msg=name)
        else:
            assert np.array_equal(got[name], value, equal_nan=value.dtype.kind == "f"), name
    got_model, want_model = trained_model(run_dir, model), trained_model(reference, model)
    assert got_model.keys() == want_model.keys()
    for key, value in want_model.items():
        assert torch.equal(got_model[key], value), key


def stopped_copy(run_dir: Path, dest: Path, after_round: int) -> Path:
    """A copy of a finished fixed-network run as a stop after round `after_round` leaves it: the later
    checkpoints and the final model gone, so `--resume` continues from that round."""
    shutil.copytree(run_dir, dest)
    for path in (dest / "checkpoints").glob("round-*.pt"):
        if int(path.stem.split("-")[1]) > after_round:
            path.unlink()
    (dest / "model.pt").unlink()
    return dest


# -- the smallest fixed network, for local updates checked by hand ---------------------------------------------
LINEAR_ROWS, LINEAR_CLASSES = 6, 3


class Linear(FixedNet):
    """The smallest fixed network: a linear map of the flattened 4x4 image."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, LINEAR_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(x, 1))


def linear_split() -> TensorSplit:
    """LINEAR_ROWS seeded 4x4 images, labels cycling over the classes."""
    gen = torch.Generator().manual_seed(1)
    return TensorSplit(torch.randint(0, 256, (LINEAR_ROWS, 1, 4, 4), generator=gen, dtype=torch.uint8),
                       torch.arange(LINEAR_ROWS) % LINEAR_CLASSES, (0.5,), (0.25,), num_classes=LINEAR_CLASSES)


def linear_ctx(split: TensorSplit, state: dict[str, torch.Tensor] | None = None) -> LocalContext:
    """A client holding every row of `split` (and `state`, its state from earlier rounds)."""
    return LocalContext(split, torch.arange(LINEAR_ROWS), None, float("nan"), "expected",
                        torch.Generator().manual_seed(3), torch.Generator().manual_seed(0), state=state or {})


def full_batch_grad(net: nn.Module, split: TensorSplit) -> tuple[torch.Tensor, ...]:
    """The loss's gradient over every row (a batch of LINEAR_ROWS draws every row: the order does not change
    the mean), the batch any rule with batch size LINEAR_ROWS draws."""
    x, y = split.batch(torch.arange(LINEAR_ROWS))
    net.zero_grad()
    nn.functional.cross_entropy(net(x), y).backward()
    return tuple(p.grad.clone() for p in net.parameters())


def rank_pid(marker: str, rank: int) -> int:
    """PID of one rank of a run (by its MPI rank variable), as a user would find it with ps.

    `marker` must be unique to this run's command line (e.g. f"output.dir={tmp_path}"): other runs of the
    same test may be going on at the same machine."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes()
            env = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"launch/main.py" in cmd and marker.encode() in cmd.split(b"\0") and f"PMI_RANK={rank}".encode() in env:
            return int(proc.name)
    raise AssertionError(f"rank {rank} of the run with {marker} not found")


def launch_all(data_root: Path, out: Path, plans: dict[str, tuple[list[str], int]], common: list[str]) -> dict[str, Path]:
    """Run each plan (name -> (overrides beside `common`, ranks)) to completion; their run directories."""
    for name, (extra, np) in plans.items():
        proc = launch(tiny_overrides(data_root, out, name) + common + extra, np=np)
        assert proc.returncode == 0, f"{name}: {proc.stderr[-3000:]}"
    return {name: out / name for name in plans}


def saved_model(run_dir: Path, file: str = "model.pt") -> dict[str, Any]:
    """The state dict a finished run saved."""
    return torch.load(run_dir / file, weights_only=False)["state_dict"]


def killed_after(args: list[str], np: int, checkpoint: Path) -> None:
    """Start a run and SIGKILL every rank (no handler runs) as soon as `checkpoint` lands."""
    import os  # noqa: PLC0415 - only the kill tests need it
    import signal  # noqa: PLC0415

    proc = start(args, np)
    wait_for(checkpoint, proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def nudged(build, seed: int = 5):  # noqa: ANN001, ANN201 - test helper
    """`build` with every weight moved by float32 rounding (a relative 1e-7): how far a result itself moves
    under rounding-sized differences, the yardstick for "equal to float rounding" (batched, captured)."""
    def make():  # noqa: ANN202
        net = build()
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in net.parameters():
                p.mul_(1 + 1e-7 * torch.randn(p.shape, generator=gen))
        return net
    return make
