"""Tumor-aware classification: region pooling, descriptors of the predicted segmentation, the
whole-volume option, the gradient balance, and that the heads learn a tumor-size label."""

from __future__ import annotations

import math

import pytest
import torch
from sklearn.metrics import roc_auc_score

from common.config import compose, replace
from common.contract import ED, ET, NCR, TASKS
from common.model import build_model
from common.model.classifier import (
    DESCRIPTORS,
    GlobalPoolClassifier,
    TumorAwareClassifier,
    region_pool,
    region_probabilities,
    scale_gradient,
    tumor_descriptors,
)


def one_hot_logits(seg: torch.Tensor, scale: float = 30.0) -> torch.Tensor:
    """Segmentation logits (B, 4, N, N, N) that put all the probability on ``seg`` (B, N, N, N)."""
    return torch.nn.functional.one_hot(seg.long(), 4).permute(0, 4, 1, 2, 3).float() * scale


def test_descriptors_measure_volumes_in_ml_fractions_and_location() -> None:
    n = 16
    seg = torch.zeros(1, n, n, n, dtype=torch.long)
    seg[0, 10:14, 6:10, 6:10] = ED  # 64 voxels of edema in the right (+x) half
    seg[0, 11:13, 7:9, 7:9] = ET  # 8 voxels of enhancing tumor inside it
    seg[0, 11, 7, 7] = NCR  # 1 necrotic voxel
    logits = one_hot_logits(seg)
    spacing = torch.tensor([[2.0, 2.0, 2.0]])  # 8 mm^3 per voxel
    d = dict(zip(DESCRIPTORS, tumor_descriptors(region_probabilities(logits), None, spacing)[0].tolist()))
    assert math.expm1(d["log_ml_wt"]) == pytest.approx(64 * 8 / 1000, rel=1e-3)
    assert math.expm1(d["log_ml_tc"]) == pytest.approx(8 * 8 / 1000, rel=1e-3)
    assert math.expm1(d["log_ml_et"]) == pytest.approx(7 * 8 / 1000, rel=1e-3)
    assert d["frac_et_tc"] == pytest.approx(7 / 8, rel=1e-3) and d["frac_ncr_tc"] == pytest.approx(1 / 8, rel=1e-3)
    assert d["frac_tc_wt"] == pytest.approx(8 / 64, rel=1e-3)
    assert d["centroid_x"] > 0.4 and abs(d["centroid_y"]) < 0.3 and abs(d["centroid_z"]) < 0.3
    assert 0 < d["extent"] < 0.3


def test_location_is_relative_to_the_brain_box() -> None:
    n = 16
    seg = torch.zeros(1, n, n, n, dtype=torch.long)
    seg[0, 6:8, 6:10, 6:10] = ED  # left of the grid centre ...
    brain = torch.zeros(1, n, n, n, dtype=torch.bool)
    brain[0, 0:8] = True  # ... but in the right half of a brain that fills the left of the grid
    logits = one_hot_logits(seg)
    grid_only = tumor_descriptors(region_probabilities(logits), None, None)[0, DESCRIPTORS.index("centroid_x")]
    in_brain = tumor_descriptors(region_probabilities(logits), brain, None)[0, DESCRIPTORS.index("centroid_x")]
    assert grid_only < 0 < in_brain


def test_region_pooling_reads_features_inside_the_tumor() -> None:
    n = 8
    seg = torch.zeros(1, n, n, n, dtype=torch.long)
    seg[0, 2:6, 2:6, 2:6] = ED
    features = torch.zeros(1, 1, n, n, n)
    features[0, 0, 2:6, 2:6, 2:6] = 5.0
    pooled = region_pool(features, region_probabilities(one_hot_logits(seg)))  # WT, TC, ET, whole
    assert pooled[0, 0] == pytest.approx(5.0, rel=1e-3)
    assert pooled[0, 3] == pytest.approx(5.0 * 64 / 512, rel=1e-3)


