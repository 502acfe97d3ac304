"""The ClientApp: one site's training and validation, replying with weights and scalars only.

Whatever goes wrong at a site, the reply names the error class (and counts, for data problems)
and nothing of the site's cases or paths; the full text goes to the site's own log
(:mod:`client.disclosure`).

Flower starts a new process for every message, so what this module imports at the top is paid
once per message: torch and the model are imported inside the handlers that use them
(:mod:`client.handlers`), which run in the site's long-lived worker by default
(``federation.site_worker``, :mod:`client.worker`), and a benchmark's empty round
(``federation.empty_rounds``) replies without them.
"""

from __future__ import annotations

import os
import time
import traceback
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

from client.handlers import HANDLERS, site_record
from client.state import site_location, site_state_path
from client.worker import call, worker_wanted
from common.config import from_run_config

app = ClientApp()

#: Flower's error code for an exception in a ClientApp (flwr.common.constant.ErrorCode.CLIENT_APP_RAISED_EXCEPTION)
APP_RAISED_EXCEPTION = 2


def _site_name(node_config: Mapping[str, Any]) -> str:
    return site_location(node_config)[0]


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
                name = _site_name(node_config)
                state = site_state_path(node_config, name)
            except Exception:  # noqa: BLE001 - no usable node config: log to stderr only
                pass
            from client.disclosure import public_reason, site_logger  # the data layer: only on failure

            logger = site_logger(state)
            detail = getattr(exc, "detail", None)
            logger.error("%s failed: %s%s\n%s", stage, exc, f"\n{detail}" if detail else "", traceback.format_exc())
            # the site's (claimed) name helps the coordinator before the server has bound it to the node
            reason = (f"site {name}: " if name else "") + public_reason(exc, stage, _secrets(node_config))
            return Message(Error(code=APP_RAISED_EXCEPTION, reason=reason), reply_to=msg)

    return run


def _train(msg: Message, context: Context) -> Message:
    if RECORD_KEY_CONFIGS in msg.content.config_records:
        # one of SecAgg+'s four messages (federation.secure_aggregation); the third trains with
        # _train_content. Imported here: only secure runs pay for the protocol's crypto imports.
        from client.secure import run_protocol

        reply = run_protocol(msg, context, _train_content)
        # every protocol reply names the site, so that the server can name a site lost mid-protocol
        reply.content["site"] = site_record(_site_name(context.node_config))
        return reply
    return Message(_train_content(msg.content, context), reply_to=msg)


def _train_content(instruction: RecordDict, context: Context) -> RecordDict:
    """Train on the site's data from ``instruction["arrays"]`` with ``instruction["config"]``; the
    reply content: the local weights, the scalar metrics and the site's name."""
    return _run("train", instruction, context)


def _evaluate(msg: Message, context: Context) -> Message:
    return Message(_run("evaluate", msg.content, context), reply_to=msg)


def _run(kind: str, content: RecordDict, context: Context) -> RecordDict:
    """The ``kind`` handler of :mod:`client.handlers`, in the site's worker when the run asks for
    it and the site allows it (:mod:`client.worker`), else in this process."""
    started = time.perf_counter()
    cfg = from_run_config(context.run_config)
    node_config = context.node_config
    if cfg.federation.empty_rounds or not worker_wanted(node_config, cfg.federation.site_worker):
        return HANDLERS[kind](content, node_config, context.run_config)
    state = site_state_path(node_config, _site_name(node_config))
    reply, started_worker = call(kind, content, node_config, context.run_config, state, cfg.federation.site_worker_idle_s)
    if kind == "train":
        # the ClientApp's whole call, hand-over to the worker included
        reply["metrics"]["message_seconds"] = time.perf_counter() - started
        reply["metrics"]["worker_started"] = float(started_worker)
    return reply


train = app.train()(_guarded("training", _train))
evaluate = app.evaluate()(_guarded("validation", _evaluate))
