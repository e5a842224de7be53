"""The peer benchmark's workload on Apple's pfl-research 0.6 (PyTorch backend), as a pfl user writes it.

Run by `benchmarks/peers.py` with the peers venv's python, one process or several under torchrun (pfl's
multi-process mode: each process simulates its share of the cohort, one all-reduce sums the updates):

    .venv-peers/bin/python -m torch.distributed.run --standalone --nproc_per_node 2 \
        benchmarks/peers_pfl.py '{"clients": 100, "rounds": 5, ...}'

pfl's FederatedAveraging with its own local SGD loop (`local_num_steps` steps, momentum and weight decay
through `local_optimizer_create`, `local_max_grad_norm` clipping), updates weighted by the users' data
points, a central SGD step of 1 (the plain average), and pfl's CentralEvaluationCallback on our
2000-image subset every round. The work is `peers_workload`'s: our partition and clients, our CNN and
initial weights; the user sampler hands out our round's clients in order and each user dataset yields
the batches our client draws, so every round trains the same clients on the same batches as our run.
Client-side evaluation and the evaluation of the initial model are switched off (ours does neither).
Rank 0 prints one JSON line (prefix `PEERS_RESULT `) with per-round timestamps (time.time()).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
import time
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from pfl.aggregate.simulate import SimulatedBackend
from pfl.aggregate.weighting import WeightByDatapoints
from pfl.algorithm import FederatedAveraging, NNAlgorithmParams
from pfl.callback.base import TrainingProcessCallback
from pfl.callback.central_evaluation import CentralEvaluationCallback
from pfl.data.dataset import Dataset
from pfl.data.federated_dataset import FederatedDataset
from pfl.hyperparam import NNEvalHyperParams, NNTrainHyperParams
from pfl.hyperparam.base import HyperParam
from pfl.internal.ops.selector import get_framework_module as get_ops
from pfl.metrics import Metrics, Weighted
from pfl.model.pytorch import PyTorchModel

from peers_workload import Task, Workload, evaluate, initial_model, prepare, round_clients, round_lr
from fedmetanas.data.client_data import sample_batch
from fedmetanas.seeding import Purpose, torch_generator

RESULT_PREFIX = "PEERS_RESULT "


class Net(nn.Module):
    """Our CNN with the `loss` and `metrics` methods pfl's PyTorchModel calls."""

    def __init__(self, net: nn.Module, memory_format: torch.memory_format) -> None:
        super().__init__()
        self.net, self.memory_format = net, memory_format

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.contiguous(memory_format=self.memory_format))

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.train()
        return nn.functional.cross_entropy(self(x), y.long())

    @torch.no_grad()
    def metrics(self, x: torch.Tensor, y: torch.Tensor, eval: bool = True) -> dict[str, Any]:  # noqa: A002 - pfl's name
        self.eval()
        logits = self(x)
        y = y.long()
        n = len(y)
        return {"loss": Weighted(float(nn.functional.cross_entropy(logits, y, reduction="sum")), n),
                "accuracy": Weighted(float((logits.argmax(1) == y).sum()), n)}


class ClientRound(Dataset):
    """Client `cid`'s data in round `rnd`: its size is its train split's, and iterating yields the batches
    our client draws (from its (seed, round, client) generator), as many as local training asks for."""

    def __init__(self, task: Task, rnd: int, cid: int) -> None:
        super().__init__(raw_data=(task.clients[cid].train_idx,), user_id=f"{rnd}:{cid}")
        self.task, self.rnd, self.cid = task, rnd, cid

    def iter(self, batch_size: int | None) -> Iterator[list[torch.Tensor]]:  # noqa: A003 - pfl's name
        gen = torch_generator(self.task.cfg.federated.seed, Purpose.BATCHES, self.rnd, self.cid)
        while True:
            x, y = sample_batch(self.task.train, self.task.clients[self.cid].train_idx, int(batch_size), gen)
            yield [x, y]


class OurClients:
    """pfl's user sampler: our rounds' participants in order (every process draws the same sequence,
    and pfl gives each process its share of each cohort)."""

    def __init__(self, task: Task) -> None:
        self.order = iter([(rnd, cid) for rnd in range(task.cfg.federated.rounds) for cid in round_clients(task, rnd)])

    def __call__(self) -> tuple[int, int]:
        return next(self.order)


