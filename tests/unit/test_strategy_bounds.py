"""One site must not be able to take over, poison or impersonate: bounds, identities, quorum.

Crafted replies against the real strategies (Prepare / Execute / Assert, no network).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)

from common.config import STRATEGIES, ConfigError, compose, replace
from server.schedule import RoundSchedule
from server.strategy import NodeWaitTimeout, build_strategy
from server.strategy.bounds import UpdateBounds, cap_weights, screen_distances
from server.strategy.identity import SiteRegistry
from tests.helpers import FakeGrid, set_task_identity


@pytest.fixture(autouse=True)
def task_identity() -> None:
    set_task_identity()


def make_strategy(identities: Path | None = None, **federation: object):
    cfg = replace(compose(), federation={"min_nodes": 2, "node_wait_s": 0.5, "rejoin_wait_s": 0.2, **federation})
    return build_strategy(cfg.federation, schedule=RoundSchedule(cfg), identities=identities)


def zeros() -> ArrayRecord:
    return ArrayRecord({"w": Array(np.zeros(8, np.float32)), "steps": Array(np.zeros(1, np.int64))})


def send(strategy, nodes: list[int], server_round: int = 1, arrays: ArrayRecord | None = None) -> dict[int, Message]:
    """configure_train, then give each instruction a message id the way Flower's grids do on push."""
    messages = list(strategy.configure_train(server_round, arrays or zeros(), ConfigRecord({}), FakeGrid(nodes)))
    for i, message in enumerate(messages):
        message.metadata.__dict__["_message_id"] = f"r{server_round}-m{i}"
    return {m.metadata.dst_node_id: m for m in messages}


def answer(instruction: Message, site: str, w: np.ndarray | float, n: float, **metrics: float) -> Message:
    w = np.broadcast_to(np.asarray(w, np.float32), (8,)).copy()
    arrays = ArrayRecord({"w": Array(w), "steps": Array(np.ones(1, np.int64))})
    record = MetricRecord({"num-examples": n, "n_train": metrics.pop("n_train", n), **metrics})
    return Message(RecordDict({"arrays": arrays, "metrics": record, "site": ConfigRecord({"name": site})}),
                   reply_to=instruction)


def honest(seed: int) -> np.ndarray:
    return 0.1 + 0.02 * np.random.default_rng(seed).standard_normal(8)


# ------------------------------------------------------------------ bounded updates
def test_a_scaled_update_is_rejected_and_the_rest_averaged() -> None:
    strategy = make_strategy()
    sent = send(strategy, [1, 2, 3])
    arrays, _ = strategy.aggregate_train(1, [
        answer(sent[1], "site-a", honest(1), 10), answer(sent[2], "site-b", honest(2), 10),
        answer(sent[3], "site-c", honest(3) * 1000, 10),
    ])
    log = strategy.pop_round()
    assert "median of the other sites" in log["rejected"]["site-c"]
    assert np.allclose(arrays["w"].numpy(), (honest(1) + honest(2)) / 2, atol=1e-6)


def test_with_two_sites_the_honest_one_is_the_reference() -> None:
    strategy = make_strategy()
    sent = send(strategy, [1, 2])
    arrays, _ = strategy.aggregate_train(1, [answer(sent[1], "a", honest(1), 10), answer(sent[2], "b", 1000.0, 10)])
    assert set(strategy.pop_round()["rejected"]) == {"b"}
    assert np.allclose(arrays["w"].numpy(), honest(1), atol=1e-6)


def test_clip_mode_shortens_the_outlier_to_the_bound() -> None:
    strategy = make_strategy(update_bound="clip", max_update_ratio=2.0)
    sent = send(strategy, [1, 2, 3])
    arrays, _ = strategy.aggregate_train(1, [
        answer(sent[1], "a", 1.0, 10), answer(sent[2], "b", 1.0, 10), answer(sent[3], "c", 100.0, 10),
    ])
    log = strategy.pop_round()
    assert "clipped" in log["bounded"]["c"] and not log["rejected"]
    assert np.allclose(arrays["w"].numpy(), (1.0 + 1.0 + 2.0) / 3, atol=1e-5)  # c's update: 2x the others'


def test_a_site_claiming_a_billion_cases_is_capped() -> None:
    strategy = make_strategy()
    sent = send(strategy, [1, 2, 3])
    arrays, _ = strategy.aggregate_train(1, [
        answer(sent[1], "a", 0.1, 20), answer(sent[2], "b", 0.1, 20),
        answer(sent[3], "liar", 0.3, 1e9, n_train=1e9),  # declares it from the start
    ])
    log = strategy.pop_round()
    assert "10x the median" in log["bounded"]["liar"]
    # weight capped to 10 x 20 = 200 of 240 in all, instead of (practically) all of it
    assert np.allclose(arrays["w"].numpy(), (0.1 * 40 + 0.3 * 200) / 240, atol=1e-6)


