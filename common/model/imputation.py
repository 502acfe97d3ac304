"""Generative imputation of missing MRI sequences at the feature level (GMENet CGGM).

For every missing sequence ``k`` a learnable sequence embedding ``E_k`` queries, by
cross-attention, the features of the sequences the case does have; a sigmoid gate computed from
``Cat(generated, available)`` scales the generated features (GMENet eqs. 2-3). The module works on
the full-resolution stem features, one spatial token per voxel: at each voxel the query is ``E_k``
and the keys/values are the (at most S-1) available sequences' feature vectors at that voxel, so
attention costs O(S^2 * embed_dim) per voxel and runs at full resolution for small stem widths.

Before the supervised rounds the imputer is pre-trained self-supervised on complete cases
(:func:`imputation_pretrain_loss`: random sequence masking, MSE + KL + cycle-consistency, GMENet
eq. 4) and then frozen (:func:`freeze_module`) or fine-tuned, by config
(``imputation.freeze``).

Shapes: S sequences in :data:`common.contract.SEQUENCES` order, C stem channels, spatial dims
(D, H, W) (any number of spatial dims works: tokens are per spatial position).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from monai.networks.blocks import MLPBlock
from torch import nn
from torch.distributions import Normal, kl_divergence

from common.contract import SEQUENCES

#: Parameter-name prefix of the imputer inside the network (the ``"imputer"`` entry of
#: :data:`common.contract.PARAM_GROUPS`): strategies and freezing select its weights by it.
imputation_parameters_prefix: str = "imputer."

#: Variance floor of the per-channel Gaussian fits in the KL term: a channel that is constant over
#: the volume (a dead ReLU channel, an all-background crop) must not divide by zero.
KL_VARIANCE_FLOOR: float = 1e-3

#: Initial bias of the gate's linear layer: sigmoid(2) ~ 0.88, see ``CrossSequenceImputer``.
GATE_INIT_BIAS: float = 2.0


@dataclass
class ImputationResult:
    """What :class:`CrossSequenceImputer` returns.

    Attributes:
        features: (B, S, C, *spatial) available sequences bit-identical to the input, missing ones
            replaced by the gated generated features ``alpha * f_cs`` (GMENet eq. 3).
        gate: (B, S, C, *spatial) the gate ``alpha`` in [0, 1]; exactly 1 for available sequences
            (they pass through unscaled).
        generated: (B, S, C, *spatial) the raw generated features ``f_cs`` before gating, for the
            losses; exactly 0 for available sequences (nothing is generated for them).
        imputed: (B, S) bool, True where a sequence was generated (= ``~available``). The network
            passes ``available | imputed`` (all True) to the fusion when the imputer is on.
    """

    features: torch.Tensor
    gate: torch.Tensor
    generated: torch.Tensor
    imputed: torch.Tensor


def check_sequence_inputs(
    features: torch.Tensor, available: torch.Tensor, num_sequences: int, channels: int, owner: str
) -> None:
    """Fail fast on features/availability that do not match ``owner``'s configuration.

    Args:
        features: (B, S, C, *spatial) per-sequence feature maps.
        available: (B, S) bool availability mask.
        num_sequences: expected S.
        channels: expected C.
        owner: module name for the error message.

    Raises:
        ValueError: wrong shapes, or a case with no available sequence.
        TypeError: ``available`` is not a bool tensor.
    """
    expected = f"(B, {num_sequences}, {channels}, D, H, W)"
    if features.ndim < 4 or features.shape[1] != num_sequences or features.shape[2] != channels:
        raise ValueError(f"{owner} expects features {expected}, got {tuple(features.shape)}")
    if available.dtype != torch.bool:
        raise TypeError(
            f"{owner} expects `available` as a bool tensor, got {available.dtype}; pass mask.bool()"
        )
    if tuple(available.shape) != tuple(features.shape[:2]):
        raise ValueError(
            f"{owner}: `available` must be (B, S) = {tuple(features.shape[:2])}, got {tuple(available.shape)}"
        )
    empty = (~available.any(dim=1)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(
            f"{owner}: cases at batch positions {empty} have no available MRI sequence; every case "
            "needs at least one sequence (such cases are rejected when the site is loaded)"
        )


def to_sequence_tokens(features: torch.Tensor) -> torch.Tensor:
    """(B, S, C, *spatial) -> (N, S, C) channels-last tokens, N = B * prod(spatial), one per voxel."""
    batch, sequences, channels = features.shape[:3]
    return features.movedim(2, -1).movedim(1, -2).reshape(-1, sequences, channels)


def from_sequence_tokens(tokens: torch.Tensor, batch: int, spatial: torch.Size) -> torch.Tensor:
    """Inverse of :func:`to_sequence_tokens`: (N, S, C) -> (B, S, C, *spatial)."""
    sequences, channels = tokens.shape[1:]
    return tokens.reshape(batch, *spatial, sequences, channels).movedim(-2, 1).movedim(-1, 2)


def token_availability(available: torch.Tensor, spatial: torch.Size) -> torch.Tensor:
    """(B, S) case-level availability -> (N, S) per-token availability (same order as the tokens)."""
    batch, sequences = available.shape
    view = available.reshape(batch, *([1] * len(spatial)), sequences)
    return view.expand(batch, *spatial, sequences).reshape(-1, sequences)


class CrossSequenceImputer(nn.Module):
    """GMENet CGGM: cross-attention generation of missing sequences' features with a sigmoid gate.

    Per voxel: tokens ``x_j`` (C) of the available sequences are projected per sequence and tagged
    with a learnable sequence embedding (``P_j x_j + s_j``, embed_dim), so attention knows which
    sequence each key is. The query of a missing sequence ``k`` is its learnable embedding ``E_k``.
    One pre-norm transformer-decoder step (masked cross-attention, then a GELU MLP, both residual
    on the query) gives ``h_k``; ``f_cs = Linear(LayerNorm(h_k))`` (C) is the generated feature,
    ``alpha = sigmoid(Linear(Cat(f_cs, f_u)))`` (C) the gate, where ``f_u`` is the mean of the
    available sequences' features at that voxel (GMENet has one other sequence; the mean generalises
    it to several), and ``alpha * f_cs`` replaces the missing sequence.

    This pattern is hand-assembled from ``nn.MultiheadAttention`` and MONAI's ``MLPBlock``: MONAI's
    ``CrossAttentionBlock`` supports only a causal mask, and no MONAI block masks keys per case,
    which is what "attend only to the sequences this case has" needs.

    Args:
        channels: stem channels C of every sequence's feature map.
        num_sequences: number of sequences S (>= 2: something must be left to impute from).
        embed_dim: attention width (default ``max(channels, 16)``); must be divisible by ``heads``.
        heads: attention heads (1 is enough for at most S-1 keys per voxel).
        mlp_ratio: hidden width of the MLP as a multiple of ``embed_dim``.
        dropout: dropout of the attention and the MLP.
    """

    def __init__(
        self,
        channels: int,
        num_sequences: int = len(SEQUENCES),
        *,
        embed_dim: int | None = None,
        heads: int = 1,
        mlp_ratio: int = 2,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        embed_dim = max(channels, 16) if embed_dim is None else embed_dim
        if channels < 1:
            raise ValueError(f"CrossSequenceImputer: channels must be >= 1, got {channels}")
        if num_sequences < 2:
            raise ValueError(
                "CrossSequenceImputer: num_sequences must be >= 2 (impute one from another), "
                f"got {num_sequences}"
            )
        if heads < 1 or embed_dim % heads:
            raise ValueError(
                f"CrossSequenceImputer: embed_dim={embed_dim} must be a positive multiple of heads={heads}"
            )
        self.channels = channels
        self.num_sequences = num_sequences
        self.embed_dim = embed_dim
        # Per-sequence key/value projection (no bias: the sequence embedding is the bias).
        self.token_proj = nn.ModuleList(
            nn.Linear(channels, embed_dim, bias=False) for _ in range(num_sequences)
        )
        self.sequence_embedding = nn.Parameter(torch.randn(num_sequences, embed_dim) * 0.02)
        self.query = nn.Parameter(torch.randn(num_sequences, embed_dim) * 0.02)  # E_k
        self.query_norm = nn.LayerNorm(embed_dim)
        self.key_norm = nn.LayerNorm(embed_dim)
        self.attention = nn.MultiheadAttention(embed_dim, heads, dropout=dropout, batch_first=True)
        self.mlp_norm = nn.LayerNorm(embed_dim)
        self.mlp = MLPBlock(embed_dim, mlp_ratio * embed_dim, dropout_rate=dropout, act="GELU")
        self.out_norm = nn.LayerNorm(embed_dim)
        self.to_features = nn.Linear(embed_dim, channels)
        self.gate = nn.Linear(2 * channels, channels)
        # Start with the gate mostly open (alpha ~ 0.88): a half-closed gate at initialisation
        # halves the reconstruction signal reaching the generator and slows pre-training; the gate
        # learns to close where the available sequences carry too little information.
        nn.init.constant_(self.gate.bias, GATE_INIT_BIAS)

    def forward(self, features: torch.Tensor, available: torch.Tensor) -> ImputationResult:
        """Fill in the missing sequences of every case.

        Args:
            features: (B, S, C, *spatial) stem features; whatever is stored for missing sequences
                (zeros by convention) is ignored.
            available: (B, S) bool, True where the case has the sequence; at least one per case.

        Returns:
            :class:`ImputationResult`; only cases with a missing sequence are computed (a batch of
            complete cases costs nothing).

        Raises:
            ValueError / TypeError: see :func:`check_sequence_inputs`.
        """
        check_sequence_inputs(features, available, self.num_sequences, self.channels, type(self).__name__)
        missing = ~available
        needs = missing.any(dim=1).nonzero().flatten()
        gate = torch.ones_like(features)
        generated = torch.zeros_like(features)
        if needs.numel() == 0:
            return ImputationResult(features=features, gate=gate, generated=generated, imputed=missing)
        sub_generated, sub_gate = self._generate(features[needs], available[needs])
        generated = generated.index_copy(0, needs, sub_generated)
        gate = gate.index_copy(0, needs, sub_gate)
        is_missing = missing.reshape(*missing.shape, *([1] * (features.ndim - 2)))
        # torch.where, not gate * generated + features: available sequences stay bit-identical.
        imputed_features = torch.where(is_missing, gate * generated, features)
        return ImputationResult(features=imputed_features, gate=gate, generated=generated, imputed=missing)

    def _attend(self, keys: torch.Tensor, token_available: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``self.attention`` (its weights: in_proj, out_proj, heads, dropout) of the queries
        ``E_k`` over the keys/values ``keys`` (N, S, E), attending only where ``token_available``
        (N, S) is True, for the (voxel, target sequence) pairs where ``target`` (N, S) is True:
        (M, E) in ``keys[target]`` order.

        Written out here rather than calling ``nn.MultiheadAttention``: the query of target ``k``
        is the same learned embedding at every voxel, so it folds into the key projection (one
        GEMM gives every score, no per-voxel query or key), the values are projected after the
        weighted sum (so once per pair, not per key), and only the missing targets are computed.
        On CPU the module's fused path (flash attention over length-4 sequences, then the
        discarded targets) cost about 2x as much (tests/unit/test_imputation.py checks this
        equals the module, values and gradients).
        """
        attention = self.attention
        n, s, e = keys.shape
        heads = attention.num_heads
        d = e // heads
        w_q, w_k, w_v = attention.in_proj_weight.chunk(3)
        b_q, b_k, b_v = attention.in_proj_bias.chunk(3)
        q = F.linear(self.query_norm(self.query), w_q, b_q).view(s, heads, d) * d ** -0.5  # (S_t, h, d)
        # score[n, key, t, h] = q[t, h] . (W_k keys[n, key] + b_k)[h]
        w_score = torch.einsum("thd,hde->the", q, w_k.view(heads, d, e)).reshape(s * heads, e)
        b_score = torch.einsum("thd,hd->th", q, b_k.view(heads, d)).reshape(s * heads)
        scores = F.linear(keys, w_score, b_score).view(n, s, s, heads)  # (N, key, target, h)
        pairs = target.nonzero(as_tuple=True)  # (voxel, target) in keys[target] order
        scores = scores[pairs[0], :, pairs[1]]  # (M, key, h)
        # Every case has >= 1 available sequence (checked), so no row is fully masked (no NaN).
        scores = scores.masked_fill(~token_available[pairs[0]].unsqueeze(-1), float("-inf"))
        weights = F.dropout(scores.softmax(dim=1), attention.dropout, self.training)  # (M, key, h)
        mixed = torch.einsum("mkh,mke->mhe", weights, keys[pairs[0]])  # (M, h, E)
        values = torch.einsum("mhe,hde->mhd", mixed, w_v.view(heads, d, e))
        values = values + weights.sum(dim=1).unsqueeze(-1) * b_v.view(heads, d)  # the bias, once per weight
        return attention.out_proj(values.reshape(-1, e))

    def _generate(
        self, features: torch.Tensor, available: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Generated features ``f_cs`` and gate ``alpha`` of the missing sequences.

        Args:
            features: (b, S, C, *spatial) features of the cases that miss at least one sequence.
            available: (b, S) bool, at least one True per case.

        Returns:
            ``(f_cs, alpha)``, both (b, S, C, *spatial); 0 and 1 respectively for available
            sequences.
        """
        batch, spatial = features.shape[0], features.shape[3:]
        tokens = to_sequence_tokens(features)  # (N, S, C)
        token_available = token_availability(available, spatial)  # (N, S)
        # Zero the missing tokens: masked keys get zero attention weight, but 0 * NaN is still NaN,
        # so garbage stored for a missing sequence must not reach the value product.
        tokens = tokens.masked_fill(~token_available.unsqueeze(-1), 0.0)
        keys = torch.stack([proj(tokens[:, s]) for s, proj in enumerate(self.token_proj)], dim=1)
        keys = self.key_norm(keys + self.sequence_embedding)  # (N, S, E)
        # Only the (token, missing sequence) pairs are computed, which roughly halves the cost
        # when 1-2 of 4 sequences are missing.
        target = ~token_available  # (N, S)
        attended = self._attend(keys, token_available, target)  # (M, E)
        hidden = self.query[target.nonzero(as_tuple=True)[1]] + attended  # (M, E)
        hidden = hidden + self.mlp(self.mlp_norm(hidden))
        generated = self.to_features(self.out_norm(hidden))  # (M, C): f_cs
        counts = token_available.sum(dim=1, keepdim=True).to(tokens.dtype)  # (N, 1), >= 1
        context = tokens.sum(dim=1) / counts  # (N, C): f_u, mean of the available sequences
        context = context.unsqueeze(1).expand(-1, self.num_sequences, -1)[target]  # (M, C)
        alpha = torch.sigmoid(self.gate(torch.cat([generated, context], dim=-1)))  # GMENet eq. 2
        all_generated = tokens.new_zeros(tokens.shape).index_put((target,), generated)
        all_alpha = tokens.new_ones(tokens.shape).index_put((target,), alpha)
        return (
            from_sequence_tokens(all_generated, batch, spatial),
            from_sequence_tokens(all_alpha, batch, spatial),
        )


def random_sequence_mask(
    num_cases: int, num_sequences: int, mask_prob: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Which sequences of complete cases to hide for pre-training, at least one hidden and one kept.

    Each sequence is hidden with probability ``mask_prob``; then the sequence with the lowest draw
    is always hidden and the one with the highest always kept, so every case has something to
    impute and something to impute it from (even with ``mask_prob`` 0 or 1).

    Args:
        num_cases: number of complete cases n.
        num_sequences: S (>= 2).
        mask_prob: probability in [0, 1] of hiding each sequence.
        generator: CPU random generator for reproducible masks (None: the global one).

    Returns:
        (n, S) bool on the CPU, True = hidden.
    """
    if not 0.0 <= mask_prob <= 1.0:
        raise ValueError(f"mask_prob must be in [0, 1] (imputation.mask_prob), got {mask_prob}")
    if num_sequences < 2:
        raise ValueError(f"random masking needs >= 2 sequences, got {num_sequences}")
    draws = torch.rand(num_cases, num_sequences, generator=generator)
    masked = draws < mask_prob
    rows = torch.arange(num_cases)
    masked[rows, draws.argmin(dim=1)] = True
    masked[rows, draws.argmax(dim=1)] = False
    return masked


def gaussian_kl(real: torch.Tensor, generated: torch.Tensor) -> torch.Tensor:
    """Mean KL(N_real || N_generated) between per-channel Gaussian fits over the voxels.

    Each (case, channel) of the real and of the generated features is summarised by its mean and
    variance over the voxels, and the closed-form Gaussian KL is averaged. Why this fit rather than
    a softmax over channels: the MSE-optimal prediction under uncertainty is a conditional mean
    whose spread over the volume is smaller than the target's (over-smoothed features); matching
    the first two moments of each channel's distribution counteracts exactly that, which the MSE
    term does not, and unlike a channel softmax it is not blind to a shared offset of all channels.
    KL(real || generated) is the maximum-likelihood direction (fit the generator to the data).

    Args:
        real: (M, C, *spatial) target features.
        generated: (M, C, *spatial) imputed features.

    Returns:
        Scalar tensor (nats per channel).
    """
    real_flat, gen_flat = real.flatten(2), generated.flatten(2)
    real_var = real_flat.var(dim=2, unbiased=False) + KL_VARIANCE_FLOOR
    gen_var = gen_flat.var(dim=2, unbiased=False) + KL_VARIANCE_FLOOR
    real_dist = Normal(real_flat.mean(dim=2), real_var.sqrt())
    gen_dist = Normal(gen_flat.mean(dim=2), gen_var.sqrt())
    return kl_divergence(real_dist, gen_dist).mean()


def imputation_pretrain_loss(
    imputer: CrossSequenceImputer,
    features: torch.Tensor,
    available: torch.Tensor,
    *,
    mask_prob: float = 0.5,
    kl_weight: float = 0.1,
    cycle_weight: float = 0.5,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Self-supervised reconstruction loss of the imputer on complete cases (GMENet eq. 4).

    Complete cases (all S sequences available) get a random subset of sequences hidden
    (:func:`random_sequence_mask`), which the imputer fills in from the kept ones::

        loss = MSE(f^m_hat, f^m) + kl_weight * KL(f^m, f^m_hat) + cycle_weight * MSE(f^u_hat, f^u)

    where ``f^m_hat`` are the gated imputed features of the hidden sequences, and ``f^u_hat`` the
    cycle: the kept sequences re-imputed from the *imputed* hidden ones alone (the kept ones marked
    missing), compared with the real kept features. The KL term is :func:`gaussian_kl`.

    The features are detached here: they are targets (and inputs) only, so this loss trains the
    imputer and never the stems - otherwise the stems could make imputation trivial by collapsing
    every sequence's features to one shared pattern. Pass stem outputs as they are.

    Args:
        imputer: the module to train.
        features: (B, S, C, *spatial) stem features of a batch.
        available: (B, S) bool availability; only rows that are all True are used.
        mask_prob: probability of hiding each sequence (``imputation.mask_prob``).
        kl_weight: weight of the KL term (``imputation.kl_weight``).
        cycle_weight: weight of the cycle-consistency term (``imputation.cycle_weight``).
        generator: CPU generator for reproducible masks.

    Returns:
        ``(loss, stats)``: scalar loss and float stats ``n_complete``, ``n_masked`` (hidden
        sequences in total), ``mse``, ``kl``, ``cycle``, ``loss``. With no complete case the loss
        is a zero leaf that requires grad (``backward()`` works and leaves every imputer ``.grad``
        at None, so optimizers skip them) and ``stats == {"n_complete": 0.0}``.
    """
    if available.dtype != torch.bool:
        raise TypeError(f"imputation_pretrain_loss expects `available` as bool, got {available.dtype}")
    complete = available.all(dim=1)
    n_complete = int(complete.sum())
    if n_complete == 0:
        return torch.zeros((), device=features.device, requires_grad=True), {"n_complete": 0.0}
    real = features.detach()[complete]  # (n, S, C, *spatial)
    masked = random_sequence_mask(n_complete, real.shape[1], mask_prob, generator).to(real.device)
    kept = ~masked
    first = imputer(real.masked_fill(_broadcast(masked, real), 0.0), kept)
    mse = F.mse_loss(first.features[masked], real[masked])
    kl = gaussian_kl(real[masked], first.features[masked])
    # Cycle: the imputed hidden sequences stand in as the only available ones.
    cycle_input = torch.where(_broadcast(masked, real), first.features, torch.zeros_like(real))
    cycle = F.mse_loss(imputer(cycle_input, masked).features[kept], real[kept])
    loss = mse + kl_weight * kl + cycle_weight * cycle
    stats = {
        "n_complete": float(n_complete),
        "n_masked": float(masked.sum()),
        "mse": float(mse.detach()),
        "kl": float(kl.detach()),
        "cycle": float(cycle.detach()),
        "loss": float(loss.detach()),
    }
    return loss, stats


def _broadcast(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B, S) mask -> (B, S, 1, ..., 1) broadcastable against ``like`` (B, S, C, *spatial)."""
    return mask.reshape(*mask.shape, *([1] * (like.ndim - 2)))


def freeze_module(module: nn.Module) -> None:
    """Stop training ``module``: ``requires_grad=False`` and stale ``.grad`` cleared.

    Clearing ``.grad`` matters: an optimizer built before freezing still updates a parameter that
    has a leftover gradient (and AdamW applies weight decay to it). Train/eval mode is left alone.
    """
    for parameter in module.parameters():
        parameter.requires_grad_(False)
        parameter.grad = None


def unfreeze_module(module: nn.Module) -> None:
    """Make every parameter of ``module`` trainable again (``requires_grad=True``)."""
    for parameter in module.parameters():
        parameter.requires_grad_(True)
