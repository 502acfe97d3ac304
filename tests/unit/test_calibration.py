"""Calibration fit on the sites' aggregate validation statistics (no per-case data)."""

from __future__ import annotations

import numpy as np
import pytest

from common.evaluation.calibration import (
    MIN_CASES,
    Calibration,
    fit_calibration,
    statistics_metrics,
    task_statistics,
)


def sample(n: int, temperature: float, shift: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels drawn from sigmoid(z / temperature) for logits z shifted by ``shift``."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 3.0, n)
    y = (rng.uniform(size=n) < 1 / (1 + np.exp(-(z - shift) / temperature))).astype(int)
    return z, y


def separated(n: int, shift: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """3:1 imbalanced classes, z | y ~ N(shift -+ 1, 1): the balanced-accuracy optimum is ``shift``."""
    rng = np.random.default_rng(seed)
    y = (rng.uniform(size=n) < 0.25).astype(int)
    return rng.normal(shift + np.where(y == 1, 1.0, -1.0), 1.0), y


def test_pooled_site_statistics_recover_temperature_and_threshold() -> None:
    sites = [sample(400, 2.0, 0.0, seed) for seed in range(3)]
    metrics = [statistics_metrics({"idh": task_statistics(z, y)}) for z, y in sites]
    fit = fit_calibration(metrics)
    assert 1.4 <= fit.temperature["idh"] <= 2.9
    assert fit.cases["idh"] == 1200
    shifted = fit_calibration([statistics_metrics({"grade": task_statistics(*separated(2000, 1.5, s))}) for s in range(2)])
    assert 1.0 <= shifted.logit_threshold["grade"] <= 2.0
    # identity for tasks no site could fit
    assert fit.temperature["mgmt"] == 1.0 and fit.probability_threshold("mgmt") == 0.5
    # pooling statistics is the same as fitting the pooled cases
    z = np.concatenate([s[0] for s in sites])
    y = np.concatenate([s[1] for s in sites])
    pooled = fit_calibration([statistics_metrics({"idh": task_statistics(z, y)})])
    assert pooled.temperature == fit.temperature and pooled.logit_threshold == fit.logit_threshold


def test_a_site_with_too_few_cases_sends_no_statistics() -> None:
    z, y = sample(MIN_CASES - 1, 1.0, 0.0, 0)
    assert task_statistics(z, y) is None
    assert statistics_metrics({"idh": None}) == {}


def test_calibrated_probability_and_threshold_agree() -> None:
    cal = Calibration(temperature={"idh": 2.0}, logit_threshold={"idh": 1.0})
    p = cal.probability("idh", np.array([1.0]))[0]
    assert p == pytest.approx(cal.probability_threshold("idh"))
    assert cal.as_metrics()["temperature_idh"] == 2.0


def test_calibration_round_trips_through_a_checkpoint(tmp_path) -> None:
    import torch

    cal = Calibration(temperature={"idh": 2.0}, logit_threshold={"idh": -0.5}, cases={"idh": 12.0})
    torch.save({"calibration": cal.to_dict()}, tmp_path / "c.pt")
    back = Calibration.from_dict(torch.load(tmp_path / "c.pt", weights_only=True)["calibration"])
    assert back.temperature["idh"] == 2.0 and back.logit_threshold["idh"] == -0.5
    assert back.temperature["mgmt"] == 1.0  # tasks not stored stay at the identity
    assert Calibration.from_dict(None).probability_threshold("idh") == 0.5
