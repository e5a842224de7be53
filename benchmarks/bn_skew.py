"""Are the global net's batch-norm statistics what label skew costs? (issue 23, item 3: BN under skew)

    python benchmarks/bn_skew.py runs/<name> [runs/<name> ...]

A finished FedMetaNAS run's global discrete net (the final round's model, masks and genotype, read from its
newest checkpoint) evaluated on the full test set with four sets of BN running statistics, everything else
unchanged:

- `averaged`: the run's own: each client's running statistics (an exponential average over its local
  steps' batches) averaged by the server with the weights, as every federated round does;
- `pooled`: recomputed on all clients' training data pooled, as if one party held it (an oracle: what the
  statistics would be without skew);
- `second moments`: each client's own statistics over its data, aggregated as a federated recalibration
  round could (sample-weighted means of E[x] and E[x^2]: the variance includes the spread between clients'
  means);
- `mean of variances`: the same client statistics, variances averaged plainly (what averaging running_var
  does, with the spread between clients left out).

Statistics are collected as PyTorch's `update_bn` does: forward passes in train mode (each layer's input
normalized by batch statistics above it), batches of 64, no gradient. Writes nothing.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
from torch import nn

from fedmetanas.checkpoint import load_latest
from fedmetanas.configure import config_from_dict
from fedmetanas.dist import init_distributed
from fedmetanas.federated.evaluation import evaluate
from fedmetanas.federated.loop import Loop
from fedmetanas.search.supernet import arch_from_genotype

Moments = list[tuple[torch.Tensor, torch.Tensor] | None]  # per BN layer: (E[x], E[x^2]); None: layer unused


def moments(net: nn.Module, forward, split, idx: torch.Tensor, channels_last: bool) -> tuple[Moments, int]:  # noqa: ANN001
    """Per BN layer, the mean and second moment of its input over `idx` (float64), and the sample count."""
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    sums: list[list[torch.Tensor] | None] = [None] * len(bns)
    counts = [0] * len(bns)

    def hook(i: int):  # noqa: ANN202
        def record(_mod: nn.Module, inputs: tuple[torch.Tensor, ...], _out: torch.Tensor) -> None:
            x = inputs[0].detach().double()
            n = x.shape[0] * x.shape[2] * x.shape[3]
            s = [x.mean((0, 2, 3)) * n, (x * x).mean((0, 2, 3)) * n]
            sums[i] = s if sums[i] is None else [sums[i][0] + s[0], sums[i][1] + s[1]]
            counts[i] += n
        return record

    handles = [m.register_forward_hook(hook(i)) for i, m in enumerate(bns)]
    net.train()
    with torch.no_grad():
        for start in range(0, len(idx), 64):
            x, _ = split.batch(idx[start:start + 64])
            forward(x.contiguous(memory_format=torch.channels_last) if channels_last else x)
    for h in handles:
        h.remove()
    return [None if s is None else (s[0] / c, s[1] / c) for s, c in zip(sums, counts)], len(idx)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="finished FedMetaNAS run directories (runs/<name>)")
    args = p.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    ctx = init_distributed("cpu", 1)
    print("| run | averaged (the run's) % | pooled (oracle) % | second moments % | mean of variances % |\n"
          "| --- | --- | --- | --- | --- |")
    for run in args.runs:
        found = load_latest(run / "checkpoints")
        if found is None:
            raise SystemExit(f"{run}/checkpoints: no checkpoint; the run must have finished")
        cfg = config_from_dict(found[0]["config"], ["output.resume=true", f"output.dir={run.parent}",
                                                    f"output.name={run.name}"])
        loop = Loop(cfg, ctx)
        loop._resume()  # the final round's model, masks and genotype
        net, setup, phase = loop.cur.net, loop.setup, loop.phase
        plan = phase.round_plan(loop.end_round - 1)
        arch = arch_from_genotype(net, phase.current_genotype(net, plan))
        forward = lambda x: net(x, arch)  # noqa: E731
        bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
        saved = [(m.running_mean.clone(), m.running_var.clone()) for m in bns]

        def accuracy(stats: list[tuple[torch.Tensor, torch.Tensor] | None]) -> float:
            """Test accuracy (%) with `stats` (mean, variance) in the BN layers the net uses."""
            with torch.no_grad():
                for m, (mean, var), s in zip(bns, saved, stats):
                    m.running_mean.copy_(mean if s is None else s[0].float())
                    m.running_var.copy_(var if s is None else s[1].float())
            net.eval()
            out = evaluate(forward, setup.test, torch.arange(len(setup.test)), cfg.eval.batch_size,
                           cfg.model.channels_last)
            return 100 * float(out[1] / out[2])

        cl = cfg.model.channels_last
        pooled, _ = moments(net, forward, setup.train, torch.cat([setup.train_idx[c] for c in range(len(setup.clients))]), cl)
        clients = [moments(net, forward, setup.train, setup.train_idx[c], cl) for c in range(len(setup.clients))]
        total = sum(n for _, n in clients)
        second, plain = [], []
        for i in range(len(bns)):
            if clients[0][0][i] is None:
                second.append(None)
                plain.append(None)
                continue
            mean = sum(n * m[i][0] for m, n in clients) / total
            sq = sum(n * m[i][1] for m, n in clients) / total
            second.append((mean, sq - mean * mean))
            plain.append((mean, sum(n * (m[i][1] - m[i][0] ** 2) for m, n in clients) / total))
        figures = [accuracy([None] * len(bns)), accuracy([None if s is None else (s[0], s[1] - s[0] ** 2)
                                                          for s in pooled]), accuracy(second), accuracy(plain)]
        print(f"| {run.name} | " + " | ".join(f"{a:.2f}" for a in figures) + " |", flush=True)


if __name__ == "__main__":
    main()
