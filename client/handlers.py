"""What a training or evaluate message does at a site, given its content and the node's and run's
configs: the bodies of the ClientApp's handlers (:mod:`client.app`).

They run either in the ClientApp's own process or in the site's long-lived worker
(:mod:`client.worker`, ``federation.site_worker``), which then skips importing torch, MONAI and
the model code for every message. They read nothing of Flower's ``Context`` but the two configs,
so both places give the same reply.

With ``federation.site_validation=after_reply`` the worker passes ``defer``: a training message
then hands it the validation of the received global model (and, with ``ssl.select_after_reply``
in a round before a pseudo-labeling round, that round's pseudo-label selection with the same
model), which the worker runs after it has sent the reply; the scalar metrics wait in the site's state folder
(:func:`client.state.save_pending_validation`) and the site's next reply, training or evaluate,
carries them (``val/`` keys tagged with the model's global round). Without a worker the
validation runs before training and the same reply carries it, as with ``in_train``.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, MetricRecord, RecordDict

from client.state import RoundTag, save_pending_validation, site_location, take_pending_validation
from common.arrays import cast_floats
from common.config import from_run_config
from common.contract import VALIDATED_ROUND, VALIDATION_FAILED, VALIDATION_PREFIX


#: how a handler hands work to the worker for after its reply (None: no worker, do it now)
Defer = Callable[[Callable[[], None]], None] | None


def site_record(name: str) -> ConfigRecord:
    # The site's name (not a case ID) lets the coordinator see per-site results.
    return ConfigRecord({"name": name})


def train_content(instruction: RecordDict, node_config: Mapping[str, Any], run_config: Mapping[str, Any],
                  defer: Defer = None) -> RecordDict:
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

    round_config = instruction["config"]
    received = int(round_config.get("global-round", 0)) - 1  # type: ignore[call-overload]
    model = build_model(cfg.model, cfg.data.size)
    load_packed(model, instruction["arrays"])  # type: ignore[arg-type]
    opened = time.perf_counter()
    site = SiteSession.open(node_config, cfg)
    open_seconds = time.perf_counter() - opened
    later = (defer is not None and cfg.federation.site_validation == "after_reply"
             and bool(round_config.get("validate", False)))
    select_later = (defer is not None and cfg.ssl.enabled and cfg.ssl.select_after_reply
                    and bool(round_config.get("select-after-reply", False)))
    kept = _kept_validation(site.state_dir, cfg, received)
    metrics = site.train(model, round_config, defer_validation=later)  # type: ignore[arg-type]
    if kept and not any(k.startswith(VALIDATION_PREFIX) for k in metrics):
        metrics.update(kept)
    metrics.update(open_seconds=open_seconds, message_seconds=time.perf_counter() - started,
                   validation_after_reply=float(later))
    arrays = cast_floats(pack_state(model.state_dict()), cfg.federation.wire_dtype)
    received_model = functools.cache(lambda: _received_model(cfg, instruction))  # built once for both jobs
    if later:
        defer(lambda: _validate_later(site, cfg, instruction, received_model))  # type: ignore[misc]
    if select_later:
        defer(lambda: _select_later(site, cfg, instruction, received_model))  # type: ignore[misc]
    return RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics), "site": site_record(site.name)})


def evaluate_content(content: RecordDict, node_config: Mapping[str, Any], run_config: Mapping[str, Any],
                     defer: Defer = None) -> RecordDict:
    """The received model (``content["arrays"]``) on the site's validation split: scalar metrics
    (surface distances included) and the site's name; plus, with ``after_reply``, the kept
    validation of the model before it."""
    cfg = from_run_config(run_config)
    # imported here, as in train_content
    from client.session import SiteSession
    from common.model import build_model
    from common.wire import load_packed

    model = build_model(cfg.model, cfg.data.size)
    load_packed(model, content["arrays"])  # type: ignore[arg-type]
    site = SiteSession.open(node_config, cfg)
    config = content["config"] if "config" in content else ConfigRecord({})
    kept = _kept_validation(site.state_dir, cfg, int(config.get("global-round", 0)))  # type: ignore[union-attr, call-overload]
    metrics = {**site.evaluate(model), **kept}
    return RecordDict({"metrics": MetricRecord(metrics), "site": site_record(site.name)})


def _kept_validation(state_dir: Path, cfg: Any, received: int) -> dict[str, float]:
    """The site's kept validation of the model before the ``received`` one, as reply metrics
    (``val/`` keys), or nothing."""
    from client.session import prefixed_validation  # torch: only where a model is used anyway

    validation = take_pending_validation(state_dir, RoundTag(cfg.federation.run_name, received - 1))
    return prefixed_validation(validation) if validation else {}


def _received_model(cfg: Any, instruction: RecordDict) -> Any:
    """The global model the training message brought (its own copy: training changed the other)."""
    # torch and the model code: already imported by train_content
    from common.model import build_model
    from common.wire import load_packed

    model = build_model(cfg.model, cfg.data.size)
    load_packed(model, instruction["arrays"])  # type: ignore[arg-type]
    return model


def _validate_later(site: Any, cfg: Any, instruction: RecordDict, received_model: Callable[[], Any]) -> None:
    """After the reply: the received model on the validation split, kept for the next reply."""
    round_config = instruction["config"]
    received = int(round_config.get("global-round", 0)) - 1  # type: ignore[call-overload]
    tag = RoundTag(cfg.federation.run_name, received)
    try:
        validation = site.validate_received(received_model(), round_config)
        save_pending_validation(site.state_dir, tag, validation)
    except Exception:
        # the next reply says so (the server names the site and model); the cause is in worker.log
        save_pending_validation(site.state_dir, tag, {VALIDATION_FAILED: 1.0, VALIDATED_ROUND: float(received)})
        raise


def _select_later(site: Any, cfg: Any, instruction: RecordDict, received_model: Callable[[], Any]) -> None:
    """After the reply: the next round's pseudo-labels, selected with the received model
    (``ssl.select_after_reply``); that round uses them and reports the selection's metrics."""
    from client.pseudo_labels import predict_pseudo_labels, save_pseudo_labels  # torch: imported already

    cases = site.stage_cases("supervised")
    result = predict_pseudo_labels(received_model(), cases, cfg, site.device, cache_dir=site.preprocessed)
    tag = RoundTag(cfg.federation.run_name, int(instruction["config"].get("global-round", 0)))  # type: ignore[union-attr, call-overload]
    save_pseudo_labels(site.state_dir, cases, result.labels, tag, selected_after_reply=result.metrics)


HANDLERS = {"train": train_content, "evaluate": evaluate_content}
