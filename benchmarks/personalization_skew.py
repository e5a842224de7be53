"""Per-client diagnosis of FedMetaNAS personalization on a finished run (issue 23): which part of the
adaptation changes a client's accuracy, measured on the run's own final model without re-running the search.

    python benchmarks/personalization_skew.py runs/<name> [--variants shipped discrete ...] [--steps 5]

For each client: the classes it holds (train and local test split), its accuracy before personalization
(the global discrete net) and after each variant of the adaptation, on its local test split and on its own
train split, and what the adaptation changed (ops flipped in the re-derived genotype, the largest logit
change, the relative change of the discrete net's weights, the shift of its BN running means). Every
variant starts from the same global model and draws from the same generators (the run's personalization
streams; a hold-out draws its split first), so the differences are the rules'. Reads the run's newest checkpoint (the final round's
model and masks); writes nothing unless --json is given.

Variants: `shipped` the old rule (task learner on weights and logits, BN in train mode, net re-derived from
the adapted logits); `shipped_global_genotype` / `shipped_bn_global` the same, evaluated with the global
genotype / with the global BN statistics put back; `frozen_alphas` the task learner with the logits
frozen; `discrete[_bn_frozen][_lr1]` Adam on the global discrete net's weights, BN in train mode or frozen,
at the last round's rate or at the full inner rate; `rule[key=value,...]` FedMetaNAS.personalize under the
run's `personalize` settings with those keys replaced (e.g. `rule[adapt=discrete,bn=frozen,holdout=0.2]`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from fedmetanas.algorithms.common import LocalContext, clip_weight_grads, copy_state, draw_batch
from fedmetanas.algorithms.fedmetanas import FedMetaNAS
from fedmetanas.checkpoint import load_latest
from fedmetanas.configure import config_from_dict
from fedmetanas.dist import init_distributed
from fedmetanas.federated.evaluation import evaluate
from fedmetanas.federated.loop import Loop
from fedmetanas.search.genotypes import Genotype
from fedmetanas.search.supernet import SuperNet, arch_from_genotype, derive_genotype


def flips(a: Genotype, b: Genotype) -> int:
    """Edges (op, input) of the two genotypes' cells that differ."""
    return sum(x != y for kind in ("normal", "reduce") for na, nb in zip(getattr(a, kind), getattr(b, kind))
               for x, y in zip(na, nb))


