"""Local pseudo-labels for the molecular tasks (MTTU-Net; GMMAS stage 1), kept at the site.

For every training case and task *without* a real label, T MC-dropout passes of the received
global model (:func:`common.evaluation.uncertainty.mc_dropout_predict`) give the mean and standard deviation of
the class probabilities. Per task, the means are distribution-aligned to the site's real-label
class balance (:func:`align_distribution`), and a prediction becomes a pseudo-label when its
aligned confidence is at least ``ssl.tau_c`` and the MC standard deviation of that class's
probability is at most ``ssl.tau_u`` (:func:`select`). Real labels are never predicted over and
never overwritten.

The pseudo-labels live in ``<state path>/pseudo_labels.json`` keyed by case ID (written
atomically, read back each round, re-selected only in rounds whose config says
``pseudo-label=True``). Case IDs and per-case labels never leave the site: the round reply carries
only the scalar counts and mean confidences of :attr:`PseudoLabels.metrics`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from client.state import RoundTag
from common.config import ConfigError, ExperimentConfig, SSLConfig
from common.contract import TASKS, UNKNOWN_LABEL
from common.data.cache import preprocessed_dir
from common.data.dataset import make_loader
from common.data.site import CaseRecord, label_matrix
from common.data.transforms import INDEX, LABELS
from common.evaluation.uncertainty import mc_dropout_predict
from common.io import atomic_write
from common.runtime import Batch

PSEUDO_LABELS_FILE = "pseudo_labels.json"
STORE_FORMAT = "fedglioma-pseudo-labels/1"
NUM_CLASSES = 2


class PseudoLabelStoreError(ValueError):
    """The pseudo-label file of a site cannot be used; the message names it and the fix."""


def check_pseudo_label_config(ssl: SSLConfig) -> None:
    """Reject pseudo-labeling settings that are of the right type but make no sense."""
    if not 0.0 <= ssl.tau_c <= 1.0:
        raise ConfigError(f"ssl.tau_c={ssl.tau_c} is a probability threshold: choose it in [0, 1] (GMMAS: 0.95)")
    if ssl.tau_u < 0.0:
        raise ConfigError(f"ssl.tau_u={ssl.tau_u} is a standard-deviation threshold: it must be >= 0 (GMMAS: 0.1)")
    if ssl.mc_passes < 2:
        raise ConfigError(f"ssl.mc_passes={ssl.mc_passes}: MC-dropout needs at least 2 passes to measure a spread")
    if ssl.pseudo_weight < 0.0:
        raise ConfigError(f"ssl.pseudo_weight={ssl.pseudo_weight} must be >= 0")


# --------------------------------------------------------------------------- alignment, selection
def _smoothed_distribution(counts: torch.Tensor, smoothing: float) -> torch.Tensor:
    counts = counts.double().clamp_min(0.0) + smoothing
    return counts / counts.sum()


def align_distribution(
    probs: torch.Tensor,
    labeled_prior: torch.Tensor,
    predicted_prior: torch.Tensor | None = None,
    smoothing: float = 1.0,
) -> torch.Tensor:
    """Distribution alignment (ReMixMatch, Berthelot et al. 2020; GMMAS stage 1).

    ``p~ = normalize(p * prior_labeled / prior_predicted)``: predictions on unlabeled cases are
    scaled by how much more (or less) often each class occurs among the real labels than the model
    predicts it, then each row is renormalised to sum to 1.

    Args:
        probs: (N, C) class probabilities (e.g. MC-dropout means).
        labeled_prior: (C,) class counts of the real labels (frequencies work too, with a
            small ``smoothing``).
        predicted_prior: (C,) the model's predicted class mass, default ``probs.sum(0)`` (soft
            counts over these N cases).
        smoothing: added to every entry of both priors before normalising (Laplace). Why: a class
            absent among a site's few real labels would get ratio 0, so no case could ever be
            pseudo-labeled with it; a class with ~0 predicted mass would divide by ~0; and with few
            candidates (N = 1 gives ``predicted = p``) unsmoothed alignment would replace every
            prediction by the labeled prior itself.

    Returns:
        (N, C) aligned probabilities, rows summing to 1, dtype of ``probs``.
    """
    if probs.ndim != 2:
        raise ValueError(f"align_distribution: probs must be (N, C), got shape {tuple(probs.shape)}")
    if smoothing <= 0.0:
        raise ValueError(f"align_distribution: smoothing must be > 0 (guards zero counts), got {smoothing}")
    classes = probs.shape[1]
    predicted_prior = probs.sum(0) if predicted_prior is None else predicted_prior
    for name, prior in (("labeled_prior", labeled_prior), ("predicted_prior", predicted_prior)):
        if tuple(prior.shape) != (classes,):
            raise ValueError(f"align_distribution: {name} must be ({classes},), got shape {tuple(prior.shape)}")
    if probs.shape[0] == 0:
        return probs.clone()
    ratio = _smoothed_distribution(labeled_prior, smoothing) / _smoothed_distribution(predicted_prior, smoothing)
    aligned = probs.double() * ratio.to(probs.device)
    return (aligned / aligned.sum(1, keepdim=True)).to(probs.dtype)


def select(
    mean: torch.Tensor, std: torch.Tensor, tau_c: float, tau_u: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dual-threshold pseudo-label selection (GMMAS stage 1; MTTU-Net).

    Args:
        mean: (N, C) (aligned) mean class probabilities.
        std: (N, C) MC-dropout standard deviation of each class probability.
        tau_c: accept only when the top probability is >= tau_c ...
        tau_u: ... and the standard deviation of that class's probability is <= tau_u.

    Returns:
        ``(labels, confidence)``: labels (N,) int64, the top class or ``UNKNOWN_LABEL`` (-1) when
        rejected; confidence (N,) float, the top probability of every row.
    """
    if mean.shape != std.shape or mean.ndim != 2:
        raise ValueError(f"select: mean and std must both be (N, C), got {tuple(mean.shape)} and {tuple(std.shape)}")
    confidence, top = mean.max(dim=1)
    spread = std.gather(1, top[:, None]).squeeze(1)
    accept = (confidence >= tau_c) & (spread <= tau_u)
    labels = torch.where(accept, top, torch.full_like(top, UNKNOWN_LABEL)).long()
    return labels, confidence


