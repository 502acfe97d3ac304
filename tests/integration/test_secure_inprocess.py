"""SecAgg+ (federation.secure_aggregation=secaggplus) through the real ServerApp and ClientApp in one
process: the securely summed global model equals FedAvg of the same sites' updates within the
quantization error; a site lost mid-protocol is survived above the reconstruction threshold, and
below it the run stops with a clear error."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Message, RecordDict
from flwr.common.secure_aggregation.secaggplus_constants import (
    RECORD_KEY_CONFIGS,
    Key,
    Stage,
)
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from common.arrays import float_keys
from common.config import compose
from common.wire import pack_state
from deploy.simulation import InProcessGrid, run_inprocess, site_nodes
from server.errors import FederationError
from server.strategy.secure import quantization_error

pytestmark = pytest.mark.integration

SITES = ["site-a", "site-b", "site-c"]
# one round (the sites validate round 0's model in its training message, the final one in an evaluate
# message); bounds off (a masked update has none)
COMMON = ("federation.rounds=1", "federation.min_nodes=3", "federation.update_bound=off", "train.max_steps=2")
SECURE = ("federation.secure_aggregation=secaggplus", "federation.secagg_num_shares=3",
          "federation.secagg_reconstruction_threshold=2")


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    from synth import generate_cohort

    out = tmp_path_factory.mktemp("cohort")
    generate_cohort(out, preset="tiny", sites=3, cases_per_site=5, heldout_cases=2, shape=32, seed=5)
    return out


def config(cohort: Path, out: Path, *overrides: str):
    return compose(["+experiment=tiny", f"federation.heldout={cohort / 'heldout'}", f"federation.out_dir={out}",
                    "train.threads=1", "federation.min_metric_cases=1", *COMMON, *overrides])


def global_model(out: Path, round_: int) -> dict[str, np.ndarray]:
    payload = torch.load(out / "tiny" / "checkpoints" / f"round-{round_:03d}.pt", weights_only=False)
    record = pack_state(payload["state_dict"])
    return {key: record[key].numpy() for key in record.keys()}


@pytest.fixture(scope="module")
def plain(cohort: Path, tmp_path_factory) -> tuple[dict[str, RecordDict], dict[str, np.ndarray]]:
    """Each site's training reply of a plain FedAvg round (same seeds), and the initial model."""
    out = tmp_path_factory.mktemp("plain")
    grid = run_inprocess(config(cohort, out), site_nodes(cohort, SITES))
    replies = {str(r.content.config_records["site"]["name"]): r.content for r in grid.replies
               if r.has_content() and r.content.array_records}  # the training replies
    assert sorted(replies) == SITES
    return replies, global_model(out, 0)


def fedavg_bound(plain, sites: list[str], cfg) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Flower's FedAvg of ``sites``' plain replies, and the per-element bound of its distance to
    SecAgg+'s (quantization step + weight rounding x the largest update + float32 rounding)."""
    replies, initial = plain
    records = [replies[name] for name in sites]
    reference = aggregate_arrayrecords(records, "num-examples")
    weights = [float(r["metrics"]["num-examples"]) for r in records]
    federation = cfg.federation
    error = quantization_error(weights, max_weight=federation.secagg_max_weight,
                               clipping_range=federation.secagg_clipping_range,
                               quantization_range=federation.secagg_quantization_range)
    keys = float_keys(records[0]["arrays"])
    largest = max(float(np.abs(r["arrays"][k].numpy() - initial[k]).max()) for r in records for k in keys)
    # every weighted update element inside the clipping range: the bound holds only then
    assert max(weights) / federation.secagg_max_weight * largest < federation.secagg_clipping_range
    bounds = {k: error["step"] + error["weight_error"] * largest + 4 * np.finfo(np.float32).eps *
              max(1.0, float(np.abs(reference[k].numpy()).max())) for k in keys}
    return {k: reference[k].numpy() for k in keys}, {**error, "largest": largest, **bounds}


def assert_equal_within(secure: dict[str, np.ndarray], reference: dict[str, np.ndarray], bounds: dict[str, float],
                        initial: dict[str, np.ndarray]) -> None:
    moved = 0.0
    for key, expected in reference.items():
        error = float(np.abs(secure[key].astype(np.float64) - expected).max())
        assert error <= bounds[key], f"{key}: SecAgg+ is {error:.3g} from FedAvg, bound {bounds[key]:.3g}"
        moved = max(moved, float(np.abs(expected - initial[key]).max()))
    # the comparison means something: the mean update is far larger than the bound
    assert moved > 20 * max(bounds[k] for k in reference)
    for key in set(secure) - set(reference):  # integer buffers keep the global values
        np.testing.assert_array_equal(secure[key], initial[key])


