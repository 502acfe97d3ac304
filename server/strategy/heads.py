"""Per-head federated averaging: each task's head is averaged over the sites that have labels for it.

FedAvg weighs every parameter by a site's training cases. A task head only learns from the cases
labeled for that task, so a site without any such label would pull the head back towards the
global model in proportion to all its cases. Here the head of task T (wire group
``classifier.heads.T``, :func:`common.wire.group_of`) is averaged with the weights ``labeled_T``
(the site's labeled training cases for T); when no site has such labels the global head is kept.
The shared trunk and the rest of the network keep FedAvg's weights.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from common.contract import TASKS
from common.wire import SURVIVAL_HEAD, head_group


def head_weight_key(task: str) -> str:
    """The reply metric a head is weighted by: the site's labeled training cases for ``task``."""
    return f"labeled_{task}"


def average_heads(
    averaged: ArrayRecord, replies: Iterable[Message], current: ArrayRecord, tasks: Sequence[str] = TASKS
) -> ArrayRecord:
    """``averaged`` (FedAvg of ``replies``) with each task head re-averaged by labeled cases.

    Args:
        averaged: the FedAvg result over ``replies`` (every key of the model).
        replies: the screened replies (one ArrayRecord and one MetricRecord each).
        current: the global model the round started from (kept for heads no site could train).
    """
    replies = list(replies)
    out = ArrayRecord({key: averaged[key] for key in averaged.keys()})
    for task in (*tasks, SURVIVAL_HEAD):  # the survival head: by the cases with a known survival
        key = head_group(task)
        if key not in out:
            continue
        weighted = []
        for reply in replies:
            metrics = next(iter(reply.content.metric_records.values()))
            weight = float(metrics.get(head_weight_key(task), 0.0))
            if weight > 0:
                arrays = next(iter(reply.content.array_records.values()))
                weighted.append(RecordDict({"arrays": ArrayRecord({key: arrays[key]}), "metrics": MetricRecord({"w": weight})}))
        out[key] = aggregate_arrayrecords(weighted, "w")[key] if weighted else current[key]
    return out
