"""Generative imputation (GMENet CGGM), its pre-training loss, and expert fusion (GMENet DWEFM).

Tiny synthetic feature maps (B, S=4, C=4, 8^3); every availability pattern is exercised.
"""

from __future__ import annotations

import itertools
import math
from typing import Iterator

import pytest
import torch

from common.contract import PARAM_GROUPS, SEQUENCES
from common.model.expert_fusion import ExpertFusion
from common.model.imputation import (
    CrossSequenceImputer,
    freeze_module,
    gaussian_kl,
    imputation_parameters_prefix,
    imputation_pretrain_loss,
    random_sequence_mask,
    unfreeze_module,
)

S = len(SEQUENCES)
C = 4
SIZE = 8
#: The 15 non-empty availability patterns of 4 sequences, as (S,) bool tuples.
PATTERNS: list[tuple[bool, ...]] = [p for p in itertools.product([False, True], repeat=S) if any(p)]


def pattern_id(pattern: tuple[bool, ...]) -> str:
    return "+".join(name for name, present in zip(SEQUENCES, pattern) if present)


def stem_features(available: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Random (B, S, C, 8, 8, 8) features, zeroed for missing sequences (the stems' convention)."""
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(available.shape[0], S, C, SIZE, SIZE, SIZE, generator=generator)
    return features * available.reshape(*available.shape, 1, 1, 1, 1)


@pytest.fixture(autouse=True)
def single_thread() -> Iterator[None]:
    """These tensors are tiny: with several threads on a shared 2-core machine, thread
    synchronisation dominates (the pre-training test runs ~8x slower), so use one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def imputer() -> CrossSequenceImputer:
    torch.manual_seed(0)
    return CrossSequenceImputer(channels=C, num_sequences=S)


@pytest.fixture
def fusion() -> ExpertFusion:
    torch.manual_seed(0)
    return ExpertFusion(channels=C, num_sequences=S)


@pytest.mark.parametrize("pattern", PATTERNS, ids=pattern_id)
def test_imputer_fills_missing_and_keeps_available(
    imputer: CrossSequenceImputer, pattern: tuple[bool, ...]
) -> None:
    available = torch.tensor([pattern, pattern])
    features = stem_features(available)
    result = imputer(features, available)

    full = (2, S, C, SIZE, SIZE, SIZE)
    assert result.features.shape == result.gate.shape == result.generated.shape == full
    assert torch.isfinite(result.features).all() and torch.isfinite(result.generated).all()
    assert torch.equal(result.imputed, ~available)
    assert torch.equal(result.features[available], features[available])  # bit-identical
    assert bool((result.gate >= 0).all() and (result.gate <= 1).all())
    assert bool((result.gate[available] == 1).all() and (result.generated[available] == 0).all())
    missing = ~available
    if missing.any():
        gated = result.gate[missing] * result.generated[missing]
        assert torch.allclose(result.features[missing], gated)
        assert result.features[missing].abs().mean() > 1e-3  # something was generated


@pytest.mark.parametrize("pattern", PATTERNS, ids=pattern_id)
def test_expert_fusion_every_pattern(fusion: ExpertFusion, pattern: tuple[bool, ...]) -> None:
    available = torch.tensor([pattern, pattern])
    fused, weights = fusion.forward_with_weights(stem_features(available), available)

    assert fused.shape == (2, C, SIZE, SIZE, SIZE) and torch.isfinite(fused).all()
    assert weights.shape == (2, S, SIZE, SIZE, SIZE)
    assert bool((weights[~available] == 0).all())
    assert bool((weights[available] > 0).all())
    assert torch.allclose(weights.sum(dim=1), torch.ones(2, SIZE, SIZE, SIZE))


def test_mixed_batch_equals_cases_one_by_one(imputer: CrossSequenceImputer, fusion: ExpertFusion) -> None:
    """Cases with different patterns in one batch do not influence each other."""
    available = torch.tensor(PATTERNS)  # (15, S): every pattern in one batch
    features = stem_features(available, seed=3)
    batch = imputer(features, available)
    fused = fusion(batch.features, torch.ones_like(available))
    for index in range(len(PATTERNS)):
        single = imputer(features[index : index + 1], available[index : index + 1])
        assert torch.allclose(batch.features[index], single.features[0], atol=1e-5)
        assert torch.allclose(batch.gate[index], single.gate[0], atol=1e-5)
        single_fused = fusion(single.features, torch.ones_like(available[index : index + 1]))
        assert torch.allclose(fused[index], single_fused[0], atol=1e-5)
    assert torch.isfinite(fused).all()


@pytest.mark.parametrize("heads", [1, 2])
def test_written_out_attention_equals_the_multihead_attention_module(heads: int) -> None:
    """CrossSequenceImputer._attend folds the per-target query into the key projection and
    projects the values after the weighted sum; for the missing targets it must give what
    nn.MultiheadAttention (whose weights it uses) gives, values and gradients, for every
    availability pattern."""
    torch.manual_seed(1)
    imputer = CrossSequenceImputer(channels=C, num_sequences=S, embed_dim=16, heads=heads)
    n = len(PATTERNS) * 5
    keys = torch.randn(n, S, 16, requires_grad=True)
    available = torch.tensor(PATTERNS).repeat(5, 1)
    query = imputer.query_norm(imputer.query).expand(n, -1, -1)
    reference, _ = imputer.attention(query, keys, keys, key_padding_mask=~available, need_weights=False)
    target = ~available
    reference = reference[target]
    ours = imputer._attend(keys, available, target)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)
    grad_ours = torch.autograd.grad(ours.square().sum(), [keys, imputer.attention.in_proj_weight])
    grad_reference = torch.autograd.grad(reference.square().sum(), [keys, imputer.attention.in_proj_weight])
    for a, b in zip(grad_ours, grad_reference):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_complete_batch_passes_through(imputer: CrossSequenceImputer) -> None:
    available = torch.ones(2, S, dtype=torch.bool)
    features = stem_features(available)
    result = imputer(features, available)
    assert torch.equal(result.features, features)
    assert bool((result.gate == 1).all() and (result.generated == 0).all() and not result.imputed.any())


def test_stored_values_of_missing_sequences_are_ignored(
    imputer: CrossSequenceImputer, fusion: ExpertFusion
) -> None:
    """NaN or huge garbage where a sequence is missing changes nothing (0 * NaN must not leak)."""
    available = torch.tensor([[True, False, True, False], [False, False, False, True]])
    features = stem_features(available)
    garbage = features.clone()
    garbage[0, 1] = float("nan")
    garbage[0, 3] = 1e6
    garbage[1, :3] = float("inf")
    clean, dirty = imputer(features, available), imputer(garbage, available)
    assert torch.isfinite(dirty.features).all()
    assert torch.allclose(clean.features, dirty.features)
    assert torch.allclose(fusion(features, available), fusion(garbage, available))


def test_generation_depends_on_available_features(imputer: CrossSequenceImputer) -> None:
    available = torch.tensor([[True, True, False, False]])
    features = stem_features(available)
    changed = features.clone()
    changed[0, 0] += 1.0  # shift T1 only
    before, after = imputer(features, available), imputer(changed, available)
    assert not torch.allclose(before.features[0, 2], after.features[0, 2], atol=1e-4)


def test_gradients_reach_imputer_and_available_features(imputer: CrossSequenceImputer) -> None:
    available = torch.tensor([[True, False, True, False], [True, True, True, True]])
    features = stem_features(available).requires_grad_(True)
    imputer(features, available).features.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in imputer.parameters())
    assert features.grad is not None and features.grad[0, 0].abs().sum() > 0


def test_invalid_inputs_raise(imputer: CrossSequenceImputer, fusion: ExpertFusion) -> None:
    available = torch.tensor([[True, False, False, False], [False, False, False, False]])
    features = stem_features(available)
    with pytest.raises(ValueError, match="positions \\[1\\]"):
        imputer(features, available)
    with pytest.raises(ValueError, match="no available MRI sequence"):
        fusion(features, available)
    with pytest.raises(ValueError, match="expects features"):
        imputer(features[:, :, :2], torch.ones(2, S, dtype=torch.bool))
    with pytest.raises(TypeError, match="bool"):
        imputer(features, torch.ones(2, S))
    with pytest.raises(ValueError, match="multiple of heads"):
        CrossSequenceImputer(channels=C, embed_dim=10, heads=4)


@pytest.mark.parametrize("mask_prob", [0.0, 0.5, 1.0])
def test_random_mask_keeps_and_hides_at_least_one(mask_prob: float) -> None:
    masked = random_sequence_mask(1000, S, mask_prob, torch.Generator().manual_seed(0))
    assert bool(masked.any(dim=1).all() and (~masked).any(dim=1).all())
    again = random_sequence_mask(1000, S, mask_prob, torch.Generator().manual_seed(0))
    assert torch.equal(masked, again)
    expected = {0.0: 1 / S, 0.5: 0.5, 1.0: 1 - 1 / S}[mask_prob]  # forced minimum of 1 / maximum of S-1
    assert abs(masked.float().mean().item() - expected) < 0.03


def test_random_mask_rejects_bad_probability() -> None:
    with pytest.raises(ValueError, match="mask_prob"):
        random_sequence_mask(2, S, 1.5)


def test_gaussian_kl_matches_closed_form() -> None:
    real = torch.tensor([-1.0, 1.0]).reshape(1, 1, 2)  # mean 0, variance 1
    generated = torch.tensor([-1.0, 3.0]).reshape(1, 1, 2)  # mean 1, variance 4
    floor = 1e-3
    var_r, var_g = 1.0 + floor, 4.0 + floor
    expected = 0.5 * math.log(var_g / var_r) + (var_r + 1.0) / (2 * var_g) - 0.5
    assert gaussian_kl(real, generated).item() == pytest.approx(expected, rel=1e-5)
    assert gaussian_kl(real, real).item() == pytest.approx(0.0, abs=1e-7)


def linear_sequence_features(n: int, generator: torch.Generator, mixing: torch.Tensor) -> torch.Tensor:
    """Complete cases whose sequence s is ``mixing[s] @ z`` of one latent z per voxel: any sequence
    determines every other one exactly, so the imputer can learn to reconstruct them."""
    latent = torch.randn(n, C, 5, 5, 5, generator=generator)
    return torch.einsum("sdc,bcxyz->bsdxyz", mixing, latent)


def test_pretraining_reduces_reconstruction_error() -> None:
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(1)
    mixing = torch.randn(S, C, C, generator=generator) / C**0.5
    train = linear_sequence_features(4, generator, mixing)
    held_out = linear_sequence_features(4, generator, mixing)
    complete = torch.ones(4, S, dtype=torch.bool)
    imputer = CrossSequenceImputer(channels=C, num_sequences=S)

    def held_out_mse() -> float:
        with torch.no_grad():
            masks = torch.Generator().manual_seed(5)  # the same hidden sequences every time
            _, stats = imputation_pretrain_loss(imputer, held_out, complete, generator=masks)
        return stats["mse"]

    before = held_out_mse()
    optimizer = torch.optim.Adam(imputer.parameters(), lr=2e-2)
    masks = torch.Generator().manual_seed(7)
    for _ in range(150):
        loss, stats = imputation_pretrain_loss(imputer, train, complete, generator=masks)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = held_out_mse()
    assert stats["n_complete"] == 4 and math.isfinite(stats["kl"]) and math.isfinite(stats["cycle"])
    assert after < 0.5 * before, (before, after)


def test_pretraining_without_complete_cases_is_a_clean_zero(imputer: CrossSequenceImputer) -> None:
    available = torch.tensor([[True, False, True, True], [True, True, True, False]])
    loss, stats = imputation_pretrain_loss(imputer, stem_features(available), available)
    loss.backward()  # must not raise
    assert loss.item() == 0.0 and stats == {"n_complete": 0}
    assert all(p.grad is None for p in imputer.parameters())


def test_pretraining_uses_only_complete_cases_and_detaches_features(imputer: CrossSequenceImputer) -> None:
    available = torch.tensor([[True, True, True, True], [True, False, True, True]])
    features = stem_features(available).requires_grad_(True)
    loss, stats = imputation_pretrain_loss(
        imputer, features, available, generator=torch.Generator().manual_seed(0)
    )
    alone, _ = imputation_pretrain_loss(
        imputer, features[:1], available[:1], generator=torch.Generator().manual_seed(0)
    )
    assert stats["n_complete"] == 1 and 1 <= stats["n_masked"] <= S - 1
    assert loss.item() == pytest.approx(alone.item(), rel=1e-6)
    assert loss.item() == pytest.approx(stats["mse"] + 0.1 * stats["kl"] + 0.5 * stats["cycle"], rel=1e-5)
    loss.backward()
    assert features.grad is None  # targets and inputs are detached: the stems are not trained here
    assert all(p.grad is not None for p in imputer.parameters())


def test_freeze_module_keeps_parameters_through_optimizer_steps(imputer: CrossSequenceImputer) -> None:
    head = torch.nn.Linear(C, 1)
    optimizer = torch.optim.AdamW([*imputer.parameters(), *head.parameters()], lr=1e-2, weight_decay=0.1)
    available = torch.tensor([[True, False, True, False]])
    features = stem_features(available)

    def step() -> None:
        out = imputer(features, available).features.mean(dim=(3, 4, 5))  # (1, S, C)
        head(out).square().mean().backward()
        optimizer.step()

    step()  # unfrozen: builds optimizer state and leaves gradients behind
    freeze_module(imputer)
    frozen = {name: p.detach().clone() for name, p in imputer.named_parameters()}
    head_before = head.weight.detach().clone()
    step()  # the loss still involves the imputer, and its stale gradients were never zeroed
    assert all(torch.equal(p, frozen[name]) for name, p in imputer.named_parameters())
    assert not any(p.requires_grad for p in imputer.parameters())
    assert not torch.equal(head.weight, head_before)
    unfreeze_module(imputer)
    assert all(p.requires_grad for p in imputer.parameters())


def test_parameter_prefix_names_the_imputer_group() -> None:
    assert imputation_parameters_prefix.rstrip(".") in PARAM_GROUPS
