"""Evaluation metrics: BraTS region Dice / HD95, per-task classification scores, aggregation.

* Segmentation (per case, per BraTS region WT/TC/ET): Dice and the 95th-percentile Hausdorff
  distance in millimetres, computed with MONAI on the case's own voxel spacing, with the BraTS
  rules for empty regions (see :func:`segmentation_scores`); and the BraTS 2023+ lesion-wise Dice
  and HD95 (:func:`lesion_wise_scores`, :mod:`common.evaluation.lesions`).
* Classification (per molecular task, positive class = index 1 of ``TASK_CLASSES[task]``): AUC,
  accuracy, sensitivity, specificity, F1 (scikit-learn) and the expected calibration error.
* Survival (with a survival head): Harrell's C-index of the predicted risk, and on request the
  Kaplan-Meier curves of the predicted low/high-risk halves (:mod:`common.evaluation.survival`).
* :class:`MetricAccumulator` collects batches and returns exactly the scalar keys of
  :data:`common.contract.METRIC_KEYS`; per-case values never leave it.

Undefined values are ``float("nan")`` (e.g. AUC when only one class is present, Dice when no
case has a reference segmentation). ``metrics.json`` is written by
:func:`server.run_folder.json_safe`, which turns every non-finite float into JSON ``null``; the
report and :func:`summary_score` treat ``null``/NaN as "not available".

No Flower imports here.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, recall_score, roc_auc_score

from common.contract import (
    CLS_METRIC_NAMES,
    LESION_METRIC_KEYS,
    METRIC_KEYS,
    REGIONS,
    SEG_METRIC_KEYS,
    TASKS,
    UNKNOWN_LABEL,
)
from common.evaluation.calibration import statistics_metrics, task_statistics
from common.evaluation.lesions import lesion_scores
from common.evaluation.survival import concordance_index, risk_group_curves

#: HD95 (mm) assigned when exactly one of prediction / reference is empty for a region: the
#: BraTS challenge penalty (the diagonal of the 240x240x155 1 mm BraTS volume, 373.13 mm).
HD95_EMPTY_PENALTY_MM = 373.13

#: Bins of the expected calibration error (Guo et al. 2017; MTTU-Net eq. 16 uses L bins).
ECE_BINS = 15


# ---------------------------------------------------------------------------------- segmentation
def region_masks(labels: torch.Tensor) -> torch.Tensor:
    """BraTS region masks of an integer label map.

    Args:
        labels: (B, 1, D, H, W) integer labels (0 bg, 1 NCR, 2 ED, 3 ET).

    Returns:
        (B, 3, D, H, W) bool, channels in ``REGIONS`` order (wt, tc, et).
    """
    if labels.ndim != 5 or labels.shape[1] != 1:
        raise ValueError(f"region_masks expects a (B, 1, D, H, W) label map, got shape {tuple(labels.shape)}")
    if labels.is_floating_point():
        raise TypeError(f"region_masks expects integer labels, got {labels.dtype}; pass argmax(seg_logits) / the seg map")
    channels = [torch.isin(labels[:, 0], torch.tensor(values, device=labels.device)) for values in REGIONS.values()]
    return torch.stack(channels, dim=1)


def segmentation_scores(
    pred: torch.Tensor, ref: torch.Tensor, spacing: torch.Tensor, *, distances: bool = True
) -> dict[str, torch.Tensor]:
    """Per-case Dice and HD95 (mm) for WT, TC, ET (HD95 NaN with ``distances=False``: not computed).

    BraTS empty-region rules (MONAI alone returns NaN for these):

    ============================  ======  ===========================
    prediction / reference        Dice    HD95
    ============================  ======  ===========================
    both empty                    1       0
    exactly one empty             0       ``HD95_EMPTY_PENALTY_MM``
    both non-empty                MONAI   MONAI (percentile 95, mm)
    ============================  ======  ===========================

    Args:
        pred: (B, 1, D, H, W) integer predicted labels.
        ref: (B, 1, D, H, W) integer reference labels.
        spacing: (B, 3) voxel size in mm along (D, H, W) of each case.

    Returns:
        ``{"dice_wt", "dice_tc", "dice_et", "hd95_wt", "hd95_tc", "hd95_et"}`` each a float (B,)
        tensor on the CPU.
    """
    if pred.shape != ref.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and reference {tuple(ref.shape)} differ in shape")
    spacing = torch.as_tensor(spacing, dtype=torch.float64).cpu()
    if spacing.shape != (pred.shape[0], 3):
        raise ValueError(f"spacing must be (B, 3) = ({pred.shape[0]}, 3) mm, got {tuple(spacing.shape)}")
    p = region_masks(pred.cpu())
    r = region_masks(ref.cpu())
    # ignore_empty=False gives the BraTS Dice convention directly: both empty -> 1, one empty -> 0
    # (with the default ignore_empty=True an empty reference would yield NaN).
    dice = compute_dice(p.float(), r.float(), include_background=True, ignore_empty=False).double()

    p_any = p.flatten(2).any(-1)  # (B, 3)
    r_any = r.flatten(2).any(-1)
    # Both empty -> 0, exactly one empty -> penalty; both present is overwritten below.
    if not distances:
        hd95 = torch.full(p_any.shape, math.nan, dtype=torch.float64)  # not computed
    else:
        hd95 = (p_any != r_any).double() * HD95_EMPTY_PENALTY_MM
    for b in range(pred.shape[0]) if distances else ():
        both = (p_any[b] & r_any[b]).nonzero().flatten()
        if both.numel() == 0:
            continue
        # MONAI's surface distances are NaN/inf (with a warning) when either mask is empty, so it
        # only sees the regions present in both; the rest are filled by the rules above.
        with warnings.catch_warnings():
            # MONAI 1.6 passes its own deprecated `always_return_as_numpy` argument internally;
            # the FutureWarning is not actionable here.
            warnings.filterwarnings("ignore", message=".*always_return_as_numpy", category=FutureWarning)
            hd95[b, both] = compute_hausdorff_distance(
                p[b : b + 1, both].float(),
                r[b : b + 1, both].float(),
                include_background=True,
                percentile=95,
                spacing=[spacing[b].tolist()],
            )[0].double()
    out: dict[str, torch.Tensor] = {}
    for i, region in enumerate(REGIONS):
        out[f"dice_{region}"] = dice[:, i]
        out[f"hd95_{region}"] = hd95[:, i]
    return out


def lesion_wise_scores(pred: torch.Tensor, ref: torch.Tensor, spacing: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-case BraTS 2023+ lesion-wise Dice and HD95 (mm) for WT, TC, ET
    (:func:`common.evaluation.lesions.lesion_scores`, BraTS-GLI parameters).

    Args:
        pred, ref: (B, 1, D, H, W) integer predicted / reference labels.
        spacing: (B, 3) voxel size in mm.

    Returns:
        ``{"lesion_dice_wt", ..., "lesion_hd95_et"}`` (:data:`LESION_METRIC_KEYS`), each float64 (B,).
    """
    if pred.shape != ref.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and reference {tuple(ref.shape)} differ in shape")
    p = region_masks(pred.cpu()).numpy()
    r = region_masks(ref.cpu()).numpy()
    spacing_np = torch.as_tensor(spacing, dtype=torch.float64).cpu().numpy()
    out = {key: torch.zeros(pred.shape[0], dtype=torch.float64) for key in LESION_METRIC_KEYS}
    for b in range(pred.shape[0]):
        for i, region in enumerate(REGIONS):
            scores = lesion_scores(p[b, i], r[b, i], spacing_np[b])
            out[f"lesion_dice_{region}"][b] = scores.dice
            out[f"lesion_hd95_{region}"][b] = scores.hd95
    return out


