"""ServerApp + ClientApp for real, in one process: an in-process Grid hands each message to the
ClientApp (Flower's deployment engine is exercised in test_federation_deployment.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from common.config import compose
from common.contract import TASKS
from deploy import simulation
from deploy.simulation import InProcessGrid, run_inprocess

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    from synth import generate_cohort

    out = tmp_path_factory.mktemp("cohort")
    generate_cohort(out, preset="tiny", sites=2, cases_per_site=6, heldout_cases=4, shape=32, seed=3)
    return out


def run_server(cohort: Path, out: Path, nodes: dict[int, dict[str, str]], *overrides: str) -> InProcessGrid:
    # the tiny sites have 1-2 validation cases: below the default minimum a site sends no metric
    cfg = compose(["+experiment=tiny", f"federation.heldout={cohort / 'heldout'}", f"federation.out_dir={out}",
                   "train.threads=1", "federation.min_metric_cases=1", *overrides])
    return run_inprocess(cfg, nodes)


def site_nodes(cohort: Path, *names: str) -> dict[int, dict[str, str]]:
    return simulation.site_nodes(cohort, names)


def test_two_rounds_write_metrics_checkpoints_report_and_resume(cohort: Path, tmp_path: Path) -> None:
    out = tmp_path / "runs"
    grid = run_server(cohort, out, site_nodes(cohort, "site-a", "site-b"), "federation.min_nodes=2")
    run_dir = out / "tiny"
    history = json.loads((run_dir / "metrics.json").read_text())
    assert [r["round"] for r in history["rounds"]] == [0, 1, 2]
    for entry in history["rounds"][1:]:
        assert set(entry["train"]) == {"site-a", "site-b"}
        assert set(entry["sites"]) == {"site-a", "site-b"}
        assert entry["train"]["site-a"]["num-examples"] > 0
    assert "dice_wt" in history["final"]["heldout"] and history["final"]["heldout_cases"] == 4
    # best.pt is chosen on the sites' validation, never on the held-out center; the calibration
    # fit on the same validation is recorded per round and travels with the checkpoint
    assert "held-out center is only reported" in history["final"]["selection"]
    for entry in history["rounds"][1:]:
        assert set(entry["calibration"]) >= {f"temperature_{t}" for t in TASKS}
        assert entry["selection_score"] is not None
        assert not any(k.startswith("cal_") for k in entry["sites"]["site-a"])
        assert 0.0 <= entry["train"]["site-a"]["grad_share_seg"] <= 1.0
    # surface distances only in the final model's validation (federation.site_validation_distances)
    for entry in history["rounds"]:
        site = entry["sites"]["site-a"]
        assert site["dice_wt"] is not None
        assert (site["hd95_wt"] is not None) == (entry["round"] == 2), entry["round"]
    scores = {r["round"]: r["selection_score"] for r in history["rounds"] if r["selection_score"] is not None}
    assert history["final"]["best_round"] == max(scores, key=scores.get)
    for name in ("round-000.pt", "round-002.pt", "last.pt", "best.pt"):
        payload = torch.load(run_dir / "checkpoints" / name, weights_only=True)
        assert payload["state_dict"]
        assert "calibration" in payload
    assert (run_dir / "report.html").read_text().count("<img") >= 3
    # the model changed over the rounds
    first = torch.load(run_dir / "checkpoints/round-000.pt", weights_only=True)["state_dict"]
    last = torch.load(run_dir / "checkpoints/last.pt", weights_only=True)["state_dict"]
    assert any(not torch.equal(first[k], last[k]) for k in first)

    # Only weights and scalars leave a site: no case ID anywhere in any reply.
    case_ids = {p.name for site in ("site-a", "site-b") for p in (cohort / site).iterdir() if p.is_dir()}
    for reply in grid.replies:
        text = repr({k: dict(v) for k, v in reply.content.config_records.items()})
        text += repr([list(r.keys()) for r in reply.content.metric_records.values()])
        assert not any(cid in text for cid in case_ids)
        for record in reply.content.metric_records.values():
            assert all(isinstance(v, (int, float)) for v in record.values())

    # Resume: ask for 3 rounds with the same run folder -> only round 3 runs, history is kept.
    before = history["rounds"]
    run_server(cohort, out, site_nodes(cohort, "site-a", "site-b"), "federation.min_nodes=2", "federation.rounds=3")
    resumed = json.loads((run_dir / "metrics.json").read_text())
    assert [r["round"] for r in resumed["rounds"]] == [0, 1, 2, 3]
    assert resumed["rounds"][:3] == before
    assert torch.load(run_dir / "checkpoints/last.pt", weights_only=True)["round"] == 3


def test_validating_every_second_model_records_the_rounds_in_order(cohort: Path, tmp_path: Path) -> None:
    """federation.validate_every=2 (after_reply: a model's validation is recorded two rounds
    later): the model of round 1, which no site validates, waits for round 0's, so metrics.json
    and the checkpoints stay in round order; models 0 and 2 carry their sites' validation."""
    run_server(cohort, tmp_path / "runs", site_nodes(cohort, "site-a", "site-b"), "federation.min_nodes=2",
               "federation.rounds=3", "federation.validate_every=2", "train.max_steps=1")
    history = json.loads((tmp_path / "runs/tiny/metrics.json").read_text())
    assert [r["round"] for r in history["rounds"]] == [0, 1, 2, 3]
    assert {r["round"]: sorted(r["sites"]) for r in history["rounds"]} == {
        0: ["site-a", "site-b"], 1: [], 2: ["site-a", "site-b"], 3: ["site-a", "site-b"]}
    assert history["rounds"][1]["selection_score"] is None  # not validated: not a candidate for best.pt


