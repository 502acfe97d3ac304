"""GMMAS's tumor-protect crop (common.model.tumor_crop, model.tumor_crop_size)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from common.config import ConfigError, compose
from common.model import tumor_crop
from common.model.classifier import DESCRIPTORS, tumor_descriptors
from common.model.network import build_model


def _blob(n: int, lo: tuple[int, int, int], hi: tuple[int, int, int]) -> torch.Tensor:
    mask = torch.zeros((1, n, n, n), dtype=torch.bool)
    mask[0, lo[0] : hi[0] + 1, lo[1] : hi[1] + 1, lo[2] : hi[2] + 1] = True
    return mask


def test_bounding_boxes_find_the_tumor_and_fall_back_to_the_whole_grid() -> None:
    mask = torch.cat([_blob(20, (3, 5, 7), (9, 6, 12)), torch.zeros((1, 20, 20, 20), dtype=torch.bool)])
    lo, hi, found = tumor_crop.bounding_boxes(mask)
    assert lo[0].tolist() == [3, 5, 7] and hi[0].tolist() == [9, 6, 12]
    assert found.tolist() == [True, False]
    assert lo[1].tolist() == [0, 0, 0] and hi[1].tolist() == [19, 19, 19]


def test_the_cube_always_holds_the_whole_tumor_and_jitter_moves_it() -> None:
    lo, hi = torch.tensor([[20, 30, 4]]), torch.tensor([[29, 37, 12]])
    start, side = tumor_crop.crop_cubes(lo, hi, 64, 16, 0.25, jitter=False)
    assert int(side) == 16  # extent 10 * 1.5 = 15, at least the network's 16
    assert ((start <= lo) & (start + side[:, None] - 1 >= hi)).all()
    assert (start >= 0).all() and (start + side[:, None] <= 64).all()
    torch.manual_seed(0)
    starts = set()
    for _ in range(50):
        s, c = tumor_crop.crop_cubes(lo, hi, 64, 16, 0.25, jitter=True)
        assert ((s <= lo) & (s + c[:, None] - 1 >= hi)).all(), "a jittered crop cut the tumor"
        assert (s >= 0).all() and (s + c[:, None] <= 64).all()
        starts.add(tuple(s[0].tolist()))
    assert len(starts) > 10
    # a tumor larger than the grid allows: the whole grid
    start, side = tumor_crop.crop_cubes(torch.tensor([[0, 0, 0]]), torch.tensor([[60, 10, 10]]), 64, 16, 0.25, jitter=True)
    assert int(side) == 64 and start.tolist() == [[0, 0, 0]]


def test_a_crop_keeps_the_descriptors_whole_brain_meaning() -> None:
    """Volumes in mL and the location in brain coordinates measured on a tumor crop (finer grid,
    framed in the brain) agree with the same tumor measured on the whole brain."""
    n, g = 48, 16
    brain = _blob(n, (4, 6, 2), (43, 41, 45))
    wt = _blob(n, (28, 10, 20), (37, 19, 27)).float()
    regions = torch.stack([wt, wt * 0.5, wt * 0.25], dim=1)  # (1, 3, n, n, n)
    spacing = torch.tensor([[1.5, 1.5, 1.5]])
    whole = tumor_descriptors(regions, brain, spacing)[0]
    lo, hi, _ = tumor_crop.bounding_boxes(wt > 0)
    start, side = tumor_crop.crop_cubes(lo, hi, n, g, 0.25, jitter=False)
    crop = tumor_crop.cut(regions, start, side, g)
    frame = tumor_crop.brain_frame(brain, start, side, g)
    framed = tumor_descriptors(crop, None, spacing * side[:, None] / g, frame)[0]
    for name in ("log_ml_wt", "log_ml_tc", "log_ml_et", "frac_et_tc"):
        assert framed[DESCRIPTORS.index(name)] == pytest.approx(float(whole[DESCRIPTORS.index(name)]), abs=0.02), name
    for name in ("centroid_x", "centroid_y", "centroid_z", "extent"):
        assert framed[DESCRIPTORS.index(name)] == pytest.approx(float(whole[DESCRIPTORS.index(name)]), abs=0.05), name
    assert float(whole[DESCRIPTORS.index("centroid_x")]) > 0.3  # the tumor is off-centre: the test can see a shift


def test_paste_mean_averages_inside_the_cube_only() -> None:
    full = torch.zeros((1, 2, 12, 12, 12))
    crops = torch.ones((1, 2, 4, 4, 4))
    out = tumor_crop.paste_mean(full, crops, torch.tensor([[2, 3, 4]]), torch.tensor([8]))
    inside = out[:, :, 2:10, 3:11, 4:12]
    assert torch.allclose(inside, torch.full_like(inside, 0.5))
    assert float(out.sum()) == pytest.approx(0.5 * 2 * 8**3)


def _net(crop: int = 16, size: int = 32):
    cfg = compose(["model=tiny", f"data.size={size}", f"model.tumor_crop_size={crop}", "model.classifier_head_init=random"])
    return build_model(cfg.model, size, seed=0)


def test_the_cropped_network_takes_the_fine_grid_and_returns_it() -> None:
    net = _net()
    assert net.grid_size == 16 and net.img_size == 32
    image = torch.randn(2, 4, 32, 32, 32)
    available = torch.tensor([[True, True, False, True], [True, True, True, True]])
    image[0, 2] = 0
    out = net.eval()(image, available, torch.ones(2, 3))
    assert out.seg_logits.shape == (2, 4, 32, 32, 32)
    assert all(z.shape == (2, 2) for z in out.cls_logits.values())
    with pytest.raises(ValueError, match="data.size=32"):
        net(torch.randn(1, 4, 16, 16, 16), torch.ones(1, 4, dtype=torch.bool))


def test_the_classifier_reads_the_tumor_crop_and_inference_uses_the_predicted_tumor() -> None:
    """Classification comes from pass 2 only (a change far from the crop does not reach it), the
    crop follows the reference tumor in training and the predicted one without a reference."""
    torch.manual_seed(0)
    net = _net().eval()
    image = torch.randn(1, 4, 32, 32, 32)
    available = torch.ones(1, 4, dtype=torch.bool)
    seg = torch.zeros(1, 1, 32, 32, 32, dtype=torch.long)
    seg[0, 0, 2:8, 3:9, 4:10] = 3
    has_seg = torch.tensor([True])
    calls: list[tuple] = []
    original = tumor_crop.crop_cubes

    def spy(lo, hi, *args, **kwargs):
        calls.append((lo.clone(), hi.clone(), kwargs["jitter"]))
        return original(lo, hi, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tumor_crop, "crop_cubes", spy)
        with torch.no_grad():
            net(image, available, crop_reference=(seg, has_seg))  # eval mode: the reference box, centred
            net.train()
            net(image, available, crop_reference=(seg, has_seg))  # training: the reference box, jittered
            net.eval()
            net(image, available)  # validation / held-out / predict: the predicted tumor
    assert calls[0][0].tolist() == [[2, 3, 4]] and calls[0][1].tolist() == [[7, 8, 9]] and not calls[0][2]
    assert calls[1][2] is True
    predicted = net._forward_grid(torch.nn.functional.interpolate(image, size=16, mode="area"), available, None)
    lo, hi, _ = tumor_crop.bounding_boxes(predicted.seg_logits.argmax(1) > 0)
    assert calls[2][0].tolist() == tumor_crop.scale_boxes(lo, hi, 2.0, 32)[0].tolist()

    # the cube around the reference tumor is [0, 16)^3 (16 fine voxels: the network's side); a change
    # outside it moves the segmentation but not the classifier, a change inside moves both
    start, side = original(*tumor_crop.bounding_boxes(seg[:, 0] > 0)[:2], 32, 16, 0.25, jitter=False)
    assert start.tolist() == [[0, 0, 0]] and side.tolist() == [16]
    with torch.no_grad():
        base = net(image, available, crop_reference=(seg, has_seg))
        far = image.clone()
        far[:, :, 24:, 24:, 24:] += 3.0
        out_far = net(far, available, crop_reference=(seg, has_seg))
        near = image.clone()
        near[:, :, 4:8, 4:8, 4:8] += 3.0
        out_near = net(near, available, crop_reference=(seg, has_seg))
    assert not torch.allclose(base.seg_logits, out_far.seg_logits)
    for task in base.cls_logits:
        assert torch.allclose(base.cls_logits[task], out_far.cls_logits[task], atol=1e-6), task
    assert any(not torch.allclose(base.cls_logits[t], out_near.cls_logits[t]) for t in base.cls_logits)


def test_training_through_the_crop_reaches_every_part() -> None:
    net = _net().train()
    image = torch.randn(2, 4, 32, 32, 32)
    seg = torch.zeros(2, 1, 32, 32, 32, dtype=torch.long)
    seg[:, 0, 10:18, 12:20, 8:16] = 2
    out = net(image, torch.ones(2, 4, dtype=torch.bool), torch.ones(2, 3), crop_reference=(seg, torch.tensor([True, False])))
    (out.seg_logits.square().mean() + sum(z.square().sum() for z in out.cls_logits.values())).backward()
    for group in ("stems", "fusion", "encoder", "decoder", "classifier"):
        grads = [p.grad for name, p in net.named_parameters() if name.startswith(group) and p.requires_grad]
        assert any(g is not None and g.abs().sum() > 0 for g in grads), group


def test_mc_dropout_inputs_come_from_the_crop() -> None:
    net = _net().eval()
    image = torch.randn(1, 4, 32, 32, 32)
    available = torch.ones(1, 4, dtype=torch.bool)
    with torch.no_grad():
        inputs = net.classifier_inputs(image, available, torch.ones(1, 3))
        direct = net(image, available, torch.ones(1, 3)).cls_logits
        staged = net.classifier.predict(*inputs)[0]
    assert inputs[4] is not None and inputs[4].shape == (1, 2, 3)
    for task in direct:
        assert torch.allclose(direct[task], staged[task], atol=1e-5), task


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["data.size=32", "model.tumor_crop_size=32"], "below data.size=32"),
        (["data.size=64", "model.tumor_crop_size=20"], "multiple of 8"),
        (["data.size=64", "model.tumor_crop_size=32", "model.tumor_crop_margin=-0.1"], "tumor_crop_margin"),
    ],
)
def test_crop_settings_that_make_no_crop_are_refused(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        compose(["model=tiny", *overrides])


def test_without_the_crop_the_network_is_unchanged() -> None:
    cfg = compose(["model=tiny", "data.size=16"])
    assert cfg.model.tumor_crop_size == 0
    plain = build_model(cfg.model, 16, seed=0).eval()
    assert plain.grid_size == plain.img_size == 16
    same = build_model(replace(cfg.model, tumor_crop_margin=1.0), 16, seed=0).eval()
    image = torch.randn(1, 4, 16, 16, 16)
    with torch.no_grad():
        a, b = plain(image, torch.ones(1, 4, dtype=torch.bool)), same(image, torch.ones(1, 4, dtype=torch.bool))
    assert torch.equal(a.seg_logits, b.seg_logits)