# -------------------------------------------------------------------------------- classification
def expected_calibration_error(prob_pos: np.ndarray, labels: np.ndarray, threshold: float = 0.5, bins: int = ECE_BINS) -> float:
    """ECE = sum_l |B_l|/N * |acc(B_l) - conf(B_l)| (MTTU-Net eq. 16), over ``bins`` equal-width
    bins of [0, 1] on the confidence of the predicted class.

    Written by hand because scikit-learn's ``calibration_curve`` bins the positive-class
    probability (a reliability curve), not the predicted-class confidence, and drops bin counts.

    Args:
        prob_pos: (N,) probability of class 1. labels: (N,) 0/1, all known.
    """
    if len(labels) == 0:
        return math.nan
    pred = (prob_pos >= threshold).astype(np.int64)
    conf = np.where(pred == 1, prob_pos, 1.0 - prob_pos)
    correct = (pred == labels).astype(np.float64)
    # Bins are (lo, hi]; confidence 0 joins the first bin.
    index = np.clip(np.ceil(conf * bins).astype(np.int64) - 1, 0, bins - 1)
    ece = 0.0
    for b in np.unique(index):
        in_bin = index == b
        ece += in_bin.mean() * abs(correct[in_bin].mean() - conf[in_bin].mean())
    return float(ece)


