"""Supernet training-step time: soft (all ops), hard Gumbel (one op per edge), and each with pruned masks.

Measured side by side in one process, interleaved, on one thread; prints ms per step and the ratios
to soft. The pruned masks are those a search has late on: `--keep-ops` ops per edge and one input
pair per node left.

    .venv/bin/python benchmarks/step.py [--size 28] [--channels 8] [--batch 32] [--repeats 20]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch


from fedmetanas.search.genotypes import resolve_primitives
from fedmetanas.search.supernet import ArchMasks, SuperNet, sample_arch


def pruned_masks(net: SuperNet, keep_ops: int, generator: torch.Generator) -> ArchMasks:
    """Masks keeping `keep_ops` random ops per edge and one valid pair per node."""
    masks = net.initial_masks()
    for kind, m in masks.ops.items():
        scores = torch.rand(m.shape, generator=generator)
        keep = scores.argsort(dim=1, descending=True)[:, :keep_ops]
        masks.ops[kind] = torch.zeros_like(m).scatter_(1, keep, True)
    if masks.pairs is not None:
        for kind, m in masks.pairs.items():
            first_valid = m.float().argmax(dim=1, keepdim=True)
            masks.pairs[kind] = torch.zeros_like(m).scatter_(1, first_valid, True)
    return masks


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=28, help="input resolution")
    p.add_argument("--channels", type=int, default=8)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--nodes", type=int, default=3)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--primitives", default="metanas")
    p.add_argument("--keep-ops", type=int, default=2)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    g = torch.Generator().manual_seed(0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = SuperNet(1, 10, args.channels, args.layers, args.nodes, resolve_primitives(args.primitives), generator=g)
    net = net.to(memory_format=torch.channels_last)
    x = torch.randn(args.batch, 1, args.size, args.size, generator=g).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (args.batch,), generator=g)
    full, pruned = net.initial_masks(), pruned_masks(net, args.keep_ops, g)
    variants = {"soft": ("soft", full), "soft+pruned": ("soft", pruned),
                "hard": ("hard", full), "hard+pruned": ("hard", pruned)}

    def step(mode: str, masks: ArchMasks) -> float:
        t = time.perf_counter()
        arch = sample_arch(net, masks, 1.0, mode, g)
        loss = torch.nn.functional.cross_entropy(net(x, arch), y)
        net.zero_grad()
        loss.backward()
        return time.perf_counter() - t

    for mode, masks in variants.values():  # warm-up
        step(mode, masks)
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.repeats):  # interleaved so drift in machine load hits all variants alike
        for name, (mode, masks) in variants.items():
            times[name].append(step(mode, masks))
    ms = {k: 1000 * statistics.median(v) for k, v in times.items()}
    print(f"supernet step: {args.size}x{args.size}, C={args.channels}, {args.layers} cells x {args.nodes} nodes, "
          f"batch {args.batch}, {args.primitives} primitives, {args.threads} thread(s), median of {args.repeats}")
    for k, v in ms.items():
        print(f"  {k:12s} {v:8.1f} ms   {v / ms['soft']:.3f} x soft")
    return 0


if __name__ == "__main__":
    sys.exit(main())
