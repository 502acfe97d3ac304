"""SecAgg+ pieces without a federation: the config combinations refused, the quantization bound
against Flower's own quantizer, the site's FitIns/FitRes adapter, the server adding the update."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.common import FitIns, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.quantization import dequantize, quantize
from flwr.compat.common import recorddict_compat as compat

from client.secure import training_content, update_fitres
from common.arrays import ARRAY_KEYS
from common.config import ConfigError, compose
from server.strategy.secure import add_update, quantization_error

SECURE = ["federation.secure_aggregation=secaggplus", "federation.update_bound=off", "federation.min_nodes=3"]


def test_secure_defaults_compose() -> None:
    federation = compose(SECURE).federation
    assert federation.secure_aggregation == "secaggplus" and federation.secagg_reconstruction_threshold == 2


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["federation.strategy=krum"], "robust aggregator needs each site's update"),
        (["federation.dp=fixed"], "cannot be combined with federation.dp='fixed'"),
        (["federation.update_bound=reject"], "needs federation.update_bound=off"),
        (["federation.wire_dtype=float16"], "needs federation.wire_dtype=float32"),
        (["federation.max_examples=100"], "cannot cap weights"),
        (["federation.secagg_reconstruction_threshold=3"], "must be >= 2 and below federation.secagg_num_shares=3"),
        (["federation.secagg_num_shares=2"], "must be >= 3"),
        (["federation.min_nodes=2", "federation.secagg_num_shares=4", "federation.secagg_reconstruction_threshold=3"],
         "exceeds federation.min_nodes=2: no round could be unmasked"),
        (["federation.secagg_quantization_range=2147483648"], "must be in \\[2, 2\\*\\*31\\)"),
    ],
)
def test_combinations_that_need_each_update_in_the_clear_are_refused(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        compose(SECURE + overrides)


def test_server_optimizers_run_on_the_secure_aggregate() -> None:
    assert compose([*SECURE, "federation.strategy=fedadam"]).federation.strategy == "fedadam"


def test_quantization_bound_holds_for_flowers_quantizer_and_is_tight() -> None:
    """The site-side arithmetic of ``secaggplus_mod`` (weight rounding, stochastic quantization) and
    the server's dequantization, with Flower's functions, stay within :func:`quantization_error`."""
    # Prepare
    rng = np.random.default_rng(0)
    weights, max_weight, clip, levels = [4.0, 7.0, 13.0], 1000.0, 8.0, 2**22
    updates = [rng.normal(0, 1e-2, 5000) for _ in weights]
    # Execute: what secaggplus_mod and SecAggPlusWorkflow compute, without the masks (they cancel)
    q_ratios = [round(w / max_weight * levels) for w in weights]
    summed = sum(quantize([u * q / levels], clip, levels)[0].astype(np.int64) for u, q in zip(updates, q_ratios))
    mean = (dequantize([summed], clip, levels)[0] - (len(weights) - 1) * clip) * levels / sum(q_ratios)
    # Assert
    fedavg = sum(w * u for w, u in zip(weights, updates)) / sum(weights)
    bound = quantization_error(weights, max_weight=max_weight, clipping_range=clip, quantization_range=levels)
    largest = max(float(np.abs(u).max()) for u in updates)
    error = float(np.abs(mean - fedavg).max())
    assert error <= bound["step"] + bound["weight_error"] * largest
    assert error > 0.5 * bound["step"]  # the bound is not loose


def test_site_adapter_reads_the_fitins_and_answers_the_update_of_its_floats() -> None:
    # Prepare: a FitIns as SecAggPlusWorkflow builds it from the server's packed arrays
    sent = OrderedDict([("encoder", np.ones(4, np.float32)), ("encoder.int64", np.array([3], np.int64))])
    fitins = compat.fitins_to_recorddict(FitIns(ndarrays_to_parameters(list(sent.values())),
                                                {ARRAY_KEYS: list(sent), "stage": "supervised"}), keep_input=True)
    # Execute
    content = training_content(fitins)
    local = ArrayRecord(OrderedDict([("encoder", Array(np.full(4, 1.25, np.float32))),
                                     ("encoder.int64", Array(np.array([5], np.int64)))]))
    reply = RecordDict({"arrays": local, "metrics": MetricRecord({"num-examples": 6.0}),
                        "site": ConfigRecord({"name": "site-a"})})
    fitres = update_fitres(reply, content["arrays"])
    # Assert
    assert list(content["arrays"].keys()) == list(sent) and dict(content["config"]) == {"stage": "supervised"}
    legacy = compat.recorddict_to_fitres(fitres, keep_input=True)
    assert legacy.num_examples == 6
    np.testing.assert_allclose(parameters_to_ndarrays(legacy.parameters)[0], np.full(4, 0.25))  # floats only
    assert len(parameters_to_ndarrays(legacy.parameters)) == 1
    assert fitres["metrics"]["num-examples"] == 6.0 and fitres["site"]["name"] == "site-a"


def test_server_adds_the_mean_update_to_floats_and_keeps_integer_buffers() -> None:
    arrays = ArrayRecord(OrderedDict([("encoder", Array(np.ones(3, np.float32))),
                                      ("encoder.int64", Array(np.array([7], np.int64)))]))
    out = add_update(arrays, [np.array([0.5, -0.5, 0.0])])
    np.testing.assert_array_equal(out["encoder"].numpy(), np.array([1.5, 0.5, 1.0], np.float32))
    assert out["encoder"].numpy().dtype == np.float32 and out["encoder.int64"].numpy().tolist() == [7]
