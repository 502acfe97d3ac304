"""Multi-task loss: Dice+CE segmentation, masked per-task classification, uncertainty weighting.

* Segmentation: MONAI ``DiceCELoss`` on the cases that have a segmentation (``has_seg``).
* Classification (per task, only samples with a label): class-weighted cross-entropy (MTTU-Net
  eq. 14/20), balanced softmax (Ren et al. 2020; GMENet) or focal loss (MMRAN), each sample
  scaled by its label weight (1 for real labels, a weight for pseudo-labels).
* Survival (when the model has a survival head, ``output.risk``): the negative Cox partial
  log-likelihood (Efron ties; torchsurv) over the cases of the batch with a known survival
  (``batch["survival"]`` (B, 2) = days, event; event ``UNKNOWN_LABEL`` unknown). A batch without
  an observed death among them has no risk set to compare and leaves the term out.
* Task weighting: Kendall et al. 2018 learned log-variances (MTTU-Net eq. 15, GMMAS eq. 7-9), held
  by the model (:class:`UncertaintyWeighting`) so that they are federated with the other weights.

A term with nothing to learn from in a batch (no seg, or no label for a task) is left out of the
total *including* its log-variance regulariser; otherwise ``s_i`` would be pushed down by the
regulariser alone and drift.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss, FocalLoss
from torch import nn
from torchsurv.loss.cox import neg_partial_log_likelihood

from common.config import CLS_LOSSES, TASK_WEIGHTINGS, choice_error
from common.contract import SEG_TERM, SURVIVAL_TERM, TASKS, UNKNOWN_LABEL
from common.model import GliomaOutput
from common.model.task_weighting import UncertaintyWeighting


def cls_term_name(task: str) -> str:
    """Key of a task's classification loss in :attr:`LossResult.terms` (``cls_idh``)."""
    return f"cls_{task}"


def class_counts_from_labels(labels: np.ndarray | torch.Tensor, num_classes: int = 2) -> np.ndarray:
    """(T, num_classes) counts of each class per task among the known labels of ``labels`` (N, T)."""
    array = labels.detach().cpu().numpy() if torch.is_tensor(labels) else np.asarray(labels)
    if array.ndim != 2:
        raise ValueError(f"labels must be (N, T) (cases x tasks), got shape {array.shape}")
    counts = np.zeros((array.shape[1], num_classes), dtype=np.float64)
    for t in range(array.shape[1]):
        column = array[:, t]
        column = column[column != UNKNOWN_LABEL].astype(np.int64)
        bad = sorted(set(column.tolist()) - set(range(num_classes)))
        if bad:
            raise ValueError(
                f"labels column {t} holds values {bad}; expected 0..{num_classes - 1} or "
                f"{UNKNOWN_LABEL} for unknown"
            )
        counts[t] = np.bincount(column, minlength=num_classes)
    return counts


