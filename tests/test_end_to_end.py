"""End to end, as a user runs it: `launch/main.py` on real Fashion-MNIST, plain and under mpirun."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from fedmetanas.search.genotypes import Genotype
from tests.helpers import REPO, launch, tiny_overrides


@pytest.fixture(scope="module")
def tiny_run(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """One finished 2-round search (world size 1), shared by the tests that inspect its output."""
    out = tmp_path_factory.mktemp("runs")
    proc = launch(tiny_overrides(data_root, out, "tiny"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out / "tiny", proc.stdout


def test_a_two_round_search_writes_log_config_genotype_and_model(tiny_run: tuple[Path, str]) -> None:
    run_dir, stdout = tiny_run
    for name in ("trajectory.h5", "config.yaml", "genotype.txt", "discrete_model.pt", "supernet.pt"):
        assert (run_dir / name).is_file(), name
    assert "final genotype:" in stdout and "test accuracy:" in stdout
    genotype = Genotype.from_string((run_dir / "genotype.txt").read_text())
    assert len(genotype.normal) == 2 and all(len(node) == 2 for node in genotype.normal)


def test_the_saved_discrete_model_reproduces_the_logged_final_accuracy(tiny_run: tuple[Path, str],
                                                                      data_root: Path) -> None:
    from fedmetanas.configure import config_from_dict
    from fedmetanas.data.datasets import load_dataset
    from fedmetanas.federated.evaluation import evaluate
    from fedmetanas.algorithms.phases import build_supernet
    from fedmetanas.federated.setup import eval_indices
    from fedmetanas.search.discrete import DiscreteNet

    run_dir, _ = tiny_run
    saved = torch.load(run_dir / "discrete_model.pt", weights_only=False)
    cfg = config_from_dict(saved["config"])
    _, test = load_dataset(cfg.data.name, str(data_root), False)
    genotype = Genotype.from_string(saved["genotype"])
    net = DiscreteNet.from_supernet(build_supernet(cfg, test.in_channels, test.num_classes), genotype)
    net.load_state_dict(saved["state_dict"])
    net.eval()
    sums = evaluate(net, test, eval_indices(cfg, len(test)), 100)
    with h5py.File(run_dir / "trajectory.h5", "r") as f:
        logged = float(f["final"].attrs["discrete_acc"])
    assert abs(float(sums[1] / sums[2]) - logged) < 1e-9


def _documented_datasets() -> set[str]:
    """Dataset names listed in docs/hdf5.md's per-round table (rows starting with `/rounds/...`)."""
    text = (REPO / "docs" / "hdf5.md").read_text()
    return set(re.findall(r"^\|\s*`/rounds/([a-z_]+)`", text, flags=re.M))


def test_the_hdf5_log_has_exactly_the_documented_layout(tiny_run: tuple[Path, str]) -> None:
    run_dir, _ = tiny_run
    with h5py.File(run_dir / "trajectory.h5", "r", swmr=True) as f:
        rounds = f["rounds"]
        assert set(rounds) == _documented_datasets()
        assert all(ds.shape[0] == 2 for ds in rounds.values())
        counts = f["partition/class_counts"][()]
        assert counts.shape == (4, 10) and counts.sum() == 60000
        assert rounds["client_loss"].shape == (2, 4) and rounds["clients"][()].tolist() == [[0, 1, 2, 3]] * 2
        assert rounds["alpha_normal"].shape[1:] == rounds["mask_alpha_normal"].shape[1:]
        assert "config_yaml" in f.attrs and "partition_hash" in f.attrs
        assert 0.0 <= f["final"].attrs["discrete_acc"] <= 1.0
        assert (rounds["bytes_allreduced"][()] > 0).all()
        assert rounds["tau"][0] > rounds["tau"][1]


def _final_state(run_dir: Path) -> tuple[dict[str, np.ndarray], str]:
    saved = torch.load(run_dir / "supernet.pt", weights_only=False)
    alphas = {k: v.numpy() for k, v in saved["state_dict"].items() if k.startswith(("alpha_", "beta_"))}
    return alphas, (run_dir / "genotype.txt").read_text()


@pytest.mark.mpi
@pytest.mark.parametrize("server", [[], ["federated.server_optimizer=adam", "federated.server_lr=0.03"]],
                         ids=["avg", "adam"])
def test_the_search_is_the_same_on_one_and_two_ranks(data_root: Path, tmp_path: Path, server: list[str]) -> None:
    results = {}
    for np_ in (1, 2):
        proc = launch(tiny_overrides(data_root, tmp_path, f"np{np_}") + server, np=np_)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[np_] = _final_state(tmp_path / f"np{np_}")
    (a1, g1), (a2, g2) = results[1], results[2]
    assert g1 == g2
    assert a1.keys() == a2.keys()
    for name in a1:
        assert np.abs(a1[name] - a2[name]).max() <= 1e-6, name
    # The run must have moved the architecture: otherwise equality would prove nothing.
    assert max(np.abs(v).max() for v in a1.values()) > 1e-2


def test_a_one_layer_network_reports_only_its_normal_cell(data_root: Path, tmp_path: Path) -> None:
    """Issue 10: with model.layers=1 genotype.txt reported a reduce cell decoded from untrained alphas."""
    from fedmetanas import cli

    args = tiny_overrides(data_root, tmp_path, "one") + ["model.layers=1", "model.reduction_layers=null",
                                                          "federated.rounds=1", "personalize.steps=0"]
    assert cli.main(args) == 0

    text = (tmp_path / "one" / "genotype.txt").read_text()
    genotype = Genotype.from_string(text)
    assert genotype.cells == ("normal",) and "reduce" not in text
    with h5py.File(tmp_path / "one" / "trajectory.h5", "r") as f:
        assert all("reduce" not in g.decode() for g in f["rounds/genotype"][()])
        assert "reduce" not in f["final"].attrs["genotype"]


def test_a_resume_from_the_last_checkpoint_only_finishes_the_run_and_writes_the_same_model(
        tiny_run: tuple[Path, str], data_root: Path, tmp_path: Path) -> None:
    # Killed after the last round's checkpoint, before the final files: the resume runs no round, and
    # the final evaluation decodes the genotype from the restored logits and masks.
    run_dir = tmp_path / "tiny"
    shutil.copytree(tiny_run[0], run_dir)
    for name in ("genotype.txt", "discrete_model.pt"):
        (run_dir / name).unlink()

    proc = launch(tiny_overrides(data_root, tmp_path, "tiny") + ["--resume"])

    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run_dir / "genotype.txt").read_text() == (tiny_run[0] / "genotype.txt").read_text()
    want = torch.load(tiny_run[0] / "discrete_model.pt", weights_only=False)["state_dict"]
    got = torch.load(run_dir / "discrete_model.pt", weights_only=False)["state_dict"]
    assert all(torch.equal(got[k], v) for k, v in want.items())