def test_weight_is_capped_by_what_the_site_declared_when_it_joined() -> None:
    strategy = make_strategy(max_examples_ratio=1e6)
    sent = send(strategy, [1, 2])
    strategy.aggregate_train(1, [answer(sent[1], "a", 0.1, 20), answer(sent[2], "b", 0.1, 30)])
    strategy.pop_round()
    sent = send(strategy, [1, 2], server_round=2)
    arrays, _ = strategy.aggregate_train(2, [answer(sent[1], "a", 0.0, 20), answer(sent[2], "b", 1.0, 3000, n_train=3000)])
    assert "declared when it joined" in strategy.pop_round()["bounded"]["b"]
    assert np.allclose(arrays["w"].numpy(), 30 / 50)


def test_bound_helpers_leave_honest_sites_alone() -> None:
    distances = {"a": 1.0, "b": 1.3, "c": 0.8}
    assert screen_distances(distances, UpdateBounds()) == ({}, {})
    assert cap_weights({"a": 20, "b": 60, "c": 35}, {"a": 20, "b": 60, "c": 35}, UpdateBounds()) == {}


@pytest.mark.parametrize("name", ["fedmedian", "fedtrimmedavg", "krum"])
def test_robust_aggregators_ignore_a_sign_flipped_site(name: str) -> None:
    strategy = make_strategy(strategy=name, trimmed_beta=0.25)
    sent = send(strategy, [1, 2, 3, 4])
    flipped = -honest(4) * 1.2  # an honest length, the wrong direction
    arrays, _ = strategy.aggregate_train(1, [
        answer(sent[1], "a", honest(1), 10), answer(sent[2], "b", honest(2), 10),
        answer(sent[3], "c", honest(3), 10), answer(sent[4], "d", flipped, 10),
    ])
    result = arrays["w"].numpy()
    fedavg = (honest(1) + honest(2) + honest(3) + flipped) / 4
    assert np.abs(result - 0.1).mean() < np.abs(fedavg - 0.1).mean()


def test_bulyan_needs_enough_sites_and_every_strategy_builds() -> None:
    for name in STRATEGIES:
        assert make_strategy(strategy=name, min_nodes=3).per_head_averaging == (name in ("fedavg", "fedprox"))
    strategy = make_strategy(strategy="bulyan", num_malicious=1, min_nodes=7)
    sent = send(strategy, list(range(1, 8)))
    arrays, _ = strategy.aggregate_train(1, [answer(sent[i], f"s{i}", honest(i), 10) for i in range(1, 7)]
                                         + [answer(sent[7], "evil", -honest(7), 10)])
    assert arrays is not None and np.all(np.abs(arrays["w"].numpy() - 0.1) < 0.1)


def test_bad_bound_settings_are_refused() -> None:
    for bad in ({"quorum": 0.0}, {"max_update_ratio": 1.0}, {"update_bound": "ignore"}, {"on_quorum_fail": "x"},
                {"strategy": "bulyan", "num_malicious": 1, "min_nodes": 6}):
        with pytest.raises(ConfigError):
            replace(compose(), federation=bad)


# ------------------------------------------------------------------------ identity
def test_a_site_cannot_take_another_sites_name(tmp_path: Path) -> None:
    strategy = make_strategy(identities=tmp_path / "sites.json")
    sent = send(strategy, [1, 2])
    strategy.aggregate_train(1, [answer(sent[1], "site-a", 0.1, 10), answer(sent[2], "site-b", 0.1, 10)])
    strategy.pop_round()
    sent = send(strategy, [1, 2, 3], server_round=2)
    arrays, _ = strategy.aggregate_train(2, [
        answer(sent[1], "site-a", 0.2, 10, loss=1.0),
        answer(sent[2], "site-b", 0.2, 10),
        answer(sent[3], "site-a", 0.2, 10, loss=99.0),  # node 3 pretends to be site-a
    ])
    log = strategy.pop_round()
    assert log["train"]["site-a"]["loss"] == 1.0  # the real site's metrics are intact
    assert any("claims site 'site-a'" in reason for reason in log["rejected"].values())
    assert json.loads((tmp_path / "sites.json").read_text()) == {"1": "site-a", "2": "site-b"}


def test_a_node_cannot_change_its_name_and_bindings_survive_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "sites.json"
    strategy = make_strategy(identities=path)
    sent = send(strategy, [1, 2])
    strategy.aggregate_train(1, [answer(sent[1], "site-a", 0.1, 10), answer(sent[2], "site-b", 0.1, 10)])
    restarted = make_strategy(identities=path)  # a new ServerApp process after a restart
    sent = send(restarted, [1, 2], server_round=2)
    restarted.aggregate_train(2, [answer(sent[1], "site-a", 0.1, 10), answer(sent[2], "site-a", 0.1, 10)])
    rejected = restarted.pop_round()["rejected"]
    assert "bound to site 'site-b'" in rejected["site-b"]


def test_a_restarted_node_with_a_new_id_takes_its_name_back() -> None:
    strategy = make_strategy()
    sent = send(strategy, [1, 2])
    strategy.aggregate_train(1, [answer(sent[1], "site-a", 0.1, 10), answer(sent[2], "site-b", 0.1, 10)])
    strategy.pop_round()
    sent = send(strategy, [1, 7], server_round=2)  # node 2 is gone; node 7 is site-b restarted
    strategy.aggregate_train(2, [answer(sent[1], "site-a", 0.1, 10), answer(sent[7], "site-b", 0.1, 10)])
    assert set(strategy.pop_round()["train"]) == {"site-a", "site-b"}
    assert strategy.sites == {1: "site-a", 7: "site-b"}


