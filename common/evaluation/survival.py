"""Survival metrics: Harrell's C-index of a risk score and Kaplan-Meier curves of risk groups.

Both come from torchsurv (``ConcordanceIndex``, ``KaplanMeierEstimator``); this module only masks
unknown survival, handles the degenerate cases (no death, fewer than two cases: NaN / no curve) and
shapes the result into aggregate numbers that may be written to ``metrics.json``: a C-index, and
per risk group a step function (event times and survival probabilities) with its size, never a
case ID.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import torch
from torchsurv.metrics.cindex import ConcordanceIndex
from torchsurv.stats.kaplan_meier import KaplanMeierEstimator

from common.contract import UNKNOWN_LABEL


def _known(risk: np.ndarray, survival: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(risk, event bool, time) tensors of the cases whose survival is known."""
    risk = np.asarray(risk, dtype=np.float64).reshape(-1)
    survival = np.asarray(survival, dtype=np.float64).reshape(-1, 2)
    if risk.shape[0] != survival.shape[0]:
        raise ValueError(f"risk has {risk.shape[0]} values but survival {survival.shape[0]} rows")
    keep = survival[:, 1] != UNKNOWN_LABEL
    return (torch.from_numpy(risk[keep]), torch.from_numpy(survival[keep, 1] == 1), torch.from_numpy(survival[keep, 0]))


def concordance_index(risk: np.ndarray, survival: np.ndarray) -> float:
    """Harrell's C-index of ``risk`` (N,) (higher = shorter survival) against ``survival`` (N, 2) =
    (days, event: 1 death, 0 censored, ``UNKNOWN_LABEL`` unknown, skipped). 0.5 is chance, 1 a
    perfect ranking; NaN without a comparable pair (a death before another case's time: none with
    fewer than two known cases or no observed death)."""
    r, event, time = _known(risk, survival)
    if not bool((time[event][:, None] < time[None, :]).any()):
        return math.nan  # torchsurv raises on this
    with warnings.catch_warnings():  # torchsurv warns about ties and small samples; both are expected here
        warnings.simplefilter("ignore")
        return float(ConcordanceIndex()(r, event, time))


def kaplan_meier(event: torch.Tensor, time: torch.Tensor) -> dict[str, Any]:
    """Kaplan-Meier step function of one group: ``{"n", "events", "time", "survival"}`` with the
    survival probability just after each distinct time (days), starting at (0, 1)."""
    if event.numel() == 0:
        return {"n": 0, "events": 0, "time": [], "survival": []}
    if not bool(event.any()):  # no death: flat at 1 until the last follow-up (torchsurv refuses it)
        return {"n": int(event.numel()), "events": 0, "time": [0.0, round(float(time.max()), 1)], "survival": [1.0, 1.0]}
    km = KaplanMeierEstimator()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        km(event, time)
    return {
        "n": int(event.numel()),
        "events": int(event.sum()),
        "time": [0.0, *(round(float(t), 1) for t in km.time)],
        "survival": [1.0, *(round(float(s), 4) for s in km.km_est)],
    }


def risk_group_curves(risk: np.ndarray, survival: np.ndarray) -> dict[str, Any] | None:
    """Kaplan-Meier curves of the low- and high-risk halves (split at the median predicted risk;
    cases at the median go to the low group) of the cases with known survival, and the split value.
    None with fewer than two such cases."""
    r, event, time = _known(risk, survival)
    if r.numel() < 2:
        return None
    threshold = float(r.median())
    high = r > threshold
    return {"threshold": threshold, "low": kaplan_meier(event[~high], time[~high]),
            "high": kaplan_meier(event[high], time[high])}
