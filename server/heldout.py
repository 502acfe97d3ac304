"""Scoring global models on the held-out, independent center (never trained on)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from common.config import ExperimentConfig
from common.data.dataset import make_loader
from common.data.site import load_site
from common.evaluation.calibration import Calibration
from common.evaluation.loop import evaluate
from common.runtime import select_device


class HeldoutEvaluator:
    """Loads and validates the held-out center once, then scores any model on all of its cases."""

    def __init__(self, root: Path | str, cfg: ExperimentConfig, device: torch.device | None = None) -> None:
        if not str(root):
            raise ValueError(
                "federation.heldout is empty: set it to the held-out center's folder, e.g. "
                "federation.heldout=/data/heldout (an absolute path on the SuperLink host)"
            )
        self.index = load_site(Path(root))
        self.loader = make_loader(self.index.cases, cfg.data, train=False)
        self.device = device or select_device("auto")
        self.progress = cfg.train.progress

    @property
    def n_cases(self) -> int:
        return len(self.index.cases)

    def evaluate(self, model: nn.Module, calibration: Calibration | None = None) -> dict[str, Any]:
        """Scores of ``model`` on every held-out case, with the temperature and thresholds fit on
        the sites' validation splits (``calibration``; None = raw softmax, threshold 0.5), and the
        Kaplan-Meier curves of its predicted low/high-risk halves (``km_risk_groups``, for the
        report; None without a survival head or known survival)."""
        model.to(self.device)
        return evaluate(model, self.loader, self.device, progress=self.progress, desc="held-out",
                        calibration=calibration, survival_curves=True)