def class_weights_from_counts(counts: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Inverse-frequency class weights (T, K) from class counts (T, K), add-one smoothed.

    ``w_c = (N + K) / (K (n_c + 1))``: scikit-learn's "balanced" weights ``N / (K n_c)`` on counts
    with one pseudo-case per class, so a class that these counts never saw still gets a finite,
    large weight instead of the whole task silently falling back to all ones. With no labels at
    all the weights are all 1 (nothing to rebalance). Pass federation-wide counts (the sum of the
    sites' label counts) so that every site weighs the classes alike.
    """
    table = torch.as_tensor(np.asarray(counts, dtype=np.float64)).float()
    if table.ndim != 2 or not bool(torch.isfinite(table).all()) or bool((table < 0).any()):
        raise ValueError(f"class counts must be a finite, non-negative (T, K) table, got {table.tolist()}")
    k = table.shape[1]
    smoothed = table + 1.0
    return smoothed.sum(1, keepdim=True) / (k * smoothed)


def class_weights_from_labels(labels: np.ndarray | torch.Tensor, num_classes: int = 2) -> torch.Tensor:
    """Inverse-frequency class weights per task from real labels (N, T), ``UNKNOWN_LABEL`` (-1)
    where unknown: :func:`class_weights_from_counts` of :func:`class_counts_from_labels`."""
    return class_weights_from_counts(class_counts_from_labels(labels, num_classes))


@dataclass
class LossResult:
    """``total``: the scalar to backpropagate. ``terms``: detached per-term losses (``seg``,
    ``cls_<task>``, and ``survival`` when the model has a survival head), 0 for terms that had no
    data in the batch (every key is always present)."""

    total: torch.Tensor
    terms: dict[str, torch.Tensor]
    #: the weighted contribution of each term present in the batch, still attached to the graph
    #: (``exp(-s_i) L_i`` under uncertainty weighting): what each task pushes into the shared weights
    weighted: dict[str, torch.Tensor] = field(default_factory=dict)


class MultiTaskLoss(nn.Module):
    """Segmentation + per-task classification losses combined by a :class:`UncertaintyWeighting`.

    Args:
        tasks: task names (a subset of ``common.contract.TASKS``); the label of task ``t`` is read
            from column ``TASKS.index(t)`` of ``batch["labels"]``.
        cls_loss: "weighted_ce", "balanced_softmax" or "focal".
        focal_gamma: focusing parameter of the focal loss.
        class_weights: (T, 2) per-task class weights in ``tasks`` order (weighted CE and focal);
            default all ones. Not used by balanced softmax, which corrects the imbalance itself.
        class_counts: (T, 2) per-task class counts of the training labels (balanced softmax).
        task_weighting: "uncertainty" (Kendall) or "equal".
        segmentation: False leaves the segmentation term out (classification-only training).
        dice_batch: the Dice term over all cases of the batch together (per case, then averaged,
            when False); the cross-entropy term is the same either way.
    """

    def __init__(
        self,
        tasks: Sequence[str] = TASKS,
        cls_loss: str = "weighted_ce",
        focal_gamma: float = 2.0,
        class_weights: torch.Tensor | None = None,
        class_counts: torch.Tensor | None = None,
        task_weighting: str = "uncertainty",
        segmentation: bool = True,
        dice_batch: bool = False,
    ) -> None:
        super().__init__()
        self.train_segmentation = segmentation

        self.tasks = tuple(tasks)
        for task in self.tasks:
            if task not in TASKS:
                raise choice_error("task", task, TASKS)
        if cls_loss not in CLS_LOSSES:
            raise choice_error("classification loss (train.cls_loss)", cls_loss, CLS_LOSSES)
        if task_weighting not in TASK_WEIGHTINGS:
            raise choice_error("task weighting (train.task_weighting)", task_weighting, TASK_WEIGHTINGS)
        self.columns = tuple(TASKS.index(t) for t in self.tasks)
        self.cls_loss = cls_loss
        self.task_weighting = task_weighting
        num_tasks = len(self.tasks)

        weights = torch.ones(num_tasks, 2) if class_weights is None else torch.as_tensor(class_weights).float()
        self._check_table("class_weights", weights, num_tasks)
        self.register_buffer("class_weights", weights.clone())
        if cls_loss == "balanced_softmax":
            if class_counts is None:
                raise ValueError(
                    "cls_loss='balanced_softmax' needs class_counts (T, 2) of the training labels "
                    "(see client.losses.class_counts_from_labels), or use cls_loss='weighted_ce'"
                )
            counts = torch.as_tensor(class_counts).float()
            self._check_table("class_counts", counts, num_tasks)
            # Balanced softmax adds log(prior) to the logits; +1 keeps a class that this site never
            # saw finite (a constant shift of all classes would not change the softmax).
            self.register_buffer("log_prior", torch.log((counts + 1.0) / (counts + 1.0).sum(1, keepdim=True)))
        else:
            self.register_buffer("log_prior", torch.zeros(num_tasks, 2))

        self.seg_loss = DiceCELoss(to_onehot_y=True, softmax=True, batch=dice_batch)
        # MONAI's FocalLoss (softmax form, one-hot target) rather than a hand-written copy;
        # reduction "none" keeps the per-sample values that label weights and class weights need.
        self.focal = FocalLoss(to_onehot_y=True, use_softmax=True, gamma=focal_gamma, reduction="none")

    @staticmethod
    def _check_table(name: str, table: torch.Tensor, num_tasks: int) -> None:
        if tuple(table.shape) != (num_tasks, 2):
            raise ValueError(f"{name} must have shape ({num_tasks}, 2) (tasks x classes), got {tuple(table.shape)}")
        if not bool(torch.isfinite(table).all()) or bool((table < 0).any()):
            raise ValueError(f"{name} must be finite and non-negative, got {table.tolist()}")

    # ----------------------------------------------------------------- terms
    def segmentation(self, seg_logits: torch.Tensor, seg: torch.Tensor, has_seg: torch.Tensor) -> torch.Tensor | None:
        """Dice+CE over the cases with a segmentation; None when the batch has none.

        Args:
            seg_logits: (B, K, D, H, W) logits. seg: (B, 1, D, H, W) int labels 0..K-1.
            has_seg: (B,) bool.
        """
        has_seg = has_seg.bool()
        if not bool(has_seg.any()):
            return None
        return self.seg_loss(seg_logits[has_seg].float(), seg[has_seg])

    def per_sample_cls(self, task_index: int, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Unreduced classification loss (n,) of task ``task_index`` for logits (n, 2), target (n,)."""
        logits = logits.float()
        if self.cls_loss == "balanced_softmax":
            return F.cross_entropy(logits + self.log_prior[task_index], target, reduction="none")
        class_weight = self.class_weights[task_index][target]
        if self.cls_loss == "focal":
            return self.focal(logits, target.unsqueeze(1)).sum(dim=1) * class_weight
        return F.cross_entropy(logits, target, reduction="none") * class_weight

    def classification(
        self, task_index: int, logits: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor
    ) -> torch.Tensor | None:
        """Mean loss of one task over the samples that carry a label; None when none does.

        Args:
            logits: (B, 2). labels: (B,) int, ``UNKNOWN_LABEL`` where unknown.
            weight: (B,) per-sample label weight (0 = ignore).

        The weighted sum is divided by the number of labelled samples (MTTU-Net eq. 20's 1/m),
        not by the sum of weights, so that down-weighted pseudo-labels really count less.
        """
        keep = (labels != UNKNOWN_LABEL) & (weight > 0)
        if not bool(keep.any()):
            return None
        losses = self.per_sample_cls(task_index, logits[keep], labels[keep])
        return (weight[keep].float() * losses).sum() / keep.sum()

    @staticmethod
    def survival(risk: torch.Tensor, survival: torch.Tensor) -> torch.Tensor | None:
        """Negative Cox partial log-likelihood (mean per death, Efron ties) of the log hazard
        ratios ``risk`` (B,) over the cases with a known ``survival`` (B, 2) = (days, event); None
        unless at least two such cases and one observed death (nothing to rank)."""
        event = survival[:, 1]
        keep = event != UNKNOWN_LABEL
        if int(keep.sum()) < 2 or not bool((event[keep] == 1).any()):
            return None
        return neg_partial_log_likelihood(risk[keep].float(), event[keep] == 1, survival[keep, 0].float())

    # --------------------------------------------------------------- forward
    def forward(
        self, output: "GliomaOutput", batch: Mapping[str, torch.Tensor], weighting: UncertaintyWeighting
    ) -> LossResult:
        """Loss of one batch (see the module docstring for the batch keys used)."""
        present: dict[str, torch.Tensor] = {}
        seg = self.segmentation(output.seg_logits, batch["seg"], batch["has_seg"]) if self.train_segmentation else None
        if seg is not None:
            present[SEG_TERM] = seg
        labels = batch["labels"].long()
        label_weight = batch.get("label_weight")
        for j, (task, column) in enumerate(zip(self.tasks, self.columns)):
            task_labels = labels[:, column]
            if label_weight is None:
                weight = (task_labels != UNKNOWN_LABEL).float()
            else:
                weight = label_weight[:, column].float()
            loss = self.classification(j, output.cls_logits[task], task_labels, weight)
            if loss is not None:
                present[task] = loss
        survival = batch.get("survival")
        cox = self.survival(output.risk, survival) if output.risk is not None and survival is not None else None
        if cox is not None:
            present[SURVIVAL_TERM] = cox

        weighted: dict[str, torch.Tensor] = {}
        if present:
            weighted = weighting.weighted_terms(present, mode=self.task_weighting)
            total = weighting.total(weighted, mode=self.task_weighting)
        else:
            # Nothing to learn from: a zero that is still attached to the graph, so that
            # backward() works and leaves all gradients at zero.
            outputs = [output.seg_logits, *output.cls_logits.values(), *([output.risk] if output.risk is not None else [])]
            total = torch.stack([o.float().sum() for o in outputs]).sum() * 0.0

        zero = total.new_zeros(()).detach()
        terms = {SEG_TERM: present[SEG_TERM].detach() if SEG_TERM in present else zero}
        for task in self.tasks:
            terms[cls_term_name(task)] = present[task].detach() if task in present else zero
        if output.risk is not None:
            terms[SURVIVAL_TERM] = present[SURVIVAL_TERM].detach() if SURVIVAL_TERM in present else zero
        return LossResult(total=total, terms=terms, weighted=weighted)
