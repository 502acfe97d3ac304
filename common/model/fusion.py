"""Fusion of per-sequence feature maps into one feature map, robust to missing sequences.

Two interchangeable modules share one signature, ``forward(features, available)``:

* ``"weighted"``: :class:`WeightedFusion`, GMMAS eq. 1 - one learnable scalar weight per sequence,
  renormalised over the sequences each case actually has;
* ``"experts"``: ``common.model.expert_fusion.ExpertFusion`` (GMENet DWEFM: per-sequence and
  cross-sequence experts with a softmax router), built by :func:`build_fusion`.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import nn

from common.config import FUSIONS, choice_error
from common.model.expert_fusion import ExpertFusion


@runtime_checkable
class Fusion(Protocol):
    """What the network needs from a fusion module (structural: no subclassing required)."""

    def forward(self, features: torch.Tensor, available: torch.Tensor) -> torch.Tensor:
        """Fuse ``features`` (B, S, C, D, H, W) of S sequences, ``available`` (B, S) bool, into
        one map (B, C, D, H, W). Features of missing sequences must not influence the result."""
        ...


def masked_sequence_weights(logits: torch.Tensor, available: torch.Tensor) -> torch.Tensor:
    """Softmax of per-sequence ``logits`` (S,) restricted to each case's available sequences.

    Args:
        logits: (S,) unnormalised sequence weights.
        available: (B, S) bool availability mask; every case needs at least one True.

    Returns:
        (B, S) weights: non-negative, summing to 1 over each case's available sequences,
        exactly 0 for missing ones.
    """
    if not bool(available.any(dim=1).all()):
        empty = torch.nonzero(~available.any(dim=1)).flatten().tolist()
        raise ValueError(
            f"cases at batch positions {empty} have no available MRI sequence; every case needs at "
            "least one of the sequences (drop such cases when loading the site)"
        )
    scores = logits.to(torch.float32).unsqueeze(0).expand(available.shape[0], -1)
    scores = scores.masked_fill(~available, float("-inf"))
    return torch.softmax(scores, dim=1)


class WeightedFusion(nn.Module):
    """GMMAS eq. 1: ``F = sum_s W_s F_s / sum_s W_s`` over the available sequences.

    The weights are parameterised as a softmax of learnable logits (initialised equal), which
    keeps them positive and makes "divide by W_sum over the available sequences" a masked softmax:
    a case with only T2 and FLAIR gets weights that sum to 1 over those two.

    Args:
        num_sequences: number of input sequences S.
    """

    def __init__(self, num_sequences: int = 4) -> None:
        super().__init__()
        if num_sequences < 1:
            raise ValueError(f"num_sequences must be >= 1, got {num_sequences}")
        self.num_sequences = num_sequences
        self.logits = nn.Parameter(torch.zeros(num_sequences))

    def weights(self, available: torch.Tensor) -> torch.Tensor:
        """(B, S) fusion weights for an availability mask ``available`` (B, S) bool."""
        return masked_sequence_weights(self.logits, available)

    def forward(self, features: torch.Tensor, available: torch.Tensor) -> torch.Tensor:
        """Fuse ``features`` (B, S, C, D, H, W) with ``available`` (B, S) bool -> (B, C, D, H, W)."""
        if features.ndim != 6 or features.shape[1] != self.num_sequences:
            raise ValueError(
                f"WeightedFusion expects features (B, {self.num_sequences}, C, D, H, W), got "
                f"{tuple(features.shape)}"
            )
        weights = self.weights(available.bool()).to(features.dtype)
        # Missing sequences get weight exactly 0, so whatever finite values are stored for them
        # cannot leak into the fused map.
        return torch.einsum("bs,bscdhw->bcdhw", weights, features)


def build_fusion(kind: str, channels: int, num_sequences: int = 4) -> nn.Module:
    """The fusion module for ``model.fusion`` = ``kind``.

    Args:
        kind: "weighted" (GMMAS eq. 1) or "experts" (GMENet DWEFM).
        channels: channels C of each sequence's feature map (used by the expert fusion).
        num_sequences: number of sequences S.
    """
    if kind == "weighted":
        return WeightedFusion(num_sequences=num_sequences)
    if kind == "experts":
        return ExpertFusion(channels=channels, num_sequences=num_sequences)
    raise choice_error("fusion kind (model.fusion)", kind, FUSIONS)
