"""Score a model on a loader: the one evaluation loop used by the server (held-out center), the
sites (validation split), the baselines and ``fedglioma evaluate``.

Returns only aggregate scalars (:data:`common.contract.METRIC_KEYS`, plus ``unc_<task>`` with
MC-dropout); nothing per case leaves this function.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from common.contract import SEQUENCES, TASKS
from common.evaluation.calibration import Calibration
from common.evaluation.metrics import MetricAccumulator
from common.evaluation.uncertainty import mc_dropout_predict
from common.runtime import move_batch


def evaluate(
    model: nn.Module,
    loader: Iterable[Mapping[str, torch.Tensor]],
    device: torch.device | str = "cpu",
    *,
    mc_passes: int = 0,
    progress: bool = False,
    desc: str = "eval",
    calibration: Calibration | None = None,
    calibration_stats: bool = False,
    survival_curves: bool = False,
    distances: bool = True,
) -> dict[str, Any]:
    """Segmentation and classification metrics of ``model`` over every batch of ``loader``.

    Args:
        model: ``model(image (B, 4, S, S, S), available (B, 4) bool, spacing (B, 3) mm)`` returning an object with
            ``seg_logits`` (B, 4, S, S, S), ``cls_logits`` ``{task: (B, 2)}`` and, optionally,
            ``risk`` (B,) (a survival head's log hazard ratio; absent or None: no C-index). It is moved to
            ``device`` and put in eval mode; every module's train/eval flag is restored afterwards.
        loader: batches (dicts) with ``image``, ``available``, ``seg`` (B, 1, S, S, S) int64,
            ``has_seg`` (B,), ``labels`` (B, 4) int64 (-1 unknown) and ``spacing`` (B, 3) mm.
            Any iterable of such dicts works (a DataLoader or a plain list).
        mc_passes: 0 = deterministic softmax probabilities; T >= 2 = the mean of T MC-dropout
            passes, and ``unc_<task>`` (mean over cases of the positive-class probability's
            standard deviation, the epistemic uncertainty) is added to the result.
        progress: show a tqdm bar named ``desc``.
        calibration: per-task temperature and decision threshold fit on the sites' validation
            splits (deterministic probabilities only); None = raw softmax, threshold 0.5.
        calibration_stats: add the ``cal_*`` statistics a site sends for fitting a calibration
            (list values; :mod:`common.evaluation.calibration`).
        distances: compute HD95 and the lesion-wise scores (False: NaN, Dice only; the sites'
            per-round validation, ``federation.site_validation_distances``).
        survival_curves: add ``km_risk_groups``, the Kaplan-Meier curves of the predicted
            low/high-risk halves (a dict; None without a survival head or known survival).

    Returns:
        ``{key: float}`` with every key of ``METRIC_KEYS`` (NaN where undefined), in that order,
        then the ``cal_*`` lists and ``km_risk_groups`` when asked.
    """
    if mc_passes < 0 or mc_passes == 1:
        raise ValueError(f"mc_passes must be 0 (deterministic) or >= 2 MC-dropout passes, got {mc_passes}")
    device = torch.device(device)
    accumulator = MetricAccumulator(
        {t: calibration.probability_threshold(t) for t in TASKS} if calibration is not None else 0.5,
        distances=distances,
    )
    uncertainty_sums = {task: 0.0 for task in TASKS}
    # Per-module flags, not model.training: a frozen sub-module may be kept in eval mode on purpose.
    modes = {module: module.training for module in model.modules()}
    model.to(device).eval()
    if progress:
        loader = tqdm(loader, desc=desc, leave=False, dynamic_ncols=True)
    try:
        with torch.no_grad():
            for batch in loader:
                batch = move_batch(batch, device)
                output = model(batch["image"], batch["available"], batch["spacing"])
                # Segmentation always from the deterministic pass: BraTS scores a hard label map.
                seg_pred = output.seg_logits.argmax(dim=1, keepdim=True)
                diffs = {task: (logits[:, 1] - logits[:, 0]).float() for task, logits in output.cls_logits.items()}
                if mc_passes:
                    probs, spread = mc_dropout_predict(model, batch["image"], batch["available"], mc_passes, spacing=batch["spacing"])
                    for task in TASKS:
                        uncertainty_sums[task] += float(spread[task][:, 1].sum())
                elif calibration is not None:
                    probs = {task: _two_class(calibration.probability(task, z.cpu().numpy())) for task, z in diffs.items()}
                else:
                    probs = {task: torch.softmax(logits.float(), dim=-1) for task, logits in output.cls_logits.items()}
                accumulator.add(seg_pred, batch["seg"], batch["has_seg"], batch["spacing"], probs, batch["labels"], diffs,
                                risk=getattr(output, "risk", None), survival=batch.get("survival"))
    finally:
        for module, mode in modes.items():
            module.training = mode
    metrics: dict[str, Any] = dict(accumulator.compute())
    if calibration_stats:
        metrics.update(accumulator.calibration_statistics())
    if survival_curves:
        metrics["km_risk_groups"] = accumulator.survival_curves()
    if mc_passes:
        n = max(accumulator.n_cases, 1)
        metrics.update({f"unc_{task}": uncertainty_sums[task] / n for task in TASKS})
    return metrics


def drop_sequences(
    loader: Iterable[Mapping[str, torch.Tensor]], drop: Iterable[str]
) -> Iterable[dict[str, torch.Tensor]]:
    """The batches of ``loader`` as if the sequences named in ``drop`` had not been acquired:
    their channels zero-filled and their availability flag off (what the data layer does for a
    sequence that is really missing). Used to measure robustness to missing sequences."""
    drop = list(drop)
    unknown = sorted(set(drop) - set(SEQUENCES))
    if unknown:
        raise ValueError(f"unknown sequence(s) {unknown}; expected names from {SEQUENCES}")
    columns = [SEQUENCES.index(name) for name in drop]
    for batch in loader:
        batch = dict(batch)
        if columns:
            image = batch["image"].clone()
            available = batch["available"].clone()
            image[:, columns] = 0.0
            available[:, columns] = False
            batch["image"], batch["available"] = image, available
        yield batch


def _two_class(prob_pos: np.ndarray) -> torch.Tensor:
    """(B,) probabilities of class 1 -> (B, 2) class probabilities."""
    p = torch.as_tensor(prob_pos, dtype=torch.float32)
    return torch.stack([1.0 - p, p], dim=1)
