"""Secure aggregation (``federation.secure_aggregation=secaggplus``): the federation's rounds
through Flower's SecAgg+ workflow, so that the server sees only the sum of the sites' updates.

Flower 1.41 has SecAgg+ only on its legacy path: ``SecAggPlusWorkflow`` runs inside
``DefaultWorkflow(fit_workflow=...)`` over a ``LegacyContext`` with a legacy
``flwr.server.strategy`` strategy (``flwr/server/workflow/secure_aggregation/secaggplus_workflow.py``);
the Message API strategies' ``start()`` cannot host it. So this module adapts, and copies nothing:

* :class:`SecureFedAvg` is the legacy strategy. Its hooks call the federation strategy
  (:class:`server.strategy.federation.FederationMixin`) of a plain run: ``configure_fit`` its
  ``configure_train`` (waits for sites, stage config, class counts, sampling), ``aggregate_fit`` its
  ``aggregate_train`` (site identities, metric screening, validation for model selection, quorum,
  FedAvg/FedProx/a server optimizer) on the collect-stage replies, each carrying the unmasked
  aggregate instead of the site's own weights;
* each site sends its *update* (``local - global`` of the floating-point arrays, ``client.secure``),
  which stays inside ``secagg_clipping_range``; the workflow unmasks the ``num-examples``-weighted
  mean update and the server adds it to the global model; integer arrays keep the global values;
* :class:`ProtocolGrid` passes the protocol's four messages per round through and keeps, per site,
  the collect-stage replies (metrics, site name), the errors of every stage and the bytes;
* the sites validate the global models as in a plain run: in the training reply
  (``federation.site_validation=in_train``; the collect-stage reply's metrics reach the server next
  to the masked vector, ``client.secure``) or in Message API evaluate messages (:func:`start_secure`'s
  evaluate workflow, also for the final model), after which the held-out center scores the model.

What a masked round cannot do: per-site update screening (bounds, clipping, weight caps) and
per-head re-averaging need each update in the clear; ``common.config`` refuses the options that
need them, and a site whose *metrics* are rejected after its masked update was summed makes the
round not applied (an update cannot be taken out of the sum). SecAgg+ halting (fewer live
neighbours than ``secagg_reconstruction_threshold``) stops the run with :class:`FederationError`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from logging import WARNING
from typing import Any, cast

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.common import FitIns, FitRes, Parameters, Scalar, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.compat.common import recorddict_compat as compat
from flwr.server import ServerConfig
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import FedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid
from flwr.supercore import log

from common.arrays import ARRAY_KEYS, float_keys
from common.config import FederationConfig
from server.errors import FederationError
from server.strategy.federation import FederationMixin
from server.strategy.identity import SiteRegistry

SITE_RECORD, METRICS_RECORD = "site", "metrics"  # what client.secure keeps next to the FitRes


def add_update(arrays: ArrayRecord, update: Sequence[np.ndarray]) -> ArrayRecord:
    """``arrays`` with ``update`` (one array per :func:`float_keys`, in order) added to its
    floating-point arrays, in their dtype; the integer arrays unchanged."""
    keys = float_keys(arrays)
    if len(update) != len(keys):
        raise FederationError(f"the unmasked SecAgg+ sum has {len(update)} arrays, the global model {len(keys)} "
                              "floating-point ones: server and sites run different model configurations")
    added = dict(zip(keys, update))
    out = OrderedDict()
    for key in arrays.keys():
        array = arrays[key].numpy()
        if key in added:
            array = (array.astype(np.float64) + added[key].reshape(array.shape)).astype(array.dtype)
        out[key] = Array(np.ascontiguousarray(array))
    return ArrayRecord(out)


def quantization_error(weights: Sequence[float], *, max_weight: float, clipping_range: float,
                       quantization_range: int) -> dict[str, float]:
    """How far SecAgg+'s mean update may be from FedAvg's, per element, for sites of ``weights``
    training cases (all summed): ``step + weight_error x max_i |update_i|``, as long as every
    ``weight_i / max_weight x update_i`` lies inside ``+-clipping_range``.

    ``secaggplus_mod`` rounds each weight to ``r_i = round(w_i / max_weight x Q) / Q`` (``Q`` =
    ``quantization_range``), multiplies the update by it and rounds each element stochastically to
    one of ``Q`` levels over ``+-clipping_range``: each site's value moves by less than one level
    ``2 c / Q``; the server divides the sum by ``sum r_i``. Hence ``step = n 2c / (Q sum r_i)`` and
    ``weight_error = sum |r_i / sum r - w_i / sum w|`` (the weights' own rounding).
    """
    ratios = [round(w / max_weight * quantization_range) / quantization_range for w in weights]
    total, cases = sum(ratios), sum(weights)
    if total <= 0 or cases <= 0:
        return {"step": 0.0, "weight_error": 0.0}
    step = len(ratios) * 2.0 * clipping_range / (quantization_range * total)
    weight_error = sum(abs(r / total - w / cases) for r, w in zip(ratios, weights))
    return {"step": step, "weight_error": weight_error}


def content_bytes(content: RecordDict) -> int:
    """The bytes a message carries: its arrays and the protocol's byte strings (keys, shares,
    masked vectors travel in ConfigRecords)."""
    total = sum(len(array.data) for record in content.array_records.values() for array in record.values())
    for record in content.config_records.values():
        for value in record.values():
            values = value if isinstance(value, list) else [value]
            total += sum(len(v) for v in values if isinstance(v, bytes))
    return total


def _stage(message: Message) -> str | None:
    record = message.content.config_records.get(RECORD_KEY_CONFIGS) if message.has_content() else None
    return None if record is None else str(record.get(Key.STAGE, ""))


class ProtocolGrid(Grid):
    """The Grid of a secure run: passes every message on to ``grid`` and keeps what the federation
    strategy needs to file a SecAgg+ round by site (reset by :meth:`start_round`).

    Attributes:
        instructions: every protocol instruction of the round (their ids attribute error replies).
        collected: the (instruction, reply) pairs of the masked-vector stage that carry content.
        errors: the error replies of any stage.
        lost: node id -> the stage in which it did not answer.
        bytes: node id -> {"sent", "received"} bytes over the round's protocol messages.

    The sites name themselves in every protocol reply (``client.app``); the setup stage's names are
    bound in the federation's :class:`SiteRegistry`, so that a site lost later is named.
    """

    def __init__(self, grid: Grid, registry: SiteRegistry) -> None:
        self.grid = grid
        self.registry = registry  # the setup stage's replies bind site names, as training replies do
        self.start_round()

    def start_round(self) -> None:
        self.instructions: list[Message] = []
        self.collected: list[tuple[Message, Message]] = []
        self.errors: list[Message] = []
        self.lost: dict[int, str] = {}
        self.bytes: dict[int, dict[str, int]] = {}

    @property
    def run(self) -> Any:
        return self.grid.run

    def set_run(self, run: Any) -> None:
        self.grid.set_run(run)

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        return self.grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        stages = {_stage(m) for m in messages}
        if not messages or None in stages:
            return replies  # Message API evaluate messages: the federation strategy files them
        stage = stages.pop()
        self.instructions += messages
        by_id = {m.metadata.message_id: m for m in messages}
        for message in messages:
            self._count(message.metadata.dst_node_id, "sent", content_bytes(message.content))
        answered = set()
        for reply in replies:
            instruction = by_id.get(reply.metadata.reply_to_message_id)
            node = instruction.metadata.dst_node_id if instruction is not None else reply.metadata.src_node_id
            answered.add(node)
            if reply.has_error():
                self.errors.append(reply)
                continue
            self._count(node, "received", content_bytes(reply.content))
            if stage == Stage.SETUP:
                self.registry.claim(reply, self.grid.get_node_ids())  # a conflict is refused with the masked vector
            if stage == Stage.COLLECT_MASKED_VECTORS and instruction is not None:
                self.collected.append((instruction, reply))
        for message in messages:
            if message.metadata.dst_node_id not in answered:
                self.lost[message.metadata.dst_node_id] = stage
        return replies

    def _count(self, node: int, direction: str, n: int) -> None:
        counted = self.bytes.setdefault(node, {"sent": 0, "received": 0})
        counted[direction] += n


class SecureFedAvg(FedAvg):
    """The legacy strategy ``SecAggPlusWorkflow`` drives; its hooks call ``federation`` (see the
    module docstring).

    Args:
        federation: the strategy of a plain run (:func:`server.strategy.build_strategy`).
        grid: the run's :class:`ProtocolGrid`.
        initial_arrays: the packed global model to start from (names kept here: legacy
            ``Parameters`` have none).
        settings: ``federation`` config (the SecAgg+ parameters, for the round's record).
        evaluate_fn: the held-out scoring of ``server.app`` (``(server_round, arrays) -> metrics``).
    """

    def __init__(self, federation: FederationMixin, grid: ProtocolGrid, initial_arrays: ArrayRecord,
                 settings: FederationConfig, evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None]) -> None:
        # accept_failures: sites lost during the protocol are the federation strategy's to record (quorum)
        super().__init__(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=federation.min_nodes,
                         min_available_clients=federation.min_nodes, accept_failures=True)
        self.federation = federation
        federation.masked_updates = True
        federation.per_head_averaging = False  # one masked sum, weighted by num-examples, for every head
        self.grid = grid
        self.arrays = initial_arrays
        self.settings = settings
        self.evaluate_fn = evaluate_fn
        self.aggregated = False  # set when the workflow reached aggregate_fit (it did not halt)

    def __repr__(self) -> str:
        return f"SecureFedAvg({type(self.federation).__name__})"

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return compat.arrayrecord_to_parameters(self.arrays, keep_input=True)

    def evaluate(self, server_round: int, parameters: Parameters) -> tuple[float, dict[str, Scalar]] | None:
        """The initial model is scored here, as the Message API's ``start()`` does; later models
        after the sites' validation (:func:`start_secure`'s evaluate workflow), in the same order."""
        if server_round == 0:
            self.evaluate_fn(0, self.arrays)
        return None

    def configure_fit(self, server_round: int, parameters: Parameters,
                      client_manager: ClientManager) -> list[tuple[ClientProxy, FitIns]]:
        messages = list(self.federation.configure_train(server_round, self.arrays, ConfigRecord({}), self.grid))
        proxies = {proxy.node_id: proxy for proxy in client_manager.all().values()}
        keys = list(self.arrays.keys())
        out = []
        for message in messages:
            node = message.metadata.dst_node_id
            if node not in proxies:  # connected after Flower's client manager last looked
                log(WARNING, "round %d: node %d is not in Flower's client manager yet; it joins the next round",
                    server_round, node)
                continue
            config = {**message.content[self.federation.configrecord_key], ARRAY_KEYS: keys}  # type: ignore[attr-defined]
            arrays = message.content[self.federation.arrayrecord_key]  # type: ignore[attr-defined]
            out.append((proxies[node], FitIns(compat.arrayrecord_to_parameters(arrays, keep_input=True), config)))
        return out

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list[tuple[ClientProxy, FitRes] | BaseException]) -> tuple[Parameters | None, dict[str, Scalar]]:
        """``results`` all carry the unmasked mean update (the workflow sets it on each): add it to
        the global model and let the federation strategy file the round on the sites' replies."""
        self.aggregated = True
        update = None
        if any(fitres.num_examples > 0 for _, fitres in results):
            mean, _ = super().aggregate_fit(server_round, results, failures)  # FedAvg of equal vectors: the vector
            update = parameters_to_ndarrays(cast(Parameters, mean))
        candidate = add_update(self.arrays, update) if update is not None else self.arrays
        replies = [Message(RecordDict({self.federation.arrayrecord_key: candidate,  # type: ignore[attr-defined]
                                       "metrics": reply.content.metric_records[METRICS_RECORD],
                                       SITE_RECORD: reply.content.config_records[SITE_RECORD]}), reply_to=instruction)
                   for instruction, reply in self.grid.collected]
        self.federation.registry.remember(self.grid.instructions)  # error replies filed under the site they went to
        summed = [self.federation.registry.name_of(instruction.metadata.dst_node_id) for instruction, _ in self.grid.collected]
        weights = [float(reply.content.metric_records[METRICS_RECORD]["num-examples"]) for _, reply in self.grid.collected]
        arrays, _ = self.federation.aggregate_train(server_round, [*replies, *self.grid.errors])
        tainted = sorted(set(summed) & set(self.federation.rejected))
        notes: dict[str, Any] = {}
        if tainted and arrays is not None:
            notes["not_applied"] = (f"the secure sum includes the masked update of {', '.join(tainted)}, whose reply "
                                    "was rejected; a masked update cannot be taken out of the sum")
            log(WARNING, "round %d: not applied: %s (%s)", server_round, notes["not_applied"],
                "; ".join(self.federation.rejected[name] for name in tainted))
            arrays = None
        self.federation.bytes.update({self.federation.registry.name_of(node): counts
                                      for node, counts in self.grid.bytes.items()})
        self.federation.notes["secure_aggregation"] = {
            "protocol": "secaggplus", "applied": arrays is not None, "summed": summed,
            "lost": {self.federation.registry.name_of(node): stage for node, stage in self.grid.lost.items()},
            "num_shares": self.settings.secagg_num_shares,
            "reconstruction_threshold": self.settings.secagg_reconstruction_threshold,
            **quantization_error(weights, max_weight=self.settings.secagg_max_weight,
                                 clipping_range=self.settings.secagg_clipping_range,
                                 quantization_range=self.settings.secagg_quantization_range),
            **notes,
        }
        if arrays is None:
            return None, {}
        self.arrays = arrays
        return compat.arrayrecord_to_parameters(arrays, keep_input=True), {}


