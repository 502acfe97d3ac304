"""The ClientApp: one site's training and validation, replying with weights and scalars only."""

from __future__ import annotations

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.session import SiteSession
from common.config import from_run_config
from common.model import build_model
from common.wire import load_packed, pack_state

app = ClientApp()


def _model_from(msg: Message, context: Context):
    cfg = from_run_config(context.run_config)
    model = build_model(cfg.model, cfg.data.size)
    load_packed(model, msg.content["arrays"])
    return cfg, model


def _site_record(name: str) -> ConfigRecord:
    # The site's name (not a case ID) lets the coordinator see per-site results.
    return ConfigRecord({"name": name})


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg, model = _model_from(msg, context)
    site = SiteSession.open(context.node_config, cfg)
    metrics = site.train(model, msg.content["config"])
    content = RecordDict(
        {"arrays": pack_state(model.state_dict()), "metrics": MetricRecord(metrics), "site": _site_record(site.name)}
    )
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    cfg, model = _model_from(msg, context)
    site = SiteSession.open(context.node_config, cfg)
    metrics = site.evaluate(model)
    content = RecordDict({"metrics": MetricRecord(metrics), "site": _site_record(site.name)})
    return Message(content, reply_to=msg)
