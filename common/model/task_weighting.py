"""Homoscedastic-uncertainty task weighting (Kendall et al. 2018), held by the model.

The learned log-variances are a parameter group of the network (``task_weighting``) so that they
are federated with the other weights; :class:`client.losses.MultiTaskLoss` combines its terms
through them.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import nn

from common.config import TASK_WEIGHTINGS, choice_error


class UncertaintyWeighting(nn.Module):
    """Homoscedastic-uncertainty task weighting (Kendall et al. 2018; MTTU-Net eq. 15).

    ``total = sum_i exp(-s_i) * L_i + s_i`` with learnable ``s_i = log sigma_i^2`` (initialised
    to 0, i.e. sigma = 1 as in MTTU-Net). Eq. 15 reads ``L_i / (2 sigma_i^2) + log sigma_i``,
    which is exactly half of this form, so both have the same minimiser; the unhalved form keeps
    ``total == sum_i L_i`` at initialisation.

    Args:
        names: one name per loss term, e.g. ``("seg", "idh", "1p19q", "grade", "mgmt")``.
    """

    def __init__(self, names: Sequence[str]) -> None:
        super().__init__()
        names = tuple(names)
        if not names:
            raise ValueError("UncertaintyWeighting needs at least one term name")
        if len(set(names)) != len(names):
            raise ValueError(f"UncertaintyWeighting term names must be unique, got {names}")
        self.names = names
        self._index = {name: i for i, name in enumerate(names)}
        self.log_vars = nn.Parameter(torch.zeros(len(names)))

    def log_variance(self, name: str) -> torch.Tensor:
        """The scalar ``s`` of term ``name``."""
        if name not in self._index:
            raise KeyError(f"no uncertainty weight for loss term {name!r}; known terms: {self.names}")
        return self.log_vars[self._index[name]]

    def forward(self, losses: Mapping[str, torch.Tensor], mode: str = "uncertainty") -> torch.Tensor:
        """Combine the scalar ``losses`` present in this batch into one scalar.

        Args:
            losses: {term name: scalar loss}; only the terms that had data in this batch (absent
                terms must be left out, so their log-variance gets no regulariser gradient).
            mode: "uncertainty" (learned weights) or "equal" (plain sum).
        """
        if not losses:
            raise ValueError("UncertaintyWeighting got no loss terms to combine")
        return self.total(self.weighted_terms(losses, mode), mode)

    def total(self, weighted: Mapping[str, torch.Tensor], mode: str = "uncertainty") -> torch.Tensor:
        """The combined loss from :meth:`weighted_terms`' output: their sum, plus the ``s``
        regulariser of each term under uncertainty weighting."""
        total = torch.stack(list(weighted.values())).sum()
        if mode == "equal":
            return total
        return total + torch.stack([self.log_variance(name).float() for name in weighted]).sum()

    def weighted_terms(self, losses: Mapping[str, torch.Tensor], mode: str = "uncertainty") -> dict[str, torch.Tensor]:
        """``{name: exp(-s) * loss}`` (``{name: loss}`` with ``mode="equal"``), without the ``s``
        regulariser: the part of the total through which each term reaches the shared weights."""
        if mode not in TASK_WEIGHTINGS:
            raise choice_error("task weighting", mode, TASK_WEIGHTINGS)
        if mode == "equal":
            return {name: loss.float() for name, loss in losses.items()}
        return {name: torch.exp(-self.log_variance(name).float()) * loss.float() for name, loss in losses.items()}
