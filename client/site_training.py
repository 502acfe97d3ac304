"""Everything a site does with its own data in one federated round.

A :class:`SiteSession` is built fresh for every message (Flower starts a new ClientApp process per
message in deployment): it validates the site folder, splits it deterministically into
train/validation, and trains or evaluates the received global model. What it returns is scalar
metrics only; case IDs and per-case outputs never leave this module.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from common.config import ExperimentConfig
from common.constants import SEQUENCES, TASKS


class SiteConfigError(ValueError):
    """The SuperNode's node config does not say where the site's data is."""


def site_location(node_config: Mapping[str, Any]) -> tuple[str, Path]:
    """(site name, data folder) from a SuperNode's ``--node-config``."""
    path = str(node_config.get("data-path", "")).strip()
    if not path:
        raise SiteConfigError(
            "this SuperNode has no data path: start it with "
            "--node-config 'data-path=\"/abs/path/to/site\" site-name=\"site-x\"'"
        )
    root = Path(path).expanduser()
    name = str(node_config.get("site-name", "")).strip() or root.name
    return name, root


@dataclass
class SiteSession:
    name: str
    cfg: ExperimentConfig
    device: torch.device
    index: Any  # common.site.SiteIndex
    train_cases: list[Any]  # common.site.CaseRecord
    val_cases: list[Any]

    @classmethod
    def open(cls, node_config: Mapping[str, Any], cfg: ExperimentConfig) -> "SiteSession":
        from common.site import load_site, split_cases
        from common.training import select_device

        name, root = site_location(node_config)
        index = load_site(root)  # raises NoUsableCaseError naming the site and the reasons
        train_cases, val_cases = split_cases(index.cases, cfg.data.val_fraction, cfg.data.split_seed)
        return cls(name, cfg, select_device("auto"), index, train_cases, val_cases)

    # ----------------------------------------------------------------- facts
    def description(self) -> dict[str, float]:
        """Counts the coordinator may see: cases, sequences and labels available (no IDs)."""
        facts: dict[str, float] = {
            "n_train": float(len(self.train_cases)),
            "n_val": float(len(self.val_cases)),
            "n_rejected": float(len(self.index.rejected)),
            "n_complete": float(sum(all(c.available) for c in self.train_cases)),
        }
        for i, seq in enumerate(SEQUENCES):
            facts[f"has_{seq}"] = float(sum(c.available[i] for c in self.train_cases))
        for t, task in enumerate(TASKS):
            facts[f"labeled_{task}"] = float(sum(c.labels[t] >= 0 for c in self.train_cases))
        facts["has_seg"] = float(sum(c.seg is not None for c in self.train_cases))
        return facts

    # ----------------------------------------------------------------- train
    def train(self, model: nn.Module, round_config: Mapping[str, Any]) -> dict[str, float]:
        """Local training of ``model`` (in place) for the stage the server asked for."""
        from common.dataset import make_loader
        from common.training import LocalTrainer, configure_runtime

        cfg = self.cfg
        configure_runtime(cfg, self.device)
        stage = str(round_config.get("stage", "supervised"))
        epochs = int(round_config.get("local-epochs", cfg.train.local_epochs))
        lr = float(round_config.get("lr", cfg.train.lr))
        if bool(round_config.get("freeze-imputer", False)) and hasattr(model, "imputer"):
            from common.imputation import freeze_module

            freeze_module(model.imputer)
        loader = make_loader(self.train_cases, cfg.data, train=True)
        labels = loader.dataset.label_matrix()
        trainer = LocalTrainer(model, cfg, self.device, labels)
        metrics = self.description()
        if stage == "pretrain_imputer":
            n_examples = int(metrics["n_complete"])
            if n_examples == 0:
                # Nothing to pre-train on here: send the weights back unchanged, weight 0.
                metrics.update({"num-examples": 0.0, "steps": 0.0})
                return metrics
            result = trainer.run(loader, stage=stage, epochs=epochs, lr=lr, desc=self.name)
        else:
            n_examples = len(self.train_cases)
            result = trainer.run(
                loader,
                stage=stage,
                epochs=epochs,
                lr=lr,
                proximal_mu=float(round_config.get("proximal-mu", 0.0)),
                desc=self.name,
            )
        metrics.update(result.metrics)
        metrics["num-examples"] = float(n_examples)
        model.cpu()
        return metrics

    # -------------------------------------------------------------- evaluate
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Global model on this site's validation split (scalar metrics + num-examples)."""
        from common.dataset import make_loader
        from common.evaluation import evaluate

        loader = make_loader(self.val_cases, self.cfg.data, train=False)
        model.to(self.device)
        metrics = evaluate(model, loader, self.device, progress=False)
        metrics["num-examples"] = float(len(self.val_cases))
        model.cpu()
        return metrics
