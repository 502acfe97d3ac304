"""Post-hoc calibration of the molecular heads, fit on the sites' validation splits only.

Per task, a temperature ``T`` (Guo et al. 2017: ``p = sigmoid(z / T)`` with ``z = logit_1 -
logit_0``) minimises the pooled validation negative log-likelihood, and a decision threshold on
``z`` maximises the pooled validation balanced accuracy. The held-out center only ever receives
the result; it chooses nothing.

Federated without per-case data: each site sends, per task, its summed NLL at every temperature of
a fixed grid and its true-positive/true-negative counts at every threshold of a fixed grid (a few
dozen scalars, only when it has at least ``MIN_CASES`` labeled validation cases). The server sums
them and takes the grid optimum, which equals the optimum over the pooled cases on that grid.
scikit-learn's ``CalibratedClassifierCV`` needs the pooled cases themselves, hence this module.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping

import numpy as np

from common.contract import TASKS

#: Temperatures tried (geometric grid; 1 = the raw softmax). Early in training the logits are
#: tiny, so the grid reaches far below 1.
TEMPERATURES: tuple[float, ...] = tuple(float(t) for t in np.geomspace(0.01, 10.0, 31))
#: Thresholds on the logit difference z tried: 0 (the raw 0.5 rule) and +-10^k for k in [-3, 1]
#: (a symmetric log grid, since the logits' scale grows by orders of magnitude during training).
_MAGNITUDES = np.geomspace(1e-3, 10.0, 25)
LOGIT_THRESHOLDS: tuple[float, ...] = tuple(float(t) for t in np.concatenate([-_MAGNITUDES[::-1], [0.0], _MAGNITUDES]))
#: Fewest labeled validation cases of a task for which a site sends its calibration statistics.
MIN_CASES = 5


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # overflow-free logistic


def task_statistics(z: np.ndarray, y: np.ndarray) -> dict[str, list[float]] | None:
    """One site's sufficient statistics for one task, or None below :data:`MIN_CASES` cases.

    Args:
        z: (N,) logit differences of the labeled cases. y: (N,) 0/1 labels.

    Returns:
        ``{"nll": [sum NLL at each T], "tp": [...], "tn": [...] at each threshold, "pos": [P], "neg": [N]}``.
    """
    z = np.asarray(z, dtype=np.float64).reshape(-1)
    y = np.asarray(y).reshape(-1).astype(np.int64)
    if z.size < MIN_CASES:
        return None
    sign = np.where(y == 1, 1.0, -1.0)
    # NLL of the true class: softplus(-sign * z / T), summed over cases
    nll = [float(np.logaddexp(0.0, -sign * z / t).sum()) for t in TEMPERATURES]
    tp = [float(((z >= thr) & (y == 1)).sum()) for thr in LOGIT_THRESHOLDS]
    tn = [float(((z < thr) & (y == 0)).sum()) for thr in LOGIT_THRESHOLDS]
    return {"nll": nll, "tp": tp, "tn": tn, "pos": [float((y == 1).sum())], "neg": [float((y == 0).sum())]}


def statistics_metrics(stats: Mapping[str, Mapping[str, list[float]] | None]) -> dict[str, list[float]]:
    """``{task: statistics}`` -> flat metric entries ``cal_<name>_<task>`` (tasks without statistics left out)."""
    return {f"cal_{name}_{task}": list(values) for task, s in stats.items() if s for name, values in s.items()}


@dataclass(frozen=True)
class Calibration:
    """Per-task temperature and logit threshold (identity: T = 1, threshold 0)."""

    temperature: dict[str, float] = field(default_factory=lambda: {t: 1.0 for t in TASKS})
    logit_threshold: dict[str, float] = field(default_factory=lambda: {t: 0.0 for t in TASKS})
    #: labeled validation cases behind each task's fit (0: identity, nothing to fit on)
    cases: dict[str, float] = field(default_factory=lambda: {t: 0.0 for t in TASKS})

    def probability(self, task: str, z: np.ndarray) -> np.ndarray:
        """Calibrated probability of class 1 from logit differences ``z``."""
        return _sigmoid(np.asarray(z, dtype=np.float64) / self.temperature.get(task, 1.0))

    def probability_threshold(self, task: str) -> float:
        """The decision threshold on the calibrated probability (equivalent to the logit threshold)."""
        return float(_sigmoid(np.asarray(self.logit_threshold.get(task, 0.0) / self.temperature.get(task, 1.0))))

    def to_dict(self) -> dict[str, dict[str, float]]:
        """Plain dicts (stored in checkpoints; ``torch.load(weights_only=True)`` reads them back)."""
        return {"temperature": dict(self.temperature), "logit_threshold": dict(self.logit_threshold),
                "cases": dict(self.cases)}

    @classmethod
    def from_dict(cls, values: Mapping[str, Mapping[str, float]] | None) -> "Calibration":
        """Inverse of :meth:`to_dict`; None (a checkpoint without calibration) gives the identity."""
        out = cls()
        for name in ("temperature", "logit_threshold", "cases"):
            getattr(out, name).update({str(k): float(v) for k, v in ((values or {}).get(name) or {}).items()})
        return out

    def as_metrics(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for task in TASKS:
            out[f"temperature_{task}"] = self.temperature.get(task, 1.0)
            out[f"threshold_{task}"] = self.probability_threshold(task)
            out[f"calibration_cases_{task}"] = self.cases.get(task, 0.0)
        return out


def fit_calibration(site_metrics: Iterable[Mapping[str, object]]) -> Calibration:
    """Pool the sites' ``cal_*`` statistics and take the grid optimum per task.

    Tasks that no site sent statistics for keep the identity (T = 1, threshold 0). The threshold
    maximises the pooled balanced accuracy (ties: the one closest to 0, i.e. to the raw rule).
    """
    sums: dict[str, dict[str, np.ndarray]] = {}
    for metrics in site_metrics:
        for task in TASKS:
            keys = {name: f"cal_{name}_{task}" for name in ("nll", "tp", "tn", "pos", "neg")}
            if not all(k in metrics for k in keys.values()):
                continue
            bucket = sums.setdefault(task, {})
            for name, key in keys.items():
                values = np.asarray(metrics[key], dtype=np.float64).reshape(-1)
                bucket[name] = bucket.get(name, 0.0) + values
    calibration = Calibration()
    for task, s in sums.items():
        pos, neg = float(s["pos"][0]), float(s["neg"][0])
        calibration.temperature[task] = TEMPERATURES[int(np.argmin(s["nll"]))]
        calibration.cases[task] = pos + neg
        if pos > 0 and neg > 0:
            bacc = (s["tp"] / pos + s["tn"] / neg) / 2
            best = np.flatnonzero(np.isclose(bacc, bacc.max()))
            calibration.logit_threshold[task] = LOGIT_THRESHOLDS[int(best[np.argmin(np.abs(np.asarray(LOGIT_THRESHOLDS)[best]))])]
    return calibration
