"""What a site may send: no metric over fewer than min_metric_cases cases, no case detail in errors."""

from __future__ import annotations

from pathlib import Path

from client.disclosure import public_reason, withhold_small_groups, withhold_small_pseudo_label_groups
from common.data.site import NoUsableCaseError


def validation(n_cases: float, n_idh: float) -> dict[str, float]:
    return {"num-examples": n_cases, "n_cases": n_cases, "dice_wt": 0.8, "hd95_wt": 5.0,
            "auc_idh": 0.7, "n_idh": n_idh, "sen_idh": 1.0, "auc_grade": 0.6, "n_grade": 9.0}


def test_a_small_validation_split_sends_no_metric_at_all() -> None:
    assert withhold_small_groups(validation(3, 3), n_seg=3, min_cases=5) == {"num-examples": 0.0, "n_cases": 0.0,
                                                                             "withheld": 1.0}


def test_a_task_with_few_labeled_cases_is_left_out_and_the_rest_kept() -> None:
    out = withhold_small_groups({**validation(9, 2), "cal_tp_idh": [1.0, 2.0]}, n_seg=9, min_cases=5)
    assert "auc_idh" not in out and "sen_idh" not in out and "cal_tp_idh" not in out
    assert out["n_idh"] == 2 and out["auc_grade"] == 0.6 and out["dice_wt"] == 0.8


def test_segmentation_metrics_need_enough_reference_segmentations() -> None:
    out = withhold_small_groups(validation(9, 9), n_seg=4, min_cases=5)
    assert "dice_wt" not in out and "hd95_wt" not in out and out["auc_idh"] == 0.7


def test_confidences_of_few_accepted_pseudo_labels_are_left_out() -> None:
    metrics = {"pseudo_idh_accepted": 1.0, "pseudo_idh_candidates": 7.0, "pseudo_idh_confidence": 0.97,
               "pseudo_idh_majority_share": 1.0, "pseudo_idh_candidate_confidence": 0.8, "pseudo_accepted": 1.0}
    out = withhold_small_pseudo_label_groups(metrics, min_cases=5)
    assert "pseudo_idh_confidence" not in out and "pseudo_idh_majority_share" not in out
    assert out["pseudo_idh_candidate_confidence"] == 0.8 and out["pseudo_idh_accepted"] == 1.0


def test_error_text_names_the_class_not_the_cases_or_paths(tmp_path: Path) -> None:
    secret = tmp_path / "hospital" / "BraTS2021_00042" / "BraTS2021_00042_t1.nii.gz"
    leaky = FileNotFoundError(f"[Errno 2] No such file or directory: '{secret}'")
    text = public_reason(leaky, "training", [str(tmp_path / "hospital"), "BraTS2021_00042"])
    assert "FileNotFoundError during training" in text
    assert "BraTS2021_00042" not in text and str(tmp_path) not in text
    counts = NoUsableCaseError("no usable case at this site (3 of 3 cases rejected: 3 bad header)", "detail with IDs")
    assert "3 bad header" in public_reason(counts, "training")
    # a path inside a message written to be public is still scrubbed
    assert "/srv/data" not in public_reason(NoUsableCaseError("see /srv/data/site-a/x.nii", ""), "training")
