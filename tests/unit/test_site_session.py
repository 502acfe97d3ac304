"""One site's local round (client side): which cases each stage trains on."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from client.session import SiteSession
from common.config import compose
from common.model import build_model


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    from synth import generate_cohort

    out = tmp_path_factory.mktemp("cohort")
    # site-a has every sequence, site-b never has T1 (see synth/cohort.py profiles)
    generate_cohort(out, preset="tiny", sites=2, cases_per_site=5, heldout_cases=2, shape=32, seed=2)
    return out


def session(cohort: Path, site: str, tmp_path: Path, *overrides: str) -> SiteSession:
    cfg = compose(["+experiment=tiny", "train.max_steps=1", "train.threads=1", *overrides])
    return SiteSession.open({"data-path": str(cohort / site), "state-path": str(tmp_path / site)}, cfg)


def test_complete_only_trains_on_complete_cases_and_a_site_without_any_sits_out(cohort: Path, tmp_path: Path) -> None:
    full = session(cohort, "site-a", tmp_path, "data.complete_only=true")
    assert full.stage_cases("supervised") == full.train_cases
    model = build_model(full.cfg.model, full.cfg.data.size)
    assert full.train(model, {"stage": "supervised"})["num-examples"] == len(full.train_cases)

    partial = session(cohort, "site-b", tmp_path, "data.complete_only=true")
    assert partial.stage_cases("supervised") == []
    before = {k: v.clone() for k, v in model.state_dict().items()}
    metrics = partial.train(model, {"stage": "supervised"})
    assert metrics["num-examples"] == 0.0 and metrics["steps"] == 0.0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())

    # without the option every usable case trains, complete or not
    everyone = session(cohort, "site-b", tmp_path)
    assert everyone.stage_cases("supervised") == everyone.train_cases != []


def test_imputer_pretraining_uses_complete_cases_only(cohort: Path, tmp_path: Path) -> None:
    site = session(cohort, "site-b", tmp_path, "model.imputation=true")
    assert site.stage_cases("pretrain_imputer") == []
    model = build_model(site.cfg.model, site.cfg.data.size)
    assert site.train(model, {"stage": "pretrain_imputer"})["num-examples"] == 0.0
    complete = session(cohort, "site-a", tmp_path, "model.imputation=true")
    metrics = complete.train(build_model(complete.cfg.model, complete.cfg.data.size), {"stage": "pretrain_imputer"})
    assert metrics["num-examples"] == len(complete.train_cases) and metrics["steps"] >= 1


def test_a_case_linked_in_from_another_center_is_rejected_unless_the_node_allows_it(cohort: Path, tmp_path: Path) -> None:
    import shutil

    site = tmp_path / "site-linked"
    shutil.copytree(cohort / "site-a", site)
    heldout_case = sorted(p for p in (cohort / "heldout").iterdir() if p.is_dir())[0]
    (site / heldout_case.name).symlink_to(heldout_case, target_is_directory=True)
    labels = (cohort / "heldout" / "labels.csv").read_text().splitlines()
    row = next(line for line in labels if line.startswith(heldout_case.name + ","))
    with (site / "labels.csv").open("a") as f:
        f.write(row + "\n")
    cfg = compose(["+experiment=tiny", "train.threads=1"])
    strict = SiteSession.open({"data-path": str(site)}, cfg)
    assert heldout_case.name not in {c.case_id for c in strict.index.cases}
    assert strict.description()["rejected_external_symlink"] == 1.0
    allowed = SiteSession.open({"data-path": str(site), "allow-external-links": "true"}, cfg)
    assert heldout_case.name in {c.case_id for c in allowed.index.cases}