# --------------------------------------------------------------------------- prediction
@dataclass
class PseudoLabels:
    """Pseudo-labels of a site's training cases for one round.

    Attributes:
        labels: (N, T) int64 in the order of the training cases and of TASKS; a class where a
            pseudo-label is used, ``UNKNOWN_LABEL`` elsewhere (always where a real label exists).
        metrics: scalar metrics (``pseudo_*``), the only part that may leave the site.
    """

    labels: np.ndarray
    metrics: dict[str, float]

    @property
    def count(self) -> int:
        """Number of (case, task) pseudo-labels."""
        return int((self.labels != UNKNOWN_LABEL).sum())


def class_counts(column: np.ndarray) -> np.ndarray:
    """Per class, how many real labels one task's ``column`` of :func:`label_matrix` holds."""
    return np.bincount(column[column != UNKNOWN_LABEL], minlength=NUM_CLASSES)


def majority_class(counts: np.ndarray) -> int | None:
    """The most frequent class of :func:`class_counts` (ties to the lower class); None without labels."""
    return int(counts.argmax()) if counts.sum() else None


def mc_predict_cases(
    model: nn.Module, cases: Sequence[CaseRecord], cfg: ExperimentConfig, device: torch.device,
    cache_dir: Path | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MC-dropout mean and std of every task's class probabilities for ``cases``.

    Returns:
        ``(mean, std)``, each (len(cases), T, 2) float32 on the CPU, tasks in TASKS order.
    """
    mean = torch.zeros(len(cases), len(TASKS), NUM_CLASSES)
    std = torch.zeros_like(mean)
    if not cases:
        return mean, std
    # No augmentation (train=False): pseudo-labels are predicted on the cases as they are.
    loader = make_loader(cases, cfg.data, train=False, seed=cfg.train.seed, cache_dir=cache_dir)
    model.to(device)
    # The dropout masks come from a generator forked off and seeded here, so selecting
    # pseudo-labels neither depends on nor shifts the random stream local training uses next.
    with torch.random.fork_rng(devices=None if device.type == "cuda" else []):
        torch.manual_seed(cfg.train.seed)
        for batch in loader:
            rows = batch[INDEX].long()
            m, s = mc_dropout_predict(
                model, batch["image"].to(device), batch["available"].to(device), passes=cfg.ssl.mc_passes,
                spacing=batch["spacing"].to(device),
            )
            for t, task in enumerate(TASKS):
                mean[rows, t] = m[task].float().cpu()
                std[rows, t] = s[task].float().cpu()
    return mean, std


def predict_pseudo_labels(
    model: nn.Module, cases: Sequence[CaseRecord], cfg: ExperimentConfig, device: torch.device,
    cache_dir: Path | None = None,
) -> PseudoLabels:
    """Select pseudo-labels for the site's training ``cases`` with the current (global) model.

    Only cases lacking at least one task's label go through the model, and for each task only the
    cases lacking *that* label are candidates. Per task, with ``ssl.distribution_alignment``, the
    candidates' mean probabilities are aligned to the class counts of the site's real labels of
    that task (skipped when the site has none: there is no class balance to align to).

    Returns:
        :class:`PseudoLabels` with metrics ``pseudo_<task>_candidates``,
        ``pseudo_<task>_accepted``, ``pseudo_<task>_confidence`` (mean aligned confidence of the
        accepted ones, 0.0 when none), ``pseudo_<task>_candidate_confidence`` (mean aligned top-class
        confidence over all candidates, 0.0 when none: how far the model is from ``tau_c``),
        ``pseudo_<task>_majority_share`` (fraction of the accepted ones equal to the site's most
        frequent real class of the task, ties to the lower class; 0.0 when none was accepted or the
        site has no real label of the task), ``pseudo_accepted`` (total) and ``pseudo_seconds``.
    """
    ssl = cfg.ssl
    check_pseudo_label_config(ssl)
    start = time.perf_counter()
    real = label_matrix(cases)
    rows = np.flatnonzero((real == UNKNOWN_LABEL).any(axis=1))
    mean, std = mc_predict_cases(model, [cases[i] for i in rows], cfg, device, cache_dir)

    labels = np.full_like(real, UNKNOWN_LABEL)
    metrics: dict[str, float] = {}
    for t, task in enumerate(TASKS):
        candidates = real[rows, t] == UNKNOWN_LABEL  # mask over `rows`
        mask = torch.from_numpy(candidates)
        probs, spread = mean[mask, t], std[mask, t]
        counts = class_counts(real[:, t])
        majority = majority_class(counts)
        if ssl.distribution_alignment and majority is not None:
            probs = align_distribution(probs, torch.as_tensor(counts, dtype=torch.float64))
        chosen, confidence = select(probs, spread, ssl.tau_c, ssl.tau_u)
        labels[rows[candidates], t] = chosen.numpy()
        accepted = chosen != UNKNOWN_LABEL
        metrics[f"pseudo_{task}_candidates"] = float(candidates.sum())
        metrics[f"pseudo_{task}_accepted"] = float(accepted.sum())
        metrics[f"pseudo_{task}_confidence"] = float(confidence[accepted].mean()) if bool(accepted.any()) else 0.0
        metrics[f"pseudo_{task}_candidate_confidence"] = float(confidence.mean()) if confidence.numel() else 0.0
        # 1.0 = every accepted label repeats the site's majority real class: the model is outputting
        # the class prior, and such pseudo-labels add nothing a case-level label would
        metrics[f"pseudo_{task}_majority_share"] = (
            float((chosen[accepted] == majority).float().mean()) if majority is not None and bool(accepted.any()) else 0.0
        )
    metrics["pseudo_accepted"] = float((labels != UNKNOWN_LABEL).sum())
    metrics["pseudo_seconds"] = time.perf_counter() - start
    return PseudoLabels(labels=labels, metrics=metrics)


# --------------------------------------------------------------------------- the on-disk store
def store_path(state_path: Path | str) -> Path:
    """``<state path>/pseudo_labels.json``."""
    return Path(state_path) / PSEUDO_LABELS_FILE


def save_pseudo_labels(
    state_path: Path | str, cases: Sequence[CaseRecord], labels: np.ndarray, tag: RoundTag,
    *, selected_after_reply: Mapping[str, float] | None = None,
) -> Path:
    """Write the cases' pseudo-labels (N, T) to the site's store atomically; only cases with at
    least one pseudo-label are listed. Returns the file written. ``selected_after_reply``: the
    selection's metrics, when the site's worker selected them after round ``tag``'s reply for
    the next round (``ssl.select_after_reply``), which then reports them."""

    if labels.shape != (len(cases), len(TASKS)):
        raise ValueError(f"save_pseudo_labels: labels must be ({len(cases)}, {len(TASKS)}), got {labels.shape}")
    entries = {
        case.case_id: [int(v) for v in row]
        for case, row in zip(cases, labels)
        if (row != UNKNOWN_LABEL).any()
    }
    payload: dict[str, Any] = {"format": STORE_FORMAT, **tag.as_dict(), "tasks": list(TASKS), "labels": entries}
    if selected_after_reply is not None:
        payload["selected_after_reply"] = {str(k): float(v) for k, v in selected_after_reply.items()}
    path = store_path(state_path)
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(payload, indent=1, sort_keys=True)))
    return path


def read_pseudo_labels(state_path: Path | str) -> tuple[RoundTag, dict[str, list[int]]] | None:
    """(the round that wrote it, {case_id: [label per TASKS]}) from the site's store; None when
    there is no store yet.

    Raises:
        PseudoLabelStoreError: the file is not a valid store (names it and the fix).
    """
    path = store_path(state_path)
    if not path.exists():
        return None
    fix = "delete it; the next pseudo-labeling round writes a new one"
    try:
        payload = json.loads(path.read_text())
        tag = RoundTag.from_dict(payload)
        stored_format, tasks, entries = payload["format"], payload["tasks"], payload["labels"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise PseudoLabelStoreError(f"cannot read the pseudo-label store {path}: {exc}; {fix}") from exc
    if stored_format != STORE_FORMAT or tasks != list(TASKS) or not isinstance(entries, dict):
        raise PseudoLabelStoreError(
            f"{path} is not a {STORE_FORMAT} store for tasks {list(TASKS)} (found format "
            f"{stored_format!r}, tasks {tasks!r}); {fix}"
        )
    allowed = {UNKNOWN_LABEL, *range(NUM_CLASSES)}
    for case_id, row in entries.items():
        if not (isinstance(row, list) and len(row) == len(TASKS) and all(isinstance(v, int) and v in allowed for v in row)):
            raise PseudoLabelStoreError(
                f"{path}: case {case_id!r} has labels {row!r}; expected {len(TASKS)} values in "
                f"{sorted(allowed)}; {fix}"
            )
    return tag, entries


def load_pseudo_labels(state_path: Path | str) -> dict[str, list[int]]:
    """{case_id: [label per TASKS, UNKNOWN_LABEL where none]} stored at a site ({} when none).

    For local inspection and benchmarks (e.g. pseudo-label precision against a synthetic cohort's
    ground truth); the federated system itself never reads ground truth.
    """
    stored = read_pseudo_labels(state_path)
    return {} if stored is None else stored[1]


def pseudo_label_matrix(stored: Mapping[str, Sequence[int]], cases: Sequence[CaseRecord]) -> tuple[np.ndarray, int]:
    """Stored pseudo-labels as an (N, T) matrix over ``cases``.

    A stored label whose case now has a real label for that task is dropped (the real label
    wins); cases no longer in the training split are ignored.

    Returns:
        ``(labels (N, T) int64, number of stored labels dropped for a real one)``.
    """
    real = label_matrix(cases)
    labels = np.full_like(real, UNKNOWN_LABEL)
    for i, case in enumerate(cases):
        if case.case_id in stored:
            labels[i] = np.asarray(stored[case.case_id], dtype=np.int64)
    superseded = (labels != UNKNOWN_LABEL) & (real != UNKNOWN_LABEL)
    labels[superseded] = UNKNOWN_LABEL
    return labels, int(superseded.sum())


def prepare_pseudo_labels(
    state_path: Path | str,
    model: nn.Module,
    cases: Sequence[CaseRecord],
    cfg: ExperimentConfig,
    device: torch.device,
    *,
    refresh: bool,
    tag: RoundTag,
) -> PseudoLabels:
    """The pseudo-labels a round trains with.

    ``refresh`` (the round config's ``pseudo-label``): select anew with ``model`` and replace the
    store. Otherwise reuse the store when an earlier round of this run wrote it (labels that have
    meanwhile become real are dropped, and the store is rewritten without them); with no usable
    store there are none.

    A refresh uses the labels the site's worker selected after the previous round's reply
    (:func:`selected_after_reply`) when there are such; it selects itself otherwise.

    Metrics: always ``pseudo_used`` (pseudo-labels merged into training); on refresh also those
    of :func:`predict_pseudo_labels` (``pseudo_after_reply`` 1 when the worker selected them).
    """
    early = selected_after_reply(state_path, cases, tag) if refresh else None
    if early is not None:
        result = early
    elif refresh:
        result = predict_pseudo_labels(model, cases, cfg, device,
                                       cache_dir=preprocessed_dir(Path(state_path), cfg.data.site_cache))
        save_pseudo_labels(state_path, cases, result.labels, tag)
    else:
        stored = read_pseudo_labels(state_path)
        labels = np.full((len(cases), len(TASKS)), UNKNOWN_LABEL, dtype=np.int64)
        if stored is not None and stored[0].precedes(tag):
            labels, dropped = pseudo_label_matrix(stored[1], cases)
            if dropped:
                save_pseudo_labels(state_path, cases, labels, stored[0])
        result = PseudoLabels(labels=labels, metrics={})
    result.metrics["pseudo_used"] = float(result.count)
    return result


def selected_after_reply(state_path: Path | str, cases: Sequence[CaseRecord], tag: RoundTag) -> PseudoLabels | None:
    """The pseudo-labels the site's worker selected for round ``tag`` after the previous round's
    reply (the store written by that round with ``selected_after_reply``), with that selection's
    metrics; None when the store holds none for this round (then the round selects itself)."""
    stored = read_pseudo_labels(state_path)  # a damaged store is an error naming it
    if stored is None or stored[0] != RoundTag(tag.run_name, tag.global_round - 1):
        return None
    metrics = json.loads(store_path(state_path).read_text()).get("selected_after_reply")
    if not isinstance(metrics, dict):
        return None
    labels, _ = pseudo_label_matrix(stored[1], cases)  # labels that became real meanwhile are dropped
    return PseudoLabels(labels=labels, metrics={**{str(k): float(v) for k, v in metrics.items()}, "pseudo_after_reply": 1.0})


# --------------------------------------------------------------------------- training hook
class PseudoLabelHook:
    """``batch_hook`` for :meth:`client.training.LocalTrainer.run`: merges pseudo-labels.

    Writes ``labels`` (B, T): the real label where there is one, else the pseudo-label (else
    ``UNKNOWN_LABEL``); and ``label_weight`` (B, T) float: 1 for real labels, ``pseudo_weight``
    for pseudo-labels, 0 for unknown (``client.losses.MultiTaskLoss`` masks by it).

    Args:
        pseudo: (N, T) pseudo-labels in the order of the loader's dataset (``batch["index"]``).
        pseudo_weight: loss weight of a pseudo-label (``ssl.pseudo_weight``).
    """

    def __init__(self, pseudo: np.ndarray, pseudo_weight: float) -> None:
        if pseudo.ndim != 2 or pseudo.shape[1] != len(TASKS):
            raise ValueError(f"PseudoLabelHook: pseudo must be (N, {len(TASKS)}), got {pseudo.shape}")
        self.table = torch.as_tensor(pseudo, dtype=torch.long)
        self.pseudo_weight = float(pseudo_weight)

    def __call__(self, batch: Batch) -> Batch:
        if INDEX not in batch:
            raise KeyError(f"PseudoLabelHook needs batch[{INDEX!r}] (common.data.dataset batches carry it)")
        real = batch[LABELS].long()
        pseudo = self.table[batch[INDEX].long().cpu()].to(real.device)
        is_real = real != UNKNOWN_LABEL
        is_pseudo = ~is_real & (pseudo != UNKNOWN_LABEL)
        weight = is_real.float() + self.pseudo_weight * is_pseudo.float()
        return {**batch, LABELS: torch.where(is_real, real, pseudo), "label_weight": weight}