@pytest.mark.parametrize("pooling", ["tumor", "global"])
def test_both_classifiers_are_selectable_and_give_two_logits_per_task(pooling: str) -> None:
    cfg = compose([f"model.classifier_pooling={pooling}"])
    model = build_model(cfg.model, cfg.data.size, seed=0)
    kind = TumorAwareClassifier if pooling == "tumor" else GlobalPoolClassifier
    assert isinstance(model.classifier, kind)
    image = torch.randn(2, 4, 32, 32, 32)
    out = model(image, torch.ones(2, 4, dtype=torch.bool), torch.ones(2, 3))
    assert set(out.cls_logits) == set(TASKS) and all(v.shape == (2, 2) for v in out.cls_logits.values())


def test_unknown_pooling_fails_with_a_suggestion() -> None:
    with pytest.raises(Exception, match="did you mean 'tumor'"):
        compose(["model.classifier_pooling=tumour"])


def test_classification_does_not_reshape_the_segmentation() -> None:
    cfg = compose()
    model = build_model(cfg.model, cfg.data.size, seed=0)
    out = model(torch.randn(1, 4, 32, 32, 32), torch.ones(1, 4, dtype=torch.bool))
    out.cls_logits["idh"].sum().backward()
    assert all(p.grad is None or not p.grad.any() for p in model.decoder.parameters())


def test_scale_gradient_is_identity_forward_and_scales_backward() -> None:
    x = torch.ones(3, requires_grad=True)
    y = scale_gradient(x, 0.25)
    assert torch.equal(y, x.detach())
    y.sum().backward()
    assert torch.allclose(x.grad, torch.full((3,), 0.25))


@pytest.mark.parametrize("crop", [0, 16], ids=["whole-brain", "tumor-crop"])
def test_tiny_network_learns_a_tumor_size_label_in_a_few_dozen_steps(crop: int) -> None:
    """Label = large tumor: the tumor-aware heads separate it within 40 steps on 16 cases, also
    through the tumor-protect crop (trained on the reference tumor's crop, scored on the predicted one)."""
    from client.training import LocalTrainer

    gen = torch.Generator().manual_seed(0)
    n, cases = 32, 16
    grid = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float32)] * 3, indexing="ij"))
    images, segs, labels = [], [], []
    for i in range(cases):
        big = i % 2
        radius = (7.0 if big else 3.5) + float(torch.rand((), generator=gen))
        centre = 16 + 4 * (torch.rand(3, generator=gen) - 0.5)
        r = ((grid - centre[:, None, None, None]) ** 2).sum(0).sqrt()
        brain = (((grid - 15.5) / 13.0) ** 2).sum(0) <= 1
        seg = torch.zeros(n, n, n, dtype=torch.long)
        seg[(r <= radius) & brain] = ED
        seg[(r <= radius * 0.5) & brain] = ET
        image = torch.where(brain, 1.0, 0.0).expand(4, n, n, n).clone()
        image += 2.0 * (seg > 0).float() + 0.3 * torch.randn(4, n, n, n, generator=gen) * brain
        images.append(image)
        segs.append(seg[None])
        labels.append([big, -1, big, -1])
    labels_t = torch.tensor(labels)
    batches = [
        {"image": torch.stack(images[j:j + 4]), "available": torch.ones(4, 4, dtype=torch.bool),
         "seg": torch.stack(segs[j:j + 4]), "has_seg": torch.ones(4, dtype=torch.bool),
         "labels": labels_t[j:j + 4], "spacing": torch.ones(4, 3)}
        for j in range(0, cases, 4)
    ]
    cfg = replace(compose(["train.threads=1", f"model.tumor_crop_size={crop}"]), train={"lr": 0.003, "progress": False, "amp": False})
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.data.size, seed=0)
    trainer = LocalTrainer(model, cfg, torch.device("cpu"), labels_t.numpy())
    result = trainer.run(batches, epochs=10)  # 40 steps
    assert result["steps"] == 40
    model.eval()
    with torch.no_grad():
        logits = torch.cat([model(b["image"], b["available"], b["spacing"]).cls_logits["idh"] for b in batches])
    z = (logits[:, 1] - logits[:, 0]).numpy()
    assert roc_auc_score(labels_t[:, 0].numpy(), z) >= 0.9
    # the shares of the gradient into the shared encoder were measured and add up
    shares = [result.metrics[f"grad_share_{t}"] for t in ("seg", *TASKS)]
    assert sum(shares) == pytest.approx(1.0) and result.metrics["grad_share_1p19q"] == 0.0