def classification_scores(
    prob_pos: np.ndarray, labels: np.ndarray, threshold: float = 0.5, ece_bins: int = ECE_BINS,
    logit_diff: np.ndarray | None = None,
) -> dict[str, float]:
    """Scores of one binary task from positive-class probabilities; unknown labels are ignored.

    Args:
        prob_pos: (N,) probability of class 1 (e.g. IDH mutant).
        labels: (N,) 0, 1 or ``UNKNOWN_LABEL`` (-1, skipped).
        threshold: class 1 is predicted when ``prob_pos >= threshold``.
        ece_bins: number of equal-width confidence bins of the ECE.
        logit_diff: (N,) logit differences behind ``prob_pos`` (for ``logit_mean``/``logit_std``);
            None: NaN.

    Returns:
        ``CLS_METRIC_NAMES``: ``{"auc", "acc", "bacc", "sen", "spe", "f1", "ece", "logit_mean",
        "logit_std", "n"}``. ``n`` is the number of labeled cases; ``bacc`` the balanced accuracy
        (mean of sensitivity and specificity, NaN unless both classes are present).
        NaN where undefined: everything but ``n`` when ``n == 0``; ``auc`` when only one class is
        present (ROC AUC needs both); ``sen`` without positives, ``spe`` without negatives.
        ``f1`` is 0 when it has no positive prediction and no positive label (scikit-learn
        ``zero_division=0``).
    """
    prob_pos = np.asarray(prob_pos, dtype=np.float64).reshape(-1)
    labels = np.asarray(labels).reshape(-1)
    if prob_pos.shape != labels.shape:
        raise ValueError(f"prob_pos has {prob_pos.size} values but labels has {labels.size}")
    bad = set(np.unique(labels).tolist()) - {UNKNOWN_LABEL, 0, 1}
    if bad:
        raise ValueError(f"labels must be 0, 1 or {UNKNOWN_LABEL} (unknown), found {sorted(bad)}")
    known = labels != UNKNOWN_LABEL
    p, y = prob_pos[known], labels[known].astype(np.int64)
    if not np.all(np.isfinite(p)) or np.any((p < 0) | (p > 1)):
        raise ValueError("prob_pos must be finite probabilities in [0, 1]; pass softmax(logits)[:, 1]")
    n = int(y.size)
    if n == 0:
        return {name: (0.0 if name == "n" else math.nan) for name in CLS_METRIC_NAMES}
    pred = (p >= threshold).astype(np.int64)
    both_classes = np.unique(y).size == 2
    z = np.asarray(logit_diff, dtype=np.float64).reshape(-1)[known] if logit_diff is not None else None
    return {
        "auc": float(roc_auc_score(y, p)) if both_classes else math.nan,
        "acc": float(accuracy_score(y, pred)),
        "bacc": float(balanced_accuracy_score(y, pred)) if both_classes else math.nan,
        "sen": float(recall_score(y, pred, pos_label=1, labels=[0, 1], zero_division=np.nan)),
        "spe": float(recall_score(y, pred, pos_label=0, labels=[0, 1], zero_division=np.nan)),
        "f1": float(f1_score(y, pred, pos_label=1, labels=[0, 1], zero_division=0)),
        "ece": expected_calibration_error(p, y, threshold, ece_bins),
        "logit_mean": float(z.mean()) if z is not None else math.nan,
        "logit_std": float(z.std()) if z is not None else math.nan,
        "n": float(n),
    }


