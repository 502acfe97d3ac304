"""Strategy behaviour with crafted replies (Prepare / Execute / Assert, no network)."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)

from common.config import compose, replace
from server.schedule import RoundSchedule
from server.strategy import FederationError, NodeWaitTimeout, build_strategy
from tests.helpers import FakeGrid, set_task_identity


@pytest.fixture(autouse=True)
def task_identity() -> None:
    set_task_identity()


def make_strategy(name: str = "fedavg", min_nodes: int = 2, node_wait_s: float = 1.0, **federation: object):
    cfg = replace(compose(), federation={"strategy": name, "min_nodes": min_nodes, "node_wait_s": node_wait_s,
                                         "proximal_mu": 0.1, **federation})
    return build_strategy(cfg.federation, schedule=RoundSchedule(cfg))


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


def head_reply(node: int, site: str, head: float, trunk: float, n: float, labeled_idh: float) -> Message:
    instruction = Message(RecordDict({}), dst_node_id=node, message_type=MessageType.TRAIN)
    arrays = ArrayRecord({
        "classifier": Array(np.full(3, trunk, np.float32)),
        "classifier.heads.idh": Array(np.full(2, head, np.float32)),
        "classifier.heads.mgmt": Array(np.full(2, head, np.float32)),
    })
    metrics = MetricRecord({"num-examples": n, "labeled_idh": labeled_idh, "labeled_mgmt": 0.0,
                            "count_idh_0": labeled_idh / 2, "count_idh_1": labeled_idh / 2})
    return Message(RecordDict({"arrays": arrays, "metrics": metrics, "site": ConfigRecord({"name": site})}),
                   reply_to=instruction)


def test_each_head_is_averaged_over_the_sites_labeled_for_its_task() -> None:
    strategy = make_strategy()
    current = ArrayRecord({"classifier": Array(np.zeros(3, np.float32)),
                           "classifier.heads.idh": Array(np.zeros(2, np.float32)),
                           "classifier.heads.mgmt": Array(np.full(2, 7.0, np.float32))})
    list(strategy.configure_train(1, current, ConfigRecord({}), FakeGrid([1, 2])))
    arrays, _ = strategy.aggregate_train(1, [
        head_reply(1, "site-a", head=1.0, trunk=1.0, n=30, labeled_idh=0),  # no IDH label at site-a
        head_reply(2, "site-b", head=5.0, trunk=5.0, n=10, labeled_idh=10),
    ])
    assert np.allclose(arrays["classifier"].numpy(), (1.0 * 30 + 5.0 * 10) / 40)  # trunk: FedAvg
    assert np.allclose(arrays["classifier.heads.idh"].numpy(), 5.0)  # only site-b had IDH labels
    assert np.allclose(arrays["classifier.heads.mgmt"].numpy(), 7.0)  # nobody had MGMT labels: kept
    # the sites' class counts come back summed in the next round's config (federation-wide weights)
    messages = list(strategy.configure_train(2, arrays, ConfigRecord({}), FakeGrid([1, 2])))
    config = messages[0].content["config"]
    assert list(config["class-count-idh"]) == [5.0, 5.0]


@pytest.mark.parametrize("name", ["fedavgm", "fedadam", "fedyogi"])
def test_server_optimizers_step_from_the_averaged_update(name: str) -> None:
    """Two rounds of the same site update: FedAvg lands on the sites' mean both times; a server
    optimizer moves by its own rule (momentum accumulates; Adam/Yogi take a step of about eta)."""
    strategy = make_strategy(name, server_lr=0.05, server_momentum=0.9)
    current = global_arrays()
    steps = []
    for server_round in (1, 2):
        list(strategy.configure_train(server_round, current, ConfigRecord({}), FakeGrid([1, 2])))
        start = float(current["w"].numpy().mean())
        target = start + 0.1  # both sites moved every weight by +0.1
        current, _ = strategy.aggregate_train(server_round, [reply(1, "a", target, 10), reply(2, "b", target, 10)])
        steps.append(float(current["w"].numpy().mean()) - start)
    if name == "fedavgm":
        assert steps[0] == pytest.approx(0.1, abs=1e-6) and steps[1] == pytest.approx(0.19, abs=1e-5)
    else:
        assert 0 < steps[0] < 0.1 and steps[0] != pytest.approx(0.1)


def test_float16_on_the_wire_is_averaged_in_float32_and_bytes_are_counted() -> None:
    strategy = make_strategy(wire_dtype="float16")
    current = ArrayRecord({"w": Array(np.full((2, 2), 1.0001, np.float32)), "b": Array(np.zeros(2, np.float32))})
    messages = list(strategy.configure_train(1, current, ConfigRecord({}), FakeGrid([1, 2])))
    assert all(m.content["arrays"]["w"].numpy().dtype == np.float16 for m in messages)
    assert current["w"].numpy().dtype == np.float32  # the global model stays float32
    half = [reply(1, "a", 1.0, 10), reply(2, "b", 2.0, 10)]
    for r in half:
        r.content["arrays"] = ArrayRecord({k: Array(r.content["arrays"][k].numpy().astype(np.float16))
                                           for k in r.content["arrays"].keys()})
    arrays, _ = strategy.aggregate_train(1, half)
    assert arrays["w"].numpy().dtype == np.float32 and np.allclose(arrays["w"].numpy(), 1.5)
    counted = strategy.pop_round()["bytes"]
    assert counted["a"] == {"sent": 6 * 2, "received": 6 * 2}  # six float16 values each way



def test_the_survival_head_is_averaged_over_the_sites_with_known_survival() -> None:
    from common.wire import group_of

    assert group_of("classifier.survival.head.0.weight") == "classifier.heads.survival"
    strategy = make_strategy()
    current = ArrayRecord({"classifier": Array(np.zeros(3, np.float32)),
                           "classifier.heads.survival": Array(np.zeros(2, np.float32))})
    list(strategy.configure_train(1, current, ConfigRecord({}), FakeGrid([1, 2])))

    def survival_reply(node: int, site: str, value: float, n: float, known: float) -> Message:
        instruction = Message(RecordDict({}), dst_node_id=node, message_type=MessageType.TRAIN)
        arrays = ArrayRecord({"classifier": Array(np.full(3, value, np.float32)),
                              "classifier.heads.survival": Array(np.full(2, value, np.float32))})
        metrics = MetricRecord({"num-examples": n, "labeled_survival": known})
        return Message(RecordDict({"arrays": arrays, "metrics": metrics, "site": ConfigRecord({"name": site})}),
                       reply_to=instruction)

    arrays, _ = strategy.aggregate_train(1, [survival_reply(1, "a", 1.0, 30, 0), survival_reply(2, "b", 3.0, 10, 10)])
    assert np.allclose(arrays["classifier"].numpy(), (30 + 30) / 40)
    assert np.allclose(arrays["classifier.heads.survival"].numpy(), 3.0)  # only site b knew survival


def test_site_validations_are_filed_under_the_model_they_name_and_failures_are_named() -> None:
    """federation.site_validation=after_reply: a reply's val/ metrics carry the round of the model
    they validated; the strategy files them there, names a site that could not validate, ignores
    a tag naming a model it has not sent yet, and asks for the models whose validations are in."""
    strategy = make_strategy()
    calls: list[tuple[dict, int]] = []
    strategy.on_validation = lambda by_round, upto: calls.append((by_round, upto))
    list(strategy.configure_train(3, global_arrays(), ConfigRecord({}), FakeGrid([1, 2, 3])))
    replies = [
        reply(1, "site-a", 1.0, 5, **{"val/global-round": 1.0, "val/dice_wt": 0.7}),  # after its reply
        reply(2, "site-b", 1.0, 5, **{"val/global-round": 2.0, "val/dice_wt": 0.6}),  # before training
        reply(3, "site-c", 1.0, 5, **{"val/global-round": 1.0, "val/validation_failed": 1.0}),
    ]
    strategy.aggregate_train(3, replies)
    (by_round, upto), = calls
    assert upto == 1  # round 3's replies complete model 1 (lag 2)
    assert {g: {s: m["dice_wt"] for s, m in sites.items()} for g, sites in by_round.items()} == {
        1: {"site-a": 0.7}, 2: {"site-b": 0.6}}
    round_log = strategy.pop_round()
    assert round_log["validation_failures"] == {"site-c": 1}
    assert not any(k.startswith("val/") for m in round_log["train"].values() for k in m)  # not training metrics
    # a validation of a model the server has not sent (round 3's own or later) is not filed
    list(strategy.configure_train(4, global_arrays(), ConfigRecord({}), FakeGrid([1, 2])))
    strategy.aggregate_train(4, [reply(1, "site-a", 1.0, 5, **{"val/global-round": 4.0, "val/dice_wt": 0.9}),
                                 reply(2, "site-b", 1.0, 5)])
    assert calls[-1] == ({}, 2)


def test_the_average_does_not_depend_on_the_order_the_replies_arrive_in() -> None:
    """Float sums depend on their order; the sites' replies are averaged in the order of their names,
    so the same updates give the same global model bit for bit, whichever site finished first."""
    def average(order: list[int]) -> np.ndarray:
        strategy = make_strategy(min_nodes=3)
        list(strategy.configure_train(1, global_arrays(), ConfigRecord({}), FakeGrid([1, 2, 3])))
        replies = {1: reply(1, "site-a", 1.0, 10), 2: reply(2, "site-b", 3e-8, 10), 3: reply(3, "site-c", -1.0, 10)}
        arrays, _ = strategy.aggregate_train(1, [replies[node] for node in order])
        return arrays["w"].numpy()

    first = average([1, 2, 3])
    for order in ([1, 3, 2], [3, 2, 1], [2, 3, 1]):
        assert np.array_equal(average(order), first), order