def test_the_classifier_gets_its_own_learning_rate() -> None:
    """train.head_lr_scale multiplies the learning rate of every ``classifier.*`` parameter only."""
    from client.training import build_optimizer

    cfg = compose(["+experiment=tiny", "train.head_lr_scale=10"])
    model = build_model(cfg.model, cfg.data.size, seed=0)
    optimizer = build_optimizer(model, cfg, lr=1e-3)
    body, head = optimizer.param_groups
    assert body["lr"] == pytest.approx(1e-3) and head["lr"] == pytest.approx(1e-2)
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)].split(".")[0] for p in head["params"]} == {"classifier"}
    assert all(not names[id(p)].startswith("classifier.") for p in body["params"])
    assert len(body["params"]) + len(head["params"]) == sum(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="head_lr_scale"):
        compose(["train.head_lr_scale=0"])


def test_training_can_read_the_reference_tumor_regions_instead_of_the_predicted() -> None:
    """train.cls_reference_regions: the classifier's regions come from the reference label map for
    the cases that have one (a case without keeps the predicted ones); the segmentation is unchanged."""
    from common.model.network import classifier_regions

    # random output layers: zero ones (the default) give logit 0 whatever regions they read
    cfg = compose(["+experiment=tiny", "model.dropout=0", "model.feature_dropout=0", "model.classifier_head_init=random"])
    model = build_model(cfg.model, cfg.data.size, seed=0).eval()
    n = cfg.data.size
    image = torch.randn(2, 4, n, n, n)
    available = torch.ones(2, 4, dtype=torch.bool)
    seg = torch.zeros(2, 1, n, n, n, dtype=torch.long)
    seg[:, :, 8:16, 8:16, 8:16] = ED
    seg[:, :, 10:14, 10:14, 10:14] = ET
    with torch.no_grad():
        plain = model(image, available)
        taught = model(image, available, reference=(seg, torch.tensor([True, False])))
        regions = region_probabilities(classifier_regions(plain.seg_logits, seg, torch.tensor([True, False])))
    assert torch.equal(plain.seg_logits, taught.seg_logits)
    assert regions[0, 0].sum() == pytest.approx(8 ** 3, rel=1e-4)  # WT of the reference: 8^3 voxels
    assert regions[0, 2].sum() == pytest.approx(4 ** 3, rel=1e-4)  # ET: 4^3
    for task in TASKS:  # the case with a reference reads other regions; the case without does not
        assert not torch.allclose(plain.cls_logits[task][0], taught.cls_logits[task][0])
        assert torch.equal(plain.cls_logits[task][1], taught.cls_logits[task][1])


def test_the_heads_start_at_logit_zero_so_the_start_ranks_no_case() -> None:
    """model.classifier_head_init=zero: every case starts at logit 0 and risk 0; the first step moves
    the output layers; "random" (the ablation) starts with a ranking of its own."""
    from client.training import LocalTrainer

    image = torch.randn(3, 4, 32, 32, 32)
    available, spacing = torch.ones(3, 4, dtype=torch.bool), torch.ones(3, 3)
    for init in ("zero", "random"):
        cfg = compose([f"model.classifier_head_init={init}", "train.threads=1"])
        model = build_model(cfg.model, cfg.data.size, seed=0).eval()
        with torch.no_grad():
            out = model(image, available, spacing)
        logits = torch.stack([out.cls_logits[t] for t in TASKS])
        if init == "zero":
            assert torch.equal(logits, torch.zeros_like(logits)) and torch.equal(out.risk, torch.zeros(3))
        else:
            assert logits.std() > 0.01 and out.risk.std() > 0.0
    cfg = replace(compose(["train.threads=1"]), train={"progress": False, "amp": False})
    model = build_model(cfg.model, cfg.data.size, seed=0)
    labels = torch.tensor([[0, 1, 0, 1], [1, 0, 1, 0]])
    batch = {"image": image[:2], "available": available[:2], "spacing": spacing[:2], "labels": labels,
             "seg": torch.zeros(2, 1, 32, 32, 32, dtype=torch.long), "has_seg": torch.ones(2, dtype=torch.bool)}
    LocalTrainer(model, cfg, torch.device("cpu"), labels.numpy()).run([batch], epochs=1)
    assert all(layer.weight.abs().sum() > 0 for layer in model.classifier.output_layers()[:len(TASKS)])
