"""The captured step (`runtime.capture`, `fedmetanas.capture`): which mode a device gets and why; `graphs`
refused off CUDA; each captured unit — a fixed network's step, K fixed networks through vmap, a supernet's
op, the stacked supernet's op — gives what the eager step gives to float rounding, and really compiled; end
to end, a captured run is bit-identical on 1 and 2 ranks and after a kill and `--resume`, and says so on
the console and in the log. Nets are tiny: on 2 CPU cores every graph costs seconds to compile."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

import h5py
import pytest
import torch
from torch import nn

from fedmetanas import capture
from fedmetanas.algorithms.batched import stacked_losses
from fedmetanas.algorithms.common import LocalContext, copy_state
from fedmetanas.algorithms.fedavg import FedAvgConfig, FedAvgLocal
from fedmetanas.algorithms.fedmetanas import FedMetaNAS
from fedmetanas.config import AlgorithmConfig, ConfigError
from fedmetanas.data.datasets import TensorSplit
from fedmetanas.federated.aggregation import aggregated_tensors
from fedmetanas.search.discrete import DiscreteNet
from fedmetanas.search.genotypes import Genotype
from fedmetanas.search.stacked import stacked_op
from fedmetanas.search.supernet import SuperNet
from tests.helpers import assert_same_run, killed_after, launch, nudged, tiny_overrides

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)


def test_auto_is_off_on_a_cpu_and_on_a_gpu_and_says_why() -> None:
    assert capture.choose_capture("auto", CPU) == capture.CaptureChoice("off", capture.CPU_AUTO_WHY)
    assert "auto on a CPU" in capture.CPU_AUTO_WHY
    assert capture.choose_capture("auto", CUDA).mode == "off"  # not measured on a GPU yet: docs/batched.md
    assert "not captured until measured on a GPU" in capture.choose_capture("auto", CUDA).why


def test_capture_off_unquoted_is_the_mode_off_not_a_boolean(tmp_path: Path) -> None:
    # YAML 1.1 reads an unquoted off as false: in a file and in an override, it still means the mode
    from fedmetanas.configure import load_config  # noqa: PLC0415

    path = tmp_path / "cfg.yaml"
    path.write_text("runtime:\n  capture: off\n")
    assert load_config(str(path)).runtime.capture == "off"
    assert load_config(None, ["runtime.capture=off"]).runtime.capture == "off"
    assert load_config(None, []).runtime.capture == "auto"
    with pytest.raises(ConfigError, match=r"runtime.capture: 'of' is not valid.*did you mean 'off'"):
        load_config(None, ["runtime.capture=of"])


def test_an_explicit_mode_is_taken_and_graphs_needs_cuda() -> None:
    assert capture.choose_capture("compile", CPU) == capture.CaptureChoice("compile", "runtime.capture compile")
    assert capture.choose_capture("off", CUDA).mode == "off"
    assert capture.choose_capture("graphs", CUDA).mode == "graphs"  # pure: no GPU needed to decide
    with pytest.raises(ConfigError, match=r"runtime.capture: graphs needs CUDA graphs.*set runtime.capture: "
                                          r"compile, off or auto"):
        capture.choose_capture("graphs", CPU)
    capture.refuse_capture("compile", CPU)  # no error


def test_a_unit_that_needs_more_graphs_than_the_limit_fails_instead_of_falling_back_to_eager(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: a unit of its own (dynamo keeps graphs per code object) allowed one graph
    def double(x: torch.Tensor) -> torch.Tensor:
        return x * 2.0

    monkeypatch.setattr(capture, "RECOMPILE_LIMIT", 1)
    unit = capture.Captured("double", double, "compile")
    assert torch.equal(unit(torch.ones(3)), torch.full((3,), 2.0))

    # Execute / Assert: a second shape would be a second graph
    with pytest.raises(capture.CaptureError, match=r"'double' would need more than 1 graphs.*runtime.capture: off"):
        unit(torch.ones(4))
    assert unit.graphs == 1


def test_graphs_mode_dry_run_on_a_cpu_compiles_with_cuda_graphs_on_and_computes_what_compile_does() -> None:
    # Prepare: the plumbing of `graphs` on CPU tensors (inductor skips CUDA graphs for them); on a GPU the
    # gpu-marked test below runs it for real
    def step(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return torch.relu(x @ w).sum()

    graphs, compiled = capture.Captured("dry_run", step, "graphs"), capture.Captured("dry_run", step, "compile")
    x, w = torch.randn(8, 8, generator=torch.Generator().manual_seed(0)), torch.randn(8, 8, requires_grad=True)

    # Execute
    got, want = graphs(x, w), compiled(x, w)

    # Assert
    assert graphs.options == {"triton.cudagraphs": True} and compiled.options == {}
    assert graphs.graphs == 1 and compiled.graphs == 1
    assert torch.equal(got, want)
    assert torch.equal(torch.autograd.grad(got, w)[0], torch.autograd.grad(want, w)[0])


# -- each unit against the eager step --------------------------------------------------------------------
SIZE, CLASSES, PER_CLIENT = 8, 3, 24
# Two nodes, ops with and without parameters (BN statistics moved inside the graph), one cell: few graphs.
SMALL = Genotype([[("sep_conv_3x3", 0), ("max_pool_3x3", 1)], [("skip_connect", 0), ("avg_pool_3x3", 2)]], [2, 3],
                 [], [])
PRIMITIVES = ("sep_conv_3x3", "conv_3x3", "max_pool_3x3", "skip_connect")


def _split(clients: int) -> TensorSplit:
    gen = torch.Generator().manual_seed(7)
    n = clients * PER_CLIENT
    return TensorSplit(torch.randint(0, 256, (n, 1, SIZE, SIZE), generator=gen, dtype=torch.uint8),
                       torch.randint(0, CLASSES, (n,), generator=gen), (0.5,), (0.25,), num_classes=CLASSES)


def _fixed() -> nn.Module:
    torch.manual_seed(0)
    return DiscreteNet.from_genotype(SMALL, 1, CLASSES, 4, 1, reduction_layers=())


def _supernet() -> nn.Module:
    torch.manual_seed(0)
    return SuperNet(1, CLASSES, 4, 1, 2, PRIMITIVES, reduction_layers=(), generator=torch.Generator().manual_seed(1))


def _contexts(model: nn.Module, clients: int, mode: str, device: torch.device = CPU) -> list[LocalContext]:
    """Client c: its own rows and (CPU) generators, as the loop derives them, its data on `device`, in the
    memory format a default run uses (`model.channels_last`)."""
    masks = model.initial_masks() if isinstance(model, SuperNet) else None
    split = _split(clients).to(device)
    return [LocalContext(split, torch.arange(c * PER_CLIENT, (c + 1) * PER_CLIENT, device=device), masks, 1.0, "soft",
                         torch.Generator().manual_seed(100 + c), torch.Generator().manual_seed(200 + c),
                         channels_last=True, client_id=c, soft_topk=2, capture=mode) for c in range(clients)]


FEDAVG = FedAvgLocal(FedAvgConfig(local_steps=3, batch_size=8, lr=0.05))
DUAL = FedMetaNAS(AlgorithmConfig(local_steps=2, inner_steps=1, batch_size=8, query_batch_size=8))
# unit -> (network, rule, clients stepped together: 1 one after another)
UNITS: dict[str, tuple[Callable[[], nn.Module], object, int]] = {
    "fixed": (_fixed, FEDAVG, 1), "fixed_batched": (_fixed, FEDAVG, 2), "op": (_supernet, DUAL, 1),
    "stacked_op": (_supernet, DUAL, 2)}
UNIT_FNS = {"fixed": capture.fixed_loss, "fixed_batched": stacked_losses, "op": capture.run_op_fn,
            "stacked_op": stacked_op}


def _update(unit: str, mode: str, build: Callable[[], nn.Module], device: torch.device = CPU) -> torch.Tensor:
    """Every client's aggregated tensors after its local update from `build()`, flattened and concatenated."""
    _, rule, k = UNITS[unit]
    last = torch.channels_last  # a compiled backward hands back grads in other strides in it (a bug found so)
    glob = build().to(device, memory_format=last)
    ctxs = _contexts(glob, 2, mode, device)
    if k > 1:
        update = rule.local_update_batch(glob, ctxs)
        return torch.cat([torch.cat([t.reshape(-1) for t in update.client(c)]) for c in range(len(ctxs))])
    out = []
    for ctx in ctxs:
        worker, task = build().to(device, memory_format=last), build().to(device, memory_format=last)
        copy_state(worker, glob)
        rule.local_update(worker, task, ctx)
        out.append(torch.cat([t.detach().reshape(-1) for t in aggregated_tensors(worker)]))
    return torch.cat(out)


