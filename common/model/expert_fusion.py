"""Expert fusion of per-sequence feature maps (GMENet DWEFM), per voxel.

Every sequence ``k`` has a lightweight expert ``E_k`` (MLP with GELU, then LayerNorm). A sequence's
features are read by its own expert (sequence-specific features ``E_k(x_k)``) and by the other
sequences' experts (cross-sequence features ``mean_{j != k} E_j(x_k)``); the two are concatenated
into ``e_k`` (2C), so ``e_k`` depends on sequence ``k``'s features only. A router scores each
sequence, a softmax over the sequences gives confidence weights ``w_k`` (GMENet eq. 5), and the
weighted ``w_k * e_k`` (eq. 6) of all sequences are concatenated and projected back to C channels.
All layers are channels-last linear layers applied to one token per voxel.

Availability convention: the router softmax runs over the sequences marked available only;
missing ones get weight exactly 0 and their stored features (zeros, or anything else) cannot
influence the output. When the imputer is on, the network passes the imputed features together
with ``available | imputed`` (all True), so generated sequences are fused like real ones and the
router decides how much to trust them; with the imputer off it passes ``available``.
"""

from __future__ import annotations

import torch
from monai.networks.blocks import MLPBlock
from torch import nn

from common.contract import SEQUENCES
from common.model.imputation import check_sequence_inputs, to_sequence_tokens, token_availability


class ExpertFusion(nn.Module):
    """GMENet DWEFM: per-sequence and cross-sequence experts, softmax router, weighted concat.

    Hand-assembled from MONAI ``MLPBlock`` and ``nn.LayerNorm``: MONAI has no mixture-of-experts
    block, and the router must be masked per case by sequence availability.

    Args:
        channels: channels C of every sequence's feature map (and of the fused map).
        num_sequences: number of sequences S (>= 2: cross-sequence experts need another sequence).
        mlp_ratio: hidden width of each expert as a multiple of C.
        dropout: dropout inside the experts.
    """

    def __init__(
        self, channels: int, num_sequences: int = len(SEQUENCES), *, mlp_ratio: int = 2, dropout: float = 0.0
    ) -> None:
        super().__init__()
        if channels < 1:
            raise ValueError(f"ExpertFusion: channels must be >= 1, got {channels}")
        if num_sequences < 2:
            raise ValueError(f"ExpertFusion: num_sequences must be >= 2, got {num_sequences}")
        self.channels = channels
        self.num_sequences = num_sequences
        self.experts = nn.ModuleList(
            nn.Sequential(
                MLPBlock(channels, mlp_ratio * channels, dropout_rate=dropout, act="GELU"),
                nn.LayerNorm(channels),
            )
            for _ in range(num_sequences)
        )
        # Router R: one score per sequence token from its own features, plus a learnable
        # per-sequence prior (GMENet eq. 5 scores each f_k with one shared R).
        self.router = nn.Linear(channels, 1)
        self.router_prior = nn.Parameter(torch.zeros(num_sequences))
        self.projection = nn.Linear(num_sequences * 2 * channels, channels)

    def forward(self, features: torch.Tensor, available: torch.Tensor) -> torch.Tensor:
        """Fuse ``features`` (B, S, C, *spatial) with ``available`` (B, S) bool -> (B, C, *spatial)."""
        return self.forward_with_weights(features, available)[0]

    def forward_with_weights(
        self, features: torch.Tensor, available: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Fused map and router weights.

        Args:
            features: (B, S, C, *spatial) per-sequence features.
            available: (B, S) bool; at least one True per case (see the module docstring for the
                convention with imputed sequences).

        Returns:
            ``(fused, weights)``: fused (B, C, *spatial); weights (B, S, *spatial), non-negative,
            summing to 1 over the sequences at every voxel, exactly 0 for unavailable ones.
        """
        check_sequence_inputs(features, available, self.num_sequences, self.channels, type(self).__name__)
        batch, spatial = features.shape[0], features.shape[3:]
        tokens = to_sequence_tokens(features)  # (N, S, C)
        token_available = token_availability(available, spatial)  # (N, S)
        # masked_fill (not a multiply): NaN/Inf stored for a missing sequence must not leak via 0 * NaN.
        tokens = tokens.masked_fill(~token_available.unsqueeze(-1), 0.0)
        fused_tokens, weights = self._fuse_tokens(tokens, token_available)
        fused = fused_tokens.reshape(batch, *spatial, self.channels).movedim(-1, 1)
        weights = weights.reshape(batch, *spatial, self.num_sequences).movedim(-1, 1)
        return fused, weights

    def _fuse_tokens(
        self, tokens: torch.Tensor, token_available: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, S, C) tokens, (N, S) availability -> fused (N, C), router weights (N, S)."""
        # by_expert[:, j, k] = E_j(x_k): every expert reads every sequence.
        by_expert = torch.stack([expert(tokens) for expert in self.experts], dim=1)  # (N, S, S, C)
        native = torch.diagonal(by_expert, dim1=1, dim2=2).movedim(-1, 1)  # (N, S, C): E_k(x_k)
        cross = (by_expert.sum(dim=1) - native) / (self.num_sequences - 1)  # mean_{j != k} E_j(x_k)
        per_sequence = torch.cat([native, cross], dim=-1)  # (N, S, 2C): e_k
        logits = self.router(tokens).squeeze(-1) + self.router_prior  # (N, S)
        # Every case has an available sequence (checked), so no row is all -inf (no NaN softmax).
        weights = torch.softmax(logits.masked_fill(~token_available, float("-inf")), dim=-1)
        weighted = weights.unsqueeze(-1) * per_sequence  # GMENet eq. 6
        return self.projection(weighted.flatten(1)), weights
