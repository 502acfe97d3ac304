"""Strategy behaviour with crafted replies (Prepare / Execute / Assert, no network)."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict

from common.config import compose
from server.schedule import RoundSchedule
from server.strategy import FederationError, NodeWaitTimeout, build_strategy


@pytest.fixture(autouse=True)
def task_identity() -> None:
    # Creating instruction messages outside a Flower runtime needs these ids (internal API).
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id = TaskIdentity.node_id = TaskIdentity.task_id = 1


def make_strategy(name: str = "fedavg", min_nodes: int = 2, node_wait_s: float = 1.0):
    return build_strategy(name, schedule=RoundSchedule(compose()), min_nodes=min_nodes, node_wait_s=node_wait_s, proximal_mu=0.1)


def global_arrays() -> ArrayRecord:
    return ArrayRecord({"w": Array(np.zeros((2, 2), np.float32)), "b": Array(np.zeros(2, np.float32))})


def reply(node: int, site: str, value: float, n: float, **metrics: float) -> Message:
    instruction = Message(RecordDict({}), dst_node_id=node, message_type=MessageType.TRAIN)
    arrays = ArrayRecord({"w": Array(np.full((2, 2), value, np.float32)), "b": Array(np.full(2, value, np.float32))})
    content = RecordDict(
        {"arrays": arrays, "metrics": MetricRecord({"num-examples": n, "loss": value, **metrics}),
         "site": ConfigRecord({"name": site})}
    )
    return Message(content, reply_to=instruction)


def failed(node: int, reason: str) -> Message:
    instruction = Message(RecordDict({}), dst_node_id=node, message_type=MessageType.TRAIN)
    return Message(Error(code=2, reason=reason), reply_to=instruction)


class FakeGrid:
    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes

    def get_node_ids(self) -> list[int]:
        return self.nodes


def test_average_is_weighted_by_training_cases() -> None:
    strategy = make_strategy()
    list(strategy.configure_train(1, global_arrays(), ConfigRecord({}), FakeGrid([1, 2])))
    arrays, metrics = strategy.aggregate_train(1, [reply(1, "site-a", 1.0, 30), reply(2, "site-b", 4.0, 10)])
    assert np.allclose(arrays["w"].numpy(), (1.0 * 30 + 4.0 * 10) / 40)
    round_log = strategy.pop_round()
    assert set(round_log["train"]) == {"site-a", "site-b"}
    assert round_log["train"]["site-b"]["num-examples"] == 10


def test_nan_update_is_rejected_and_named() -> None:
    strategy = make_strategy()
    list(strategy.configure_train(1, global_arrays(), ConfigRecord({}), FakeGrid([1, 2])))
    arrays, _ = strategy.aggregate_train(1, [reply(1, "site-a", 2.0, 5), reply(2, "site-b", float("nan"), 50)])
    assert np.allclose(arrays["w"].numpy(), 2.0)
    assert "NaN" in strategy.pop_round()["rejected"]["site-b"]


def test_wrong_shapes_and_keys_are_rejected() -> None:
    strategy = make_strategy()
    list(strategy.configure_train(1, global_arrays(), ConfigRecord({}), FakeGrid([1, 2])))
    bad = reply(2, "site-b", 1.0, 5)
    bad.content["arrays"]["w"] = Array(np.zeros((3, 3), np.float32))
    arrays, _ = strategy.aggregate_train(1, [reply(1, "site-a", 2.0, 5), bad])
    assert np.allclose(arrays["w"].numpy(), 2.0)
    assert "shape" in strategy.pop_round()["rejected"]["site-b"]


def test_one_failing_site_is_tolerated_and_recorded() -> None:
    strategy = make_strategy()
    list(strategy.configure_train(1, global_arrays(), ConfigRecord({}), FakeGrid([1, 2, 3])))
    arrays, _ = strategy.aggregate_train(
        1, [reply(1, "site-a", 1.0, 5), reply(2, "site-b", 3.0, 5), failed(3, "site-c has no usable case")]
    )
    assert np.allclose(arrays["w"].numpy(), 2.0)
    assert strategy.pop_round()["failures"] == {"node-3": "site-c has no usable case"}


def test_every_site_failing_stops_the_run_with_reasons() -> None:
    strategy = make_strategy()
    list(strategy.configure_train(1, global_arrays(), ConfigRecord({}), FakeGrid([1, 2])))
    with pytest.raises(FederationError, match="no usable case"):
        strategy.aggregate_train(1, [failed(1, "no usable case"), reply(2, "site-b", float("inf"), 5)])


def test_sites_with_nothing_for_the_stage_are_skipped_not_averaged() -> None:
    strategy = make_strategy()
    list(strategy.configure_train(1, global_arrays(), ConfigRecord({}), FakeGrid([1, 2])))
    arrays, _ = strategy.aggregate_train(1, [reply(1, "site-a", 1.0, 4), reply(2, "site-b", 9.0, 0)])
    assert np.allclose(arrays["w"].numpy(), 1.0)
    assert strategy.pop_round()["skipped"] == ["site-b"]


def test_metric_keys_differing_between_sites_do_not_abort() -> None:
    strategy = make_strategy()
    list(strategy.configure_train(1, global_arrays(), ConfigRecord({}), FakeGrid([1, 2])))
    arrays, metrics = strategy.aggregate_train(1, [reply(1, "a", 1.0, 1, extra=1.0), reply(2, "b", 3.0, 1)])
    assert np.allclose(arrays["w"].numpy(), 2.0)
    assert "extra" not in metrics


def test_round_config_carries_stage_and_fedprox_mu() -> None:
    strategy = make_strategy("fedprox")
    messages = list(strategy.configure_train(1, global_arrays(), ConfigRecord({}), FakeGrid([5, 6])))
    config = messages[0].content["config"]
    assert config["stage"] == "supervised" and config["proximal-mu"] == pytest.approx(0.1)
    assert config["server-round"] == 1 and config["global-round"] == 1


def test_waiting_for_sites_is_bounded() -> None:
    strategy = make_strategy(min_nodes=3, node_wait_s=0.5)
    with pytest.raises(NodeWaitTimeout, match="only 1 of 3 sites"):
        list(strategy.configure_train(1, global_arrays(), ConfigRecord({}), FakeGrid([1])))
