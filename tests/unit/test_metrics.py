"""common.evaluation.metrics: BraTS Dice/HD95 with empty-region rules, classification scores, ECE,
the accumulator's key contract and the model-selection score."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from common.contract import ED, ET, METRIC_KEYS, NCR, SEG_METRIC_KEYS, TASKS, UNKNOWN_LABEL
from common.evaluation.metrics import (
    HD95_EMPTY_PENALTY_MM,
    MetricAccumulator,
    classification_scores,
    expected_calibration_error,
    region_masks,
    segmentation_scores,
    summary_score,
)
from common.io import json_safe

S = 16


def label_map(*cubes: tuple[int, tuple[slice, slice, slice]], batch: int = 1) -> torch.Tensor:
    """(batch, 1, S, S, S) int64 with each ``(label, (slices))`` painted in order."""
    out = torch.zeros(batch, 1, S, S, S, dtype=torch.int64)
    for label, where in cubes:
        out[(slice(None), 0) + where] = label
    return out


CUBE = (slice(4, 8), slice(4, 8), slice(4, 8))  # 64 voxels
CUBE_SHIFTED = (slice(5, 9), slice(4, 8), slice(4, 8))  # overlaps CUBE in 3*4*4 = 48 voxels


def unit_spacing(batch: int = 1) -> torch.Tensor:
    return torch.ones(batch, 3)


# ------------------------------------------------------------------------------- segmentation
def test_region_masks_follow_brats_regions() -> None:
    labels = torch.tensor([0, NCR, ED, ET]).view(1, 1, 4, 1, 1)
    masks = region_masks(labels)[0, :, :, 0, 0]
    assert masks.shape == (3, 4)
    assert masks[0].tolist() == [False, True, True, True]  # WT = {1,2,3}
    assert masks[1].tolist() == [False, True, False, True]  # TC = {1,3}
    assert masks[2].tolist() == [False, False, False, True]  # ET = {3}


def test_region_masks_rejects_float_and_wrong_shape() -> None:
    with pytest.raises(TypeError, match="integer"):
        region_masks(torch.zeros(1, 1, 2, 2, 2))
    with pytest.raises(ValueError, match=r"\(B, 1, D, H, W\)"):
        region_masks(torch.zeros(1, 2, 2, 2, dtype=torch.int64))


def test_dice_of_shifted_cube_is_exact() -> None:
    pred, ref = label_map((ET, CUBE)), label_map((ET, CUBE_SHIFTED))
    scores = segmentation_scores(pred, ref, unit_spacing())
    for region in ("wt", "tc", "et"):
        assert scores[f"dice_{region}"].item() == pytest.approx(2 * 48 / (64 + 64))


def test_empty_region_rules() -> None:
    # pred: NCR cube (-> WT, TC); ref: ED cube at the same place (-> WT only); ET empty in both.
    scores = segmentation_scores(label_map((NCR, CUBE)), label_map((ED, CUBE)), unit_spacing())
    assert scores["dice_wt"].item() == pytest.approx(1.0)
    assert scores["hd95_wt"].item() == pytest.approx(0.0)
    assert scores["dice_tc"].item() == 0.0  # predicted, not in the reference
    assert scores["hd95_tc"].item() == HD95_EMPTY_PENALTY_MM
    assert scores["dice_et"].item() == 1.0  # both empty
    assert scores["hd95_et"].item() == 0.0


def test_empty_prediction_and_empty_reference_are_penalised() -> None:
    tumor, empty = label_map((ET, CUBE)), label_map()
    for pred, ref in ((empty, tumor), (tumor, empty)):
        scores = segmentation_scores(pred, ref, unit_spacing())
        for region in ("wt", "tc", "et"):
            assert scores[f"dice_{region}"].item() == 0.0
            assert scores[f"hd95_{region}"].item() == HD95_EMPTY_PENALTY_MM
    both_empty = segmentation_scores(empty, empty, unit_spacing())
    assert all(both_empty[f"dice_{r}"].item() == 1.0 and both_empty[f"hd95_{r}"].item() == 0.0 for r in ("wt", "tc", "et"))


def test_hd95_is_in_millimetres_of_each_case() -> None:
    # Single voxels 3 voxels apart along the first axis: HD = 3 * spacing[0] mm exactly.
    pred = label_map((ET, (slice(2, 3), slice(5, 6), slice(5, 6))), batch=2)
    ref = label_map((ET, (slice(5, 6), slice(5, 6), slice(5, 6))), batch=2)
    spacing = torch.tensor([[1.5, 1.0, 1.0], [3.0, 0.5, 7.0]])
    scores = segmentation_scores(pred, ref, spacing)
    assert scores["hd95_et"].tolist() == pytest.approx([4.5, 9.0])


def test_hd95_doubles_with_spacing() -> None:
    pred = label_map((ET, (slice(3, 9), slice(3, 9), slice(4, 8))))
    ref = label_map((ET, (slice(5, 12), slice(4, 8), slice(4, 10))))
    single = segmentation_scores(pred, ref, torch.tensor([[1.0, 1.2, 0.8]]))["hd95_wt"].item()
    double = segmentation_scores(pred, ref, torch.tensor([[2.0, 2.4, 1.6]]))["hd95_wt"].item()
    assert single > 0
    assert double == pytest.approx(2 * single)


def test_segmentation_scores_validates_shapes() -> None:
    with pytest.raises(ValueError, match="spacing"):
        segmentation_scores(label_map(), label_map(), torch.ones(3))
    with pytest.raises(ValueError, match="differ in shape"):
        segmentation_scores(label_map(), label_map(batch=2), unit_spacing())


# ----------------------------------------------------------------------------- classification
def test_auc_matches_sklearn_and_ignores_unknown_labels() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(-1, 2, size=200)
    probs = np.clip(0.3 * labels + rng.uniform(0, 0.7, size=200), 0, 1)
    known = labels != UNKNOWN_LABEL
    scores = classification_scores(probs, labels)
    assert scores["auc"] == pytest.approx(roc_auc_score(labels[known], probs[known]))
    assert scores["n"] == known.sum()
    # Unknown cases' probabilities do not matter at all.
    probs_changed = np.where(known, probs, 1.0 - probs)
    assert classification_scores(probs_changed, labels) == pytest.approx(scores, nan_ok=True)


def test_crafted_confusion_matrix() -> None:
    # 4 positives: 3 TP, 1 FN; 6 negatives: 4 TN, 2 FP; plus 2 unknown.
    labels = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0, -1, -1])
    probs = np.array([0.9, 0.8, 0.6, 0.2, 0.1, 0.3, 0.4, 0.45, 0.7, 0.55, 0.99, 0.01])
    scores = classification_scores(probs, labels)
    assert scores["n"] == 10
    assert scores["acc"] == pytest.approx(7 / 10)
    assert scores["sen"] == pytest.approx(3 / 4)
    assert scores["spe"] == pytest.approx(4 / 6)
    assert scores["f1"] == pytest.approx(2 * 3 / (2 * 3 + 1 + 2))
    # A higher threshold turns the 0.55 and 0.6 predictions negative.
    strict = classification_scores(probs, labels, threshold=0.65)
    assert (strict["sen"], strict["spe"]) == pytest.approx((2 / 4, 5 / 6))


def test_undefined_scores_are_nan() -> None:
    one_class = classification_scores(np.array([0.2, 0.7, 0.4]), np.array([0, 0, -1]))
    assert math.isnan(one_class["auc"]) and math.isnan(one_class["sen"])
    assert one_class["spe"] == pytest.approx(0.5)
    assert one_class["f1"] == 0.0 and one_class["n"] == 2
    nothing = classification_scores(np.array([0.2, 0.7]), np.array([-1, -1]))
    assert nothing["n"] == 0
    assert all(math.isnan(v) for k, v in nothing.items() if k != "n")


def test_classification_scores_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="found \\[2\\]"):
        classification_scores(np.array([0.5, 0.5]), np.array([0, 2]))
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        classification_scores(np.array([1.5, 0.5]), np.array([0, 1]))
    with pytest.raises(ValueError, match="3 values"):
        classification_scores(np.array([0.1, 0.5, 0.2]), np.array([0, 1]))


def test_ece_hand_computed_two_bins() -> None:
    # 4 cases at p=0.9 (predict 1, confidence 0.9, 3 correct) and 2 at p=0.3 (predict 0,
    # confidence 0.7, 1 correct): ECE = 4/6 * |0.75 - 0.9| + 2/6 * |0.5 - 0.7|.
    probs = np.array([0.9, 0.9, 0.9, 0.9, 0.3, 0.3])
    labels = np.array([1, 1, 1, 0, 0, 1])
    expected = 4 / 6 * 0.15 + 2 / 6 * 0.2
    assert expected_calibration_error(probs, labels) == pytest.approx(expected)
    assert classification_scores(probs, labels)["ece"] == pytest.approx(expected)


def test_ece_extremes() -> None:
    rng = np.random.default_rng(1)
    probs = rng.uniform(size=100_000)
    calibrated = (rng.uniform(size=probs.size) < probs).astype(np.int64)
    assert expected_calibration_error(probs, calibrated) < 0.01
    # Fully confident and right half of the time: ECE = |0.5 - 1|.
    assert expected_calibration_error(np.ones(10), np.array([0, 1] * 5)) == pytest.approx(0.5)


# -------------------------------------------------------------------------------- accumulator
def _probs(p: list[float]) -> torch.Tensor:
    pos = torch.tensor(p)
    return torch.stack([1 - pos, pos], dim=1)


def test_accumulator_returns_every_metric_key_and_aggregates() -> None:
    acc = MetricAccumulator()
    perfect = label_map((ET, CUBE), batch=2)
    half = label_map((ET, CUBE_SHIFTED), batch=2)
    # Batch 1: case 0 perfect, case 1 has no reference (its bad prediction must not count).
    acc.add(perfect, perfect, torch.tensor([True, False]), unit_spacing(2),
            {t: _probs([0.9, 0.2]) for t in TASKS},
            torch.tensor([[1, 0, UNKNOWN_LABEL, 1], [0, 0, UNKNOWN_LABEL, UNKNOWN_LABEL]]))
    acc.add(half, perfect, torch.tensor([True, True]), unit_spacing(2),
            {t: _probs([0.6, 0.4]) for t in TASKS},
            torch.tensor([[1, 1, UNKNOWN_LABEL, 0], [0, 1, UNKNOWN_LABEL, 0]]))
    metrics = acc.compute()
    assert tuple(metrics) == METRIC_KEYS
    assert metrics["n_cases"] == 4
    assert metrics["dice_wt"] == pytest.approx((1.0 + 0.75 + 0.75) / 3)
    assert metrics["auc_idh"] == pytest.approx(1.0)  # positives 0.9, 0.6 > negatives 0.2, 0.4
    assert metrics["n_idh"] == 4 and metrics["n_1p19q"] == 4 and metrics["n_mgmt"] == 3
    assert metrics["n_grade"] == 0 and math.isnan(metrics["auc_grade"])
    # NaN must reach metrics.json as null, not as an invalid JSON token.
    text = json.dumps(json_safe(metrics), allow_nan=False)
    assert json.loads(text)["auc_grade"] is None


def test_accumulator_without_segmentation_gives_nan_seg_metrics() -> None:
    acc = MetricAccumulator()
    acc.add(None, label_map(), torch.tensor([True]), unit_spacing(), {t: _probs([0.7]) for t in TASKS},
            torch.tensor([[1, 0, 1, 0]]))
    metrics = acc.compute()
    assert all(math.isnan(metrics[k]) for k in SEG_METRIC_KEYS)
    assert metrics["acc_idh"] == 1.0 and metrics["acc_1p19q"] == 0.0
    assert set(MetricAccumulator().compute()) == set(METRIC_KEYS)


def test_accumulator_without_distances_keeps_dice_and_leaves_surface_scores_out() -> None:
    # federation.site_validation_distances=false: the sites' per-round validation scores Dice only
    pred, ref = label_map((ET, CUBE_SHIFTED), (NCR, (slice(10, 12),) * 3)), label_map((ET, CUBE))
    full, dice_only = MetricAccumulator(), MetricAccumulator(distances=False)
    for acc in (full, dice_only):
        acc.add(pred, ref, torch.tensor([True]), unit_spacing(), {t: _probs([0.7]) for t in TASKS},
                torch.tensor([[1, 0, 1, 0]]))
    a, b = full.compute(), dice_only.compute()
    assert tuple(b) == METRIC_KEYS
    surface = [k for k in METRIC_KEYS if "hd95" in k]
    assert surface and all(math.isfinite(a[k]) for k in surface) and all(math.isnan(b[k]) for k in surface)
    for key in ("dice_wt", "dice_tc", "dice_et", "auc_idh", "n_cases"):
        assert b[key] == pytest.approx(a[key], nan_ok=True)
    assert a["dice_wt"] < 1.0  # the case is not trivially perfect: Dice is really computed


def test_accumulator_names_missing_task() -> None:
    with pytest.raises(KeyError, match="mgmt"):
        MetricAccumulator().add(None, label_map(), torch.tensor([False]), unit_spacing(),
                                {t: _probs([0.5]) for t in TASKS[:3]}, torch.tensor([[0, 0, 0, 0]]))


def test_summary_score_mean_of_dice_and_mean_auc() -> None:
    metrics = {"dice_wt": 0.8, "auc_idh": 0.9, "auc_1p19q": 0.7, "auc_grade": math.nan, "auc_mgmt": None}
    assert summary_score(metrics) == pytest.approx((0.8 + 0.8) / 2)
    assert summary_score({"dice_wt": 0.6}) == pytest.approx(0.6)
    assert summary_score({"dice_wt": math.nan, "auc_idh": 0.7}) == pytest.approx(0.7)
    assert math.isnan(summary_score({"dice_wt": math.nan}))


def test_accumulator_cindex_is_nan_without_a_comparable_pair_and_counts_known_survival() -> None:
    acc = MetricAccumulator()
    probs = {t: torch.tensor([[0.5, 0.5], [0.5, 0.5]]) for t in TASKS}
    labels = torch.full((2, len(TASKS)), UNKNOWN_LABEL)
    no_seg = torch.zeros(2, dtype=torch.bool)
    # the death comes after the other case's (censored) time: no pair can be ranked
    acc.add(None, label_map(batch=2), no_seg, unit_spacing(2), probs, labels,
            risk=torch.tensor([1.0, 0.0]), survival=torch.tensor([[300.0, 1.0], [100.0, 0.0]]))
    metrics = acc.compute()
    assert math.isnan(metrics["cindex"]) and metrics["n_survival"] == 2
    acc.add(None, label_map(batch=2), no_seg, unit_spacing(2), probs, labels,
            risk=torch.tensor([2.0, -1.0]), survival=torch.tensor([[50.0, 1.0], [80.0, float(UNKNOWN_LABEL)]]))
    metrics = acc.compute()
    assert metrics["n_survival"] == 3 and metrics["cindex"] == pytest.approx(1.0)  # risk 2 died first, 1 next
