"""FedAvg / FedProx with what a multi-center federation needs on top.

The behaviour added to Flower's strategies (no torch here, as in Flower's own strategies):

* ``configure_train`` waits a bounded time for the sites (Flower waits forever) and adds the
  per-round stage config from :class:`server.schedule.RoundSchedule`;
* ``aggregate_train`` screens every reply before averaging: wrong keys/shapes or non-finite
  weights or metrics are rejected and logged with the site's name (one bad reply would otherwise
  abort the run or poison the average); every valid site's scalar metrics are kept per site;
* every reply is filed under the site name bound to its node (:mod:`server.strategy.identity`):
  a site cannot claim another's name, and failures are attributed to the site the instruction went to;
* updates and averaging weights are bounded relative to the other sites (:mod:`server.strategy.bounds`);
* a round is applied only when a quorum of the expected sites replied usably in time; below it the
  round is recorded (who was missing and why) and the run goes on or stops (``federation.on_quorum_fail``);
  after the first round a phase waits at most ``rejoin_wait_s`` for a missing site and goes on
  with the sites that are connected, as long as they make a quorum;
* ``aggregate_evaluate`` keeps per-site validation metrics (not only their average);
* with ``federation.secure_aggregation`` (:mod:`server.strategy.secure`) every reply carries the
  securely summed aggregate instead of the site's own weights: the metrics are still screened and
  filed by site, but no per-site bound or weight cap applies (the server never sees one update);
* with ``federation.dp`` the screened replies are averaged by :mod:`server.strategy.privacy`
  (clipped, equal weights, Gaussian noise, accounted) instead of the bounds and the case-weighted
  average: a bound relative to the other sites' updates would make one site's inclusion depend on
  the others', and a weight by cases or labels would give one site more than the clipped share.

Averaging itself stays Flower's (weighted by ``num-examples`` = training cases, or one of Flower's
robust aggregators, :mod:`server.strategy.robust`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from logging import INFO, WARNING
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.supercore import log

from common.contract import TASKS, VALIDATED_ROUND, VALIDATION_FAILED, VALIDATION_PREFIX
from common.wire import SURVIVAL_HEAD
from server.errors import FederationError, NodeWaitTimeout
from server.schedule import RoundSchedule
from common.arrays import cast_floats, nbytes
from server.strategy.bounds import (
    UpdateBounds,
    cap_weights,
    clip_update,
    screen_distances,
    update_distance,
)
from server.strategy.heads import average_heads, head_weight_key
from server.strategy.identity import SiteRegistry
from server.strategy.privacy import PrivateAveraging
from server.strategy.screening import check_arrays, check_metrics, record_to_dict


class FederationMixin:
    """Shared additions for Flower strategies (combined with FedAvg, FedProx or a robust aggregator).

    ``per_head_averaging``: re-average each task head over the sites labeled for it (weighted
    strategies only; a median or trimmed mean has no weights to re-balance).
    """

    per_head_averaging = True

    def __init__(
        self,
        *args: Any,
        schedule: RoundSchedule,
        node_wait_s: float = 300.0,
        rejoin_wait_s: float = 30.0,
        quorum: float = 0.5,
        on_quorum_fail: str = "skip",
        bounds: UpdateBounds | None = None,
        registry: SiteRegistry | None = None,
        wire_dtype: str = "float32",
        privacy: PrivateAveraging | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.schedule = schedule
        self.node_wait_s = node_wait_s
        self.rejoin_wait_s = rejoin_wait_s
        self.quorum = quorum
        self.on_quorum_fail = on_quorum_fail
        self.bounds = bounds or UpdateBounds()
        self.registry = registry or SiteRegistry()
        self.wire_dtype = wire_dtype  # what travels; the global model and averaging stay float32
        self.privacy = privacy  # client-level DP averaging (federation.dp), None when off
        if privacy is not None:
            self.per_head_averaging = False  # every head's average over all sites, as the noise assumes
        # True when the replies carry SecAgg+'s aggregate (server.strategy.secure), not each site's
        # weights: the per-site bounds and weight caps cannot apply to masked updates
        self.masked_updates = False
        self.min_nodes = int(self.min_available_nodes)  # type: ignore[attr-defined]
        self.stop_reason: str | None = None  # set when a round missed its quorum and the run stops
        # called after each round's training replies and the evaluate replies after the last round
        # with {global round: {site: validation metrics}} of the global models those replies validated
        # (federation.site_validation=in_train/after_reply) and the latest round whose
        # validations are now all in (server.schedule.RoundSchedule.validation_lag)
        self.on_validation: Callable[[dict[int, dict[str, dict[str, Any]]], int], None] | None = None
        self.validation: dict[int, dict[str, dict[str, Any]]] = {}
        self._started = False  # after the first phase, missing sites are waited for only briefly
        self._reference: dict[str, tuple[tuple[int, ...], str]] = {}
        self._current: ArrayRecord | None = None  # the global model a round starts from
        self._instructions: list[Message] = []  # the messages of the phase in progress
        self._connected: list[int] = []
        # training cases each site declared when first seen (cap of its averaging weight)
        self.declared: dict[str, float] = {}
        # each site's latest class counts per task ({site: {task: [n_0, n_1]}}), for class weights
        self.class_counts: dict[str, dict[str, list[float]]] = {}
        self.reset_round()

    @property
    def sites(self) -> dict[int, str]:
        """Node id -> bound site name."""
        return self.registry.by_node

    # ------------------------------------------------------------- round log
    def reset_round(self) -> None:
        self.train_metrics: dict[str, dict[str, Any]] = {}
        self.eval_metrics: dict[str, dict[str, Any]] = {}
        self.rejected: dict[str, str] = {}
        self.failures: dict[str, str] = {}
        self.validation_failures: dict[str, int] = {}  # site -> the global model it could not validate
        self.bounded: dict[str, str] = {}  # updates clipped or weights capped, and why
        self.skipped: list[str] = []  # sites that had nothing to train on in this stage
        self.quorum_log: dict[str, Any] = {}
        self.bytes: dict[str, dict[str, int]] = {}  # per site: array bytes sent to it and received from it
        # wall-clock seconds of each phase as the server sees it (sending, site work, replies)
        self.seconds: dict[str, float] = {}
        self._phase_start: dict[str, float] = {}
        # further sections of the round's record, e.g. "secure_aggregation" (server.strategy.secure)
        self.notes: dict[str, Any] = {}

    def pop_round(self) -> dict[str, Any]:
        """Per-site results of the round just finished (then cleared)."""
        out = {
            "train": self.train_metrics,
            "sites": self.eval_metrics,
            "rejected": self.rejected,
            "failures": self.failures,
            # sites whose replies said they could not validate a global model: {site: its round}
            "validation_failures": self.validation_failures,
            "bounded": self.bounded,
            "skipped": self.skipped,
            "quorum": self.quorum_log,
            "seconds": self.seconds,
            "bytes": self.bytes,
        }
        if self.privacy is not None:
            out["privacy"] = self.privacy.record()
        out.update(self.notes)
        self.reset_round()
        return out

    def _mark(self, phase: str) -> None:
        start = self._phase_start.pop(phase, None)
        if start is not None:
            self.seconds[phase] = time.monotonic() - start

    # ----------------------------------------------------------------- nodes
    def quorum_size(self, expected: int | None = None) -> int:
        """Usable replies a round needs: ``quorum`` x the expected sites, at least one."""
        expected = max(expected or 0, self.min_nodes)
        return max(1, math.ceil(self.quorum * expected - 1e-9))

    def wait_for_nodes(self, grid: Grid) -> list[int]:
        """The connected node ids, once ``min_nodes`` are there. The first phase waits up to
        ``node_wait_s`` and needs them all; later phases wait up to ``rejoin_wait_s`` and go on
        with a quorum of them (a site that died must not stop the federation)."""
        needed = self.min_nodes
        wait = self.node_wait_s if not self._started else min(self.rejoin_wait_s, self.node_wait_s)
        deadline = time.monotonic() + wait
        while len(connected := list(grid.get_node_ids())) < needed and time.monotonic() < deadline:
            time.sleep(1.0)
        floor = needed if not self._started else self.quorum_size()
        if len(connected) < floor:
            raise NodeWaitTimeout(
                f"only {len(connected)} of {needed} sites connected after {wait:.0f} s. "
                "Check that every site's SuperNode is running, can reach the SuperLink port, and "
                "that its key is registered (`flwr supernode list`); or lower federation.min_nodes."
            )
        if len(connected) < needed:
            missing = sorted(set(self.registry.by_node.values()) - {self.registry.name_of(n) for n in connected})
            log(WARNING, "%d of %d sites connected (missing: %s); going on with them (quorum %d)",
                len(connected), needed, ", ".join(missing) or "unknown", floor)
        self._started = True
        self._connected = connected
        return connected

    @contextmanager
    def _sampling_floor(self, available: int) -> Iterator[None]:
        """Let Flower's sampling (which waits without limit for ``min_*_nodes``) take the
        ``available`` nodes when fewer than ``min_nodes`` are connected."""
        names = ("min_available_nodes", "min_train_nodes", "min_evaluate_nodes")
        saved = {name: getattr(self, name) for name in names}
        for name in names:
            setattr(self, name, min(saved[name], available))
        try:
            yield
        finally:
            for name, value in saved.items():
                setattr(self, name, value)

    # ----------------------------------------------------------------- hooks
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        connected = self.wait_for_nodes(grid)
        self._phase_start["train"] = time.monotonic()
        self._reference = {k: (tuple(a.shape), str(a.dtype)) for k, a in arrays.items()}
        self._current = arrays
        round_config = ConfigRecord({**config, **self.schedule.train_config(server_round), **self.federation_class_counts()})
        log(INFO, "round %d: stage %s", self.schedule.global_round(server_round), round_config["stage"])
        with self._sampling_floor(len(connected)):
            self._instructions = list(super().configure_train(server_round, arrays, round_config, grid))  # type: ignore[misc]
        return self._to_wire(self._instructions)

    def _to_wire(self, messages: list[Message]) -> list[Message]:
        """The instructions with their weights in ``wire_dtype`` (the strategy keeps float32)."""
        if self.wire_dtype != "float32":
            key = self.arrayrecord_key  # type: ignore[attr-defined]
            wire = {}
            for message in messages:
                record = message.content[key]
                message.content[key] = wire.setdefault(id(record), cast_floats(record, self.wire_dtype))
        return messages

    def federation_class_counts(self) -> dict[str, list[float]]:
        """``{"class-count-<task>": [n_0, n_1]}`` summed over the sites' latest replies (empty before
        any site replied): every site then weighs the classes by the federation's balance."""
        totals: dict[str, list[float]] = {}
        for counts in self.class_counts.values():
            for task, pair in counts.items():
                total = totals.setdefault(f"class-count-{task}", [0.0, 0.0])
                total[0] += pair[0]
                total[1] += pair[1]
        return totals

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if not self.schedule.evaluate_message(server_round) or self.stop_reason is not None:
            return []
        connected = self.wait_for_nodes(grid)
        self._phase_start["site_eval"] = time.monotonic()
        round_config = ConfigRecord({**config, **self.schedule.evaluate_config(server_round)})
        with self._sampling_floor(len(connected)):
            self._instructions = list(super().configure_evaluate(server_round, arrays, round_config, grid))  # type: ignore[misc]
        return self._to_wire(self._instructions)

    def _screen(self, replies: Iterable[Message], *, train: bool, received: int) -> list[tuple[str, Message]]:
        """The usable replies with their sites' names; everything else logged and recorded by site."""
        self.registry.remember(self._instructions)
        sent = {m.metadata.dst_node_id: nbytes(m.content.array_records[self.arrayrecord_key])  # type: ignore[attr-defined]
                for m in self._instructions if self.arrayrecord_key in m.content.array_records}  # type: ignore[attr-defined]
        kept: list[tuple[str, Message]] = []
        for reply in replies:
            claim = self.registry.claim(reply, self._connected)
            name = claim.name
            counted = self.bytes.setdefault(name, {"sent": 0, "received": 0})
            counted["sent"] += sent.get(claim.node, 0)
            if not reply.has_error():
                for key, record in reply.content.array_records.items():
                    counted["received"] += nbytes(record)
                    reply.content[key] = cast_floats(record, "float32")  # averaged in float32
            if reply.has_error():
                self.failures[name] = reply.error.reason[:500]
                log(WARNING, "site %s failed this round: %s", name, self.failures[name])
                continue
            content = reply.content
            if claim.conflict is None:
                self._take_validation(name, content, received)
            if claim.conflict is not None:
                reason = f"identity conflict: {claim.conflict}"
            elif len(content.metric_records) != 1 or (train and len(content.array_records) != 1):
                reason = "reply must hold exactly one MetricRecord" + (" and one ArrayRecord" if train else "")
            else:
                metrics = next(iter(content.metric_records.values()))
                reason = check_metrics(metrics, self.weighted_by_key)  # type: ignore[attr-defined]
                if reason is None and train:
                    reason = check_arrays(next(iter(content.array_records.values())), self._reference)
            if reason is not None:
                self.rejected[name] = reason
                log(WARNING, "rejected the reply of site %s: %s", name, reason)
                continue
            if metrics[self.weighted_by_key] == 0:  # type: ignore[attr-defined]
                # training: no case for this stage (e.g. imputer pre-training without complete cases);
                # validation: too few cases to send metrics (federation.min_metric_cases)
                self.skipped.append(name)
                (self.train_metrics if train else self.eval_metrics)[name] = record_to_dict(metrics)
                log(INFO, "site %s had no case for this %s; its reply is not averaged", name,
                    "stage" if train else "validation")
                continue
            kept.append((name, reply))
        # averaged in the order of the sites' names, not of their arrival: float sums depend on their
        # order, and the same updates should give the same global model (reproducible runs)
        return sorted(kept, key=lambda item: item[0])

    def _take_validation(self, name: str, content: RecordDict, received: int) -> None:
        """Move the ``val/`` metrics (the site's validation of a global model it received) out of a
        reply's MetricRecord into :attr:`validation`, under the global round they are tagged with
        (``received``, the round of the model this message sent, when untagged). A tag that names
        no model this site can have validated (the future) is ignored, with a warning."""
        for record in content.metric_records.values():
            keys = [k for k in record.keys() if k.startswith(VALIDATION_PREFIX)]
            if not keys:
                continue
            values = {k[len(VALIDATION_PREFIX):]: record[k] for k in keys}
            for key in keys:
                del record[key]
            tag = values.pop(VALIDATED_ROUND, received)
            if not isinstance(tag, (int, float)) or not float(tag).is_integer() or not 0 <= tag <= received:
                log(WARNING, "site %s sent a validation of global model %r (this message sent model %d); ignored",
                    name, tag, received)
                continue
            if values.get(VALIDATION_FAILED):
                self.validation_failures[name] = int(tag)
                log(WARNING, "site %s could not validate global model %d (the cause is in its worker.log); that "
                    "model is recorded without this site's validation", name, int(tag))
                continue
            self.validation.setdefault(int(tag), {})[name] = record_to_dict(MetricRecord(values))

    def _bound(self, kept: list[tuple[str, Message]]) -> list[tuple[str, Message]]:
        """Reject or clip outlying updates and cap averaging weights (:mod:`server.strategy.bounds`)."""
        if self._current is None:
            return kept
        arrays_of = {name: next(iter(r.content.array_records.values())) for name, r in kept}
        metrics_of = {name: next(iter(r.content.metric_records.values())) for name, r in kept}
        distances = {name: update_distance(arrays, self._current) for name, arrays in arrays_of.items()}
        rejected, clipped = screen_distances(distances, self.bounds)
        for name, reason in rejected.items():
            self.rejected[name] = reason
            log(WARNING, "rejected the update of site %s: %s", name, reason)
        replies = dict(kept)
        for name, scale in clipped.items():
            content = replies[name].content
            content[next(iter(content.array_records))] = clip_update(arrays_of[name], self._current, scale)
            self.bounded[name] = f"update clipped to {scale:.3g} of its length (federation.max_update_ratio)"
            log(WARNING, "site %s: %s", name, self.bounded[name])
        kept = [(name, r) for name, r in kept if name not in rejected]
        weights = {name: float(metrics_of[name][self.weighted_by_key]) for name, _ in kept}  # type: ignore[attr-defined]
        for name, (cap, why) in cap_weights(weights, self.declared, self.bounds).items():
            metrics = metrics_of[name]
            metrics[self.weighted_by_key] = cap  # type: ignore[attr-defined]
            for task in (*TASKS, SURVIVAL_HEAD):  # a head's weight cannot exceed the site's capped weight either
                key = head_weight_key(task)
                if key in metrics:
                    metrics[key] = min(float(metrics[key]), cap)
            self.bounded[name] = (self.bounded.get(name, "") + "; " if name in self.bounded else "") + why
            log(WARNING, "site %s: %s", name, why)
        return kept

    def _quorum(self, server_round: int, kept: list[tuple[str, Message]]) -> bool:
        """Record who replied and who was missing; True when the round may be applied."""
        sent = {m.metadata.dst_node_id for m in self._instructions}
        expected = max(len(sent), self.min_nodes)
        needed = self.quorum_size(len(sent))
        replied = len(kept) + len(self.skipped)
        missing: dict[str, str] = {**self.failures, **self.rejected}
        answered = {name for name, _ in kept} | set(self.skipped) | set(missing)
        for node in sent:
            if (name := self.registry.name_of(node)) not in answered:
                missing[name] = "no reply within federation.round_timeout_s"
        for node, name in self.registry.by_node.items():
            if node not in sent and name not in answered:
                missing.setdefault(name, "not connected")
        applied = replied >= needed
        self.quorum_log = {"expected": expected, "needed": needed, "replied": replied, "applied": applied,
                           "missing": missing}
        if not applied:
            round_no = self.schedule.global_round(server_round)
            text = (f"round {round_no}: only {replied} of {expected} sites replied usably (quorum {needed}); "
                    f"missing: {missing or 'none'}")
            if self.on_quorum_fail == "stop":
                self.stop_reason = text + ". The run stops (federation.on_quorum_fail=stop); finished rounds are kept."
                log(WARNING, "%s", self.stop_reason)
            else:
                log(WARNING, "%s. The global model is unchanged; the run goes on (federation.on_quorum_fail=skip).", text)
        return applied

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        self._mark("train")
        self.validation = {}
        kept = self._screen(replies, train=True, received=self.schedule.global_round(server_round) - 1)
        if self.on_validation is not None:
            # earlier global models are recorded first, also when this round fails below
            self.on_validation(self.validation, self.schedule.global_round(server_round) - self.schedule.validation_lag)
        for name, reply in kept:
            metrics = next(iter(reply.content.metric_records.values()))
            if "n_train" in metrics:
                self.declared.setdefault(name, float(metrics["n_train"]))
        if self.privacy is None and not self.masked_updates:
            kept = self._bound(kept)
        for name, reply in kept:
            metrics = next(iter(reply.content.metric_records.values()))
            self.train_metrics[name] = record_to_dict(metrics)
            counts = {t: [float(metrics.get(f"count_{t}_{c}", 0.0)) for c in (0, 1)] for t in TASKS
                      if f"count_{t}_0" in metrics}
            if counts:
                self.class_counts[name] = counts
        if not kept and not self.failures and not self.rejected:
            log(WARNING, "round %d: no site had a case for this stage; the global model is unchanged",
                self.schedule.global_round(server_round))
            self._quorum(server_round, kept)
            return None, None
        if not kept:
            raise FederationError(
                f"round {self.schedule.global_round(server_round)}: no site returned a usable update "
                f"(failures: {self.failures or 'none'}; rejected: {self.rejected or 'none'}). "
                "Read the site logs (SuperNode) for the cause."
            )
        if not self._quorum(server_round, kept):
            return None, None
        messages = [reply for _, reply in kept]
        keep_common_metric_keys(messages)
        if self.privacy is not None and self._current is not None:
            arrays, metrics = self.privacy.aggregate(self.schedule.global_round(server_round), kept, self._current)
            for name, why in self.privacy.clipped.items():
                self.bounded[name] = why
                log(INFO, "site %s: %s", name, why)
            return arrays, metrics
        arrays, metrics = super().aggregate_train(server_round, messages)  # type: ignore[misc]
        if arrays is not None and self._current is not None and self.per_head_averaging:
            arrays = average_heads(arrays, messages, self._current)
        return arrays, metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        self._mark("site_eval")
        self.validation = {}
        kept = self._screen(list(replies), train=False, received=self.schedule.global_round(server_round))
        if self.on_validation is not None and self.schedule.evaluate_message(server_round):
            # with after_reply, the evaluate replies also bring the validation of the model before.
            # (Flower calls this also in rounds that sent no evaluate message: nothing is due then.)
            self.on_validation(self.validation, self.schedule.global_round(server_round) - 1)
        for name, reply in kept:
            metrics = next(iter(reply.content.metric_records.values()))
            self.eval_metrics[name] = record_to_dict(metrics)
        if not kept:
            return None
        messages = [reply for _, reply in kept]
        keep_common_metric_keys(messages)  # e.g. calibration statistics only some sites had cases for
        return super().aggregate_evaluate(server_round, messages)  # type: ignore[misc]


def keep_common_metric_keys(replies: list[Message]) -> None:
    """Flower needs identical metric keys across the replies it averages: drop the others."""
    if not replies:
        return
    common = set.intersection(*(set(next(iter(m.content.metric_records.values())).keys()) for m in replies))
    for reply in replies:
        record = next(iter(reply.content.metric_records.values()))
        for key in set(record.keys()) - common:
            del record[key]
