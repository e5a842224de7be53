"""The round's buffer as a phase declares it: a client's sample-weighted model (the bits of `add_weighted`),
or its row; declared uploads summed, weighted or by row; new client state by row; a client with anything
non-finite excluded with nothing of it written. Summing two ranks' buffers gives every row and sum."""

import math

import pytest
import torch

from fedmetanas.algorithms.base import Upload
from fedmetanas.algorithms.common import LocalResult
from fedmetanas.federated.aggregation import add_weighted
from fedmetanas.federated.client_state import ClientStates
from fedmetanas.federated.round_buffer import RoundBuffer

MODEL, CLIENTS, SLOTS = 6, 5, 3  # model values, clients in the federation, participants this round


class _Declares:
    """A phase's declarations only (what RoundBuffer reads)."""

    def __init__(self, rows: bool = False, uploads: tuple[Upload, ...] = (), state: dict[str, int] | None = None):
        self.model_rows, self._uploads, self._state = rows, uploads, state or {}

    def uploads(self) -> tuple[Upload, ...]:
        return self._uploads

    def client_state(self) -> dict[str, int]:
        return self._state


def _tensors(seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 2, generator=g), torch.randn(2, generator=g) * 1e7]


def test_a_phase_that_declares_nothing_sends_the_segments_it_always_did():
    buf = RoundBuffer(_Declares(), MODEL, CLIENTS, SLOTS, world_size=2)

    assert [n for n, _ in buf.layout.segments] == ["params", "n", "stop", "dropped", "loss", "flag", "excluded",
                                                   "rank_seconds", "rank_mib", "rank_gpu_mib"]
    assert buf.layout.length("params") == MODEL


def test_a_finite_client_is_added_with_the_bits_of_add_weighted():
    buf = RoundBuffer(_Declares(), MODEL, CLIENTS, SLOTS, world_size=1)
    seg = buf.layout.split(buf.layout.zeros())
    expected = torch.zeros(MODEL, dtype=torch.float64)
    add_weighted(expected, _tensors(1), 37.0)

    assert buf.add(seg, cid=3, slot=1, n=37, loss=0.5, tensors=_tensors(1))
    assert torch.equal(seg["params"], expected)
    assert seg["n"].item() == 37 and seg["loss"][3].item() == 0.5 and seg["flag"][3].item() == 1.0


@pytest.mark.parametrize("where", ["model", "loss", "upload", "state"])
def test_a_client_with_one_non_finite_value_anywhere_is_excluded_and_nothing_of_it_is_written(where):
    decl = _Declares(uploads=(Upload("u", 2),), state={"c": 3})
    buf = RoundBuffer(decl, MODEL, CLIENTS, SLOTS, world_size=1)
    seg = buf.layout.split(buf.layout.zeros())
    tensors, loss = _tensors(2), 1.0
    result = LocalResult(loss, 1, uploads={"u": torch.ones(2)}, state={"c": torch.ones(3)})
    bad = float("nan")
    if where == "model":
        tensors[1][0] = bad
    elif where == "loss":
        loss = bad
    elif where == "upload":
        result.uploads["u"][1] = math.inf
    else:
        result.state["c"][0] = -math.inf

    assert not buf.add(seg, cid=2, slot=0, n=10, loss=loss, tensors=tensors, result=result)
    assert seg["excluded"][2].item() == 1.0 and seg["flag"][2].item() == 1.0
    untouched = [k for k in seg if k not in ("flag", "excluded")]
    assert all(not seg[k].any() for k in untouched)


def test_two_ranks_buffers_summed_hold_every_row_every_sum_and_every_weighted_sum():
    decl = _Declares(rows=True, uploads=(Upload("s", 2, "sum"), Upload("w", 2, "weighted"), Upload("r", 1, "rows")),
                     state={"c": 2})
    buf = RoundBuffer(decl, MODEL, CLIENTS, SLOTS, world_size=2)
    clients, sizes = [0, 2, 4], {0: 3, 2: 5, 4: 7}
    rank_of = {0: 1, 2: 0, 4: 1}  # clients 0 and 4 on rank 1, client 2 on rank 0
    bufs = [buf.layout.zeros(), buf.layout.zeros()]
    for slot, cid in enumerate(clients):
        seg = buf.layout.split(bufs[rank_of[cid]])
        res = LocalResult(0.1, 1, uploads={"s": torch.full((2,), float(cid)), "w": torch.ones(2),
                                           "r": torch.tensor([float(cid)])},
                          state={"c": torch.tensor([float(cid), -1.0])})
        buf.add(seg, cid, slot, sizes[cid], 0.1, _tensors(cid), res)
    total = buf.layout.split(bufs[0] + bufs[1])  # the all-reduce
    included = torch.ones(3, dtype=torch.bool)
    sums = buf.sums(total, clients, included, torch.tensor([3.0, 5.0, 7.0], dtype=torch.float64), 15.0,
                    torch.zeros(MODEL, dtype=torch.float64), MODEL)

    assert buf.layout.length("params") == 0 and sums.model_sum is None
    for slot, cid in enumerate(clients):
        assert torch.equal(sums.model_rows[slot], torch.cat([t.reshape(-1) for t in _tensors(cid)]).double())
    assert sums.uploads["s"].tolist() == [6.0, 6.0]  # 0 + 2 + 4
    assert sums.uploads["w"].tolist() == [15.0, 15.0]  # 3 + 5 + 7
    assert sums.uploads["r"].tolist() == [[0.0], [2.0], [4.0]]
    assert buf.states(total)["c"].tolist() == [[0.0, -1.0], [2.0, -1.0], [4.0, -1.0]]


def test_a_client_update_missing_a_declared_upload_names_it():
    buf = RoundBuffer(_Declares(uploads=(Upload("delta_c", 4),)), MODEL, CLIENTS, SLOTS, world_size=1)
    seg = buf.layout.split(buf.layout.zeros())

    with pytest.raises(ValueError, match=r"uploads 'delta_c' of 4 values; its local update returned nothing"):
        buf.add(seg, 1, 0, 5, 0.3, _tensors(0), LocalResult(0.3, 1))


def test_client_states_start_at_zero_take_new_rows_and_survive_a_checkpoint():
    states = ClientStates({"c": 2}, num_clients=4)
    states.write([1, 3], {"c": torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)})
    mine = states.of(1)
    mine["c"].add_(100)  # a client's copy: changing it changes nothing kept
    again = ClientStates({"c": 2}, num_clients=4)
    again.load_state_dict(states.state_dict())

    assert states.of(0)["c"].tolist() == [0.0, 0.0]
    assert states.of(1)["c"].tolist() == [1.0, 2.0] and states.of(3)["c"].tolist() == [3.0, 4.0]
    assert torch.equal(again.tables["c"], states.tables["c"])
    with pytest.raises(ValueError, match="checkpoint"):
        ClientStates({"c": 3}, num_clients=4).load_state_dict(states.state_dict())
