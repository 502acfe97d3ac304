from __future__ import annotations

import json
import math

import pytest
import torch

from common.config import compose
from common.contract import METRIC_KEYS
from common.model.checkpoint import load_checkpoint
from server.run_folder import RunFolder, RunFolderError


def heldout(dice: float, auc: float) -> dict[str, float]:
    metrics = {k: 0.5 for k in METRIC_KEYS}
    metrics.update(dice_wt=dice, auc_idh=auc, auc_1p19q=auc, auc_grade=auc, auc_mgmt=float("nan"))
    return metrics


def state(value: float) -> dict[str, torch.Tensor]:
    return {"w": torch.full((2,), value)}


def test_rounds_checkpoints_and_best_selection_on_site_validation_only(tmp_path) -> None:
    folder = RunFolder(tmp_path / "run", compose())
    # (validation score of the sites, held-out dice, held-out auc): the held-out center peaks at
    # round 2, the sites' validation at round 1; best.pt must follow the sites.
    rounds = [(float("nan"), 0.1, 0.5), (0.7, 0.4, 0.6), (0.5, 0.9, 0.9)]
    for r, (score, dice, auc) in enumerate(rounds):
        folder.record_round(r, heldout=heldout(dice, auc), sites={"site-a": {"dice_wt": dice, "cal_nll_idh": [1.0]}},
                            extra={"selection_score": score})
        folder.save_checkpoint(r, state(float(r)), score)
    final = folder.finalize()
    saved = json.loads((tmp_path / "run/metrics.json").read_text())
    assert [r["round"] for r in saved["rounds"]] == [0, 1, 2]
    assert saved["rounds"][0]["heldout"]["auc_mgmt"] is None  # NaN written as JSON null
    assert final["best_round"] == 1 and saved["final"]["round"] == 2
    assert "held-out center is only reported" in final["selection"]
    assert "cal_nll_idh" not in saved["rounds"][1]["sites"]["site-a"]  # calibration statistics stay out
    best = load_checkpoint(tmp_path / "run/checkpoints/best.pt")
    assert best["round"] == 1 and torch.equal(best["state_dict"]["w"], state(1.0)["w"])
    assert load_checkpoint(tmp_path / "run/checkpoints/last.pt")["round"] == 2
    assert (tmp_path / "run/checkpoints/round-000.pt").exists()
    assert (tmp_path / "run/config.yaml").exists()


def test_resume_continues_after_last_checkpoint_and_drops_later_history(tmp_path) -> None:
    cfg = compose()
    folder = RunFolder(tmp_path / "run", cfg)
    for r in range(3):
        folder.record_round(r, heldout=heldout(0.1 * r, 0.5))
        if r < 2:  # the process died after writing metrics of round 2, before its checkpoint
            folder.save_checkpoint(r, state(float(r)), 0.1 * r)
    again = RunFolder(tmp_path / "run", cfg, resume=True)
    resumed = again.resume_state()
    assert resumed is not None and resumed.next_round == 2
    assert torch.equal(resumed.state_dict["w"], state(1.0)["w"])
    assert [r["round"] for r in again.history["rounds"]] == [0, 1]


def test_existing_results_are_never_overwritten_without_resume(tmp_path) -> None:
    folder = RunFolder(tmp_path / "run", compose())
    folder.record_round(0, heldout=heldout(0.1, 0.5))
    with pytest.raises(RunFolderError, match="already holds a run"):
        RunFolder(tmp_path / "run", compose(), resume=False)


def test_resume_with_a_different_model_is_refused(tmp_path) -> None:
    folder = RunFolder(tmp_path / "run", compose())
    folder.record_round(0, heldout=heldout(0.1, 0.5))
    with pytest.raises(RunFolderError, match="model config differs"):
        RunFolder(tmp_path / "run", compose(["model=demo"]))


def test_selection_score_weighs_sites_by_validation_cases_and_ignores_missing_aucs() -> None:
    from common.evaluation.metrics import selection_score

    a = {**heldout(0.6, 0.8), "n_cases": 3.0}
    b = {**heldout(0.2, 0.4), "n_cases": 1.0}
    assert math.isclose(selection_score({"a": a}), (0.6 + 0.8) / 2)
    assert math.isclose(selection_score({"a": a, "b": b}), (3 * 0.7 + 1 * 0.3) / 4)
    assert math.isnan(selection_score({}))


def test_without_validation_scores_best_follows_the_last_round(tmp_path) -> None:
    folder = RunFolder(tmp_path / "run", compose())
    for r in range(3):
        folder.record_round(r, heldout=heldout(0.9 - 0.1 * r, 0.9))  # held-out best at round 0
        folder.save_checkpoint(r, state(float(r)), float("nan"))
    final = folder.finalize()
    assert final["best_round"] == 2 and "no validation metrics" in final["selection"]
    assert load_checkpoint(tmp_path / "run/checkpoints/best.pt")["round"] == 2
