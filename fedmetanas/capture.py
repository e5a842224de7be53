"""The captured step (`runtime.capture`): a fixed-shape unit of the local step compiled once, then replayed.

A client step is thousands of tiny kernels (6,279 CUDA launches for a demo-size meta-step on an H200).
`compile` runs a unit through `torch.compile` (inductor, `dynamic=False`): elementwise ops fuse (BN + ReLU,
the loss), and the backward is compiled with the forward (AOTAutograd). `graphs` adds CUDA graphs
(`mode="reduce-overhead"`): one launch replays a whole captured region. Only the arithmetic is captured;
what the host decides — the batches, each client's Gumbel draws from its own generator, which ops a sample
computes (`sample_arch`, `step_use`), the optimizers — stays outside, exactly as when nothing is captured.

The units (docs/batched.md, "The captured step"):

- `fixed`: a fixed network's forward and loss on a batch (FedAvg, FedProx, SCAFFOLD, Per-FedAvg, FedNAS's
  retraining, one client after another);
- `fixed_batched`: the same for K clients at once, `vmap` over `functional_call` (`batched.ClientStack`);
- `op`: one candidate op of a supernet edge on its input (the sequential supernet step): the op's
  computation has one shape per op and cell, whichever ops a sample draws, so what a step samples never
  causes a recompile; `nn.Identity` is never handed to the compiler (it is no computation, and a frame
  without ops makes dynamo skip the function for good);
- `stacked_op`: one op of the stacked supernet on every client and edge leaving a state (`search.stacked`),
  for the same reason per op rather than per union of the clients' ops.

Determinism: compiled kernels are fixed by the unit's code and input shapes (`dynamic=False`: a new shape
is a new graph, never a dynamic one chosen by the order shapes arrive in), so under one mode a client's
update does not depend on the rank that runs it, on the rank count, or on a resume (which compiles
again). A unit that would need more than `RECOMPILE_LIMIT` graphs fails loudly instead of falling back to
eager for the shapes that come late (which would make a resumed run differ from the uninterrupted one).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Literal

import torch

from fedmetanas.config import ConfigError

log = logging.getLogger(__name__)

CaptureMode = Literal["off", "compile", "graphs"]
# Graphs one unit may compile (per code object: dynamo keeps its cache there). Measured on the default search:
# the op unit 32 over a whole run (7 ops at the cells' shapes and strides), stacked_op 56 at one batch size (a
# graph per op, shape, edge count and K: a last, smaller batch of a round adds as many again).
RECOMPILE_LIMIT = 256

# Why `auto` is off on a CPU (docs/batched.md, "The captured step": measured on this 2-core machine).
CPU_AUTO_WHY = ("auto on a CPU: the compiled step measured slower here (0.7-0.9x) and compiling takes minutes "
                "(docs/batched.md, the captured step)")
CUDA_AUTO_WHY = ("auto on a GPU: not captured until measured on a GPU (docs/batched.md, the captured step; "
                 "runtime.capture: graphs or compile to try it)")


@dataclass(frozen=True)
class CaptureChoice:
    """How a phase's local step runs (`off`, `compile`, `graphs`) and the reason the console gives."""

    mode: CaptureMode
    why: str

    @property
    def captured(self) -> bool:
        return self.mode != "off"


def refuse_capture(setting: str, device: torch.device) -> None:
    """`runtime.capture: graphs` needs CUDA: one error naming the field and the fix on any other device."""
    if setting == "graphs" and device.type != "cuda":
        raise ConfigError(f"runtime.capture: graphs needs CUDA graphs, but this rank runs on the {device.type.upper()}; "
                          "set runtime.capture: compile, off or auto (or run on a GPU)")


def choose_capture(setting: str, device: torch.device) -> CaptureChoice:
    """The mode a rank's local steps run under: `setting` (`runtime.capture`) resolved for `device`. Pure."""
    if setting == "auto":
        return CaptureChoice("off", CUDA_AUTO_WHY if device.type == "cuda" else CPU_AUTO_WHY)
    refuse_capture(setting, device)
    return CaptureChoice(setting, f"runtime.capture {setting}")  # type: ignore[arg-type]


