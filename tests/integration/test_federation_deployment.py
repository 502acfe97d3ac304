"""The fedglioma app itself on Flower's deployment engine, as ``fedglioma demo`` runs it: a TLS
SuperLink with SuperNode authentication and two SuperNodes on 127.0.0.1 (real processes), the app
launched with ``flwr run``, two rounds on a tiny cohort, then a restart that resumes the run.

(Refusal of an unregistered site key and the deploy scripts are covered with a trivial app in
test_deployment.py.) Runtime on 2 shared cores: about 3 minutes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from deploy.federation import descendant_processes
from tests.integration.conftest import wait_until_gone

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    from synth import generate_cohort

    out = tmp_path_factory.mktemp("cohort")
    generate_cohort(out, preset="tiny", sites=2, cases_per_site=6, heldout_cases=4, shape=32, seed=5)
    return out


@pytest.mark.long
def test_two_rounds_over_tls_then_resume(cohort: Path, tmp_path: Path) -> None:
    from deploy.demo import run_demo

    runs, workdir = tmp_path / "runs", tmp_path / "federation"
    # min_metric_cases=1: the tiny sites' 1-2 validation cases send their metrics (model selection)
    overrides = ["+experiment=tiny", "federation.rounds=2", "federation.evaluate_sites=true", "federation.min_metric_cases=1"]
    run_dir = run_demo(cohort, workdir=workdir, out=runs, overrides=overrides, timeout=600)

    history = json.loads((run_dir / "metrics.json").read_text())
    assert history["final"]["round"] == 2 and history["final"]["mode"] == "federated"
    assert [r["round"] for r in history["rounds"]] == [0, 1, 2]
    for entry in history["rounds"][1:]:
        assert set(entry["train"]) == {"site-a", "site-b"}, entry["failures"]
        assert entry["train"]["site-a"]["num-examples"] > 0
        assert not entry["rejected"] and not entry["failures"]
        # federation.site_validation=after_reply: the sites' workers validated after replying ...
        assert entry["train"]["site-a"]["validation_after_reply"] == 1.0
    # ... and every global model, the initial one included, has both sites' validation (model 0's
    # came with round 2's replies, model 1's with the evaluate message after the last round)
    for entry in history["rounds"]:
        assert set(entry["sites"]) == {"site-a", "site-b"}, entry["round"]
        assert entry["selection_score"] is not None
    assert 0.0 <= history["final"]["heldout"]["dice_wt"] <= 1.0
    checkpoints = run_dir / "checkpoints"
    for name in ("round-000.pt", "round-001.pt", "round-002.pt", "last.pt", "best.pt"):
        assert torch.load(checkpoints / name, weights_only=True)["state_dict"], name
    assert (run_dir / "report.html").exists()
    # nothing a test started is left running (SuperLink, SuperNodes, SuperExec, apps)
    assert not wait_until_gone(list(descendant_processes(os.getpid())))

    # Restart with one more round: round 3 only, the first three rounds' history unchanged.
    run_demo(cohort, workdir=workdir, out=runs, overrides=[*overrides, "federation.rounds=3"], timeout=600)
    resumed = json.loads((run_dir / "metrics.json").read_text())
    assert [r["round"] for r in resumed["rounds"]] == [0, 1, 2, 3]
    assert resumed["rounds"][:3] == history["rounds"]
    assert torch.load(checkpoints / "last.pt", weights_only=True)["round"] == 3