# ---------------------------------------------------------------------------------- aggregation
class MetricAccumulator:
    """Collects per-case values batch by batch; :meth:`compute` returns only aggregate scalars.

    Segmentation metrics are means over the cases that have a reference segmentation (and a
    prediction); classification metrics are computed over all labeled cases of each task at once
    (AUC and ECE are not averages of per-batch values).
    """

    def __init__(
        self, threshold: float | Mapping[str, float] = 0.5, ece_bins: int = ECE_BINS, *, distances: bool = True
    ) -> None:
        """``threshold``: class 1 is predicted at ``prob >= threshold``; one value for every task
        or ``{task: threshold}`` (e.g. from :class:`common.evaluation.calibration.Calibration`).
        ``distances=False``: Dice only; HD95 and the lesion-wise scores come out NaN (not computed)."""
        self.distances = distances
        self.thresholds = {t: float(threshold[t] if isinstance(threshold, Mapping) else threshold) for t in TASKS}
        self.ece_bins = ece_bins
        self._seg: dict[str, list[np.ndarray]] = {k: [] for k in SEG_METRIC_KEYS}
        self._prob: dict[str, list[np.ndarray]] = {t: [] for t in TASKS}
        self._logit: dict[str, list[np.ndarray]] = {t: [] for t in TASKS}
        self._labels: list[np.ndarray] = []
        self._risk: list[np.ndarray] = []
        self._survival: list[np.ndarray] = []
        self._n_cases = 0

    def add(
        self,
        seg_pred: torch.Tensor | None,
        seg_ref: torch.Tensor,
        has_seg: torch.Tensor,
        spacing: torch.Tensor,
        cls_probs: Mapping[str, torch.Tensor],
        labels: torch.Tensor,
        logit_diff: Mapping[str, torch.Tensor] | None = None,
        risk: torch.Tensor | None = None,
        survival: torch.Tensor | None = None,
    ) -> None:
        """Add one batch of B cases.

        Args:
            seg_pred: (B, 1, D, H, W) integer predicted labels, or None (no segmentation scored).
            seg_ref: (B, 1, D, H, W) integer reference labels (ignored where ``has_seg`` is False).
            has_seg: (B,) bool, the case has a reference segmentation.
            spacing: (B, 3) voxel size in mm.
            cls_probs: ``{task: (B, 2)}`` class probabilities for every task in ``TASKS``.
            labels: (B, len(TASKS)) int, columns in ``TASKS`` order, ``UNKNOWN_LABEL`` unknown.
            logit_diff: ``{task: (B,)}`` raw logit differences ``z = logit_1 - logit_0`` (for the
                logit statistics and the calibration statistics), or None.
            risk: (B,) predicted log hazard ratio (the survival head's), or None.
            survival: (B, 2) (days, event) with event ``UNKNOWN_LABEL`` where unknown; needed with
                ``risk``.
        """
        labels_np = labels.detach().cpu().numpy().astype(np.int64)
        batch = labels_np.shape[0]
        if labels_np.shape != (batch, len(TASKS)):
            raise ValueError(f"labels must be (B, {len(TASKS)}) in TASKS order {TASKS}, got {labels_np.shape}")
        missing = [t for t in TASKS if t not in cls_probs]
        if missing:
            raise KeyError(f"cls_probs lacks tasks {missing}; expected one (B, 2) tensor per task in {TASKS}")
        for task in TASKS:
            probs = cls_probs[task].detach().float().cpu()
            if probs.shape != (batch, 2):
                raise ValueError(f"cls_probs[{task!r}] must be (B, 2) = ({batch}, 2), got {tuple(probs.shape)}")
            self._prob[task].append(probs[:, 1].numpy().astype(np.float64))
            if logit_diff is not None:
                self._logit[task].append(logit_diff[task].detach().float().cpu().reshape(-1).numpy().astype(np.float64))
        self._labels.append(labels_np)
        self._n_cases += batch
        if risk is not None and survival is not None:
            self._risk.append(risk.detach().float().cpu().reshape(-1).numpy().astype(np.float64))
            self._survival.append(survival.detach().float().cpu().reshape(-1, 2).numpy().astype(np.float64))

        has_seg = torch.as_tensor(has_seg).bool().reshape(-1).cpu()
        if seg_pred is None or not bool(has_seg.any()):
            return
        keep = has_seg.nonzero().flatten()
        pred, ref = seg_pred.detach().cpu()[keep], seg_ref.detach().cpu()[keep]
        case_spacing = torch.as_tensor(spacing).cpu()[keep]
        scores = segmentation_scores(pred, ref, case_spacing, distances=self.distances)
        if self.distances:
            scores |= lesion_wise_scores(pred, ref, case_spacing)
        for key, values in scores.items():
            self._seg[key].append(values.numpy())

    @property
    def n_cases(self) -> int:
        return self._n_cases

    def compute(self) -> dict[str, float]:
        """Every key of ``METRIC_KEYS`` as a float (NaN where no case qualifies), in that order."""
        out: dict[str, float] = {}
        for key, chunks in self._seg.items():
            values = np.concatenate(chunks) if chunks else np.empty(0)
            out[key] = float(values.mean()) if values.size else math.nan
        labels = self._label_matrix()
        for t, task in enumerate(TASKS):
            probs = np.concatenate(self._prob[task]) if self._prob[task] else np.empty(0)
            logits = np.concatenate(self._logit[task]) if self._logit[task] else None
            scores = classification_scores(probs, labels[:, t], self.thresholds[task], self.ece_bins, logits)
            out.update({f"{name}_{task}": value for name, value in scores.items()})
        risk, survival = self._risk_and_survival()
        out["cindex"] = concordance_index(risk, survival)
        out["n_survival"] = float(np.count_nonzero(survival[:, 1] != UNKNOWN_LABEL))
        out["n_cases"] = float(self._n_cases)
        return {key: out[key] for key in METRIC_KEYS}

    def _risk_and_survival(self) -> tuple[np.ndarray, np.ndarray]:
        if not self._risk:
            return np.empty(0), np.empty((0, 2))
        return np.concatenate(self._risk), np.concatenate(self._survival)

    def survival_curves(self) -> dict[str, Any] | None:
        """Kaplan-Meier curves of the low/high predicted-risk halves (aggregate step functions,
        :func:`common.evaluation.survival.risk_group_curves`); None without risks or survival."""
        return risk_group_curves(*self._risk_and_survival())

    def _label_matrix(self) -> np.ndarray:
        return np.concatenate(self._labels) if self._labels else np.empty((0, len(TASKS)), dtype=np.int64)

    def calibration_statistics(self) -> dict[str, list[float]]:
        """Per task, the aggregate statistics a site sends for calibration
        (:func:`common.evaluation.calibration.task_statistics`); needs ``logit_diff`` in :meth:`add`."""
        labels = self._label_matrix()
        stats = {}
        for t, task in enumerate(TASKS):
            if not self._logit[task]:
                continue
            z = np.concatenate(self._logit[task])
            known = labels[:, t] != UNKNOWN_LABEL
            stats[task] = task_statistics(z[known], labels[known, t])
        return statistics_metrics(stats)


