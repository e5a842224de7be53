"""Simulator overhead: a federated round of the framework vs a bare PyTorch loop doing the same steps.

Both run in this one process on one thread, on the same data, clients, batches and Gumbel draws
(same generators), interleaved round by round. The bare loop is plain torch: per client, copy the
global model, do FedMetaNAS's meta-steps with torch.optim, then a plain weighted average of the
clients' tensors. The framework adds scheduling, the flat float64 buffer and its all-reduce (gloo,
world size 1), soft-pruning masks, genotype decoding and the HDF5 log. The script checks that both
end with the same global model (so they did the same work) and prints the time ratio.

    .venv/bin/python benchmarks/overhead.py [--rounds 4] [--clients 4] [section.key=value ...]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


from fedmetanas.configure import load_config
from fedmetanas.data.client_data import sample_batch
from fedmetanas.dist import init_distributed, shutdown
from fedmetanas.federated.loop import Loop
from fedmetanas.seeding import Purpose, torch_generator
from fedmetanas.search.supernet import sample_arch


def bare_round(sim: Loop, global_sd: dict[str, torch.Tensor], rnd: int, tau: float) -> dict[str, torch.Tensor]:
    """One FedMetaNAS round in plain torch (FOMAML, Adam meta optimizer), all clients, weighted average."""
    cfg, a = sim.cfg, sim.cfg.algorithm
    model, task = sim.cur.executors[0].worker, sim.cur.executors[0].task
    total, acc = 0.0, {k: torch.zeros_like(v, dtype=torch.float64) for k, v in global_sd.items()}
    for cid in range(cfg.federated.num_clients):
        model.load_state_dict(global_sd)
        bg = torch_generator(cfg.federated.seed, Purpose.BATCHES, rnd, cid)
        gg = torch_generator(cfg.federated.seed, Purpose.GUMBEL, rnd, cid)
        weights = [p for n, p in model.named_parameters() if not n.startswith(("alpha_", "beta_"))]
        alphas = [p for n, p in model.named_parameters() if n.startswith(("alpha_", "beta_"))]
        meta = torch.optim.Adam([{"params": weights, "lr": a.meta_lr_w}, {"params": alphas, "lr": a.meta_lr_alpha}])

        def step(net: torch.nn.Module, size: int) -> None:
            x, y = sample_batch(sim.setup.train, sim.setup.train_idx[cid], size, bg)
            x = x.contiguous(memory_format=torch.channels_last)
            loss = torch.nn.functional.cross_entropy(net(x, sample_arch(net, sim.phase.masks(), tau, "hard", gg)), y)
            net.zero_grad()
            loss.backward()

        for _ in range(a.local_steps):
            task.load_state_dict(model.state_dict())
            t_w = [p for n, p in task.named_parameters() if not n.startswith(("alpha_", "beta_"))]
            t_a = [p for n, p in task.named_parameters() if n.startswith(("alpha_", "beta_"))]
            opt_w = torch.optim.Adam(t_w, lr=a.inner_lr_w, betas=a.inner_betas)
            opt_a = torch.optim.Adam(t_a, lr=a.inner_lr_alpha, betas=a.inner_betas)
            for _ in range(a.inner_steps):
                step(task, a.batch_size)
                torch.nn.utils.clip_grad_norm_(t_w, a.grad_clip)
                opt_w.step()
                opt_a.step()
            step(task, a.query_batch_size)
            for p, q in zip(model.parameters(), task.parameters()):
                p.grad = q.grad
            torch.nn.utils.clip_grad_norm_(weights, a.grad_clip)
            meta.step()
            with torch.no_grad():
                for b, c in zip(model.buffers(), task.buffers()):
                    b.copy_(c)
        n = float(sim.setup.clients[cid].num_train)
        total += n
        for k, v in model.state_dict().items():
            if v.is_floating_point():
                acc[k] += n * v.double()
    return {k: (acc[k] / total).to(v.dtype) if v.is_floating_point() else v for k, v in global_sd.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    out = tempfile.mkdtemp(prefix="overhead-")
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "default.yaml", [
        f"federated.num_clients={args.clients}", f"federated.rounds={args.rounds}", "federated.participation=1.0",
        "algorithm.local_steps=5", "algorithm.lr_schedule=constant", "eval.every=100000", "eval.subset=100",
        "eval.final_full=false", f"output.dir={out}", "output.name=framework", *args.overrides])
    ctx = init_distributed("cpu", 1, 600.0)
    sim = Loop(cfg, ctx)
    sim._resume_and_lock()  # the run directory, locked (as the loop does before its callbacks)
    sim._start()
    t_start = time.perf_counter()

    # Interleaved: the bare loop's round r, then the framework's round r, from the same global state.
    framework_s, bare_s = [], []
    for rnd in range(args.rounds):
        start = {k: v.clone() for k, v in sim.cur.net.state_dict().items()}
        t = time.perf_counter()
        plan = sim.phase.round_plan(rnd)
        bare = bare_round(sim, start, rnd, plan.tau)
        bare_s.append(time.perf_counter() - t)
        sim.cur.net.load_state_dict(start)
        t = time.perf_counter()
        row, _ = sim.run_round(rnd, plan, t_start)
        framework_s.append(time.perf_counter() - t - row["time_eval"])
        got = sim.cur.net.state_dict()
        diff = max(float((got[k].double() - bare[k].double()).abs().max()) for k in got if got[k].is_floating_point())
        if diff > 1e-5:
            print(f"round {rnd}: framework and bare loop disagree (max diff {diff:.2e}): not the same work")
            return 1
    shutdown()
    f, b = statistics.median(framework_s), statistics.median(bare_s)
    a = cfg.algorithm
    print(f"{args.clients} clients x {a.local_steps} meta-steps x ({a.inner_steps} inner + 1 query) per round, "
          f"median of {args.rounds} rounds, 1 thread; both ended each round with the same global model")
    print(f"  bare PyTorch loop  {b:7.2f} s/round")
    print(f"  fedmetanas round   {f:7.2f} s/round (evaluation excluded)")
    print(f"  overhead ratio     {f / b:7.3f}  (target <= 1.05)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