def test_a_site_without_usable_cases_is_reported_and_the_rest_train(cohort: Path, tmp_path: Path) -> None:
    empty = tmp_path / "site-empty"
    empty.mkdir()
    (empty / "labels.csv").write_text("case_id,idh,codeletion_1p19q,grade,mgmt\n")
    nodes = site_nodes(cohort, "site-a", "site-b")
    nodes[3] = {"data-path": str(empty), "site-name": "site-empty"}
    run_server(cohort, tmp_path / "runs", nodes, "federation.min_nodes=3", "federation.rounds=1",
               "federation.evaluate_sites=false")
    history = json.loads((tmp_path / "runs/tiny/metrics.json").read_text())
    failures = history["rounds"][1]["failures"]
    assert len(failures) == 1 and "site-empty" in next(iter(failures.values()))
    assert set(history["rounds"][1]["train"]) == {"site-a", "site-b"}


def test_imputer_pretraining_round_skips_sites_without_complete_cases_then_stays_frozen(
    cohort: Path, tmp_path: Path
) -> None:
    """site-a has complete cases, site-b never has T1: round 1 pre-trains the imputer at site-a
    only (site-b replies with weight 0 and is left out), round 2 trains both with it frozen."""
    run_server(cohort, tmp_path / "runs", site_nodes(cohort, "site-a", "site-b"), "federation.min_nodes=2",
               "federation.rounds=2", "federation.evaluate_sites=false", "model.imputation=true",
               "model.fusion=experts", "imputation.pretrain_rounds=1", "imputation.freeze=true")
    run_dir = tmp_path / "runs/tiny"
    history = json.loads((run_dir / "metrics.json").read_text())
    pretrain, supervised = history["rounds"][1], history["rounds"][2]
    assert pretrain["stage"] == "pretrain_imputer" and supervised["stage"] == "supervised"
    assert pretrain["skipped"] == ["site-b"] and not pretrain["failures"]
    assert pretrain["train"]["site-a"]["num-examples"] > 0 and pretrain["train"]["site-b"]["num-examples"] == 0
    assert set(supervised["train"]) == {"site-a", "site-b"} and not supervised["skipped"]

    def weights(name: str) -> dict[str, torch.Tensor]:
        return torch.load(run_dir / "checkpoints" / name, weights_only=True)["state_dict"]

    initial, after_pretrain, final = weights("round-000.pt"), weights("round-001.pt"), weights("round-002.pt")
    imputer = [k for k in initial if k.startswith("imputer.")]
    others = [k for k in initial if k.startswith(("encoder.", "decoder.", "classifier."))]
    assert imputer and others
    assert any(not torch.equal(initial[k], after_pretrain[k]) for k in imputer)  # pre-training learned
    assert all(torch.equal(initial[k], after_pretrain[k]) for k in others)  # ...and touched nothing else
    assert all(torch.equal(after_pretrain[k], final[k]) for k in imputer)  # frozen afterwards
    assert any(not torch.equal(after_pretrain[k], final[k]) for k in others)


def test_same_seed_same_global_model_and_pseudo_labeling_that_accepts_nothing_changes_nothing(
    cohort: Path, tmp_path: Path
) -> None:
    """Reproducible runs: the initial global model and every site's training depend only on the
    seed. Selecting pseudo-labels (MC dropout) must not shift the random stream training uses, so
    a pseudo-labeling round that accepts nothing (tau_c above any confidence) trains exactly like
    a supervised one, and an ablation against it measures the pseudo-labels alone."""
    common = ("federation.min_nodes=2", "federation.rounds=1", "federation.evaluate_sites=false")

    def final_weights(name: str, *overrides: str) -> dict[str, torch.Tensor]:
        run_server(cohort, tmp_path / name, site_nodes(cohort, "site-a", "site-b"), *common, *overrides)
        return torch.load(tmp_path / name / "tiny/checkpoints/last.pt", weights_only=True)["state_dict"]

    first = final_weights("first")
    again = final_weights("again")
    nothing_accepted = final_weights("ssl", "ssl.enabled=true", "ssl.warmup_rounds=0", "ssl.tau_c=1.0",
                                     "ssl.mc_passes=2")
    other_seed = final_weights("seed", "train.seed=1")
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert all(torch.equal(first[k], nothing_accepted[k]) for k in first)
    assert any(not torch.equal(first[k], other_seed[k]) for k in first)
    history = json.loads((tmp_path / "ssl/tiny/metrics.json").read_text())
    train = history["rounds"][1]["train"]
    assert all(m["pseudo_accepted"] == 0.0 for m in train.values())
    assert sum(m[f"pseudo_{t}_candidates"] for m in train.values() for t in TASKS) > 0  # selection did run
