"""common.evaluation.lesions: BraTS 2023+ lesion-wise Dice and HD95 on crafted volumes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.contract import ET, LESION_METRIC_KEYS, NCR
from common.evaluation.lesions import LESION_HD95_PENALTY_MM, lesion_scores
from common.evaluation.metrics import MetricAccumulator, lesion_wise_scores

S = 32
UNIT = (1.0, 1.0, 1.0)


def mask(*boxes: tuple[slice, slice, slice]) -> np.ndarray:
    out = np.zeros((S, S, S), dtype=bool)
    for box in boxes:
        out[box] = True
    return out


def cube(corner: tuple[int, int, int], side: int) -> tuple[slice, slice, slice]:
    return tuple(slice(c, c + side) for c in corner)  # type: ignore[return-value]


BIG_A = cube((4, 4, 4), 5)  # 125 voxels: above the 50 mm^3 threshold at 1 mm
BIG_B = cube((20, 20, 20), 5)
SMALL = cube((4, 22, 4), 3)  # 27 voxels: ignored at 1 mm


def test_one_lesion_predicted_perfectly_scores_1_and_0_mm() -> None:
    scores = lesion_scores(mask(BIG_A), mask(BIG_A), UNIT)
    assert (scores.dice, scores.hd95) == (pytest.approx(1.0), pytest.approx(0.0))
    assert (scores.n_lesions, scores.n_missed, scores.n_false_positive) == (1, 0, 0)


def test_a_false_positive_blob_counts_as_a_lesion_with_dice_0_and_the_penalty() -> None:
    scores = lesion_scores(mask(BIG_A, BIG_B), mask(BIG_A), UNIT)
    assert scores.n_false_positive == 1
    assert scores.dice == pytest.approx(0.5)
    assert scores.hd95 == pytest.approx(LESION_HD95_PENALTY_MM / 2)


def test_a_missed_lesion_under_the_volume_threshold_is_ignored() -> None:
    scores = lesion_scores(mask(BIG_A), mask(BIG_A, SMALL), UNIT)
    assert (scores.dice, scores.hd95, scores.n_ignored, scores.n_lesions) == (1.0, 0.0, 1, 1)
    # a prediction on the ignored lesion is no false positive either
    assert lesion_scores(mask(BIG_A, SMALL), mask(BIG_A, SMALL), UNIT).n_false_positive == 0


def test_the_threshold_is_in_mm3() -> None:
    """27 voxels of 2 mm (216 mm^3) are a lesion; missing it costs Dice 0 and the penalty."""
    scores = lesion_scores(mask(BIG_A), mask(BIG_A, SMALL), (2.0, 2.0, 2.0))
    assert (scores.n_lesions, scores.n_missed) == (2, 1)
    assert scores.dice == pytest.approx(0.5)


def test_two_lesions_one_missed_is_the_mean_with_a_0() -> None:
    scores = lesion_scores(mask(BIG_A), mask(BIG_A, BIG_B), UNIT)
    assert (scores.n_lesions, scores.n_missed) == (2, 1)
    assert scores.dice == pytest.approx(0.5)
    assert scores.hd95 == pytest.approx(LESION_HD95_PENALTY_MM / 2)


def test_lesions_closer_than_the_dilation_are_one_lesion() -> None:
    near = cube((4, 4, 12), 5)  # 3 voxels of gap to BIG_A: the two dilated masks touch
    scores = lesion_scores(mask(BIG_A), mask(BIG_A, near), UNIT)
    assert (scores.n_lesions, scores.n_missed, scores.n_false_positive) == (1, 0, 0)
    assert scores.dice == pytest.approx(2 * 125 / (125 + 250))
    apart = lesion_scores(mask(BIG_A), mask(BIG_A, near), UNIT, dilation=1)  # 1 dilation: two lesions
    assert (apart.n_lesions, apart.n_missed) == (2, 1)


def test_a_prediction_touching_the_dilated_lesion_is_matched_not_false() -> None:
    beside = cube((4, 4, 10), 2)  # 1 voxel of gap to BIG_A: inside its dilated extent
    scores = lesion_scores(mask(BIG_A, beside), mask(BIG_A), UNIT)
    assert scores.n_false_positive == 0
    assert scores.dice == pytest.approx(2 * 125 / (125 + 125 + 8))


def test_nothing_predicted_and_nothing_there_scores_1_and_0() -> None:
    empty = mask()
    assert (lesion_scores(empty, empty, UNIT).dice, lesion_scores(empty, empty, UNIT).hd95) == (1.0, 0.0)
    only_fp = lesion_scores(mask(BIG_B), empty, UNIT)
    assert (only_fp.dice, only_fp.hd95) == (0.0, LESION_HD95_PENALTY_MM)


def test_bad_arguments_raise() -> None:
    with pytest.raises(ValueError, match="one \\(D, H, W\\) shape"):
        lesion_scores(np.zeros((4, 4, 4), bool), np.zeros((4, 4, 5), bool), UNIT)
    with pytest.raises(ValueError, match="dilation"):
        lesion_scores(mask(), mask(), UNIT, dilation=0)


def test_per_region_scores_reach_the_accumulator() -> None:
    """WT/TC/ET of a label map: ET predicted perfectly, a false NCR blob in WT and TC only."""
    ref = torch.zeros(1, 1, S, S, S, dtype=torch.int64)
    ref[(0, 0) + BIG_A] = ET
    pred = ref.clone()
    pred[(0, 0) + BIG_B] = NCR
    spacing = torch.ones(1, 3)

    scores = lesion_wise_scores(pred, ref, spacing)

    assert set(scores) == set(LESION_METRIC_KEYS)
    assert scores["lesion_dice_et"].tolist() == [pytest.approx(1.0)]
    assert scores["lesion_dice_wt"].tolist() == [pytest.approx(0.5)] == scores["lesion_dice_tc"].tolist()
    acc = MetricAccumulator()
    probs = {t: torch.tensor([[0.5, 0.5]]) for t in ("idh", "1p19q", "grade", "mgmt")}
    acc.add(pred, ref, torch.tensor([True]), spacing, probs, torch.full((1, 4), -1))
    metrics = acc.compute()
    assert metrics["lesion_dice_wt"] == pytest.approx(0.5) and metrics["lesion_hd95_et"] == pytest.approx(0.0)
