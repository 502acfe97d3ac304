"""Local pseudo-labeling: selection, distribution alignment, MC-dropout, the site's store, the
training hook, and a whole SiteSession round with semi-supervision on a tiny synthetic site."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import client.pseudo_labels as pl
from client.pseudo_labels import (
    PseudoLabelHook,
    PseudoLabelStoreError,
    align_distribution,
    load_pseudo_labels,
    predict_pseudo_labels,
    prepare_pseudo_labels,
    pseudo_label_matrix,
    read_pseudo_labels,
    save_pseudo_labels,
    select,
)
from client.session import SiteSession
from client.state import RoundTag, default_state_path, site_state_path
from common.config import compose
from common.contract import LABELS_CSV, TASKS, UNKNOWN_LABEL
from common.data.site import CaseRecord
from common.evaluation.uncertainty import mc_dropout, mc_dropout_predict
from common.model import build_model

U = UNKNOWN_LABEL


def case(case_id: str, labels: tuple[int, ...]) -> CaseRecord:
    """A case record for label bookkeeping (no image is read by the code under test)."""
    return CaseRecord(case_id=case_id, folder=Path(case_id), images={}, seg=None, labels=labels, naming="brats2021")


# ----------------------------------------------------------------------------- selection
def test_select_needs_both_confidence_and_low_uncertainty_of_the_chosen_class() -> None:
    mean = torch.tensor([[0.97, 0.03], [0.97, 0.03], [0.60, 0.40], [0.02, 0.98], [0.90, 0.10]])
    std = torch.tensor([[0.05, 0.05], [0.20, 0.20], [0.01, 0.01], [0.30, 0.05], [0.10, 0.10]])
    labels, confidence = select(mean, std, tau_c=0.9, tau_u=0.1)
    # accept | too uncertain | not confident | class 1: only its own std counts | both at the bounds
    assert labels.tolist() == [0, U, U, 1, 0]
    assert labels.dtype == torch.int64
    torch.testing.assert_close(confidence, torch.tensor([0.97, 0.97, 0.60, 0.98, 0.90]))
    assert select(mean, std, tau_c=0.99, tau_u=1.0)[0].tolist() == [U] * 5


# ----------------------------------------------------------------------------- alignment
def test_alignment_rows_sum_to_one_and_move_towards_the_labeled_prior() -> None:
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.6, 0.4]])
    labeled = torch.tensor([1.0, 9.0])  # the site's real labels are mostly class 1
    aligned = align_distribution(probs, labeled)
    torch.testing.assert_close(aligned.sum(1), torch.ones(4))
    assert torch.all(aligned[:, 1] > probs[:, 1])
    assert list(aligned[:, 1].argsort()) == list(probs[:, 1].argsort())  # the ranking is kept
    # When the labeled counts equal the predicted mass there is nothing to correct.
    torch.testing.assert_close(align_distribution(probs, probs.sum(0)), probs)
    # A class never seen among the real labels is down-weighted, not zeroed (smoothing).
    unseen = align_distribution(probs, torch.tensor([0.0, 5.0]), predicted_prior=torch.tensor([4.0, 0.0]))
    assert torch.all(torch.isfinite(unseen)) and torch.all(unseen[:, 0] > 0)
    with pytest.raises(ValueError, match=r"labeled_prior must be \(2,\)"):
        align_distribution(probs, torch.ones(3))


# ----------------------------------------------------------------------------- MC-dropout
def test_mc_dropout_passes_differ_on_the_tiny_model() -> None:
    # random output layers: zero ones (the default) give logit 0 under any dropout mask
    cfg = compose(["model=tiny", "data=tiny", "model.classifier_head_init=random"])
    model = build_model(cfg.model, 16).eval()
    image, available = torch.randn(2, 4, 16, 16, 16), torch.ones(2, 4, dtype=torch.bool)
    with torch.no_grad():
        plain = [model(image, available).cls_logits["idh"] for _ in range(2)]
        with mc_dropout(model):
            stochastic = [model(image, available).cls_logits["idh"] for _ in range(2)]
    torch.testing.assert_close(plain[0], plain[1])  # eval: deterministic
    assert not torch.allclose(stochastic[0], stochastic[1])  # MC mode: dropout really on
    assert not model.training and not any(m.training for m in model.modules())  # flags restored
    _, std = mc_dropout_predict(model, image, available, passes=3)
    assert all(float(s.max()) > 0 for s in std.values())


# ----------------------------------------------------------------------------- site-level selection
def test_predictions_only_fill_unknown_labels_and_report_scalar_metrics(monkeypatch) -> None:
    cases = [case("a", (0, 1, 0, 1)), case("b", (U, 1, U, 0)), case("c", (1, U, 0, U)), case("d", (U, U, U, U))]
    seen: list[str] = []

    def fake_mc(model, cases_in, cfg, device, cache_dir=None):  # confident class 1 everywhere, low spread
        seen.extend(c.case_id for c in cases_in)
        n = len(cases_in)
        return torch.tensor([0.01, 0.99]).expand(n, len(TASKS), 2).clone(), torch.zeros(n, len(TASKS), 2)

    monkeypatch.setattr(pl, "mc_predict_cases", fake_mc)
    cfg = compose(["ssl.enabled=true", "ssl.distribution_alignment=false"])
    result = predict_pseudo_labels(torch.nn.Identity(), cases, cfg, torch.device("cpu"))

    assert seen == ["b", "c", "d"]  # the fully labeled case never goes through the model
    real = np.array([c.labels for c in cases])
    assert np.all(result.labels[real != U] == U)  # never a pseudo-label where a real one exists
    assert np.all(result.labels[real == U] == 1)
    m = result.metrics
    assert [m[f"pseudo_{t}_candidates"] for t in TASKS] == [2.0, 2.0, 2.0, 2.0]
    assert m["pseudo_accepted"] == 8.0 and m["pseudo_idh_confidence"] == pytest.approx(0.99)
    assert m["pseudo_idh_candidate_confidence"] == pytest.approx(0.99)
    # every accepted label is class 1; the site's real majority is 1 only for 1p/19q (a, b: 1);
    # idh (a 0, c 1) and mgmt (a 1, b 0) tie and go to class 0, grade's is 0
    assert [m[f"pseudo_{t}_majority_share"] for t in TASKS] == [0.0, 1.0, 0.0, 0.0]

    rejecting = compose(["ssl.enabled=true", "ssl.tau_c=1.0", "ssl.distribution_alignment=false"])
    none = predict_pseudo_labels(torch.nn.Identity(), cases, rejecting, torch.device("cpu"))
    assert none.metrics["pseudo_accepted"] == 0.0
    assert all(none.metrics[f"pseudo_{t}_confidence"] == 0.0 for t in TASKS)  # 0.0, never NaN
    assert all(none.metrics[f"pseudo_{t}_majority_share"] == 0.0 for t in TASKS)
    # rejected candidates still report how confident the model was, so coordinators see the gap to tau_c
    assert all(none.metrics[f"pseudo_{t}_candidate_confidence"] == pytest.approx(0.99) for t in TASKS)


# ----------------------------------------------------------------------------- the store
def test_store_round_trips_and_drops_labels_that_became_real(tmp_path: Path) -> None:
    cases = [case("a", (U, U, 0, U)), case("b", (U, 1, U, U)), case("c", (0, 0, 0, 0))]
    labels = np.array([[1, U, U, 0], [0, U, U, U], [U, U, U, U]])
    save_pseudo_labels(tmp_path, cases, labels, RoundTag("run", 3))
    assert load_pseudo_labels(tmp_path) == {"a": [1, U, U, 0], "b": [0, U, U, U]}  # c had none
    assert load_pseudo_labels(tmp_path / "elsewhere") == {}

    # Later, case a got a real IDH label at the site: its stored IDH pseudo-label must go.
    now = [case("a", (0, U, 0, U)), cases[1], cases[2]]
    matrix, dropped = pseudo_label_matrix(load_pseudo_labels(tmp_path), now)
    assert dropped == 1 and matrix[0].tolist() == [U, U, U, 0]
    reused = prepare_pseudo_labels(tmp_path, torch.nn.Identity(), now, compose(), torch.device("cpu"),
                                   refresh=False, tag=RoundTag("run", 4))
    assert reused.labels.tolist() == matrix.tolist() and reused.metrics == {"pseudo_used": 2.0}
    tag, stored = read_pseudo_labels(tmp_path)
    assert tag == RoundTag("run", 3) and stored["a"] == [U, U, U, 0]  # rewritten without it
    # Another run (or an earlier round) does not reuse this site's old pseudo-labels.
    stale = prepare_pseudo_labels(tmp_path, torch.nn.Identity(), now, compose(), torch.device("cpu"),
                                  refresh=False, tag=RoundTag("new-run", 5))
    assert stale.count == 0

    (tmp_path / pl.PSEUDO_LABELS_FILE).write_text(json.dumps({"format": pl.STORE_FORMAT, "run_name": "run",
                                                              "global_round": 1, "tasks": list(TASKS),
                                                              "labels": {"a": [2, 0, 0, 0]}}))
    with pytest.raises(PseudoLabelStoreError, match=r"pseudo_labels\.json: case 'a'.*delete it"):
        load_pseudo_labels(tmp_path)


def test_hook_merges_pseudo_labels_only_where_the_real_label_is_unknown() -> None:
    pseudo = np.array([[1, 1, 1, 1], [U, 0, U, U], [0, U, 1, U]])
    hook = PseudoLabelHook(pseudo, pseudo_weight=0.5)
    batch = {"labels": torch.tensor([[0, U, U, 1], [U, U, 1, U]]), "index": torch.tensor([2, 0])}
    out = hook(batch)
    assert out["labels"].tolist() == [[0, U, 1, 1], [1, 1, 1, 1]]
    assert out["label_weight"].tolist() == [[1.0, 0.0, 0.5, 1.0], [0.5, 0.5, 1.0, 0.5]]
    assert batch["labels"].tolist() == [[0, U, U, 1], [U, U, 1, U]]  # the input is not mutated


# ----------------------------------------------------------------------------- a whole site round
def test_state_path_comes_from_node_config_or_the_user_cache(monkeypatch, tmp_path: Path) -> None:
    assert site_state_path({"state-path": str(tmp_path / "s")}, "site-a") == tmp_path / "s"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert site_state_path({}, "site-a") == tmp_path / "cache" / "fedglioma" / "sites" / "site-a"
    with pytest.raises(ValueError, match="state-path"):
        default_state_path("../x")


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """site-a of a tiny cohort with IDH and MGMT labels blanked for four cases."""
    from synth import generate_cohort

    out = tmp_path_factory.mktemp("cohort")
    generate_cohort(out, preset="tiny", sites=1, cases_per_site=6, heldout_cases=2, shape=32, seed=1, workers=1)
    labels_csv = out / "site-a" / LABELS_CSV
    with labels_csv.open() as f:
        rows = list(csv.DictReader(f))
    for row in rows[:4]:
        row["idh"] = row["mgmt"] = ""
    with labels_csv.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return out / "site-a"


def test_site_round_with_ssl_reports_scalars_and_keeps_labels_and_teacher_local(
    site: Path, tmp_path: Path, monkeypatch
) -> None:
    cfg = compose(["+experiment=tiny", "data.size=16", "train.max_steps=1", "train.threads=1",
                   "ssl.enabled=true", "ssl.tau_c=0.5", "ssl.tau_u=1.0", "ssl.mc_passes=2",
                   "ssl.pseudo_weight=0.5", "ssl.consistency=true"])
    state = tmp_path / "state"
    session = SiteSession.open({"data-path": str(site), "site-name": "site-a", "state-path": str(state)}, cfg)
    model = build_model(cfg.model, cfg.data.size)
    round_config = {"stage": "supervised", "local-epochs": 1, "lr": 1e-3, "pseudo-label": True, "global-round": 3}
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []  # (real labels, label_weight) of trained batches
    merge = PseudoLabelHook.__call__

    def spy(hook: PseudoLabelHook, batch: dict) -> dict:
        out = merge(hook, batch)
        seen.append((batch["labels"].clone(), out["label_weight"]))
        return out

    monkeypatch.setattr(PseudoLabelHook, "__call__", spy)

    metrics = session.train(model, round_config)

    real = np.array([c.labels for c in session.train_cases])
    candidates = {t: float((real[:, i] == U).sum()) for i, t in enumerate(TASKS)}
    assert candidates["idh"] > 0
    for task in TASKS:
        # tau_c = 0.5 and tau_u = 1 accept every binary prediction: accepted == candidates.
        assert metrics[f"pseudo_{task}_candidates"] == candidates[task]
        assert metrics[f"pseudo_{task}_accepted"] == candidates[task]
    assert metrics["pseudo_accepted"] == sum(candidates.values()) == metrics["pseudo_used"]
    assert metrics["consistency_teacher_restored"] == 0.0 and metrics["loss_consistency_seg"] > 0
    assert all(type(v) is float and math.isfinite(v) for v in metrics.values())
    case_ids = [c.case_id for c in session.index.cases]
    assert not any(cid in key for key in metrics for cid in case_ids)

    stored = load_pseudo_labels(state)
    assert set(stored) <= {c.case_id for c in session.train_cases} and stored
    for c in session.train_cases:
        row = stored.get(c.case_id, [U] * len(TASKS))
        assert all(p == U for p, r in zip(row, c.labels) if r != U)  # real labels are never overwritten
    assert (state / "ema_teacher.pt").exists()
    # Every unknown label was pseudo-labeled, so the loss weighs real labels 1, all others 0.5.
    assert len(seen) == 1 and all(torch.equal(w, torch.where(r != U, 1.0, 0.5)) for r, w in seen)

    # The next pseudo-labeling round of the same run picks the teacher up again.
    again = session.train(model, {**round_config, "global-round": 4})
    assert again["consistency_teacher_restored"] == 1.0
