"""The ClientApp: one site's training and validation, replying with weights and scalars only.

Whatever goes wrong at a site, the reply names the error class (and counts, for data problems)
and nothing of the site's cases or paths; the full text goes to the site's own log
(:mod:`client.disclosure`).
"""

from __future__ import annotations

import os
import traceback
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.disclosure import public_reason, site_logger
from client.session import SiteSession, site_location
from client.state import site_state_path
from common.config import from_run_config
from common.model import build_model
from common.wire import load_packed, pack_state

app = ClientApp()

#: Flower's error code for an exception in a ClientApp (flwr.common.constant.ErrorCode.CLIENT_APP_RAISED_EXCEPTION)
APP_RAISED_EXCEPTION = 2


def _model_from(msg: Message, context: Context):
    cfg = from_run_config(context.run_config)
    model = build_model(cfg.model, cfg.data.size)
    load_packed(model, msg.content["arrays"])
    return cfg, model


def _site_record(name: str) -> ConfigRecord:
    # The site's name (not a case ID) lets the coordinator see per-site results.
    return ConfigRecord({"name": name})


def _secrets(node_config: Mapping[str, Any]) -> list[str]:
    """What an error text must not show: the site's paths and case IDs (its case folder names)."""
    out = [str(node_config.get(key, "")) for key in ("data-path", "state-path")]
    data = Path(out[0]).expanduser() if out[0] else None
    if data is not None:
        out.append(str(data.resolve()))
        try:
            out += [entry.name for entry in os.scandir(data)]
        except OSError:
            pass
    return out


def _guarded(stage: str, handler: Callable[[Message, Context], Message]) -> Callable[[Message, Context], Message]:
    """Run ``handler``; on any exception log the full text at the site and reply with an error
    that carries only :func:`client.disclosure.public_reason`."""

    def run(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context)
        except Exception as exc:  # noqa: BLE001 - every failure becomes a clean error reply
            node_config = context.node_config
            name, state = "", None
            try:
                name, _ = site_location(node_config)
                state = site_state_path(node_config, name)
            except Exception:  # noqa: BLE001 - no usable node config: log to stderr only
                pass
            logger = site_logger(state)
            detail = getattr(exc, "detail", None)
            logger.error("%s failed: %s%s\n%s", stage, exc, f"\n{detail}" if detail else "", traceback.format_exc())
            # the site's (claimed) name helps the coordinator before the server has bound it to the node
            reason = (f"site {name}: " if name else "") + public_reason(exc, stage, _secrets(node_config))
            return Message(Error(code=APP_RAISED_EXCEPTION, reason=reason), reply_to=msg)

    return run


def _train(msg: Message, context: Context) -> Message:
    cfg, model = _model_from(msg, context)
    site = SiteSession.open(context.node_config, cfg)
    metrics = site.train(model, msg.content["config"])
    content = RecordDict(
        {"arrays": pack_state(model.state_dict()), "metrics": MetricRecord(metrics), "site": _site_record(site.name)}
    )
    return Message(content, reply_to=msg)


def _evaluate(msg: Message, context: Context) -> Message:
    cfg, model = _model_from(msg, context)
    site = SiteSession.open(context.node_config, cfg)
    metrics = site.evaluate(model)
    content = RecordDict({"metrics": MetricRecord(metrics), "site": _site_record(site.name)})
    return Message(content, reply_to=msg)


train = app.train()(_guarded("training", _train))
evaluate = app.evaluate()(_guarded("validation", _evaluate))
