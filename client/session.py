"""Everything a site does with its own data in one federated round.

A :class:`SiteSession` is built fresh for every message (Flower starts a new ClientApp process per
message in deployment): it validates the site folder, splits it deterministically into
train/validation, and trains or evaluates the received global model. What it returns is scalar
metrics only; case IDs and per-case outputs never leave this module.

With ``train.dp_sgd`` the supervised stage is DP-SGD (:mod:`client.dp_sgd`); the site's accountant
is kept in its state folder across the run's messages and its epsilon sent as ``dp_sgd_epsilon``.

With ``ssl.enabled`` a site also keeps local state between rounds in its state folder (see
:func:`site_state_path`): its pseudo-labels (:mod:`client.pseudo_labels`) and, with
``ssl.consistency``, its EMA teacher (:mod:`client.consistency`). That folder stays on the site.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from client.consistency import (
    TEACHER_FILE,
    ConsistencyRegularizer,
    load_teacher,
    save_teacher,
)
from client.disclosure import withhold_small_groups, withhold_small_pseudo_label_groups
from client.dp_sgd import SiteAccountant
from client.pseudo_labels import PseudoLabelHook, prepare_pseudo_labels
from client.state import (
    RoundTag,
    default_state_path,
    load_optimizer_state,
    node_flag,
    save_optimizer_state,
    site_location,
    site_state_path,
)
from client.training import LocalTrainer
from common.config import ExperimentConfig
from common.contract import SEQUENCES, TASKS, VALIDATED_ROUND, VALIDATION_PREFIX
from common.data.cache import ValidationCache, preprocessed_dir, site_cache_dir
from common.data.dataset import make_loader
from common.data.site import load_site, split_cases
from common.evaluation.loop import evaluate
from common.model.imputation import freeze_module
from common.runtime import configure_runtime, select_device


@dataclass
class SiteSession:
    """One site's data and what it does with a received model (see the module docstring).

    ``state_path``: the site's local state folder (:func:`site_state_path`); None means
    :func:`default_state_path` of ``name``.
    """

    name: str
    cfg: ExperimentConfig
    device: torch.device
    index: Any  # common.data.site.SiteIndex
    train_cases: list[Any]  # common.data.site.CaseRecord
    val_cases: list[Any]
    state_path: Path | None = None
    cache_hits: int = 0

    @classmethod
    def open(cls, node_config: Mapping[str, Any], cfg: ExperimentConfig) -> SiteSession:
        name, root = site_location(node_config)
        external = node_flag(node_config, "allow-external-links", False)
        state = site_state_path(node_config, name)
        cache = site_cache_dir(state, cfg.data.site_cache)
        validation = ValidationCache(cache, content_hash=cfg.data.cache_content_hash) if cache is not None else None
        index = load_site(root, allow_external_links=external, label_convention=node_config.get("label-convention") or None,
                          validation_cache=validation)
        train_cases, val_cases = split_cases(index.cases, cfg.data.val_fraction, cfg.data.split_seed)
        session = cls(name, cfg, select_device("auto"), index, train_cases, val_cases, state)
        session.cache_hits = validation.hits if validation is not None else 0
        return session

    @property
    def state_dir(self) -> Path:
        """The site's local state folder (see :func:`site_state_path`)."""
        return self.state_path if self.state_path is not None else default_state_path(self.name)

    @property
    def preprocessed(self) -> Path | None:
        """Where preprocessed cases are kept across messages (None: ``data.site_cache`` off)."""
        return preprocessed_dir(self.state_dir, self.cfg.data.site_cache)

    # ----------------------------------------------------------------- facts
    def description(self) -> dict[str, float]:
        """Counts the coordinator may see: cases, sequences and labels available (no IDs)."""
        facts: dict[str, float] = {
            "n_train": float(len(self.train_cases)),
            "n_val": float(len(self.val_cases)),
            "n_rejected": float(len(self.index.rejected)),
            # counts per rejection category ("rejected_shape_mismatch"): no case ID, file or path
            **{f"rejected_{category.replace(' ', '_').replace('-', '_')}": float(n)
               for category, n in self.index.rejection_counts().items()},
            "n_complete": float(sum(all(c.available) for c in self.train_cases)),
            "cache_hits": float(self.cache_hits),  # cases whose validation came from the site cache
        }
        for i, seq in enumerate(SEQUENCES):
            facts[f"has_{seq}"] = float(sum(c.available[i] for c in self.train_cases))
        for t, task in enumerate(TASKS):
            facts[f"labeled_{task}"] = float(sum(c.labels[t] >= 0 for c in self.train_cases))
            for c in (0, 1):  # class counts: the server sums them into federation-wide class weights
                facts[f"count_{task}_{c}"] = float(sum(case.labels[t] == c for case in self.train_cases))
        facts["has_seg"] = float(sum(c.seg is not None for c in self.train_cases))
        # the survival head is averaged by these (server.strategy.heads)
        facts["labeled_survival"] = float(sum(c.survival is not None for c in self.train_cases))
        return facts

    # ----------------------------------------------------------------- train
    def train(self, model: nn.Module, round_config: Mapping[str, Any], *, defer_validation: bool = False) -> dict[str, Any]:
        """Local training of ``model`` (in place) for the stage the server asked for.

        Round config keys: ``stage``, ``local-epochs``, ``lr``, ``proximal-mu``,
        ``freeze-imputer``, ``global-round``, ``pseudo-label`` and ``validate`` (first score the
        received model on the validation split; those metrics come back prefixed ``val/``, NaN
        where undefined, as an evaluate reply's would). In a supervised round with
        ``ssl.enabled``, pseudo-labels are re-selected first when ``pseudo-label`` is True (else
        the stored ones are reused) and merged into training; with ``ssl.consistency`` such a
        round also trains against the site's EMA teacher. The training metrics are finite scalars.
        ``defer_validation``: the caller validates the received model after the reply
        (``federation.site_validation=after_reply``, :func:`client.handlers.train_content`).
        """
        cfg = self.cfg
        configure_runtime(cfg, self.device)
        stage = str(round_config.get("stage", "supervised"))
        epochs = int(round_config.get("local-epochs", cfg.train.local_epochs))
        lr = float(round_config.get("lr", cfg.train.lr))
        if bool(round_config.get("freeze-imputer", False)) and hasattr(model, "imputer"):
            freeze_module(model.imputer)
        metrics = self.description()
        validated: dict[str, Any] = {}  # may hold NaN (e.g. an AUC of a one-class split), as evaluate replies do
        if bool(round_config.get("validate", False)) and not defer_validation:
            # the received global model on the validation split, before it is trained: the round's
            # one message also does what an evaluate message would (federation.site_validation)
            validated = prefixed_validation(self.validate_received(model, round_config))
        cases = self.stage_cases(stage)
        if not cases:
            # Nothing to train on in this stage here (imputer pre-training or complete-case-only
            # training at a site without complete cases): weights go back unchanged, weight 0.
            metrics.update({"num-examples": 0.0, "steps": 0.0})
            return {**_scalar_metrics(metrics), **validated}
        # Shuffling and augmentation differ per round yet repeat exactly for the same seed and round.
        seed = cfg.train.seed + int(round_config.get("global-round", 0))
        loader = make_loader(cases, cfg.data, train=True, seed=seed, cache_dir=self.preprocessed)
        trainer = LocalTrainer(model, cfg, self.device, loader.dataset.label_matrix(), federation_class_counts(round_config))
        if stage == "pretrain_imputer":
            result = trainer.run(loader, stage=stage, epochs=epochs, lr=lr, desc=self.name)
        else:
            semi = self._semi_supervision(model, cases, round_config) if cfg.ssl.enabled else _SemiSupervision()
            metrics.update(semi.metrics)
            regularizer = semi.regularizer
            keep = cfg.train.keep_optimizer_state
            tag = self._round_tag(round_config)
            # train.dp_sgd: this run's accountant from the state folder (a fresh one for a new run)
            privacy = SiteAccountant.for_round(self.state_dir, cfg.train, tag) if cfg.train.dp_sgd else None
            result = trainer.run(
                loader,
                stage=stage,
                epochs=epochs,
                lr=lr,
                proximal_mu=float(round_config.get("proximal-mu", 0.0)),
                batch_hook=semi.batch_hook,
                extra_loss=regularizer,
                after_step=regularizer.after_step if regularizer is not None else None,
                desc=self.name,
                optimizer_state=load_optimizer_state(self.state_dir, tag) if keep else None,
                privacy=privacy,
            )
            if privacy is not None:
                result.metrics.update(privacy.save(self.state_dir, tag))  # the run's next message continues it
            if keep and result.optimizer_state is not None:
                save_optimizer_state(result.optimizer_state, self.state_dir, tag)
            if regularizer is not None:
                save_teacher(regularizer.teacher, self.state_dir / TEACHER_FILE, self._round_tag(round_config))
        n_examples = len(cases)
        metrics.update(result.metrics)
        metrics["num-examples"] = float(n_examples)
        model.cpu()
        return {**_scalar_metrics(metrics), **validated}

    def validate_received(self, model: nn.Module, round_config: Mapping[str, Any]) -> dict[str, float]:
        """The received global model (of round ``global-round`` - 1) on the validation split, as the
        site validation of a training message reports it: tagged with that round, timed."""
        started = time.perf_counter()
        validation = self.evaluate(model, distances=self.cfg.federation.site_validation_distances)
        validation["seconds"] = time.perf_counter() - started
        validation[VALIDATED_ROUND] = float(int(round_config.get("global-round", 0)) - 1)
        return validation

    # ------------------------------------------------------- semi-supervision
    def _round_tag(self, round_config: Mapping[str, Any]) -> RoundTag:
        return RoundTag(self.cfg.federation.run_name, int(round_config.get("global-round", 0)))

    def stage_cases(self, stage: str) -> list[Any]:
        """The training cases a stage uses: complete cases for imputer pre-training (it learns
        to rebuild masked sequences) and with ``data.complete_only``; otherwise all of them."""
        if stage == "pretrain_imputer" or self.cfg.data.complete_only:
            return [c for c in self.train_cases if all(c.available)]
        return list(self.train_cases)

    def _semi_supervision(
        self, model: nn.Module, cases: list[Any], round_config: Mapping[str, Any]
    ) -> _SemiSupervision:
        """Pseudo-labels (refreshed with the received ``model`` when the round asks) and, in
        pseudo-labeling rounds with ``ssl.consistency``, the consistency regulariser."""
        ssl = self.cfg.ssl
        tag = self._round_tag(round_config)
        refresh = bool(round_config.get("pseudo-label", False))
        pseudo = prepare_pseudo_labels(
            self.state_dir, model, cases, self.cfg, self.device, refresh=refresh, tag=tag
        )
        semi = _SemiSupervision(PseudoLabelHook(pseudo.labels, ssl.pseudo_weight),
                                metrics=withhold_small_pseudo_label_groups(pseudo.metrics, self.cfg.federation.min_metric_cases))
        if ssl.consistency and refresh:
            teacher, restored = load_teacher(model, self.state_dir / TEACHER_FILE, ssl.ema_decay, tag)
            semi.regularizer = ConsistencyRegularizer(teacher, ssl, seed=self.cfg.train.seed + tag.global_round)
            semi.metrics["consistency_teacher_restored"] = float(restored)
        return semi

    # -------------------------------------------------------------- evaluate
    def evaluate(self, model: nn.Module, *, distances: bool = True) -> dict[str, float]:
        """Global model on this site's validation split (scalar metrics + num-examples);
        ``distances=False`` leaves HD95 and the lesion-wise scores out (NaN)."""
        loader = make_loader(self.val_cases, self.cfg.data, train=False, cache_dir=self.preprocessed)
        model.to(self.device)
        # the cal_* statistics let the server fit a temperature and threshold per task
        metrics = evaluate(model, loader, self.device, progress=False, calibration_stats=True, distances=distances)
        metrics["num-examples"] = float(len(self.val_cases))
        model.cpu()
        n_seg = sum(case.seg is not None for case in self.val_cases)
        return withhold_small_groups(metrics, n_seg, self.cfg.federation.min_metric_cases)


