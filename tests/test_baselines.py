"""The baselines run end to end like FedMetaNAS (`launch/main.py`, mpirun -np 2, same data, engine and
log): FedNAS searches then retrains the genotype it found from scratch, FedAvg trains a fixed network,
every algorithm personalizes per client, and FedNAS resumes bit-identically across its two stages."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from fedmetanas.configure import load_config
from fedmetanas.data.datasets import load_dataset
from fedmetanas.federated.evaluation import evaluate
from fedmetanas.federated.setup import eval_indices
from fedmetanas.search.discrete import CNN, DiscreteNet
from fedmetanas.search.genotypes import Genotype
from tests.helpers import REPO, launch, tiny_overrides

SEARCH, RETRAIN = 2, 2
ALGORITHMS = {
    "fedmetanas": [],
    "fednas": ["model.primitives=darts", "search.input_mode=all", "fednas.local_steps=2", "fednas.batch_size=16",
               f"fednas.retrain_rounds={RETRAIN}", "checkpoint.keep=10"],
    "fedavg": ["fedavg.architecture=cnn"],
    "perfedavg": ["perfedavg.architecture=cnn"],
}
COMMON = ["fedavg.local_steps=3", "fedavg.batch_size=16", "fedavg.channels=4", "personalize.steps=3", "personalize.lr=0.05",
          f"federated.rounds={SEARCH}"]


@pytest.fixture(scope="module")
def runs(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One tiny run of each algorithm under `mpirun -np 2`, on the same partition."""
    out = tmp_path_factory.mktemp("baselines")
    dirs = {}
    for name, extra in ALGORITHMS.items():
        proc = launch(tiny_overrides(data_root, out, name) + COMMON + extra + [f"algorithm.name={name}"], np=2)
        assert proc.returncode == 0, proc.stderr[-3000:]
        dirs[name] = out / name
    return dirs


def _final(run_dir: Path) -> dict:
    with h5py.File(run_dir / "trajectory.h5", "r") as f:
        return dict(f["final"].attrs)


def test_every_algorithm_runs_under_mpirun_and_logs_its_final_accuracy(runs: dict[str, Path]) -> None:
    hashes = set()
    for name, run_dir in runs.items():
        final = _final(run_dir)
        assert final["algorithm"] == name and final["stopped_by"] == "rounds"
        assert 0.0 <= final["discrete_acc"] <= 1.0
        with h5py.File(run_dir / "trajectory.h5", "r") as f:
            hashes.add(f.attrs["partition_hash"])
            assert f["rounds/round"].shape[0] == SEARCH
            assert (f["rounds/bytes_clients"][()] > 0).all()
    assert len(hashes) == 1  # the same clients and data for every algorithm


def test_the_logs_of_the_baselines_have_the_documented_layout(runs: dict[str, Path]) -> None:
    """docs/hdf5.md: a train stage's table holds exactly the datasets marked *all stages*."""
    text = (REPO / "docs" / "hdf5.md").read_text()
    all_stages = set(re.findall(r"^\|\s*`/rounds/([a-z_]+)`[^|]*\|[^|]*\|\s*\*all stages\*", text, flags=re.M))
    documented = set(re.findall(r"^\|\s*`/personalization/([a-z_]+)`", text, flags=re.M))
    documented |= set(re.findall(r"`/personalization/[a-z_]+`, `/personalization/([a-z_]+)`", text))
    assert {"round", "discrete_acc", "wall_time", "bytes_clients"} <= all_stages
    with h5py.File(runs["fedavg"] / "trajectory.h5", "r") as f:
        assert set(f["rounds"]) == all_stages
        assert set(f["personalization"]) == documented
    with h5py.File(runs["fednas"] / "trajectory.h5", "r") as f:
        assert set(f["retrain"]) == all_stages
        assert all_stages < set(f["rounds"])


def test_fednas_retrains_the_genotype_its_search_found_from_scratch(runs: dict[str, Path]) -> None:
    run_dir = runs["fednas"]
    final = _final(run_dir)
    searched = (run_dir / "search_genotype.txt").read_text().strip()
    with h5py.File(run_dir / "trajectory.h5", "r") as f:
        last_search_genotype = f["rounds/genotype"][-1].decode()
        retrain_rounds = f["retrain/round"][()].tolist()
        search_end = float(f["rounds/wall_time"][-1])
        retrain_wall = f["retrain/wall_time"][()]
        assert "alpha_normal" not in f["retrain"] and "alpha_normal" in f["rounds"]
    assert searched == last_search_genotype == final["genotype"] == final["search_genotype"]
    # fednas.stable_rounds (3) needs 4 search rounds: these 2 ran to the cap, federated.rounds.
    assert final["search_stopped_by"] == "cap" and final["search_rounds"] == SEARCH
    assert retrain_rounds == list(range(SEARCH, SEARCH + RETRAIN))
    assert (retrain_wall > search_end).all() and final["search_seconds"] <= search_end + 1e-6
    saved = torch.load(run_dir / "model.pt", weights_only=False)
    assert saved["architecture"] == searched
    net = DiscreteNet.from_genotype(Genotype.from_string(searched), 1, 10, channels=4, layers=2,
                                   reduction_layers=(1,), stem_stride=2)
    net.load_state_dict(saved["state_dict"])  # exactly the searched cells, affine BN: a network of its own
    supernet = torch.load(run_dir / "supernet.pt", weights_only=False)["state_dict"]
    # A network of its own (affine BN, as DARTS's evaluation network), not the supernet's ops.
    assert "cells.0.pre1.2.weight" in saved["state_dict"] and "cells.0.pre1.2.weight" not in supernet


