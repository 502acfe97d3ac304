"""The local training engine shared by site training (ClientApp) and the baselines.

One :class:`LocalTrainer` runs epochs of one *stage* over a site's training loader:

* ``supervised``   - segmentation + molecular tasks (Dice+CE, masked per-task CE, uncertainty
  task weighting); optional FedProx proximal term towards the received global weights;
* ``pretrain_imputer`` - self-supervised pre-training of the imputation module on complete
  cases (GMENet); the rest of the network is untouched.

Semi-supervised learning plugs into the supervised stage through three optional callables:

* ``batch_hook(batch) -> batch`` may add ``labels``/``label_weight`` entries (pseudo-labels,
  :mod:`client.pseudo_labels`) before the loss is computed;
* ``extra_loss(model, batch, output) -> (loss, {name: value})`` adds a scalar to the loss of every
  step (consistency regularisation, :mod:`client.consistency`); its terms are reported as
  ``loss_<name>`` metrics;
* ``after_step(model)`` runs after every optimizer step (the EMA teacher update).

With a :class:`client.dp_sgd.SiteAccountant` (``train.dp_sgd``) the supervised stage runs DP-SGD:
Poisson batches, the whole loss's gradient of each case clipped and noised by Opacus, every step
counted by the accountant; the stage then reports no loss values (they are statistics of the
training cases that the noise does not cover), only steps and time.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Sized

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from client.dp_sgd import SiteAccountant, case_copies, per_sample_gradients
from client.losses import MultiTaskLoss, class_counts_from_labels, class_weights_from_counts
from common.config import ExperimentConfig
from common.contract import SEG_TERM, TASKS
from common.model import GliomaOutput
from common.model.imputation import imputation_pretrain_loss
from common.runtime import Batch, move_batch

STAGES: tuple[str, ...] = ("supervised", "pretrain_imputer")

BatchHook = Callable[[Batch], Batch]
#: ``(model, batch, output) -> (scalar loss, {term name: detached scalar})``; ``output`` is the
#: model's output on ``batch`` from the supervised forward pass of the same step.
ExtraLoss = Callable[[nn.Module, Batch, "GliomaOutput"], tuple[torch.Tensor, Mapping[str, torch.Tensor | float]]]
#: ``(model) -> None``, called after every optimizer step.
StepHook = Callable[[nn.Module], None]


#: Parameter-name prefix of the molecular classifier (its own learning rate, ``train.head_lr_scale``).
CLASSIFIER_PREFIX = "classifier."


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/inf loss; the message says where and what to try."""


def build_optimizer(model: nn.Module, cfg: ExperimentConfig, lr: float) -> torch.optim.Optimizer:
    """AdamW (or SGD) over the trainable parameters; the molecular classifier's (``classifier.*``:
    trunk, heads, descriptor paths, survival head) at ``lr * train.head_lr_scale``."""
    head, body = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (head if name.startswith(CLASSIFIER_PREFIX) else body).append(p)
    groups = [{"params": body}]
    if head:
        groups.append({"params": head, "lr": lr * cfg.train.head_lr_scale})
    if cfg.train.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9, weight_decay=cfg.train.weight_decay)
    return torch.optim.AdamW(groups, lr=lr, weight_decay=cfg.train.weight_decay)