class CaptureError(RuntimeError):
    """A captured unit met more shapes than `RECOMPILE_LIMIT` graphs cover (never silently run eagerly)."""


@dataclass
class CaptureStats:
    """What the captured units of this process compiled: graphs (every recompile included) and the
    seconds the compiler spent on the forward graphs (a backward is compiled at its first use, not counted)."""

    graphs: int = 0
    seconds: float = 0.0


STATS = CaptureStats()


def log_compiled() -> None:
    """Say at the end of a run what this process compiled (nothing when nothing was captured)."""
    if STATS.graphs:
        log.info("captured step: %d graphs compiled on rank 0 (%.1f s in the compiler, forward graphs)",
                 STATS.graphs, STATS.seconds)


class Captured:
    """`fn` compiled for `mode` (`compile` or `graphs`), `dynamic=False`; every graph it compiles is
    counted in `STATS` and in its own `graphs`."""

    def __init__(self, name: str, fn: Callable[..., Any], mode: CaptureMode) -> None:
        if mode == "off":
            raise ValueError("Captured: mode off is the plain function")
        import torch._dynamo  # noqa: PLC0415 - the compiler loads only where something is captured

        self.name, self.mode, self.graphs = name, mode, 0
        # What torch.compile(mode=...) itself hands dynamo: inductor with the mode's options (graphs: CUDA graphs).
        inductor = torch._TorchCompileInductorWrapper("reduce-overhead" if mode == "graphs" else None, None, False)
        self.options = dict(inductor.config)  # graphs: {"triton.cudagraphs": True}; compile: inductor's defaults

        def backend(gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]) -> Callable[..., Any]:
            t = time.perf_counter()
            compiled = inductor(gm, example_inputs)
            self.graphs += 1
            STATS.graphs += 1
            STATS.seconds += time.perf_counter() - t
            return compiled

        self._fn = torch.compile(fn, backend=backend, dynamic=False)

    def __call__(self, *args: Any) -> Any:
        # Dynamo checks the limit when a call misses its cache. Set for the process, where only these units
        # compile (as a `config.patch` around every call it cost 24 us a call).
        config = torch._dynamo.config
        if config.recompile_limit != RECOMPILE_LIMIT or not config.fail_on_recompile_limit_hit:
            config.recompile_limit = RECOMPILE_LIMIT
            config.accumulated_recompile_limit = 16 * RECOMPILE_LIMIT
            config.fail_on_recompile_limit_hit = True
        try:
            return self._fn(*args)
        except torch._dynamo.exc.FailOnRecompileLimitHit as err:
            raise CaptureError(f"runtime.capture: {self.mode}: the captured unit {self.name!r} would need more than "
                               f"{RECOMPILE_LIMIT} graphs (one per shape and op); set runtime.capture: off for this "
                               "run") from err


_UNITS: dict[tuple[str, str], Captured] = {}


def unit(name: str, fn: Callable[..., Any], mode: CaptureMode) -> Callable[..., Any]:
    """The unit `name` (`fn`) for `mode`: `fn` itself when off, else one `Captured` per (name, mode) for the
    whole process (dynamo's cache lives on `fn`'s code object, whichever replica or stack calls it)."""
    if mode == "off":
        return fn
    key = (name, mode)
    if key not in _UNITS:
        _UNITS[key] = Captured(name, fn, mode)
    return _UNITS[key]


# ------------------------------------------------------------------------------------------------
# The units' functions (module level: one code object each, so each unit has its own recompile budget)


def fixed_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
               loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Unit `fixed`: a fixed network's loss on one batch."""
    return loss(model(x), y)


def run_op_fn(op: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Unit `op`: one candidate op of a supernet edge."""
    return op(x)


OpRunner = Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]


def op_runner(mode: CaptureMode) -> OpRunner | None:
    """How a supernet runs its edges' ops under `mode`: None (plainly) when off, else the `op` unit, with
    `nn.Identity` left out (no computation; see the module)."""
    if mode == "off":
        return None
    captured = unit("op", run_op_fn, mode)

    def run(op: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        return x if isinstance(op, torch.nn.Identity) else captured(op, x)

    return run