def test_the_saved_trained_model_reproduces_the_logged_final_accuracy(runs: dict[str, Path], data_root: Path) -> None:
    for name, build in (("fednas", None), ("fedavg", CNN)):
        run_dir = runs[name]
        cfg = load_config(run_dir / "config.yaml")
        saved = torch.load(run_dir / "model.pt", weights_only=False)
        _, test = load_dataset("fashion_mnist", str(data_root), False)
        if build is None:
            net = DiscreteNet.from_genotype(Genotype.from_string(saved["architecture"]), 1, 10, 4, 2, reduction_layers=(1,),
                                               stem_stride=2)
        else:
            net = CNN(1, 10, 28)
        net.load_state_dict(saved["state_dict"])
        net.eval()
        sums = evaluate(net, test, eval_indices(cfg, len(test)), 500, cfg.model.channels_last)
        assert float(sums[1] / sums[2]) == pytest.approx(_final(run_dir)["discrete_acc"], abs=1e-9), name


def test_personalization_reports_every_client_before_and_after_adaptation(runs: dict[str, Path]) -> None:
    for name, run_dir in runs.items():
        with h5py.File(run_dir / "trajectory.h5", "r") as f:
            before, after = f["personalization/acc_before"][()], f["personalization/acc_after"][()]
            sizes = f["personalization/test_sizes"][()]
            assert sizes.tolist() == f["partition/test_sizes"][()].tolist()
        assert before.shape == after.shape == (4,)
        assert not np.array_equal(before, after), name  # adaptation changed the per-client numbers
        final = _final(run_dir)
        assert final["personal_after_mean"] == pytest.approx(float(np.nanmean(after)))
        assert final["personal_before_worst10"] == pytest.approx(float(np.nanmin(before)))  # 4 clients: the worst one


@pytest.mark.parametrize("next_round", [SEARCH, SEARCH + 1])
def test_fednas_resumes_bit_identically_at_and_after_the_switch_to_retraining(runs: dict[str, Path], tmp_path: Path,
                                                                              data_root: Path, next_round: int) -> None:
    run_dir = tmp_path / "fednas"
    shutil.copytree(runs["fednas"], run_dir)
    for ckpt in (run_dir / "checkpoints").glob("round-*.pt"):
        if int(ckpt.stem.split("-")[1]) > next_round:
            ckpt.unlink()
    (run_dir / "model.pt").unlink()
    proc = launch(tiny_overrides(data_root, tmp_path, "fednas") + COMMON + ALGORITHMS["fednas"]
                  + ["algorithm.name=fednas", "--resume"], np=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    want = torch.load(runs["fednas"] / "model.pt", weights_only=False)["state_dict"]
    got = torch.load(run_dir / "model.pt", weights_only=False)["state_dict"]
    for key, value in want.items():
        assert torch.equal(got[key], value), key
    with h5py.File(run_dir / "trajectory.h5", "r") as f, h5py.File(runs["fednas"] / "trajectory.h5", "r") as ref:
        assert f["retrain/round"][()].tolist() == list(range(SEARCH, SEARCH + RETRAIN))
        assert f["rounds/round"][()].tolist() == list(range(SEARCH))
        assert {k: f.attrs[k] for k in ("primitives", "nodes", "num_params")} == {
            k: ref.attrs[k] for k in ("primitives", "nodes", "num_params")}  # the search's model, also resumed later


def test_the_report_draws_fednas_retraining_and_every_baselines_log(runs: dict[str, Path], tmp_path: Path) -> None:
    from fedmetanas.reporting.report import load_run, write_report

    fednas = load_run(runs["fednas"] / "trajectory.h5")
    assert fednas.retrain["round"].tolist() == list(range(SEARCH, SEARCH + RETRAIN))
    assert "retrain/discrete_acc" in fednas.series()
    page = write_report([runs[m] / "trajectory.h5" for m in ALGORITHMS], tmp_path / "report")
    assert "accuracy.png" in page.read_text() and (tmp_path / "report" / "accuracy.png").stat().st_size > 1024