def encoder_gradient_shares(model: nn.Module, weighted: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Each loss term's share of the gradient norm that reaches the shared encoder.

    ``weighted``: ``{term: weighted scalar loss}`` attached to the graph (``LossResult.weighted``).
    Returns ``{"grad_share_<term>": ||d term / d encoder||_2 / sum over terms}`` (terms absent from
    the batch are 0). One extra backward pass per term: measured on one batch per local round
    (the first epoch's last).
    """
    params = [p for p in model.encoder.parameters() if p.requires_grad]
    norms: dict[str, float] = {}
    for name, loss in weighted.items():
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        norms[name] = float(torch.sqrt(sum((g.float() ** 2).sum() for g in grads if g is not None) or torch.zeros(())))
    total = sum(norms.values())
    return {f"grad_share_{name}": (norms.get(name, 0.0) / total if total > 0 else 0.0) for name in (SEG_TERM, *TASKS)}


@dataclass
class StageResult:
    """Scalar summary of one local stage (safe to send to the server)."""

    metrics: dict[str, float]
    #: the optimizer's state after the stage (kept by the site with train.keep_optimizer_state)
    optimizer_state: dict | None = None

    def __getitem__(self, key: str) -> float:
        return self.metrics[key]


class LocalTrainer:
    """Runs local epochs of one stage for a :class:`common.model.MultiTaskGliomaNet`.

    Args:
        model: the network (moved to ``device`` here).
        cfg: the experiment config (train section used).
        device: where to train.
        labels: (N, T) real labels of the training cases (class weights, balanced softmax).
        class_counts: (T, 2) class counts to weigh the classes by instead of ``labels``' own, e.g.
            the federation-wide sum of the sites' label counts (every site then weighs alike).
    """

    def __init__(
        self,
        model: nn.Module,
        cfg: ExperimentConfig,
        device: torch.device,
        labels: np.ndarray,
        class_counts: np.ndarray | None = None,
    ) -> None:
        self.model = model.to(device)
        self.cfg = cfg
        self.device = device
        counts = class_counts_from_labels(labels) if class_counts is None else np.asarray(class_counts, dtype=np.float64)
        self.class_counts = counts
        self.loss_fn = MultiTaskLoss(
            tasks=TASKS,
            cls_loss=cfg.train.cls_loss,
            focal_gamma=cfg.train.focal_gamma,
            class_weights=class_weights_from_counts(counts),
            class_counts=torch.as_tensor(counts).float(),
            task_weighting=cfg.train.task_weighting,
            segmentation=cfg.train.segmentation,
            dice_batch=cfg.train.seg_dice_batch,
        ).to(device)
        # DP-SGD's per-case gradients go to Opacus unscaled: no float16 autocast and GradScaler there
        self.use_amp = cfg.train.amp and device.type == "cuda" and not cfg.train.dp_sgd

    # ------------------------------------------------------------------ stages
    def run(
        self,
        loader: Iterable[Batch],
        *,
        stage: str = "supervised",
        epochs: int = 1,
        lr: float | None = None,
        proximal_mu: float = 0.0,
        batch_hook: BatchHook | None = None,
        extra_loss: ExtraLoss | None = None,
        after_step: StepHook | None = None,
        desc: str = "train",
        optimizer_state: dict | None = None,
        privacy: SiteAccountant | None = None,
    ) -> StageResult:
        """Train ``epochs`` epochs of ``stage``; returns scalar metrics (mean losses, steps, time).

        ``privacy``: run the supervised stage as DP-SGD, counted by this accountant (see the module
        docstring); the imputer's pre-training has no private form and refuses it.

        ``optimizer_state``: a supervised stage's optimizer state from an earlier round to continue
        from (:attr:`StageResult.optimizer_state`); one that does not fit the parameters is not used
        (metric ``optimizer_state_restored`` says which happened).

        ``batch_hook``, ``extra_loss`` and ``after_step`` (see the module docstring) apply to the
        supervised stage only.
        """
        if stage not in STAGES:
            raise ValueError(f"unknown training stage {stage!r}; expected one of {STAGES}")
        lr = self.cfg.train.lr if lr is None else lr
        if stage == "pretrain_imputer":
            hooks = {"batch_hook": batch_hook, "extra_loss": extra_loss, "after_step": after_step}
            given = [name for name, hook in hooks.items() if hook is not None]
            if given:
                raise ValueError(f"stage 'pretrain_imputer' does not use {given}: pass them with stage='supervised' only")
            if privacy is not None:
                raise ValueError("stage 'pretrain_imputer' has no DP-SGD form: set imputation.pretrain_rounds=0 with train.dp_sgd")
            return self._run_pretrain(loader, epochs=epochs, lr=lr, desc=desc)
        return self._run_supervised(
            loader,
            epochs=epochs,
            lr=lr,
            proximal_mu=proximal_mu,
            batch_hook=batch_hook,
            extra_loss=extra_loss,
            after_step=after_step,
            desc=desc,
            optimizer_state=optimizer_state,
            privacy=privacy,
        )

    def _progress(self, loader: Iterable[Batch], desc: str) -> Iterable[Batch]:
        if not self.cfg.train.progress:
            return loader

        return tqdm(loader, desc=desc, leave=False, dynamic_ncols=True)

    @staticmethod
    def _check_finite(loss: torch.Tensor, where: str) -> torch.Tensor:
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"non-finite training loss ({loss.item()}) {where}. Lower train.lr, enable "
                "train.grad_clip, or run `fedglioma check-site` on the data (NaN/constant volumes)."
            )
        return loss

    def _step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, where: str) -> None:
        self._check_finite(loss, where)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if self.cfg.train.grad_clip > 0:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(
                [p for p in self.model.parameters() if p.requires_grad], self.cfg.train.grad_clip
            )
        scaler.step(optimizer)
        scaler.update()

    def _supervised_loss(
        self,
        batch: Batch,
        extra_loss: ExtraLoss | None,
        anchor: list[torch.Tensor] | None,
        proximal_mu: float,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor | float], GliomaOutput, dict[str, torch.Tensor]]:
        """(total loss, detached terms, model output, weighted terms still on the graph) of one batch:
        the multi-task loss, ``extra_loss`` and the FedProx proximal term. DP-SGD calls it on one
        case at a time, so each case's gradient is that of this whole loss."""
        model = self.model
        with torch.autocast(self.device.type, enabled=self.use_amp):
            reference = (batch["seg"], batch["has_seg"]) if self.cfg.train.cls_reference_regions and "seg" in batch else None
            crop_reference = (batch["seg"], batch["has_seg"]) if "seg" in batch else None  # used by model.tumor_crop_size
            output = model(batch["image"], batch["available"], batch.get("spacing"), reference=reference,
                           crop_reference=crop_reference)
            result = self.loss_fn(output, batch, model.task_weighting)
            extra = extra_loss(model, batch, output) if extra_loss is not None else None
        loss = result.total.float()
        terms: dict[str, torch.Tensor | float] = dict(result.terms)
        if extra is not None:
            extra_total, extra_terms = extra
            loss = loss + extra_total.float()
            terms.update(extra_terms)
        if anchor is not None:
            # FedProx proximal term (Li et al. 2020): mu/2 * ||w - w_global||^2.
            prox = sum(
                ((p - a) ** 2).sum()
                for p, a in zip((p for p in model.parameters() if p.requires_grad), anchor)
            )
            loss = loss + 0.5 * proximal_mu * prox
        return loss, terms, output, result.weighted

    def _run_supervised(
        self,
        loader: Iterable[Batch],
        *,
        epochs: int,
        lr: float,
        proximal_mu: float,
        batch_hook: BatchHook | None,
        extra_loss: ExtraLoss | None,
        after_step: StepHook | None,
        desc: str,
        optimizer_state: dict | None = None,
        privacy: SiteAccountant | None = None,
    ) -> StageResult:
        model = self.model
        model.train()
        optimizer = build_optimizer(model, self.cfg, lr)
        restored = 0.0
        if optimizer_state is not None:
            try:
                optimizer.load_state_dict(optimizer_state)
                for group in optimizer.param_groups:
                    group["lr"] = lr  # this round's learning rate, not the saved one
                restored = 1.0
            except (ValueError, KeyError):
                optimizer = build_optimizer(model, self.cfg, lr)  # another model shape: start afresh
        if privacy is not None:
            optimizer, loader = privacy.private(optimizer, loader, epochs=epochs, max_steps=self.cfg.train.max_steps)
        scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)
        anchor = (
            [p.detach().clone() for p in model.parameters() if p.requires_grad] if proximal_mu > 0 else None
        )
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}  # divisors other than the steps (a metric seen on some steps only)
        shares: dict[str, float] = {}
        steps = 0
        # the gradient shares are probed on the first epoch's last batch: on the first, the
        # classifier's zero-initialised output layers (model.classifier_head_init) pass no gradient
        per_epoch = len(loader) if isinstance(loader, Sized) else 1
        probe_step = max(min(per_epoch, self.cfg.train.max_steps or per_epoch) - 1, 0)
        start = time.perf_counter()
        for epoch in range(epochs):
            for batch in self._progress(loader, f"{desc} {epoch + 1}/{epochs}"):
                where = f"at epoch {epoch + 1}, step {steps + 1} ({desc})"
                if batch is not None:  # None: an empty Poisson batch (DP-SGD), a noise-only step
                    batch = move_batch(batch, self.device)
                    if batch_hook is not None:
                        batch = batch_hook(batch)
                if privacy is not None:
                    # each case's gradient of the whole loss; Opacus clips, sums, noises and counts
                    per_sample_gradients(optimizer.params, batch, lambda case: self._check_finite(
                        self._supervised_loss(case, extra_loss, anchor, proximal_mu)[0], where),
                        copies=case_copies(self.device))
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    if after_step is not None:
                        after_step(model)
                    steps += 1
                    if self.cfg.train.max_steps and steps >= self.cfg.train.max_steps:
                        break
                    continue
                loss, terms, output, weighted = self._supervised_loss(batch, extra_loss, anchor, proximal_mu)
                if steps == probe_step and weighted and hasattr(model, "encoder"):
                    shares = encoder_gradient_shares(model, weighted)
                self._step(loss, optimizer, scaler, where)
                if after_step is not None:
                    after_step(model)
                steps += 1
                gate = output.aux.get("imputation_gate") if getattr(output, "aux", None) else None
                if gate is not None and bool((~batch["available"].bool()).any()):
                    # how open the imputer's gate is on the sequences it generated (GMENet eq. 3)
                    missing = ~batch["available"].bool()
                    sums["imputation_gate"] = sums.get("imputation_gate", 0.0) + float(
                        gate.detach().float().mean(dim=tuple(range(2, gate.dim())))[missing].mean())
                    counts["imputation_gate"] = counts.get("imputation_gate", 0) + 1
                    sums["imputed_sequences"] = sums.get("imputed_sequences", 0.0) + float(missing.sum())
                    counts["imputed_sequences"] = 1  # a total, not a mean
                sums["loss"] = sums.get("loss", 0.0) + float(loss.detach())
                for name, value in terms.items():
                    sums[f"loss_{name}"] = sums.get(f"loss_{name}", 0.0) + float(value)
                if self.cfg.train.max_steps and steps >= self.cfg.train.max_steps:
                    break
            if self.cfg.train.max_steps and steps >= self.cfg.train.max_steps:
                break
        metrics = {k: v / counts.get(k, max(steps, 1)) for k, v in sums.items()}
        metrics.update(shares)
        metrics.update(steps=float(steps), seconds=time.perf_counter() - start, optimizer_state_restored=restored)
        return StageResult(metrics, optimizer.state_dict())

    def _run_pretrain(self, loader: Iterable[Batch], *, epochs: int, lr: float, desc: str) -> StageResult:
        """GMENet stage 1: train only the imputer to reconstruct masked sequences' features."""
        model = self.model
        imputer = getattr(model, "imputer", None)
        if imputer is None:
            raise ValueError("stage 'pretrain_imputer' needs model.imputation=true")
        model.eval()  # stems give fixed targets; only the imputer learns
        imputer.train()
        optimizer = torch.optim.AdamW(imputer.parameters(), lr=lr, weight_decay=self.cfg.train.weight_decay)
        scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)
        generator = torch.Generator().manual_seed(self.cfg.train.seed)
        icfg = self.cfg.imputation
        sums: dict[str, float] = {}
        steps = complete = 0
        start = time.perf_counter()
        for epoch in range(epochs):
            for batch in self._progress(loader, f"{desc} imputer {epoch + 1}/{epochs}"):
                batch = move_batch(batch, self.device)
                if not bool(batch["available"].all(dim=1).any()):
                    continue  # no complete case in this batch: nothing to learn from
                with torch.no_grad():
                    features = model.encode_sequences(batch["image"], batch["available"])
                with torch.autocast(self.device.type, enabled=self.use_amp):
                    loss, terms = imputation_pretrain_loss(
                        imputer,
                        features,
                        batch["available"],
                        mask_prob=icfg.mask_prob,
                        kl_weight=icfg.kl_weight,
                        cycle_weight=icfg.cycle_weight,
                        generator=generator,
                    )
                self._step(loss.float(), optimizer, scaler, f"in imputer pre-training, epoch {epoch + 1}")
                steps += 1
                complete += int(terms.get("n_complete", 0))
                sums["loss_impute"] = sums.get("loss_impute", 0.0) + float(loss.detach())
                for name, value in terms.items():
                    if name != "n_complete":
                        sums[f"loss_impute_{name}"] = sums.get(f"loss_impute_{name}", 0.0) + float(value)
        metrics = {k: v / max(steps, 1) for k, v in sums.items()}
        metrics.update(steps=float(steps), complete_cases_seen=float(complete), seconds=time.perf_counter() - start)
        return StageResult(metrics)


def finite_or_nan(value: float) -> float:
    """Map inf to NaN so metrics stay JSON-serialisable as null."""
    return value if math.isfinite(value) else float("nan")
