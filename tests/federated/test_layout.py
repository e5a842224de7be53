"""The flat buffer's named layout: segments end to end in declaration order, views that encode,
`split` that decodes; no process group needed."""

import numpy as np
import pytest
import torch

from fedmetanas.federated.layout import FlatLayout, client_columns, metrics_layout, round_layout


def test_segments_lie_end_to_end_in_declaration_order():
    layout = FlatLayout.of(("a", 3), ("b", 1), ("c", 2))

    assert layout.size == 6
    assert [layout.offset(n) for n in "abc"] == [0, 3, 4]
    assert [layout.length(n) for n in "abc"] == [3, 1, 2]


def test_writing_into_a_view_encodes_and_split_decodes_the_same_values():
    layout = FlatLayout.of(("params", 4), ("n", 1), ("loss", 2))
    buf = layout.zeros()

    layout.view(buf, "params").copy_(torch.arange(4.0))
    layout.view(buf, "n")[0] = 7
    layout.split(buf)["loss"][1] = 0.5

    assert buf.dtype == torch.float64
    assert buf.tolist() == [0.0, 1.0, 2.0, 3.0, 7.0, 0.0, 0.5]
    parts = layout.split(buf)
    assert parts["params"].tolist() == [0.0, 1.0, 2.0, 3.0] and float(parts["n"]) == 7.0


def test_summing_two_encoded_buffers_sums_every_segment():
    # What the all-reduce does: ranks' buffers add segment by segment.
    layout = round_layout(n_params=3, num_clients=2, world_size=2)
    a, b = layout.zeros(), layout.zeros()
    layout.view(a, "params").fill_(1.0)
    layout.view(a, "rank_seconds")[0] = 2.0
    layout.view(b, "params").fill_(3.0)
    layout.view(b, "rank_seconds")[1] = 5.0

    total = layout.split(a + b)

    assert total["params"].tolist() == [4.0, 4.0, 4.0]
    assert total["rank_seconds"].tolist() == [2.0, 5.0]


def test_the_rounds_layout_is_parameters_count_stop_dropped_clients_then_ranks():
    layout = round_layout(n_params=10, num_clients=4, world_size=3)

    assert [name for name, _ in layout.segments] == ["params", "n", "stop", "dropped", "loss", "flag", "excluded",
                                                     "rank_seconds", "rank_mib", "rank_gpu_mib"]
    assert layout.size == 10 + 1 + 1 + 1 + 3 * 4 + 3 * 3


def test_metrics_layout_has_three_sums_per_named_forward():
    assert metrics_layout(("supernet", "discrete")).segments == (("supernet", 3), ("discrete", 3))


@pytest.mark.parametrize("segments", [(("a", 1), ("a", 2)), (("a", -1),)])
def test_duplicate_names_and_negative_lengths_are_refused(segments):
    with pytest.raises(ValueError):
        FlatLayout.of(*segments)


def test_split_refuses_a_buffer_of_another_size_and_offset_names_an_unknown_segment():
    layout = FlatLayout.of(("a", 2))
    with pytest.raises(ValueError):
        layout.split(torch.zeros(3, dtype=torch.float64))
    with pytest.raises(KeyError, match="no segment 'b'"):
        layout.offset("b")


def test_the_logged_client_columns_hold_only_the_rounds_participants():
    # 5 clients, 3 took part; client 3's update was excluded as non-finite.
    flag, excluded = np.array([0.0, 1, 0, 1, 1]), np.array([0.0, 0, 0, 1, 0])
    loss = np.array([0.0, 0.5, 0.0, 0.0, 0.25])

    columns = client_columns(flag, excluded, loss)

    assert columns["clients"].tolist() == [1, 3, 4] and columns["clients"].dtype == np.int64
    assert np.array_equal(columns["client_loss"], [0.5, np.nan, 0.25], equal_nan=True)
    assert columns["excluded"].tolist() == [False, True, False]