def adapt_discrete(task: SuperNet, ctx: LocalContext, genotype: Genotype, steps: int, lr: float,
                   betas: tuple[float, float], batch_size: int, grad_clip: float, bn: str) -> None:
    """Adam on the weights of the fixed discrete net `genotype` (alphas untouched); `bn`: 'train' (batch
    statistics, running statistics updated) or 'frozen' (the global running statistics, eval mode)."""
    arch = arch_from_genotype(task, genotype)
    opt = torch.optim.Adam(task.weights(), lr=lr, betas=betas)
    task.train(bn == "train")
    for _ in range(steps):
        x, y = draw_batch(ctx, ctx.train_idx, batch_size)
        loss = nn.functional.cross_entropy(task(x, arch), y)
        task.zero_grad(set_to_none=True)
        loss.backward()
        clip_weight_grads(task, grad_clip)
        opt.step()
    task.train()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path, help="a finished run directory (runs/<name>) with checkpoints/")
    p.add_argument("--steps", type=int, default=0, help="adaptation steps (0: the run's personalize.steps)")
    p.add_argument("--variants", nargs="+", default=["shipped", "shipped_global_genotype", "frozen_alphas",
                                                     "discrete", "discrete_bn_frozen", "discrete_lr1",
                                                     "discrete_bn_frozen_lr1"])
    p.add_argument("--json", type=Path, default=None, help="write the per-client numbers here")
    args = p.parse_args()
    found = load_latest(args.run / "checkpoints")
    if found is None:
        raise SystemExit(f"{args.run}/checkpoints: no checkpoint; the run must have finished")
    state, _ = found
    cfg = config_from_dict(state["config"], ["output.resume=true", f"output.dir={args.run.parent}",
                                           f"output.name={args.run.name}"])
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    ctx = init_distributed("cpu", 1)
    loop = Loop(cfg, ctx)
    loop._resume()  # the final round's model, masks and genotype
    end, phase, net, setup = loop.end_round, loop.phase, loop.cur.net, loop.setup
    a = cfg.algorithm
    steps = args.steps or cfg.personalize.steps
    plan = phase.round_plan(end - 1)
    g0 = phase.current_genotype(net, plan)
    arch0 = arch_from_genotype(net, g0)
    worker, task = loop.cur.executors[0].worker, loop.cur.executors[0].task
    rule = FedMetaNAS(a)
    labels = setup.train.labels
    print(f"run {args.run}: {cfg.data.name} alpha {cfg.data.dirichlet_alpha}, end round {end}, tau {plan.tau:.3f}, "
          f"relax {plan.relax_mode}, lr_scale {plan.lr_scale:.4f} (weights' rate {a.inner_lr_w * plan.lr_scale:.2e}, "
          f"alphas' {a.inner_lr_alpha}), steps {steps}\nglobal genotype {g0.to_string()}")

    def acc(forward: Callable[[torch.Tensor], torch.Tensor], idx: torch.Tensor) -> float:
        s = evaluate(forward, setup.train, idx, cfg.eval.batch_size)
        return float(s[1] / s[2]) if s[2] > 0 else float("nan")

    def classes(idx: torch.Tensor) -> str:
        counts = torch.bincount(labels[idx], minlength=setup.train.num_classes)
        share = counts.float() / max(1, int(counts.sum()))
        return " ".join(f"{c}:{100 * float(share[c]):.0f}%" for c in torch.argsort(-counts).tolist()
                        if share[c] >= 0.02)

    def bn_means(m: nn.Module) -> list[torch.Tensor]:
        return [b.clone() for name, b in m.named_buffers() if name.endswith("running_mean")]

    def discrete_weights(m: SuperNet) -> list[torch.Tensor]:
        """The weights the discrete net uses: those that receive a gradient through it."""
        m.zero_grad(set_to_none=True)
        x = setup.train.images[:2].float()
        m.eval()
        m(x, arch0).sum().backward()
        m.train()
        out = [p.detach().clone() for p in m.weights() if p.grad is not None]
        m.zero_grad(set_to_none=True)
        return out

    net.eval()
    w_global, bn_global = discrete_weights(net), bn_means(net)
    rows = []
    for cid in range(len(setup.clients)):
        test_idx, train_idx = setup.clients[cid].test_idx, setup.train_idx[cid]
        net.eval()
        row = {"client": cid, "n_train": int(train_idx.numel()), "n_test": int(test_idx.numel()),
               "train_classes": classes(train_idx), "test_classes": classes(test_idx),
               "before": acc(lambda x: net(x, arch0), test_idx),
               "before_train": acc(lambda x: net(x, arch0), train_idx)}
        net.train()
        for v in args.variants:
            lr_scale = 1.0 if v.endswith("_lr1") else plan.lr_scale
            c = loop.work.context(loop.cur, cid, dataclasses.replace(plan, lr_scale=lr_scale), end, 1)
            copy_state(worker, net)
            copy_state(task, net)
            genotype, forward = g0, None
            if v in ("shipped", "shipped_global_genotype", "shipped_bn_global", "frozen_alphas"):
                if v == "frozen_alphas":
                    c.train_arch = False
                rule.adapt(task, c, steps)
                if v in ("shipped", "shipped_bn_global"):
                    genotype = derive_genotype(task, c.masks, c.tau)
                if v == "shipped_bn_global":
                    with torch.no_grad():
                        torch._foreach_copy_(task.buffer_list(), net.buffer_list())
            elif v.startswith("rule"):  # the shipped rule under personalize settings: rule[adapt=discrete,bn=batch]
                given = dict(kv.split("=") for kv in v[5:-1].split(",") if kv) if "[" in v else {}
                over = [f"personalize.{k}={val}" for k, val in given.items()]
                pcfg = config_from_dict(state["config"], over).personalize
                forward = FedMetaNAS(a, pcfg).personalize(worker, task, c, steps)
                if pcfg.adapt == "supernet":
                    genotype = derive_genotype(task, c.masks, c.tau)
            elif v.startswith("discrete"):
                bn = "frozen" if "bn_frozen" in v else "train"
                adapt_discrete(task, c, g0, steps, a.inner_lr_w * lr_scale, a.inner_betas, a.batch_size,
                               a.grad_clip, bn)
            else:
                raise SystemExit(f"--variants: unknown variant {v!r}")
            arch = arch_from_genotype(task, genotype)
            if not v.startswith("rule"):
                forward = lambda x, arch=arch: task(x, arch)  # noqa: E731
            worker.eval()
            task.eval()
            after, after_train = acc(forward, test_idx), acc(forward, train_idx)
            worker.train()
            with torch.no_grad():
                dalpha = max(float((pa - pb).abs().max()) for pa, pb in zip(task.alphas(), net.alphas()))
            w = discrete_weights(task)
            dw = float(torch.sqrt(sum(((x - y) ** 2).sum() for x, y in zip(w, w_global))) /
                       torch.sqrt(sum((y ** 2).sum() for y in w_global)))
            dbn = max(float((x - y).abs().max()) for x, y in zip(bn_means(task), bn_global))
            task.train()
            row[v] = {"after": after, "after_train": after_train, "flips": flips(genotype, g0), "dalpha": dalpha,
                      "dw_rel": dw, "dbn_mean": dbn}
        rows.append(row)
        print(f"client {cid} train {row['n_train']} [{row['train_classes']}] test {row['n_test']} "
              f"[{row['test_classes']}] before {100 * row['before']:.1f} (train {100 * row['before_train']:.1f})")
        for v in args.variants:
            r = row[v]
            print(f"   {v:26s} after {100 * r['after']:5.1f} (train {100 * r['after_train']:5.1f})  "
                  f"flips {r['flips']}  max|dalpha| {r['dalpha']:.3f}  |dw|/|w| {r['dw_rel']:.4f}  "
                  f"max|dBN mean| {r['dbn_mean']:.3f}", flush=True)
    print("\nsummary (local test split, %): mean before / after, worst-10% after, largest drop")
    before = np.array([r["before"] for r in rows])
    for v in args.variants:
        after = np.array([r[v]["after"] for r in rows])
        k = max(1, int(np.ceil(0.1 * len(after))))
        drop = before - after
        print(f"   {v:26s} {100 * before.mean():.2f} / {100 * after.mean():.2f}  worst10 "
              f"{100 * np.sort(after)[:k].mean():.2f}  largest drop {100 * drop.max():.1f} (client "
              f"{int(drop.argmax())})  clients lowered > 1 pt: {int((drop > 0.01).sum())}")
    if args.json is not None:
        args.json.write_text(json.dumps({"run": str(args.run), "steps": steps, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