@pytest.mark.parametrize("unit", sorted(UNITS))
def test_a_captured_unit_gives_the_eager_step_to_float_rounding(unit: str) -> None:
    # Prepare
    build = UNITS[unit][0]
    eager = _update(unit, "off", build)
    start = torch.cat([t.detach().reshape(-1) for t in aggregated_tensors(build())] * 2)
    captured = capture.unit(unit, UNIT_FNS[unit], "compile")  # the process's one instance of the unit
    graphs = captured.graphs

    # Execute
    compiled = _update(unit, "compile", build)

    # Assert: it compiled (a unit that fell back to eager would pass the comparison trivially), and it is as
    # close to the eager step as the eager step is to itself from a start nudged by float32 rounding (the
    # fused kernels sum in another order: not the same bits)
    assert captured.graphs > graphs
    size = float((eager - start).norm())
    distance = float((compiled - eager).norm()) / size
    yardstick = max(float((_update(unit, "off", nudged(build, seed)) - eager).norm()) / size for seed in (5, 6))
    assert distance <= 2 * yardstick + 1e-5, (distance, yardstick)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("mode", ["compile", "graphs"])
@pytest.mark.parametrize("unit", sorted(UNITS))
def test_on_a_gpu_a_captured_unit_gives_the_eager_step_to_rounding_and_the_same_bits_twice(unit: str, mode: str) -> None:
    # Prepare: the eager step on the GPU, and how far it moves from a start nudged by float32 rounding
    build, cuda = UNITS[unit][0], torch.device("cuda")
    eager = _update(unit, "off", build, cuda)
    start = torch.cat([t.detach().reshape(-1) for t in aggregated_tensors(build())] * 2).to(cuda)
    yardstick = max(float((_update(unit, "off", nudged(build, seed), cuda) - eager).norm()) for seed in (5, 6))

    # Execute: twice (the second replays what the first compiled, or recorded as CUDA graphs)
    first, second = _update(unit, mode, build, cuda), _update(unit, mode, build, cuda)

    # Assert: under one mode the same bits (the determinism contract), and within rounding of eager
    assert torch.equal(first, second)
    size = float((eager - start).norm())
    assert float((first - eager).norm()) / size <= 2 * yardstick / size + 1e-5


