"""FedAvg / FedProx with what a multi-center federation needs on top.

The behaviour added to Flower's strategies (no torch here, as in Flower's own strategies):

* ``configure_train`` waits a bounded time for the sites (Flower waits forever) and adds the
  per-round stage config from :class:`server.schedule.RoundSchedule`;
* ``aggregate_train`` screens every reply before averaging: wrong keys/shapes or non-finite
  weights or metrics are rejected and logged with the site's name (one bad reply would otherwise
  abort the run or poison the average); every valid site's scalar metrics are kept per site;
* ``aggregate_evaluate`` keeps per-site validation metrics (not only their average).

Averaging itself stays Flower's (weighted by ``num-examples`` = training cases).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from logging import INFO, WARNING
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.supercore import log

from common.contract import TASKS
from server.errors import FederationError, NodeWaitTimeout
from server.schedule import RoundSchedule
from server.strategy.heads import average_heads
from server.strategy.screening import check_arrays, check_metrics, record_to_dict, site_name


class FederationMixin:
    """Shared additions for Flower strategies (combined with FedAvg or FedProx below)."""

    def __init__(self, *args: Any, schedule: RoundSchedule, node_wait_s: float = 300.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.schedule = schedule
        self.node_wait_s = node_wait_s
        self.sites: dict[int, str] = {}
        self._reference: dict[str, tuple[tuple[int, ...], str]] = {}
        self._current: ArrayRecord | None = None  # the global model a round starts from
        # each site's latest class counts per task ({site: {task: [n_0, n_1]}}), for class weights
        self.class_counts: dict[str, dict[str, list[float]]] = {}
        self.reset_round()

    # ------------------------------------------------------------- round log
    def reset_round(self) -> None:
        self.train_metrics: dict[str, dict[str, Any]] = {}
        self.eval_metrics: dict[str, dict[str, Any]] = {}
        self.rejected: dict[str, str] = {}
        self.failures: dict[str, str] = {}
        self.skipped: list[str] = []  # sites that had nothing to train on in this stage
        # wall-clock seconds of each phase as the server sees it (sending, site work, replies)
        self.seconds: dict[str, float] = {}
        self._phase_start: dict[str, float] = {}

    def pop_round(self) -> dict[str, Any]:
        """Per-site results of the round just finished (then cleared)."""
        out = {
            "train": self.train_metrics,
            "sites": self.eval_metrics,
            "rejected": self.rejected,
            "failures": self.failures,
            "skipped": self.skipped,
            "seconds": self.seconds,
        }
        self.reset_round()
        return out

    def _mark(self, phase: str) -> None:
        start = self._phase_start.pop(phase, None)
        if start is not None:
            self.seconds[phase] = time.monotonic() - start

    # ----------------------------------------------------------------- hooks
    def wait_for_nodes(self, grid: Grid) -> None:
        needed = self.min_available_nodes  # type: ignore[attr-defined]
        deadline = time.monotonic() + self.node_wait_s
        while (connected := len(list(grid.get_node_ids()))) < needed:
            if time.monotonic() >= deadline:
                raise NodeWaitTimeout(
                    f"only {connected} of {needed} sites connected after {self.node_wait_s:.0f} s. "
                    "Check that every site's SuperNode is running, can reach the SuperLink port, and "
                    "that its key is registered (`flwr supernode list`); or lower federation.min_nodes."
                )
            time.sleep(1.0)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.wait_for_nodes(grid)
        self._phase_start["train"] = time.monotonic()
        self._reference = {k: (tuple(a.shape), str(a.dtype)) for k, a in arrays.items()}
        self._current = arrays
        round_config = ConfigRecord({**config, **self.schedule.train_config(server_round), **self.federation_class_counts()})
        log(INFO, "round %d: stage %s", self.schedule.global_round(server_round), round_config["stage"])
        return super().configure_train(server_round, arrays, round_config, grid)  # type: ignore[misc]

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
        if not self.schedule.evaluate_sites:
            return []
        self.wait_for_nodes(grid)
        self._phase_start["site_eval"] = time.monotonic()
        round_config = ConfigRecord({**config, **self.schedule.evaluate_config(server_round)})
        return super().configure_evaluate(server_round, arrays, round_config, grid)  # type: ignore[misc]

    def _screen(self, replies: Iterable[Message], *, train: bool) -> list[Message]:
        """Keep only usable replies; log and record everything else by site."""
        kept: list[Message] = []
        for reply in replies:
            name = site_name(reply, self.sites)
            if reply.has_error():
                self.failures[name] = reply.error.reason
                log(WARNING, "site %s failed this round: %s", name, reply.error.reason)
                continue
            content = reply.content
            if len(content.metric_records) != 1 or (train and len(content.array_records) != 1):
                reason = "reply must hold exactly one MetricRecord" + (" and one ArrayRecord" if train else "")
            else:
                metrics = next(iter(content.metric_records.values()))
                reason = check_metrics(metrics, self.weighted_by_key)  # type: ignore[attr-defined]
                if reason is None and train:
                    reason = check_arrays(next(iter(content.array_records.values())), self._reference)
            if reason is not None:
                self.rejected[name] = reason
                log(WARNING, "rejected the update of site %s: %s", name, reason)
                continue
            if train and metrics[self.weighted_by_key] == 0:  # type: ignore[attr-defined]
                # e.g. imputer pre-training at a site without complete cases: nothing to average
                self.skipped.append(name)
                self.train_metrics[name] = record_to_dict(metrics)
                log(INFO, "site %s had no case for this stage; its reply is not averaged", name)
                continue
            kept.append(reply)
        if train:
            keep_common_metric_keys(kept)
        return kept

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        self._mark("train")
        kept = self._screen(replies, train=True)
        for reply in kept:
            metrics = next(iter(reply.content.metric_records.values()))
            name = site_name(reply, self.sites)
            self.train_metrics[name] = record_to_dict(metrics)
            counts = {t: [float(metrics.get(f"count_{t}_{c}", 0.0)) for c in (0, 1)] for t in TASKS
                      if f"count_{t}_0" in metrics}
            if counts:
                self.class_counts[name] = counts
        if not kept and not self.failures and not self.rejected:
            log(WARNING, "round %d: no site had a case for this stage; the global model is unchanged",
                self.schedule.global_round(server_round))
            return None, None
        if not kept:
            raise FederationError(
                f"round {self.schedule.global_round(server_round)}: no site returned a usable update "
                f"(failures: {self.failures or 'none'}; rejected: {self.rejected or 'none'}). "
                "Read the site logs (SuperNode) for the cause."
            )
        arrays, metrics = super().aggregate_train(server_round, kept)  # type: ignore[misc]
        if arrays is not None and self._current is not None:
            arrays = average_heads(arrays, kept, self._current)
        return arrays, metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        self._mark("site_eval")
        kept = self._screen(list(replies), train=False)
        for reply in kept:
            metrics = next(iter(reply.content.metric_records.values()))
            self.eval_metrics[site_name(reply, self.sites)] = record_to_dict(metrics)
        if not kept:
            return None
        keep_common_metric_keys(kept)  # e.g. calibration statistics only some sites had cases for
        return super().aggregate_evaluate(server_round, kept)  # type: ignore[misc]


def keep_common_metric_keys(replies: list[Message]) -> None:
    """Flower needs identical metric keys across the replies it averages: drop the others."""
    if not replies:
        return
    common = set.intersection(*(set(next(iter(m.content.metric_records.values())).keys()) for m in replies))
    for reply in replies:
        record = next(iter(reply.content.metric_records.values()))
        for key in set(record.keys()) - common:
            del record[key]
