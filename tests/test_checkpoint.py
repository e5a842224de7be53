"""Saved files hold CPU tensors only, so a GPU run's checkpoint or model loads on a host without a GPU."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from fedmetanas.checkpoint import cpu_state_dict, load_latest, save_checkpoint, to_cpu
from tests.helpers import REPO


def test_to_cpu_keeps_the_structure_and_everything_that_is_not_a_tensor() -> None:
    rows = [("rounds", {"round": 0, "client_loss": np.array([0.5, np.nan]), "genotype": "x"})]
    state = {"next_round": 3, "rows": rows, "masks": {"ops": {"normal": torch.ones(2, 3, dtype=torch.bool)}},
             "pair": (torch.zeros(1), None)}
    out = to_cpu(state)
    assert out["next_round"] == 3 and out["rows"][0][1]["genotype"] == "x"
    assert out["rows"][0][1]["client_loss"] is rows[0][1]["client_loss"]
    assert isinstance(out["pair"], tuple) and out["pair"][1] is None
    assert torch.equal(out["masks"]["ops"]["normal"], state["masks"]["ops"]["normal"])


def test_to_cpu_copies_and_detaches_so_the_saved_values_never_move_with_training() -> None:
    p = nn.Parameter(torch.ones(3))
    saved = to_cpu({"w": p})["w"]
    with torch.no_grad():
        p.add_(1.0)
    assert not saved.requires_grad and torch.equal(saved, torch.ones(3))


def test_cpu_state_dict_holds_every_entry_on_the_cpu() -> None:
    net = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3))
    state = cpu_state_dict(net)
    assert state.keys() == net.state_dict().keys()
    assert all(t.device.type == "cpu" for t in state.values())


def test_a_checkpoint_loads_without_map_location_and_holds_detached_cpu_tensors(tmp_path: Path) -> None:
    net = nn.Linear(2, 2)
    save_checkpoint(tmp_path, {"next_round": 1, "model": net.state_dict(), "rows": []}, keep=2)
    plain = torch.load(tmp_path / "round-000001.pt", weights_only=False)
    assert all(t.device.type == "cpu" and not t.requires_grad for t in plain["model"].values())
    state, _ = load_latest(tmp_path)
    assert torch.equal(state["model"]["weight"], net.weight.detach())


LOAD_WITHOUT_GPU = """
import sys, torch
state = torch.load(sys.argv[1], weights_only=False)
model = torch.load(sys.argv[2], weights_only=False)
assert not torch.cuda.is_available()
assert all(t.device.type == "cpu" for t in state["model"].values())
assert all(t.device.type == "cpu" for t in model["state_dict"].values())
print("loaded")
"""


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_files_saved_from_a_gpu_load_on_a_host_without_one(tmp_path: Path) -> None:
    net = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)).cuda()
    save_checkpoint(tmp_path, {"next_round": 1, "model": net.state_dict(), "rows": []}, keep=1)
    torch.save(to_cpu({"state_dict": net.state_dict()}), tmp_path / "model.pt")
    script = tmp_path / "load.py"
    script.write_text(LOAD_WITHOUT_GPU)
    out = subprocess.run([sys.executable, str(script), str(tmp_path / "round-000001.pt"), str(tmp_path / "model.pt")],
                         capture_output=True, text=True, timeout=120, check=False, cwd=REPO,
                         env={"CUDA_VISIBLE_DEVICES": "", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0 and "loaded" in out.stdout, out.stderr[-2000:]


def test_the_reliability_docs_list_exactly_the_fields_a_resume_may_change() -> None:
    """Issue 21: docs/reliability.md's list omitted personalize.*, data.root and data.download, which the code
    allows."""
    import re  # noqa: PLC0415

    from fedmetanas.checkpoint import RESUMABLE_CHANGES  # noqa: PLC0415

    text = (REPO / "docs" / "reliability.md").read_text()
    listed = re.search(r"\(only (.*?) may change", text, re.S)
    assert listed is not None
    assert {name.rstrip("*") for name in re.findall(r"`([a-z_.*]+)`", listed.group(1))} == set(RESUMABLE_CHANGES)


# -- what a resume compares: the core sections and the active algorithm's own --------------------------------
def _saved(name: str, *overrides: str) -> dict:
    from fedmetanas.config import to_dict  # noqa: PLC0415
    from fedmetanas.configure import load_config  # noqa: PLC0415

    return to_dict(load_config(None, [f"algorithm.name={name}", *overrides]))


def test_a_checkpoint_holding_every_algorithms_sections_matches_a_config_holding_only_the_active_ones() -> None:
    """Checkpoints written before issue 22 hold every registered algorithm's section; those of an algorithm
    that does not run determine nothing, whatever their values."""
    from fedmetanas.checkpoint import config_differences  # noqa: PLC0415

    # Prepare
    current = _saved("fedavg")
    old = {**current, "fednas": {**_saved("fednas")["fednas"], "lr_w": 9.0}, "perfedavg": {"architecture": "cnn"},
           "fedprox": {"mu": 0.5}}

    # Execute / Assert
    assert config_differences(old, current) == []
    assert config_differences(current, _saved("fedavg", "fednas.lr_w=9.0")) == []  # not kept: not fedavg's


def test_the_active_algorithms_own_section_still_decides_and_is_named(tmp_path: Path) -> None:
    from fedmetanas.checkpoint import CheckpointError, check_compatible, config_differences  # noqa: PLC0415

    # Prepare: FedNAS retrains with the fedavg section, so a change there changes its run
    saved, current = _saved("fednas"), _saved("fednas", "fedavg.lr=0.5")
    state = {"config": saved, "next_round": 1, "partition_hash": "h"}

    # Execute / Assert
    assert config_differences(saved, current) == ["fedavg.lr"]
    with pytest.raises(CheckpointError, match=r"different search: fedavg\.lr \(checkpoint 0\.025, now 0\.5\)"):
        check_compatible(state, tmp_path / "round-000001.pt", current, "h")
    # Another algorithm's checkpoint is refused by its name (and the sections the current one reads).
    assert config_differences(_saved("fedavg"), saved)[:1] == ["algorithm.name"]