class CosineLR(HyperParam, TrainingProcessCallback):
    """The local learning rate on our cosine schedule, advanced after each central iteration."""

    def __init__(self, task: Task) -> None:
        self.task, self.round = task, 0

    def value(self) -> float:
        return round_lr(self.task, self.round)

    def after_central_iteration(self, aggregate_metrics: Metrics, model: Any, *,
                                central_iteration: int) -> tuple[bool, Metrics]:
        self.round = central_iteration + 1
        return False, Metrics()


class TimedFedAvg(FederatedAveraging):
    """pfl's FederatedAveraging, timing each central iteration from choosing its cohort to the model
    update, with the per-user evaluation before and after local training switched off."""

    def __init__(self) -> None:
        super().__init__()
        self.round_start: list[float] = []
        self.round_end: list[float] = []

    def get_next_central_contexts(self, model: Any, iteration: int, *args: Any, **kwargs: Any) -> Any:
        t = time.time()
        contexts, model, metrics = super().get_next_central_contexts(model, iteration, *args, **kwargs)
        if contexts is not None:
            self.round_start.append(t)
            contexts = tuple(dataclasses.replace(c, do_evaluation=False) for c in contexts)
        return contexts, model, metrics

    def process_aggregated_statistics(self, *args: Any, **kwargs: Any) -> Any:
        out = super().process_aggregated_statistics(*args, **kwargs)
        self.round_end.append(time.time())
        return out


class TimedEvaluation(CentralEvaluationCallback):
    """pfl's central evaluation after every round (not before training), timed."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.seconds: list[float] = []
        self.accuracy: list[float] = []
        self.loss: list[float] = []

    def on_train_begin(self, *, model: Any) -> Metrics:
        return Metrics()

    def after_central_iteration(self, aggregate_metrics: Metrics, model: Any, *,
                                central_iteration: int) -> tuple[bool, Metrics]:
        t = time.time()
        stop, metrics = self._eval(model)
        self.seconds.append(time.time() - t)
        values = {str(k): v for k, v in metrics}
        self.accuracy.append(next(float(v.overall_value) for k, v in values.items() if k.endswith("| accuracy")))
        self.loss.append(next(float(v.overall_value) for k, v in values.items() if k.endswith("| loss")))
        return stop, metrics


def main(argv: list[str]) -> int:
    spec = json.loads(argv[0]) if argv else {}
    spec.pop("workers", None)
    w = Workload(**spec)
    torch.set_num_threads(1)
    task = prepare(w)
    f = task.cfg.fedavg
    fmt = torch.channels_last if task.cfg.model.channels_last else torch.contiguous_format
    net = Net(initial_model(task), fmt)
    model = PyTorchModel(model=net,
                         local_optimizer_create=functools.partial(torch.optim.SGD, momentum=f.momentum,
                                                                  weight_decay=f.weight_decay, foreach=True),
                         central_optimizer=torch.optim.SGD(net.parameters(), lr=1.0))
    clients = FederatedDataset(lambda user: ClientRound(task, *user), OurClients(task))
    x_eval, y_eval = task.test.batch(task.eval_idx)
    central_eval = TimedEvaluation(Dataset(raw_data=[x_eval, y_eval]),
                                   model_eval_params=NNEvalHyperParams(local_batch_size=task.cfg.eval.batch_size))
    lr = CosineLR(task)
    algorithm = TimedFedAvg()
    backend = SimulatedBackend(training_data=clients, val_data=None, postprocessors=[WeightByDatapoints()])
    algorithm.run(
        algorithm_params=NNAlgorithmParams(central_num_iterations=w.rounds, evaluation_frequency=1,
                                           train_cohort_size=w.per_round, val_cohort_size=0),
        backend=backend, model=model,
        model_train_params=NNTrainHyperParams(local_learning_rate=lr, local_num_epochs=None,
                                              local_num_steps=f.local_steps, local_batch_size=f.batch_size,
                                              local_max_grad_norm=f.grad_clip if f.grad_clip > 0 else None),
        model_eval_params=NNEvalHyperParams(local_batch_size=task.cfg.eval.batch_size),
        callbacks=[lr, central_eval])
    if get_ops().distributed.global_rank == 0:
        t = time.time()
        _, final_acc = evaluate(task, net.net, full=True)
        print(RESULT_PREFIX + json.dumps({
            "round_start": algorithm.round_start, "round_end": algorithm.round_end, "eval_s": central_eval.seconds,
            "round_acc": central_eval.accuracy, "round_loss": central_eval.loss, "final_acc": final_acc,
            "final_eval_s": time.time() - t, "workers": get_ops().distributed.world_size, "pid": os.getpid()}),
            flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
