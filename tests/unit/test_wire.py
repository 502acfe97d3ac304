"""Packed weights on the wire: exact round trip, group names, and FedAvg equivalence."""

import numpy as np
import pytest
import torch

from common.config import compose
from common.contract import TASKS
from common.model import build_model
from common.wire import WireFormatError, pack_state, unpack_state


@pytest.fixture(scope="module")
def model():
    cfg = compose(["model=tiny", "data=tiny"])
    torch.manual_seed(0)
    return build_model(cfg.model, cfg.data.size)


def test_round_trip_is_exact_and_grouped(model):
    state = model.state_dict()
    record = pack_state(state)
    # one vector per group; each task head of the classifier is a group of its own
    heads = {f"classifier.heads.{t}" for t in TASKS} | ({"classifier.heads.survival"} if any(".survival." in k for k in state) else set())
    assert set(record.keys()) == {k.split(".")[0] for k in state} | heads
    assert len(record) < len(state) // 10
    back = unpack_state(record, state)
    assert list(back) == list(state)
    for name in state:
        assert torch.equal(back[name], state[name]), name


def test_weighted_average_of_packed_equals_per_tensor_average(model):
    a = model.state_dict()
    b = {k: v + torch.randn_like(v) for k, v in a.items()}
    wa, wb = 3.0, 1.0
    packed = {
        key: (wa * pack_state(a)[key].numpy() + wb * pack_state(b)[key].numpy()) / (wa + wb)
        for key in pack_state(a).keys()
    }
    from flwr.app import ArrayRecord

    averaged = unpack_state(ArrayRecord({k: torch.from_numpy(v.astype(np.float32)) for k, v in packed.items()}), a)
    for name in a:
        expected = (wa * a[name] + wb * b[name]) / (wa + wb)
        assert torch.allclose(averaged[name], expected, atol=1e-6), name


def test_mismatched_model_is_refused_with_a_clear_error(model):
    state = model.state_dict()
    record = pack_state(state)
    other = dict(state)
    first = next(iter(other))
    other[first] = torch.zeros(other[first].numel() + 1)
    with pytest.raises(WireFormatError, match="model configuration"):
        unpack_state(record, other)
    del record[next(iter(record.keys()))]
    with pytest.raises(WireFormatError, match="no group"):
        unpack_state(record, state)


def test_copy_arrays_is_independent_of_the_original() -> None:
    """A pending global model is kept as a copy (server.app, site_validation=after_reply)."""
    import numpy as np
    from flwr.app import Array, ArrayRecord

    from common.arrays import copy_arrays

    record = ArrayRecord({"w": Array(np.arange(6, dtype=np.float32).reshape(2, 3)), "n": Array(np.array([7], np.int64))})
    copied = copy_arrays(record)
    record["w"] = Array(np.zeros((2, 3), np.float32))
    assert copied["w"].numpy().tolist() == [[0, 1, 2], [3, 4, 5]] and copied["n"].numpy().dtype == np.int64
