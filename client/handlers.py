"""What a training or evaluate message does at a site, given its content and the node's and run's
configs: the bodies of the ClientApp's handlers (:mod:`client.app`).

They run either in the ClientApp's own process or in the site's long-lived worker
(:mod:`client.worker`, ``federation.site_worker``), which then skips importing torch, MONAI and
the model code for every message. They read nothing of Flower's ``Context`` but the two configs,
so both places give the same reply.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from flwr.app import ConfigRecord, MetricRecord, RecordDict

from client.state import site_location
from common.arrays import cast_floats
from common.config import from_run_config


def site_record(name: str) -> ConfigRecord:
    # The site's name (not a case ID) lets the coordinator see per-site results.
    return ConfigRecord({"name": name})


def train_content(instruction: RecordDict, node_config: Mapping[str, Any], run_config: Mapping[str, Any]) -> RecordDict:
    """Train on the site's data from ``instruction["arrays"]`` with ``instruction["config"]``; the
    reply content: the local weights, the scalar metrics and the site's name."""
    started = time.perf_counter()
    cfg = from_run_config(run_config)
    if cfg.federation.empty_rounds:
        # benchmark floor: what Flower itself costs per message (process start, polling, transfer)
        metrics = MetricRecord({"num-examples": 1.0, "n_train": 1.0, "message_seconds": time.perf_counter() - started})
        return RecordDict({"arrays": instruction["arrays"], "metrics": metrics,
                           "site": site_record(site_location(node_config)[0])})
    # torch, the model and the data layer: imported here so that empty rounds do without them
    from client.session import SiteSession
    from common.model import build_model
    from common.wire import load_packed, pack_state

    model = build_model(cfg.model, cfg.data.size)
    load_packed(model, instruction["arrays"])  # type: ignore[arg-type]
    opened = time.perf_counter()
    site = SiteSession.open(node_config, cfg)
    open_seconds = time.perf_counter() - opened
    metrics = site.train(model, instruction["config"])
    metrics.update(open_seconds=open_seconds, message_seconds=time.perf_counter() - started)
    arrays = cast_floats(pack_state(model.state_dict()), cfg.federation.wire_dtype)
    return RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics), "site": site_record(site.name)})


def evaluate_content(content: RecordDict, node_config: Mapping[str, Any], run_config: Mapping[str, Any]) -> RecordDict:
    """The received model (``content["arrays"]``) on the site's validation split: scalar metrics
    (surface distances included) and the site's name."""
    cfg = from_run_config(run_config)
    # imported here, as in train_content
    from client.session import SiteSession
    from common.model import build_model
    from common.wire import load_packed

    model = build_model(cfg.model, cfg.data.size)
    load_packed(model, content["arrays"])  # type: ignore[arg-type]
    site = SiteSession.open(node_config, cfg)
    metrics = site.evaluate(model)
    return RecordDict({"metrics": MetricRecord(metrics), "site": site_record(site.name)})


HANDLERS = {"train": train_content, "evaluate": evaluate_content}
