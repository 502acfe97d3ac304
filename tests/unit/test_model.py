"""The multi-task network (common.model) and sequence fusion (common.model.fusion)."""

from __future__ import annotations

import itertools
from dataclasses import replace
from typing import Iterator

import pytest
import torch

from common.config import ModelConfig, compose
from common.contract import PARAM_GROUPS, SEQUENCES, TASKS
from common.evaluation.uncertainty import mc_dropout
from common.model import GliomaOutput, MultiTaskGliomaNet, build_model
from common.model.fusion import Fusion, WeightedFusion, build_fusion
from common.wire import group_of

SIZE = 16
SUBSETS = [s for r in range(1, 5) for s in itertools.combinations(range(len(SEQUENCES)), r)]


@pytest.fixture(scope="module", autouse=True)
def single_thread() -> Iterator[None]:
    """Tiny volumes: intra-op threading only adds overhead (and stalls badly on a busy machine)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def tiny_cfg() -> ModelConfig:
    return compose(["model=tiny"]).model


@pytest.fixture(scope="module")
def model(tiny_cfg: ModelConfig) -> MultiTaskGliomaNet:
    torch.manual_seed(0)
    return build_model(tiny_cfg, SIZE).eval()


def _mask(*subsets: tuple[int, ...]) -> torch.Tensor:
    available = torch.zeros(len(subsets), len(SEQUENCES), dtype=torch.bool)
    for row, subset in enumerate(subsets):
        available[row, list(subset)] = True
    return available


def _image(batch: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, len(SEQUENCES), SIZE, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def test_subsets_cover_all_fifteen_combinations() -> None:
    assert len(SUBSETS) == 15 and len(set(SUBSETS)) == 15


@pytest.mark.parametrize("subset", SUBSETS, ids=lambda s: "+".join(SEQUENCES[i] for i in s))
def test_output_shapes_for_every_availability_subset(model: MultiTaskGliomaNet, subset: tuple[int, ...]) -> None:
    available = _mask(subset, subset)
    image = _image(2) * available[:, :, None, None, None]

    with torch.no_grad():
        out = model(image, available)

    assert isinstance(out, GliomaOutput)
    assert out.seg_logits.shape == (2, 4, SIZE, SIZE, SIZE)
    assert set(out.cls_logits) == set(TASKS)
    assert all(v.shape == (2, 2) for v in out.cls_logits.values())
    assert torch.isfinite(out.seg_logits).all()
    assert all(torch.isfinite(v).all() for v in out.cls_logits.values())


def test_mixed_availability_batch_matches_cases_run_alone(model: MultiTaskGliomaNet) -> None:
    available = _mask((0, 1, 2, 3), (3,), (1, 2))
    image = _image(3, seed=1)

    with torch.no_grad():
        together = model(image, available)
        alone = [model(image[i : i + 1], available[i : i + 1]) for i in range(3)]

    for i, single in enumerate(alone):
        torch.testing.assert_close(together.seg_logits[i : i + 1], single.seg_logits, rtol=1e-4, atol=1e-4)
        for task in TASKS:
            torch.testing.assert_close(together.cls_logits[task][i : i + 1], single.cls_logits[task], rtol=1e-4, atol=1e-4)


def test_missing_sequence_content_is_ignored(model: MultiTaskGliomaNet) -> None:
    available = _mask((0, 2), (1, 3))
    image = _image(2, seed=2)
    noisy = image.clone()
    noisy[~available] = 1000.0 * torch.randn_like(noisy[~available])

    with torch.no_grad():
        features = model.encode_sequences(noisy, available)
        a, b = model(image, available), model(noisy, available)

    assert features.shape == (2, 4, model.stem_channels, SIZE, SIZE, SIZE)
    assert torch.count_nonzero(features[~available]) == 0
    assert torch.count_nonzero(features[available]) > 0
    torch.testing.assert_close(a.seg_logits, b.seg_logits)


def test_forward_equals_stems_then_forward_from_sequence_features(model: MultiTaskGliomaNet) -> None:
    available = _mask((0, 1, 3), (2,))
    image = _image(2, seed=3)

    with torch.no_grad():
        direct = model(image, available)
        staged = model.forward_from_sequence_features(model.encode_sequences(image, available), available)

    torch.testing.assert_close(direct.seg_logits, staged.seg_logits)
    torch.testing.assert_close(direct.cls_logits["idh"], staged.cls_logits["idh"])


def test_parameter_names_follow_param_groups(model: MultiTaskGliomaNet) -> None:
    names = [n for n, _ in model.named_parameters()]
    groups = model.param_groups()

    assert all(n.split(".", 1)[0] in PARAM_GROUPS for n in names)
    assert set(groups) == set(PARAM_GROUPS) - {"imputer"}
    assert sorted(n for g in groups.values() for n in g) == sorted(names)
    assert not hasattr(model, "imputer")
    assert len(model.stems) == len(SEQUENCES)
    assert all(any(n.startswith(f"classifier.heads.{t}.") for n in names) for t in TASKS)
    assert model.task_weighting.names == ("seg", *TASKS, "survival")
    assert any(n.startswith("classifier.survival.") for n in names)  # federated with the classifier


def test_mc_dropout_samples_differ_while_eval_is_deterministic(tiny_cfg: ModelConfig) -> None:
    torch.manual_seed(0)
    # random output layers: zero ones (the default) give logit 0 under any dropout mask
    net = build_model(replace(tiny_cfg, classifier_head_init="random"), SIZE).eval()
    available = _mask((0, 1, 2, 3), (1,))
    image = _image(2, seed=4)

    with torch.no_grad():
        first, second = net(image, available), net(image, available)
        with mc_dropout(net):
            mc1, mc2 = net(image, available), net(image, available)
        after = net(image, available)

    torch.testing.assert_close(first.cls_logits["idh"], second.cls_logits["idh"], rtol=0, atol=0)
    assert not torch.allclose(mc1.cls_logits["idh"], mc2.cls_logits["idh"])
    # Dropout sits in the classifier only: the segmentation is unaffected by MC-dropout.
    torch.testing.assert_close(mc1.seg_logits, first.seg_logits)
    torch.testing.assert_close(after.cls_logits["idh"], first.cls_logits["idh"], rtol=0, atol=0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"img_size": 20}, "multiple of 8"),
        ({"img_size": 8}, "at least 16"),
        ({"img_size": 16, "d_model": 30, "heads": 4}, "divisible by heads"),
        ({"img_size": 16, "fusion": "weigted"}, "did you mean 'weighted'"),
        ({"img_size": 16, "tasks": ("idhh",)}, "did you mean 'idh'"),
        ({"img_size": 16, "dropout": 1.0}, "dropout=1.0"),
        ({"img_size": 16, "stem_channels": 0}, "stem_channels=0"),
    ],
)
def test_invalid_constructor_arguments_raise(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MultiTaskGliomaNet(**kwargs)


def test_bad_inputs_raise_actionable_errors(model: MultiTaskGliomaNet, tiny_cfg: ModelConfig) -> None:
    with pytest.raises(ValueError, match="data.size=16"):
        model(torch.zeros(1, 4, 24, 24, 24), _mask((0,)))
    with pytest.raises(ValueError, match="no available MRI sequence"):
        model(_image(2), _mask((0,), ()))


@pytest.mark.parametrize("survival", [True, False])
def test_survival_head_gives_one_risk_per_case_or_none(tiny_cfg: ModelConfig, survival: bool) -> None:
    net = build_model(ModelConfig(**{**tiny_cfg.__dict__, "survival_head": survival}), SIZE, seed=0)
    out = net(_image(2), _mask((0, 1, 2, 3), (1,)))
    names = [n for n, _ in net.named_parameters()]
    if survival:
        assert out.risk.shape == (2,) and torch.isfinite(out.risk).all()
        # its own wire group, averaged by the cases with a known survival (server.strategy.heads)
        assert {group_of(n) for n in names if ".survival." in n} == {"classifier.heads.survival"}
    else:
        assert out.risk is None and not any(".survival." in n for n in names)
        assert "survival" not in net.task_weighting.names


def test_every_parameter_group_gets_gradient(tiny_cfg: ModelConfig) -> None:
    torch.manual_seed(0)
    # random output layers: zero ones (the default) pass no gradient behind them before a first step
    net = build_model(replace(tiny_cfg, classifier_head_init="random"), SIZE).train()
    available = _mask((0, 1), (2, 3))
    out = net(_image(2, seed=5), available)

    (out.seg_logits.square().mean() + sum(v.square().mean() for v in out.cls_logits.values())
     + out.risk.square().mean()).backward()

    for group in ("stems", "fusion", "encoder", "decoder", "classifier"):
        grads = [p.grad for n, p in net.named_parameters() if n.startswith(f"{group}.")]
        assert all(g is not None for g in grads), group
        assert any(g.abs().sum() > 0 for g in grads), group


# ----------------------------------------------------------------- fusion
def test_weighted_fusion_renormalises_over_available_sequences() -> None:
    fusion = WeightedFusion(num_sequences=4)
    with torch.no_grad():
        fusion.logits.copy_(torch.tensor([0.0, 1.0, 2.0, 3.0]))
    available = _mask((0, 1, 2, 3), (1, 3), (2,))

    weights = fusion.weights(available)

    torch.testing.assert_close(weights.sum(dim=1), torch.ones(3))
    assert torch.all(weights[~available] == 0)
    e1, e3 = torch.exp(torch.tensor(1.0)), torch.exp(torch.tensor(3.0))
    torch.testing.assert_close(weights[1, [1, 3]], torch.stack([e1, e3]) / (e1 + e3))
    torch.testing.assert_close(weights[2], torch.tensor([0.0, 0.0, 1.0, 0.0]))


def test_weighted_fusion_output_is_weighted_mean_of_available_features() -> None:
    fusion = WeightedFusion(num_sequences=4)
    features = torch.stack([torch.full((2, 3, 3, 3), float(v)) for v in (1, 2, 4, 8)])[None]  # (1, 4, 2, 3, 3, 3)
    features[0, 0] = 1e6  # a missing sequence's (finite) content must not leak
    available = _mask((1, 3))

    fused = fusion(features, available)

    assert isinstance(fusion, Fusion)
    assert fused.shape == (1, 2, 3, 3, 3)
    torch.testing.assert_close(fused, torch.full((1, 2, 3, 3, 3), 5.0))  # equal weights: (2 + 8) / 2


def test_build_fusion_kinds() -> None:
    assert isinstance(build_fusion("weighted", channels=4), WeightedFusion)
    with pytest.raises(ValueError, match="did you mean 'experts'"):
        build_fusion("expert", channels=4)


def test_expert_fusion_plugs_in(tiny_cfg: ModelConfig) -> None:
    pytest.importorskip("common.model.expert_fusion")
    cfg = ModelConfig(**{**tiny_cfg.__dict__, "fusion": "experts"})
    net = build_model(cfg, SIZE).eval()
    available = _mask((0, 2), (1, 2, 3))

    with torch.no_grad():
        out = net(_image(2, seed=6), available)

    assert out.seg_logits.shape == (2, 4, SIZE, SIZE, SIZE)
    assert "fusion" in net.param_groups()


def test_imputer_plugs_in(tiny_cfg: ModelConfig) -> None:
    pytest.importorskip("common.model.imputation")
    cfg = ModelConfig(**{**tiny_cfg.__dict__, "imputation": True})
    net = build_model(cfg, SIZE).eval()
    available = _mask((0, 2), (3,))

    with torch.no_grad():
        out = net(_image(2, seed=7), available)

    assert out.seg_logits.shape == (2, 4, SIZE, SIZE, SIZE)
    assert "imputation_gate" in out.aux
    assert "imputer" in net.param_groups()