def summary_score(metrics: Mapping[str, float]) -> float:
    """Model-selection score for ``best.pt`` (higher is better).

    score = mean(dice_wt, mean of auc_T over the tasks whose AUC is defined), where NaN entries
    are dropped at both levels: with no AUC available the score is dice_wt; without dice_wt it is
    the mean AUC; NaN when neither exists. Both terms lie in [0, 1], so segmentation and the
    molecular tasks weigh equally.
    """
    def finite(key: str) -> float:
        value = metrics.get(key, math.nan)
        value = math.nan if value is None else float(value)
        return value if math.isfinite(value) else math.nan

    aucs = [a for a in (finite(f"auc_{t}") for t in TASKS) if not math.isnan(a)]
    parts: Sequence[float] = [v for v in (finite("dice_wt"), float(np.mean(aucs)) if aucs else math.nan) if not math.isnan(v)]
    return float(np.mean(parts)) if parts else math.nan


def selection_score(site_metrics: Mapping[str, Mapping[str, float]]) -> float:
    """Model-selection score from the sites' *validation* metrics: the mean of each site's
    :func:`summary_score`, weighted by its validation cases (``n_cases``; 1 when absent). NaN when
    no site has a score. The held-out center never enters it: it is only reported."""
    scores, weights = [], []
    for metrics in site_metrics.values():
        score = summary_score(metrics)
        if math.isfinite(score):
            n = metrics.get("n_cases", 1.0)
            scores.append(score)
            weights.append(float(n) if n is not None and math.isfinite(float(n)) and float(n) > 0 else 1.0)
    return float(np.average(scores, weights=weights)) if scores else math.nan
