"""A site's side of SecAgg+ (``federation.secure_aggregation=secaggplus``): Flower's protocol
around the same training code.

Flower's ``secaggplus_mod`` (``flwr/client/mod/secure_aggregation/secaggplus_mod.py``) answers the
protocol's four training messages (public keys, encrypted key shares, the masked update, the
shares that unmask the sum) and keeps its keys and shares in ``context.state`` between them. Only
its third message trains: it hands the legacy ``FitIns`` that the server's ``SecAggPlusWorkflow``
sent to the next handler and parses that handler's reply as a legacy ``FitRes`` (``fitres.*``
records, ``compat.recorddict_to_fitres``). This module converts at exactly that boundary:

* ``FitIns`` -> the ``{"arrays", "config"}`` content the Message API training reads
  (:func:`client.app._train_content`, the one training code path);
* its reply -> a ``FitRes`` whose parameters are the *update* ``local - global`` of the
  floating-point arrays: updates are small, so they stay inside the clipping range and the
  quantization error stays small; the integer arrays (step counters) stay the server's.

The reply keeps the ``metrics`` MetricRecord and the ``site`` record next to the ``fitres.*``
records (the mod clears only array records), so the server files the masked round by site with the
same metrics as a plain one; ``FitRes.metrics`` stays empty because the legacy conversion refuses
the list-valued metrics the sites send.

The mod is not registered on the ClientApp: it reads the SecAgg+ config record of *every* training
message, so :mod:`client.app` calls :func:`run_protocol` only for messages that carry one.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat

from common.arrays import ARRAY_KEYS, float_keys

FITINS_ARRAYS, FITINS_CONFIG = "fitins.parameters", "fitins.config"


def training_content(fitins: RecordDict) -> RecordDict:
    """The ``{"arrays", "config"}`` content of a SecAgg+ collect-stage ``FitIns``."""
    config = ConfigRecord(dict(fitins.config_records[FITINS_CONFIG]))
    keys = [str(k) for k in config.pop(ARRAY_KEYS)]  # type: ignore[union-attr]
    values = parameters_to_ndarrays(compat.arrayrecord_to_parameters(fitins.array_records[FITINS_ARRAYS], keep_input=True))
    if len(keys) != len(values):
        raise ValueError(f"the SecAgg+ instruction names {len(keys)} arrays but carries {len(values)}: "
                         "server and site must run the same fedglioma version")
    arrays = ArrayRecord(OrderedDict((key, Array(np.ascontiguousarray(value))) for key, value in zip(keys, values)))
    return RecordDict({"arrays": arrays, "config": config})


def update_fitres(reply: RecordDict, received: ArrayRecord) -> RecordDict:
    """The legacy ``FitRes`` of a training reply: ``local - received`` of the floating-point arrays
    (float64, so that the subtraction adds no rounding), weighted by ``num-examples``."""
    local = reply["arrays"]
    update = [local[key].numpy().astype(np.float64) - received[key].numpy().astype(np.float64)
              for key in float_keys(received)]
    metrics = reply["metrics"]
    assert isinstance(metrics, MetricRecord)
    fitres = FitRes(status=Status(Code.OK, ""), parameters=ndarrays_to_parameters(update),
                    num_examples=round(float(metrics["num-examples"])), metrics={})  # type: ignore[arg-type]
    content = compat.fitres_to_recorddict(fitres, keep_input=False)
    content["metrics"] = metrics
    content["site"] = reply["site"]
    return content


def run_protocol(msg: Message, context: Context, train: Callable[[RecordDict, Context], RecordDict]) -> Message:
    """Answer one SecAgg+ message with Flower's mod; ``train``: the training of a Message API
    content (:func:`client.app._train_content`), called in the collect stage only."""

    def fit(instruction: Message, ctx: Context) -> Message:
        content = training_content(instruction.content)
        return Message(update_fitres(train(content, ctx), content["arrays"]), reply_to=instruction)  # type: ignore[arg-type]

    return secaggplus_mod(msg, context, fit)