# -- end to end ----------------------------------------------------------------------------------------------
SMALL_BOTH = SMALL._replace(reduce=[[("max_pool_3x3", 0), ("sep_conv_3x3", 1)], [("skip_connect", 2),
                                                                                 ("avg_pool_3x3", 1)]],
                            reduce_concat=[2, 3]).to_string()
CAPTURED = ["runtime.capture=compile", "federated.rounds=3", "checkpoint.keep=10", "personalize.steps=0"]
FIXED_RUN = ["algorithm.name=fedavg", f"fedavg.architecture={SMALL_BOTH}", "fedavg.local_steps=2",
             "fedavg.batch_size=16"]
SEARCH_RUN = ["model.primitives=[sep_conv_3x3, max_pool_3x3, skip_connect]", "search.gumbel=soft", "search.soft_topk=2",
              "search.hard_after_fraction=0.5"]


def _supernet_of(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "supernet.pt", weights_only=False)["state_dict"]


@pytest.mark.mpi
def test_a_captured_fedavg_run_is_the_same_on_one_and_two_ranks(data_root: Path, tmp_path: Path) -> None:
    # Execute
    runs = {np: launch(tiny_overrides(data_root, tmp_path, f"np{np}") + CAPTURED + FIXED_RUN, np=np) for np in (1, 2)}

    # Assert: captured (the console and the log say so), and rank-invariant to the bit
    for run in runs.values():
        assert run.returncode == 0, run.stderr[-3000:]
    assert "step captured: compile, unit fixed (runtime.capture compile)" in runs[2].stderr
    assert "captured step: " in runs[2].stderr and "graphs compiled on rank 0" in runs[2].stderr
    with h5py.File(tmp_path / "np2" / "trajectory.h5", "r") as f:
        assert [v.decode() for v in f["rounds/capture"][()]] == ["compile"] * 3
    assert_same_run(tmp_path / "np2", tmp_path / "np1", rounding=("rounds/discrete_loss",))


@pytest.mark.mpi
def test_a_captured_search_is_rank_invariant_and_resumes_bit_identical(data_root: Path, tmp_path: Path) -> None:
    # Prepare: the shipped schedule's relaxations (sparse soft top-2, then hard) with the ops captured; a run
    # killed with SIGKILL as soon as round 1's checkpoint lands
    runs = {np: launch(tiny_overrides(data_root, tmp_path, f"np{np}") + CAPTURED + SEARCH_RUN, np=np) for np in (1, 2)}
    args = tiny_overrides(data_root, tmp_path, "killed") + CAPTURED + SEARCH_RUN
    killed_after(args, 2, tmp_path / "killed" / "checkpoints" / "round-000001.pt")

    # Execute
    resumed = launch(args + ["--resume"], np=2)

    # Assert: 1 rank == 2 ranks == killed and resumed (which compiled its graphs again), to the bit
    for run in (*runs.values(), resumed):
        assert run.returncode == 0, run.stderr[-3000:]
    assert "step captured: compile, unit op (runtime.capture compile)" in runs[2].stderr
    assert "resumed from" in resumed.stderr
    one, two, back = (_supernet_of(tmp_path / name) for name in ("np1", "np2", "killed"))
    for key in one:
        assert torch.equal(one[key], two[key]), key
        assert torch.equal(back[key], two[key]), key
