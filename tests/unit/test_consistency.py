"""Stage-2 consistency regularisation: EMA teacher, persistence, augmentation, CutMix, feature
dropout, and the regulariser plugged into LocalTrainer."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from client.consistency import (
    ComplementaryDropout,
    ConsistencyRegularizer,
    EMATeacher,
    StrongAugment,
    WeakAugment,
    bottleneck_module,
    consistency_terms,
    draw_cutmix,
    load_teacher,
    save_teacher,
)
from client.state import RoundTag
from client.training import LocalTrainer
from common.config import ConfigError, compose, replace
from common.contract import TASKS, UNKNOWN_LABEL
from common.model import build_model

SIZE = 16


def small_net(width: int = 3) -> nn.Module:
    """Parameters and buffers (BatchNorm running statistics), to check both update rules."""
    return nn.Sequential(nn.Linear(2, width), nn.BatchNorm1d(width))


def test_ema_update_matches_hand_computation() -> None:
    student = small_net()
    teacher = EMATeacher(student, decay=0.9)
    before = {k: v.clone() for k, v in teacher.model.state_dict().items()}
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    student.train()(torch.randn(8, 2))  # moves the BatchNorm running statistics

    teacher.update(student)

    t_state, s_state = teacher.model.state_dict(), student.state_dict()
    for name, _ in student.named_parameters():
        expected = 0.9 * before[name] + 0.1 * s_state[name]
        torch.testing.assert_close(t_state[name], expected)
        assert not torch.equal(t_state[name], s_state[name])
    for name, _ in student.named_buffers():
        torch.testing.assert_close(t_state[name], s_state[name])  # buffers are copied
    assert not any(p.requires_grad for p in teacher.model.parameters())
    with pytest.raises(ValueError, match="ssl.ema_decay"):
        EMATeacher(student, decay=1.0)


def test_teacher_is_restored_only_for_a_later_round_of_the_same_run(tmp_path: Path) -> None:
    path = tmp_path / "state" / "ema_teacher.pt"
    student = small_net()
    teacher = EMATeacher(student, decay=0.5)
    with torch.no_grad():
        for p in teacher.model.parameters():
            p.fill_(7.0)
    save_teacher(teacher, path, RoundTag("run", 3))
    global_model = small_net()

    restored, ok = load_teacher(global_model, path, 0.5, RoundTag("run", 4))
    assert ok and all(torch.all(p == 7.0) for p in restored.model.parameters())
    for tag in (RoundTag("run", 3), RoundTag("other-run", 9)):  # same round again; another run
        fresh, ok = load_teacher(global_model, path, 0.5, tag)
        assert not ok
        torch.testing.assert_close(fresh.model.state_dict(), global_model.state_dict())
    # A changed model shape re-initialises from the global model instead of failing.
    wider = small_net(width=5)
    fresh, ok = load_teacher(wider, path, 0.5, RoundTag("run", 4))
    assert not ok and fresh.model[0].out_features == 5

    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"ema_teacher\.pt.*Delete the file"):
        load_teacher(global_model, path, 0.5, RoundTag("run", 4))


def test_cutmix_mixes_teacher_targets_exactly_like_the_images() -> None:
    batch, spatial = 4, (8, 8, 8)
    rng = np.random.default_rng(0)
    boxes = draw_cutmix(batch, spatial, alpha=1.0, rng=rng, device=torch.device("cpu"))
    # Case b is the constant b, so the mixed mean of case b tells how much came from perm[b].
    image = torch.arange(batch, dtype=torch.float32)[:, None, None, None, None].expand(batch, 2, *spatial)
    mixed = boxes.mix(image)
    fraction = boxes.fraction
    perm = boxes.perm
    assert float(fraction.max()) > 0.0 and float(fraction.max()) <= 1.0
    expected = (1 - fraction) * torch.arange(batch) + fraction * perm.float()
    torch.testing.assert_close(mixed.mean(dim=(1, 2, 3, 4)), expected)
    # Per-case targets are mixed by the pasted volume: one-hot "which case" vectors say so.
    onehot = torch.eye(batch)
    mixed_onehot = boxes.mix_vectors(onehot)
    torch.testing.assert_close(mixed_onehot.sum(1), torch.ones(batch))
    for b in range(batch):
        if perm[b] != b:
            assert float(mixed_onehot[b, perm[b]]) == pytest.approx(float(fraction[b]))
    # Voxel-wise targets (segmentation probabilities) follow the same boxes as the image.
    seg = torch.softmax(torch.randn(batch, 4, *spatial), dim=1)
    mask = boxes.mask
    torch.testing.assert_close(boxes.mix(seg), seg * (1 - mask) + seg[perm] * mask)
    # A sequence stays available only where both mixed cases have it.
    available = torch.tensor([[1, 1, 1, 1], [1, 0, 1, 1], [1, 1, 0, 1], [0, 1, 1, 1]], dtype=torch.bool)
    mixed_available = boxes.mix_available(available)
    for b in range(batch):
        both = available[b] & available[perm[b]] if fraction[b] > 0 else available[b]
        assert torch.equal(mixed_available[b], both)


def test_augmentations_change_intensities_and_keep_missing_sequences_zero() -> None:
    image = torch.randn(2, 4, SIZE, SIZE, SIZE)
    available = torch.tensor([[1, 0, 1, 1], [1, 1, 1, 0]], dtype=torch.bool)
    image = image * available[:, :, None, None, None]
    for augment in (WeakAugment(seed=0), StrongAugment(seed=0)):
        out = augment(image, available)
        assert out.shape == image.shape and type(out) is torch.Tensor
        assert torch.all(out[0, 1] == 0) and torch.all(out[1, 3] == 0)
        assert not torch.allclose(out[available], image[available])
    strong = StrongAugment(seed=3)(image, available)
    again = StrongAugment(seed=3)(image, available)
    torch.testing.assert_close(strong, again)  # seeded: a round is reproducible


class _Bottleneck(nn.Module):
    """The minimal shape ComplementaryDropout needs: ``encoder.feature_dropout``."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Module()
        self.encoder.feature_dropout = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder.feature_dropout(x)


