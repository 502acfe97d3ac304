"""Post-processing steps (common.evaluation.postprocess) on crafted label maps."""

from __future__ import annotations

import numpy as np
import pytest

from common.contract import ED, ET, NCR
from common.evaluation.postprocess import (
    STEPS,
    density_filter,
    fill_holes,
    parse_steps,
    postprocess,
    remove_small_components,
)


def _ball(shape: tuple[int, int, int], centre: tuple[float, float, float], radius: float) -> np.ndarray:
    grid = np.indices(shape, dtype=np.float32)
    return ((grid - np.asarray(centre, dtype=np.float32)[:, None, None, None]) ** 2).sum(0) <= radius**2


def _scatter(labels: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """``n`` isolated tumor voxels at random positions outside the existing tumor (at least 2 voxels apart)."""
    rng = np.random.default_rng(seed)
    out = labels.copy()
    placed = 0
    while placed < n:
        p = tuple(int(v) for v in rng.integers(1, np.asarray(labels.shape) - 1))
        window = tuple(slice(c - 1, c + 2) for c in p)
        if out[window].any():
            continue
        out[p] = ED
        placed += 1
    return out


def test_density_filter_removes_scattered_voxels_and_keeps_the_dense_tumor() -> None:
    # Prepare: a compact tumor and 40 isolated false-positive voxels all over the volume
    tumor = np.zeros((40, 40, 40), dtype=np.uint8)
    tumor[_ball(tumor.shape, (20, 20, 20), 5)] = ED
    tumor[_ball(tumor.shape, (20, 20, 20), 2)] = ET
    noisy = _scatter(tumor, 40)

    # Execute
    filtered = density_filter(noisy)

    # Assert: exactly the tumor is left, its labels untouched; the input is not modified
    np.testing.assert_array_equal(filtered, tumor)
    assert (noisy > 0).sum() == (tumor > 0).sum() + 40


def test_density_filter_keeps_the_foci_of_a_multifocal_tumor() -> None:
    # two foci of similar size (neither holds 60 % of the tumor voxels) plus noise
    tumor = np.zeros((48, 48, 48), dtype=np.uint8)
    tumor[_ball(tumor.shape, (12, 12, 12), 4)] = ED
    tumor[_ball(tumor.shape, (35, 35, 35), 4)] = NCR
    noisy = _scatter(tumor, 30, seed=1)

    filtered = density_filter(noisy)

    np.testing.assert_array_equal(filtered, tumor)


def test_density_filter_leaves_a_compact_prediction_alone() -> None:
    # the tumor fills its bounding box well (D >= 0.1): GMMAS line 5, nothing is filtered,
    # not even a small second component close by
    labels = np.zeros((24, 24, 24), dtype=np.uint8)
    labels[_ball(labels.shape, (10, 10, 10), 5)] = ED
    labels[17, 17, 17] = ET

    np.testing.assert_array_equal(density_filter(labels), labels)
    np.testing.assert_array_equal(density_filter(np.zeros((4, 4, 4), dtype=np.uint8)), 0)


@pytest.mark.parametrize(
    "spacing, removed",
    [((1.0, 1.0, 1.0), True),  # 27 voxels = 0.027 mL < 0.5 mL
     ((3.0, 3.0, 3.0), False)],  # 27 voxels of 27 mm^3 = 0.729 mL >= 0.5 mL
)
def test_small_components_are_removed_by_volume_in_ml(spacing: tuple[float, float, float], removed: bool) -> None:
    labels = np.zeros((40, 40, 40), dtype=np.uint8)
    big = _ball(labels.shape, (12, 12, 12), 6)  # ~900 voxels
    labels[big] = ED
    labels[30:33, 30:33, 30:33] = ET  # a 3x3x3 component

    out = remove_small_components(labels, spacing, min_volume_ml=0.5)

    assert (out[big] == ED).all()
    assert (out[30:33, 30:33, 30:33] == 0).all() == removed
    assert (out[30:33, 30:33, 30:33] == ET).all() == (not removed)


def test_small_components_use_26_connectivity() -> None:
    # two voxels touching only at a corner are one component of 2 voxels
    labels = np.zeros((8, 8, 8), dtype=np.uint8)
    labels[2, 2, 2] = labels[3, 3, 3] = ED
    out = remove_small_components(labels, (10.0, 10.0, 10.0), min_volume_ml=1.5)  # 1 mL per voxel
    np.testing.assert_array_equal(out, labels)
    assert remove_small_components(labels, (10.0, 10.0, 10.0), min_volume_ml=2.5).sum() == 0


def test_fill_holes_fills_the_tumor_with_the_surrounding_label() -> None:
    labels = np.zeros((30, 30, 30), dtype=np.uint8)
    labels[_ball(labels.shape, (15, 15, 15), 10)] = ED
    hole = _ball(labels.shape, (15, 15, 15), 3)
    labels[hole] = 0

    out = fill_holes(labels)

    assert (out[hole] == ED).all()
    assert (out[~hole] == labels[~hole]).all()


def test_fill_holes_keeps_the_necrotic_core_inside_the_enhancing_ring() -> None:
    labels = np.zeros((30, 30, 30), dtype=np.uint8)
    labels[_ball(labels.shape, (15, 15, 15), 10)] = ED
    labels[_ball(labels.shape, (15, 15, 15), 6)] = ET
    labels[_ball(labels.shape, (15, 15, 15), 3)] = NCR
    holes = labels.copy()
    holes[15, 15, 15] = 0  # a hole in the necrotic core
    holes[15, 15, 20] = ED  # edema inside the core (TC hole)

    out = fill_holes(holes)

    np.testing.assert_array_equal(out, labels)  # NCR stays NCR, the holes take the nearest core label


def test_fill_holes_of_an_open_cavity_stays_open() -> None:
    labels = np.zeros((20, 20, 20), dtype=np.uint8)
    labels[5:15, 5:15, 5:15] = ED
    labels[8:12, 8:12, 8:20] = 0  # a channel to the volume's border
    out = fill_holes(labels)
    assert (out[8:12, 8:12, 8:15] == 0).all()


def test_parse_steps_orders_validates_and_suggests() -> None:
    assert parse_steps(["holes", "density"]) == ("density", "holes")
    assert parse_steps(["all"]) == STEPS
    assert parse_steps(["none"]) == () == parse_steps([])
    with pytest.raises(ValueError, match="did you mean 'holes'"):
        parse_steps(["hole"])


def test_postprocess_applies_every_step() -> None:
    labels = np.zeros((40, 40, 40), dtype=np.uint8)
    labels[_ball(labels.shape, (20, 20, 20), 6)] = ED
    labels[20, 20, 20] = 0  # a hole
    noisy = _scatter(labels, 30, seed=2)

    out = postprocess(noisy, (1.0, 1.0, 1.0), ["all"], min_volume_ml=0.01)

    assert out[20, 20, 20] == ED
    assert (out > 0).sum() == _ball(labels.shape, (20, 20, 20), 6).sum()
    with pytest.raises(ValueError, match="integer label map"):
        postprocess(noisy.astype(np.float32), (1.0, 1.0, 1.0), ["holes"])
