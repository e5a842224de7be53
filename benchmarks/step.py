"""Supernet training-step time: soft (all ops), hard Gumbel (one op per edge), each with pruned masks,
and the levers that make the soft relaxation cheaper (a sparse soft sample: the top-k ops per edge,
or only ops whose relaxed weight is at least eps).

Measured side by side in one process, interleaved, on one thread; prints ms per step and the ratios
to soft. The pruned masks are those a search has late on: `--keep-ops` ops per edge and one input
pair per node left. `--tau` is the temperature of the samples (the eps lever skips more as it falls).

    .venv/bin/python benchmarks/step.py [--size 28] [--channels 8] [--batch 32] [--repeats 20] [--tau 1.0]
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
    p.add_argument("--tau", type=float, default=1.0, help="temperature of the relaxed samples")
    p.add_argument("--stem-stride", type=int, default=2, help="configs/default.yaml's")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    g = torch.Generator().manual_seed(0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = SuperNet(1, 10, args.channels, args.layers, args.nodes, resolve_primitives(args.primitives), generator=g,
                       stem_stride=args.stem_stride)
    net = net.to(memory_format=torch.channels_last)
    x = torch.randn(args.batch, 1, args.size, args.size, generator=g).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (args.batch,), generator=g)
    full, pruned = net.initial_masks(), pruned_masks(net, args.keep_ops, g)
    variants = {"soft": ("soft", full, 0, 0.0), "soft+pruned": ("soft", pruned, 0, 0.0),
                "soft top-2": ("soft", full, 2, 0.0), "soft top-3": ("soft", full, 3, 0.0),
                "soft eps 0.05": ("soft", full, 0, 0.05), "soft eps 0.01": ("soft", full, 0, 0.01),
                "hard": ("hard", full, 0, 0.0), "hard+pruned": ("hard", pruned, 0, 0.0)}

    def step(mode: str, masks: ArchMasks, topk: int, eps: float) -> float:
        t = time.perf_counter()
        arch = sample_arch(net, masks, args.tau, mode, g, topk=topk, eps=eps)
        loss = torch.nn.functional.cross_entropy(net(x, arch), y)
        net.zero_grad()
        loss.backward()
        return time.perf_counter() - t

    for variant in variants.values():  # warm-up
        step(*variant)
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.repeats):  # interleaved so drift in machine load hits all variants alike
        for name, variant in variants.items():
            times[name].append(step(*variant))
    ms = {k: 1000 * statistics.median(v) for k, v in times.items()}
    print(f"supernet step: {args.size}x{args.size}, C={args.channels}, {args.layers} cells x {args.nodes} nodes, "
          f"batch {args.batch}, {args.primitives} primitives, stem stride {args.stem_stride}, tau {args.tau:g}, "
          f"{args.threads} thread(s), median of {args.repeats}")
    for k, v in ms.items():
        print(f"  {k:14s} {v:8.1f} ms   {v / ms['soft']:.3f} x soft")
    return 0


if __name__ == "__main__":
    sys.exit(main())
