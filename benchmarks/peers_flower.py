"""The peer benchmark's workload on Flower 1.42's Simulation Engine (Ray backend), as a Flower user writes it.

Run by `benchmarks/peers.py` with the peers venv's python (never imported by our package or tests):

    .venv-peers/bin/python benchmarks/peers_flower.py '{"clients": 100, "rounds": 5, ...}'

One `run_simulation` process: the ServerApp runs in a thread of this process and evaluates the global
model centrally; `workers` Ray actors with one CPU each (Ray started with that many CPUs) run the
ClientApps, one torch thread each. A FedAvg strategy samples `per_round` of the `clients` nodes per round;
no client-side evaluation. The work is `peers_workload`'s: our partition, our CNN and initial weights,
our clients' batches. Flower samples which *nodes* train, and the server tells each sampled node which
client's data to train on (our round's sample, in order), so every round trains the same clients as our
run and both end at the same model up to float rounding. Prints one JSON line (prefix `PEERS_RESULT `)
with per-round timestamps (time.time(), so the caller can relate them to its own clock).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterable
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from flwr.simulation import run_simulation

from peers_workload import Task, Workload, evaluate, initial_model, local_train, new_model, prepare, round_clients

RESULT_PREFIX = "PEERS_RESULT "

# ---------------------------------------------------------------------------------------------
# Client side (in each Ray worker process): the data, the partition and a model, made once per process
# (the module must be imported, not __main__, for this cache to outlive a message: see the end).
_WORKER: dict[str, Any] = {}


def _worker_state(workload_json: str) -> tuple[Task, torch.nn.Module]:
    """The worker's task and model, prepared on its first message (a Flower worker's data loading)."""
    if _WORKER.get("key") != workload_json:
        torch.set_num_threads(1)
        task = prepare(Workload(**json.loads(workload_json)))
        _WORKER.update(key=workload_json, task=task, model=new_model(task))
    return _WORKER["task"], _WORKER["model"]


client_app = ClientApp()


@client_app.train()
def train(msg: Message, context: Context) -> Message:  # noqa: ARG001 - Flower's signature
    """Load the global weights, train the client the server named, reply with weights and sample count."""
    config = msg.content["config"]
    task, model = _worker_state(str(config["workload"]))
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    loss, n = local_train(task, model, int(config["cid"]), int(config["server-round"]) - 1)
    reply = RecordDict({"arrays": ArrayRecord(model.state_dict()),
                        "metrics": MetricRecord({"train_loss": loss, "num-examples": n})})
    return Message(content=reply, reply_to=msg)


# ---------------------------------------------------------------------------------------------
# Server side (a thread of this process).
class TimedFedAvg(FedAvg):
    """Flower's FedAvg, timing each round from configuring it to the end of aggregation, and giving each
    sampled node one of our round's clients to train."""

    def __init__(self, task: Task, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.task = task
        self.round_start: list[float] = []
        self.round_end: list[float] = []

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self.round_start.append(time.time())
        messages = list(super().configure_train(server_round, arrays, config, grid))
        cids = round_clients(self.task, server_round - 1)
        # FedAvg sends one shared payload; here each node's config also names its client.
        return [Message(content=RecordDict({self.arrayrecord_key: arrays,
                                            self.configrecord_key: ConfigRecord({**dict(config), "cid": cid})}),
                        message_type=MessageType.TRAIN, dst_node_id=m.metadata.dst_node_id)
                for m, cid in zip(messages, cids, strict=True)]

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[Any, Any]:
        out = super().aggregate_train(server_round, replies)
        self.round_end.append(time.time())
        return out


RESULT: dict[str, Any] = {}


def make_server_app(w: Workload) -> ServerApp:
    """The ServerApp: FedAvg over `w.rounds` rounds, centralized evaluation after each, full test at the end."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:  # noqa: ARG001 - Flower's signature
        torch.set_num_threads(1)
        task = prepare(w)
        model = initial_model(task)
        eval_model = new_model(task)
        eval_s: list[float] = []
        round_acc: list[float] = []
        round_loss: list[float] = []

        def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
            if server_round == 0:  # our loop does not evaluate the initial model: neither does this
                return None
            t = time.time()
            eval_model.load_state_dict(arrays.to_torch_state_dict())
            loss, acc = evaluate(task, eval_model)
            eval_s.append(time.time() - t)
            round_acc.append(acc)
            round_loss.append(loss)
            return MetricRecord({"loss": loss, "accuracy": acc})

        strategy = TimedFedAvg(task, fraction_train=w.per_round / w.clients, fraction_evaluate=0.0,
                               min_train_nodes=w.per_round, min_evaluate_nodes=0, min_available_nodes=w.clients)
        workload_json = json.dumps(w.__dict__)
        result = strategy.start(grid=grid, initial_arrays=ArrayRecord(model.state_dict()), num_rounds=w.rounds,
                                train_config=ConfigRecord({"workload": workload_json}), evaluate_fn=evaluate_fn)
        eval_model.load_state_dict(result.arrays.to_torch_state_dict())
        t = time.time()
        _, final_acc = evaluate(task, eval_model, full=True)
        RESULT.update(round_start=strategy.round_start, round_end=strategy.round_end, eval_s=eval_s,
                      round_acc=round_acc, round_loss=round_loss, final_acc=final_acc, final_eval_s=time.time() - t)

    return server_app


def main(argv: list[str]) -> int:
    spec = json.loads(argv[0]) if argv else {}
    workers = int(spec.pop("workers", 2))
    w = Workload(**spec)
    torch.set_num_threads(1)
    backend_config = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                      "init_args": {"num_cpus": workers, "num_gpus": 0}}
    run_simulation(server_app=make_server_app(w), client_app=client_app, num_supernodes=w.clients,
                   backend_config=backend_config)
    if not RESULT:
        print("error: the ServerApp did not finish (see the log above)", file=sys.stderr)
        return 1
    print(RESULT_PREFIX + json.dumps({**RESULT, "workers": workers, "pid": os.getpid()}), flush=True)
    return 0


if __name__ == "__main__":
    # Run from the imported module, not from __main__: Ray pickles the ClientApp with every message it
    # sends to an actor, and an app defined in __main__ travels by value, so each message would bring a
    # fresh copy of this module's state and the worker's data cache would never hit (every client would
    # reload and repartition the data). Imported, it is pickled by reference, as `flwr run` loads an app
    # (module:attribute), and the cache lives as long as the actor.
    import peers_flower

    sys.exit(peers_flower.main(sys.argv[1:]))