def test_failures_are_filed_under_the_site_the_instruction_went_to() -> None:
    strategy = make_strategy()
    sent = send(strategy, [11, 12, 13])
    strategy.aggregate_train(1, [answer(sent[i], f"site-{i}", 0.1, 10) for i in (11, 12, 13)])
    strategy.pop_round()
    sent = send(strategy, [11, 12, 13], server_round=2)
    lost = Message(Error(code=0, reason="node unavailable"), reply_to=sent[13])
    lost.metadata.__dict__["_src_node_id"] = 1  # the SuperLink answers for a dead node
    strategy.aggregate_train(2, [answer(sent[11], "site-11", 0.1, 10), answer(sent[12], "site-12", 0.1, 10), lost])
    assert strategy.pop_round()["failures"] == {"site-13": "node unavailable"}


# -------------------------------------------------------------------------- quorum
def test_below_quorum_the_round_is_recorded_and_not_applied() -> None:
    strategy = make_strategy(min_nodes=4, quorum=0.75)
    sent = send(strategy, [1, 2, 3, 4])
    failed = [Message(Error(code=2, reason="crashed"), reply_to=sent[i]) for i in (3, 4)]
    arrays, _ = strategy.aggregate_train(1, [answer(sent[1], "a", 0.1, 10), answer(sent[2], "b", 0.1, 10), *failed])
    assert arrays is None and strategy.stop_reason is None  # on_quorum_fail=skip: the run goes on
    quorum = strategy.pop_round()["quorum"]
    assert quorum["applied"] is False and quorum["needed"] == 3 and quorum["replied"] == 2
    assert quorum["missing"] == {"node-3": "crashed", "node-4": "crashed"}


def test_below_quorum_with_stop_the_run_stops_with_who_was_missing() -> None:
    strategy = make_strategy(min_nodes=2, quorum=1.0, on_quorum_fail="stop")
    sent = send(strategy, [1, 2])
    arrays, _ = strategy.aggregate_train(1, [answer(sent[1], "a", 0.1, 10)])  # node 2 never answered
    assert arrays is None
    assert "node-2" in strategy.stop_reason and "on_quorum_fail=stop" in strategy.stop_reason
    assert list(strategy.configure_evaluate(1, zeros(), ConfigRecord({}), FakeGrid([1]))) == []


def test_after_the_first_round_a_dead_site_does_not_block_the_federation() -> None:
    strategy = make_strategy(min_nodes=3, quorum=0.5)
    sent = send(strategy, [1, 2, 3])
    strategy.aggregate_train(1, [answer(sent[i], f"s{i}", 0.1, 10) for i in (1, 2, 3)])
    strategy.pop_round()
    sent = send(strategy, [1, 2], server_round=2)  # site 3 died: only two connected
    assert set(sent) == {1, 2}
    arrays, _ = strategy.aggregate_train(2, [answer(sent[1], "s1", 0.2, 10), answer(sent[2], "s2", 0.2, 10)])
    assert arrays is not None
    assert strategy.pop_round()["quorum"]["missing"] == {"s3": "not connected"}
    with pytest.raises(NodeWaitTimeout):  # one of three is below the quorum of two
        send(strategy, [1], server_round=3)


def test_the_first_round_still_waits_for_every_site() -> None:
    with pytest.raises(NodeWaitTimeout, match="only 2 of 3"):
        send(make_strategy(min_nodes=3), [1, 2])


def test_registry_file_damage_is_named(tmp_path: Path) -> None:
    path = tmp_path / "sites.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="sites.json is damaged"):
        SiteRegistry(path)


def test_with_the_coordinators_map_names_are_known_and_fixed_from_the_first_round(tmp_path: Path) -> None:
    registered = tmp_path / "nodes.json"
    registered.write_text(json.dumps({"site-a": {"node_id": 11, "key": ["k"]}, "site-b": 12, "site-c": 13}))
    strategy = make_strategy(registered_sites=str(registered), min_nodes=3)
    sent = send(strategy, [11, 12, 13])
    died = Message(Error(code=0, reason="node unavailable"), reply_to=sent[13])
    strategy.aggregate_train(1, [
        answer(sent[11], "site-a", 0.1, 10),
        answer(sent[12], "site-a", 0.1, 10),  # site-b's node claims site-a at first sight
        died,  # site-c dies before it ever replied
    ])
    log = strategy.pop_round()
    assert log["failures"] == {"site-c": "node unavailable"}
    assert "registered as site 'site-b'" in log["rejected"]["site-b"]
    assert set(log["train"]) == {"site-a"}


def test_a_broken_coordinator_map_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "nodes.json"
    bad.write_text('{"site-a": 1, "site-b": 1}')
    with pytest.raises(ValueError, match="registered_sites.*listed for both"):
        make_strategy(registered_sites=str(bad))