def test_secure_global_model_equals_fedavg_within_the_quantization_error(cohort, plain, tmp_path) -> None:
    # Prepare
    cfg = config(cohort, tmp_path, *SECURE)
    reference, bounds = fedavg_bound(plain, SITES, cfg)
    # Execute
    run_inprocess(cfg, site_nodes(cohort, SITES))
    # Assert
    assert_equal_within(global_model(tmp_path, 1), reference, bounds, plain[1])
    history = json.loads((tmp_path / "tiny" / "metrics.json").read_text())
    record = history["rounds"][1]["secure_aggregation"]
    assert record["applied"] and sorted(record["summed"]) == SITES and record["lost"] == {}
    assert record["step"] == pytest.approx(bounds["step"])
    assert sorted(history["rounds"][1]["train"]) == SITES  # the sites' metrics reached the server
    # model selection and calibration: round 0 validated in the collect-stage replies, round 1 by evaluate messages
    assert sorted(history["rounds"][0]["sites"]) == SITES and sorted(history["rounds"][1]["sites"]) == SITES
    assert history["rounds"][1]["bytes"]["site-a"]["received"] > 0
    assert history["final"]["secure_aggregation"]["protocol"] == "secaggplus"
    assert "Secure aggregation (SecAgg+" in (tmp_path / "tiny" / "report.html").read_text()


def dropping(lost: set[str], stage: str) -> type[InProcessGrid]:
    """An InProcessGrid whose sites ``lost`` never answer SecAgg+'s ``stage`` (nor any later message)."""

    class Dropping(InProcessGrid):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.gone: set[int] = set()

        def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
            messages = list(messages)
            replies = super().send_and_receive(messages, timeout=timeout)
            for message in messages:
                configs = message.content.config_records.get(RECORD_KEY_CONFIGS)
                if configs is not None and configs.get(Key.STAGE) == stage:
                    self.gone |= {n for n, c in self.nodes.items() if c["site-name"] in lost}
            return [r for r in replies if r.metadata.src_node_id not in self.gone]

    return Dropping


def test_a_site_lost_before_its_masked_vector_is_survived_above_the_threshold(cohort, plain, tmp_path) -> None:
    # Prepare: site-c gets its key shares, trains, but its masked vector never arrives
    cfg = config(cohort, tmp_path, *SECURE)
    reference, bounds = fedavg_bound(plain, ["site-a", "site-b"], cfg)
    # Execute
    run_inprocess(cfg, site_nodes(cohort, SITES), grid_class=dropping({"site-c"}, Stage.COLLECT_MASKED_VECTORS))
    # Assert: the sum of the two survivors, unmasked with their shares of site-c's key
    assert_equal_within(global_model(tmp_path, 1), reference, bounds, plain[1])
    history = json.loads((tmp_path / "tiny" / "metrics.json").read_text())
    record = history["rounds"][1]["secure_aggregation"]
    assert record["applied"] and sorted(record["summed"]) == ["site-a", "site-b"]
    assert record["lost"] == {"site-c": Stage.COLLECT_MASKED_VECTORS}
    assert "site-c" in history["rounds"][1]["quorum"]["missing"]
    assert sorted(history["rounds"][0]["sites"]) == ["site-a", "site-b"]  # site-c's validation was in its lost reply


def test_below_the_reconstruction_threshold_the_run_stops_with_a_clear_error(cohort, tmp_path) -> None:
    # Prepare: two of three sites lost after sharing their keys; one live neighbour < threshold 2
    cfg = config(cohort, tmp_path, *SECURE)
    grid_class = dropping({"site-b", "site-c"}, Stage.COLLECT_MASKED_VECTORS)
    # Execute / Assert
    with pytest.raises(FederationError, match=r"could not unmask.*secagg_reconstruction_threshold=2.*'site-b': 'collect_masked_vectors'"):
        run_inprocess(cfg, site_nodes(cohort, SITES), grid_class=grid_class)


def test_dp_sgd_at_the_sites_composes_with_the_secure_sum(cohort: Path, tmp_path: Path) -> None:
    """The README's pairing: DP-SGD noise on each site's cases, SecAgg+ hiding each noised update."""
    run_inprocess(config(cohort, tmp_path, *SECURE, "train.dp_sgd=true", "model.survival_head=false",
                         "train.seg_dice_batch=false"),
                  site_nodes(cohort, SITES))
    history = json.loads((tmp_path / "tiny" / "metrics.json").read_text())
    last = history["rounds"][-1]
    assert last["round"] == 1 and last["secure_aggregation"]["applied"]
    assert sorted(last["secure_aggregation"]["summed"]) == SITES
    epsilons = [site["dp_sgd_epsilon"] for site in last["train"].values()]
    assert len(epsilons) == 3 and all(0 < e < float("inf") for e in epsilons)