def start_secure(federation: FederationMixin, settings: FederationConfig, *, grid: Grid, initial_arrays: ArrayRecord,
                 num_rounds: int, timeout: float, evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None]) -> ArrayRecord:
    """Run ``num_rounds`` rounds of ``federation`` with SecAgg+ (what ``federation.start(...)``
    does in a plain run); returns the last global model."""
    protocol = ProtocolGrid(grid, federation.registry)
    strategy = SecureFedAvg(federation, protocol, initial_arrays, settings, evaluate_fn)
    secagg = SecAggPlusWorkflow(
        num_shares=settings.secagg_num_shares,
        reconstruction_threshold=settings.secagg_reconstruction_threshold,
        max_weight=settings.secagg_max_weight,
        clipping_range=settings.secagg_clipping_range,
        quantization_range=settings.secagg_quantization_range,
        timeout=timeout,
    )

    def current_round(context: Context) -> int:
        return int(cast(int, context.state.config_records[MAIN_CONFIGS_RECORD][WorkflowKey.CURRENT_ROUND]))

    def fit_round(grid: Grid, context: Context) -> None:
        protocol.start_round()
        strategy.aggregated = False
        secagg(grid, context)
        if not strategy.aggregated:  # the workflow halts (returns) instead of raising
            server_round = current_round(context)
            lost = {federation.registry.name_of(node): stage for node, stage in protocol.lost.items()}
            errors = [message.error.reason[:300] for message in protocol.errors]
            raise FederationError(
                f"round {federation.schedule.global_round(server_round)}: SecAgg+ could not unmask the sum: fewer "
                f"than federation.secagg_reconstruction_threshold={settings.secagg_reconstruction_threshold} live "
                f"neighbours were left for some site (lost: {lost or 'none'}; errors: {errors or 'none'}). "
                "Bring the sites back, or lower the threshold (fewer sites then suffice to unmask a sum)."
            )

    def evaluate_round(grid: Grid, context: Context) -> None:
        # Message API evaluate messages (the sites' plain _evaluate), then the held-out score, in the
        # order of the Message API's start()
        server_round = current_round(context)
        messages = list(federation.configure_evaluate(server_round, strategy.arrays, ConfigRecord({}), grid))
        replies = grid.send_and_receive(messages, timeout=timeout) if messages else []
        federation.aggregate_evaluate(server_round, replies)
        evaluate_fn(server_round, strategy.arrays)

    context = LegacyContext(Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={}),
                            config=ServerConfig(num_rounds=num_rounds, round_timeout=timeout), strategy=strategy)
    DefaultWorkflow(fit_workflow=fit_round, evaluate_workflow=evaluate_round)(protocol, context)
    return strategy.arrays