def test_complementary_dropout_splits_channels_into_two_complementary_halves() -> None:
    model = _Bottleneck()
    x = torch.rand(3, 32, 2, 2, 2) + 0.5  # strictly positive: zero means dropped
    dropout = ComplementaryDropout(model, torch.Generator().manual_seed(0))
    with dropout.stream(0):
        first = model(x)
    with dropout.stream(1):
        second = model(x)
    torch.testing.assert_close(first + second, 2 * x)
    assert torch.all((first == 0) | (second == 0))
    kept = (first != 0).flatten(2).all(2)  # (B, C): a whole channel is kept or dropped
    assert torch.equal(kept, (first != 0).flatten(2).any(2))
    assert 0 < int(kept.sum()) < kept.numel() and not torch.equal(kept[0], kept[1])
    torch.testing.assert_close(model(x), x)  # the hook is gone after the stream
    with pytest.raises(ValueError, match="ssl.complementary_dropout=false"):
        bottleneck_module(nn.Linear(2, 2))


def _batches(n: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    labels = torch.full((2, len(TASKS)), UNKNOWN_LABEL)
    labels[0] = torch.tensor([0, 1, 0, 1])
    return [
        {
            "image": torch.randn(2, 4, SIZE, SIZE, SIZE, generator=g),
            "available": torch.tensor([[1, 1, 1, 1], [1, 0, 1, 1]], dtype=torch.bool),
            "seg": torch.randint(0, 4, (2, 1, SIZE, SIZE, SIZE), generator=g),
            "has_seg": torch.tensor([True, False]),
            "labels": labels.clone(),
            "index": torch.tensor([0, 1]),
        }
        for _ in range(n)
    ]


def test_regularizer_adds_a_loss_and_the_teacher_follows_each_optimizer_step() -> None:
    # random output layers: with the default zero start, teacher and student both say 0.5 for every
    # task before the first step and the classification term is exactly 0
    cfg = compose(["model=tiny", "data=tiny", "train.progress=false", "ssl.consistency=true",
                   "ssl.ema_decay=0.75", "train.threads=1", "model.classifier_head_init=random"])
    cfg = replace(cfg, data={"size": SIZE})
    model = build_model(cfg.model, SIZE)
    teacher = EMATeacher(model, cfg.ssl.ema_decay)
    regularizer = ConsistencyRegularizer(teacher, cfg.ssl, seed=0)
    trainer = LocalTrainer(model, cfg, torch.device("cpu"), np.full((2, len(TASKS)), UNKNOWN_LABEL))
    initial = copy.deepcopy(teacher.model.state_dict())

    result = trainer.run(_batches(1), extra_loss=regularizer, after_step=regularizer.after_step)

    for key in ("loss_consistency_seg", "loss_consistency_cls"):
        assert np.isfinite(result[key]) and result[key] > 0.0
    student = model.state_dict()
    changed = 0
    for name, _ in model.named_parameters():
        expected = 0.75 * initial[name] + 0.25 * student[name]
        torch.testing.assert_close(teacher.model.state_dict()[name], expected)
        changed += int(not torch.equal(initial[name], student[name]))
    assert changed > 0  # the step did move the student, so the check above is not trivial
    with pytest.raises(ValueError, match="stage='supervised' only"):
        trainer.run(_batches(1), stage="pretrain_imputer", extra_loss=regularizer)


def test_shared_view_uses_the_supervised_pass_as_the_student_and_runs_the_model_once_per_step() -> None:
    overrides = ["model=tiny", "data=tiny", "train.progress=false", "ssl.consistency=true", "train.threads=1",
                 "ssl.cutmix_alpha=0", "ssl.complementary_dropout=false"]
    calls = {}
    for view in ("strong", "shared"):
        cfg = replace(compose([*overrides, f"ssl.consistency_view={view}"]), data={"size": SIZE})
        model = build_model(cfg.model, SIZE)
        regularizer = ConsistencyRegularizer(EMATeacher(model, cfg.ssl.ema_decay), cfg.ssl, seed=0)
        trainer = LocalTrainer(model, cfg, torch.device("cpu"), np.full((2, len(TASKS)), UNKNOWN_LABEL))
        count = [0]
        hook = model.register_forward_hook(lambda *_: count.__setitem__(0, count[0] + 1))
        result = trainer.run(_batches(2), extra_loss=regularizer, after_step=regularizer.after_step)
        hook.remove()
        calls[view] = count[0]
        assert np.isfinite(result["loss_consistency_seg"]) and result["loss_consistency_seg"] > 0.0

    # the grad-share probe runs on the first step only and does not call the model
    assert calls == {"strong": 4, "shared": 2}

    # the shared view's terms are exactly those of the output it is handed against the teacher
    cfg = replace(compose([*overrides, "ssl.consistency_view=shared"]), data={"size": SIZE})
    model = build_model(cfg.model, SIZE)
    batch = _batches(1)[0]
    output = model(batch["image"], batch["available"])
    teacher = EMATeacher(model, cfg.ssl.ema_decay)
    loss, terms = ConsistencyRegularizer(teacher, cfg.ssl, seed=5)(model, batch, output)
    seg_target, cls_target = ConsistencyRegularizer(teacher, cfg.ssl, seed=5).teacher_targets(
        batch["image"].float(), batch["available"])
    seg, cls = consistency_terms(output, seg_target, cls_target)
    torch.testing.assert_close(terms["consistency_seg"], seg.detach())
    torch.testing.assert_close(loss, cfg.ssl.consistency_weight * (seg + cls))


def test_shared_view_with_cutmix_or_two_streams_is_refused_with_the_fix() -> None:
    for extra in (["ssl.complementary_dropout=false"], ["ssl.cutmix_alpha=0"]):
        with pytest.raises(ConfigError, match="ssl.cutmix_alpha=0 and ssl.complementary_dropout=false"):
            compose(["ssl.consistency_view=shared", *extra])
    with pytest.raises(ConfigError, match="consistency_view"):
        compose(["ssl.consistency_view=twice"])
