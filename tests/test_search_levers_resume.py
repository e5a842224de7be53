"""A search with the shipped default's levers — sparse soft sample, hybrid switch to hard sampling,
evidence-based pruning — resumes bit-identically: the pruning evidence (rounds each entry has stayed
below the threshold) is part of the checkpoint, so a run stopped after round 1 and resumed prunes
exactly when the uninterrupted run does."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch

from tests.helpers import launch, tiny_overrides

LEVERS = ["federated.rounds=4", "search.gumbel=soft", "search.soft_topk=2", "search.hard_after_fraction=0.75",
          "search.prune_patience=2", "search.op_prune_threshold=0.14", "search.pair_prune_threshold=0.34",
          "personalize.steps=0"]


def _final(run_dir: Path) -> tuple[dict[str, np.ndarray], dict[str, torch.Tensor], str]:
    saved = torch.load(run_dir / "supernet.pt", weights_only=False)
    return ({k: v.numpy() for k, v in saved["state_dict"].items()}, saved["masks"],
            (run_dir / "genotype.txt").read_text())


def test_pruning_evidence_survives_a_stop_and_resume_bit_identically(data_root: Path, tmp_path: Path) -> None:
    ref_args = tiny_overrides(data_root, tmp_path, "ref") + LEVERS
    assert launch(ref_args).returncode == 0
    args = tiny_overrides(data_root, tmp_path, "cut") + LEVERS
    first = launch(args + ["federated.time_budget_s=0.001"])  # ends after round 1, checkpointed
    assert first.returncode == 0, first.stderr[-3000:]
    state = torch.load(tmp_path / "cut" / "checkpoints" / "round-000001.pt", weights_only=False)
    assert any(int(v.sum()) > 0 for v in state["prune_below"].values())  # evidence counted, nothing cut yet

    proc = launch(args + ["federated.time_budget_s=0", "--resume"])

    assert proc.returncode == 0, proc.stderr[-3000:]
    (w, masks, genotype), (w_ref, masks_ref, genotype_ref) = _final(tmp_path / "cut"), _final(tmp_path / "ref")
    assert genotype == genotype_ref
    assert all(np.array_equal(w[k], w_ref[k]) for k in w_ref)
    assert all(torch.equal(masks[k], masks_ref[k]) for k in masks_ref)
    initial = sum(int(m.numel()) for k, m in masks_ref.items() if k.startswith("alpha"))
    assert sum(int(m.sum()) for k, m in masks_ref.items() if k.startswith("alpha")) < initial  # pruning acted
    shutil.rmtree(tmp_path / "cut" / "checkpoints")