@dataclass
class _SemiSupervision:
    """What semi-supervised learning adds to one local round (nothing by default)."""

    batch_hook: PseudoLabelHook | None = None
    regularizer: ConsistencyRegularizer | None = None
    metrics: dict[str, float] = field(default_factory=dict)


def federation_class_counts(round_config: Mapping[str, Any]) -> np.ndarray | None:
    """(T, 2) federation-wide class counts from the round config (``class-count-<task>``), or None
    when the server has not sent them for every task (then the site's own counts are used)."""
    keys = [f"class-count-{task}" for task in TASKS]
    if not all(k in round_config for k in keys):
        return None
    return np.asarray([list(round_config[k]) for k in keys], dtype=np.float64).reshape(len(TASKS), 2)


def prefixed_validation(validation: Mapping[str, float]) -> dict[str, float]:
    """A site validation as a reply's metrics carry it (``val/`` keys, NaN where undefined)."""
    return {f"{VALIDATION_PREFIX}{k}": v for k, v in validation.items()}


def _scalar_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Plain finite floats (what a MetricRecord may carry); a non-finite value is a bug upstream."""
    out = {str(k): float(v) for k, v in metrics.items()}
    bad = sorted(k for k, v in out.items() if not math.isfinite(v))
    if bad:
        raise ValueError(f"site metrics {bad} are not finite; refusing to send them to the server")
    return out
