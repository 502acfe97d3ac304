"""Client-level DP (federation.dp) through the real ServerApp and ClientApp in one process:
epsilon per round in metrics.json and across a resume, the budget stop, failing sites; and
site-level DP-SGD (train.dp_sgd): each site's epsilon in metrics.json and the report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from common.config import compose
from deploy.simulation import run_inprocess, site_nodes

pytestmark = pytest.mark.integration

DP = ("federation.dp=fixed", "federation.dp_noise_multiplier=1.0", "federation.dp_clipping_norm=0.5",
      "federation.min_nodes=2")


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    from synth import generate_cohort

    out = tmp_path_factory.mktemp("cohort")
    generate_cohort(out, preset="tiny", sites=2, cases_per_site=6, heldout_cases=4, shape=32, seed=3)
    return out


def run(cohort: Path, out: Path, *overrides: str, nodes: dict[int, dict[str, str]] | None = None,
        dp: tuple[str, ...] = DP) -> dict:
    # the tiny sites have 1-2 validation cases: below the default minimum a site sends no metric
    cfg = compose(["+experiment=tiny", f"federation.heldout={cohort / 'heldout'}", f"federation.out_dir={out}",
                   "train.threads=1", "federation.min_metric_cases=1", *dp, *overrides])
    run_inprocess(cfg, nodes or site_nodes(cohort, ["site-a", "site-b"]))
    return json.loads((out / "tiny" / "metrics.json").read_text())


def test_epsilon_per_round_continues_across_a_resume(cohort: Path, tmp_path: Path) -> None:
    straight = run(cohort, tmp_path / "straight", "federation.rounds=2", "federation.evaluate_sites=false")
    epsilon = {r["round"]: r["privacy"]["epsilon"] for r in straight["rounds"]}
    assert epsilon[0] == 0.0 < epsilon[1] < epsilon[2]
    assert straight["rounds"][2]["privacy"]["noise_std"] == pytest.approx(1.0 * 0.5 / 2)  # z C / N
    assert straight["final"]["privacy"]["epsilon"] == epsilon[2] and "stopped" not in straight["final"]["privacy"]
    assert (tmp_path / "straight/tiny/privacy.json").exists()
    assert "Privacy of the updates" in (tmp_path / "straight/tiny/report.html").read_text()

    resumed_dir = tmp_path / "resumed"
    run(cohort, resumed_dir, "federation.rounds=1", "federation.evaluate_sites=false")
    resumed = run(cohort, resumed_dir, "federation.rounds=2", "federation.evaluate_sites=false")
    assert [r["round"] for r in resumed["rounds"]] == [0, 1, 2]
    assert resumed["rounds"][2]["privacy"]["releases"] == 2  # the accounting went on, it did not restart
    assert resumed["rounds"][2]["privacy"]["epsilon"] == pytest.approx(epsilon[2])


def test_a_failing_site_and_a_budget_below_two_rounds_stop_cleanly_after_round_one(cohort: Path, tmp_path: Path) -> None:
    from flwr.serverapp import PrivacyConfig, RdpAccountant
    from flwr.supercore.privacy_accounting import GaussianPrivacyEvent, NeighboringRelation, SamplingMethod

    accountant = RdpAccountant(PrivacyConfig(target_delta=1e-5, population_size=3,
                                             neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
                                             sampling_method=SamplingMethod.NO_AMPLIFICATION))
    accountant.compose(GaussianPrivacyEvent(1.0, 3, 3), 2)
    two_rounds = accountant.get_privacy_spent().epsilon
    empty = tmp_path / "site-empty"  # every message to it fails: no usable case
    empty.mkdir()
    (empty / "labels.csv").write_text("case_id,idh,codeletion_1p19q,grade,mgmt\n")
    nodes = site_nodes(cohort, ["site-a", "site-b"])
    nodes[3] = {"data-path": str(empty), "site-name": "site-empty"}
    history = run(cohort, tmp_path / "runs", "federation.rounds=3", "federation.min_nodes=3",
                  f"federation.dp_epsilon_budget={two_rounds * 0.9}", nodes=nodes)
    assert [r["round"] for r in history["rounds"]] == [0, 1]  # round 1 kept, round 2 never started
    first = history["rounds"][1]
    assert set(first["train"]) == {"site-a", "site-b"} and "site-empty" in next(iter(first["failures"].values()))
    assert first["privacy"]["releases"] == 1 and first["privacy"]["noise_std"] == pytest.approx(0.5 / 2)
    assert set(first["sites"]) >= {"site-a", "site-b"}  # the budget's last model was validated by the sites
    stopped = history["final"]["privacy"]["stopped"]
    assert "stops after round 1 instead of 3" in stopped and "dp_epsilon_budget" in stopped
    assert history["final"]["round"] == 1


def test_dp_sgd_epsilon_of_each_site_reaches_metrics_json_and_the_report(cohort: Path, tmp_path: Path) -> None:
    # Prepare: site-level DP-SGD only (no client-level DP); each site keeps its state under tmp_path
    nodes = site_nodes(cohort, ["site-a", "site-b"], state_root=tmp_path / "state")

    # Execute
    history = run(cohort, tmp_path / "runs", "federation.rounds=2", "federation.evaluate_sites=false",
                  "train.dp_sgd=true", "model.survival_head=false", "train.seg_dice_batch=false", nodes=nodes, dp=("federation.min_nodes=2",))

    # Assert: every site's epsilon grew from round 1 to round 2 (the accountant went on across messages)
    rounds = {r["round"]: r["train"] for r in history["rounds"] if r["round"] > 0}
    assert set(rounds[1]) == set(rounds[2]) == {"site-a", "site-b"}
    for site in ("site-a", "site-b"):
        assert 0.0 < rounds[1][site]["dp_sgd_epsilon"] < rounds[2][site]["dp_sgd_epsilon"]
        assert rounds[2][site]["dp_sgd_steps"] == 2 * rounds[1][site]["dp_sgd_steps"]
        assert "loss" not in rounds[2][site]
    assert "site-level DP-SGD" in (tmp_path / "runs/tiny/report.html").read_text()


def test_a_site_past_its_dp_sgd_budget_refuses_with_a_reason_the_server_shows(cohort: Path, tmp_path: Path) -> None:
    # Prepare: a budget below what one round's steps cost
    nodes = site_nodes(cohort, ["site-a", "site-b"], state_root=tmp_path / "state")

    # Execute / Assert: no site trains; the server stops naming each site's reason
    with pytest.raises(Exception, match="no site returned a usable update") as stopped:
        run(cohort, tmp_path / "runs", "federation.rounds=1", "federation.evaluate_sites=false", "train.dp_sgd=true",
            "model.survival_head=false", "train.seg_dice_batch=false", "train.dp_sgd_epsilon_budget=0.1", nodes=nodes, dp=("federation.min_nodes=2",))
    for site in ("site-a", "site-b"):
        assert f"site {site}: PrivacyBudgetError: DP-SGD budget reached" in str(stopped.value)
    assert "train.dp_sgd_epsilon_budget=0.1" in str(stopped.value)
    assert not list((tmp_path / "state").rglob("dp_sgd_accountant.pt"))  # nothing was spent
