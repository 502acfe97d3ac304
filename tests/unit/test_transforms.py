"""Preprocessing (common.data.transforms) and the dataset/loaders built on it (common.data.dataset)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from common.config import DataConfig
from common.contract import SEQUENCES, TASKS
from common.data.dataset import SiteDataset, case_item, make_loader, make_loaders
from common.data.site import CaseRecord, scan_site
from common.data.transforms import ITEM_KEYS, build_transforms
from tests.helpers import CONTRASTS, case_path, write_case, write_labels_csv, write_nifti

ROW = ("mutant", "intact", "LGG", "")


def _one_case(tmp_path: Path, **kwargs) -> CaseRecord:
    site = tmp_path / "site"
    write_case(site, "c1", **kwargs)
    write_labels_csv(site, [("c1", *ROW)])
    (case,) = scan_site(site).cases
    return case


def _transform(case: CaseRecord, size: int, train: bool = False, seed: int = 0) -> dict[str, torch.Tensor]:
    tf = build_transforms(size, train)
    tf.set_random_state(seed)
    return tf(case_item(case, 5))


def test_missing_sequences_are_zero_channels_and_missing_seg_is_zeros(tmp_path: Path) -> None:
    case = _one_case(tmp_path, sequences=("t1", "t2", "flair"), seg=False, naming="brats2023")

    out = _transform(case, size=24)

    assert tuple(out) == ITEM_KEYS
    assert out["image"].shape == (4, 24, 24, 24) and out["image"].dtype == torch.float32
    assert type(out["image"]) is torch.Tensor  # plain tensors, no MONAI metadata in batches
    assert out["available"].tolist() == [True, False, True, True] and out["available"].dtype == torch.bool
    assert torch.count_nonzero(out["image"][1]) == 0
    for c in (0, 2, 3):  # available channels: z-scored over the brain, background stays 0
        brain = out["image"][c][out["image"][c] != 0]
        assert brain.numel() > 1000
        assert abs(float(brain.mean())) < 1e-3 and abs(float(brain.std()) - 1.0) < 1e-2
    assert out["seg"].shape == (1, 24, 24, 24) and out["seg"].dtype == torch.int64
    assert torch.count_nonzero(out["seg"]) == 0 and not bool(out["has_seg"])
    assert out["labels"].tolist() == [1, 0, 0, -1] and out["labels"].dtype == torch.int64
    assert int(out["index"]) == 5 and out["index"].dtype == torch.int64


@pytest.mark.parametrize("size", [13, 24, 40])
def test_label_4_becomes_3_and_seg_is_resampled_nearest(tmp_path: Path, size: int) -> None:
    case = _one_case(tmp_path, et_label=4)
    seg_file = case_path(tmp_path / "site", "c1", "seg")
    labels = np.asarray(nib.load(seg_file).dataobj)
    # Only background and 4: linear interpolation would create 1, 2 (or 3.x) at the border.
    write_nifti(seg_file, np.where(labels > 0, 4, 0).astype(np.uint8))

    out = _transform(case, size=size)

    assert bool(out["has_seg"])
    assert sorted(out["seg"].unique().tolist()) == [0, 3]


def test_resection_cavity_becomes_background_under_brats2024_post(tmp_path: Path) -> None:
    site = tmp_path / "site"
    write_case(site, "c1", naming="brats2023")
    seg_file = case_path(site, "c1", "seg", "brats2023")
    labels = np.asarray(nib.load(seg_file).dataobj).copy()
    labels[labels == 2] = 4  # edema relabelled as a cavity: it must vanish from every region
    write_nifti(seg_file, labels)
    write_labels_csv(site, [("c1", *ROW)])
    (case,) = scan_site(site, label_convention="brats2024-post").cases

    out = _transform(case, size=16)

    assert sorted(out["seg"].unique().tolist()) == [0, 1, 3]


def test_a_seg_without_label_convention_is_refused(tmp_path: Path) -> None:
    case = _one_case(tmp_path)
    item = case_item(case, 0)
    del item["label_convention"]
    with pytest.raises(RuntimeError) as info:  # MONAI's Compose wraps the transform's ValueError
        build_transforms(16, train=False)(item)
    assert "needs 'label_convention'" in str(info.value.__cause__)


def test_image_and_seg_stay_aligned_through_orientation_and_augmentation(tmp_path: Path) -> None:
    # LPS-oriented input (x and y flipped): Orientationd("RAS") must flip image and seg together,
    # and so must every random flip.
    affine = np.diag([-1.0, -1.0, 1.0, 1.0])
    case = _one_case(tmp_path, affine=affine)
    # A bright enhancing block in one octant of the brain, so that a flip of one axis applied to
    # the image but not to the seg (or vice versa) moves it away from its label.
    t1ce_file = case.images["t1ce"]
    t1ce = np.asarray(nib.load(t1ce_file).dataobj).copy()
    block = np.zeros(t1ce.shape, dtype=bool)
    block[4:7, 4:7, 4:7] = True
    assert (t1ce[block] > 0).all()
    t1ce[block] = 3 * CONTRASTS["t1ce"][2]
    write_nifti(t1ce_file, t1ce, affine)
    write_nifti(case.seg, (block * 3).astype(np.uint8), affine)
    channel = SEQUENCES.index("t1ce")
    flipped = set()
    for train, seed in [(False, 0), *((True, s) for s in range(6))]:
        out = _transform(case, size=24, train=train, seed=seed)
        img, seg = out["image"][channel], out["seg"][0]
        assert float(img[seg == 3].mean()) > float(img[(seg == 0) & (img != 0)].mean()) + 2.0, (train, seed)
        nz = torch.nonzero(seg == 3).float().mean(0)  # where the block ended up (24^3 grid)
        flipped.add(tuple((nz > 12).tolist()))
    assert len(flipped) > 1  # the augmentation did flip


def test_orientation_makes_the_storage_order_irrelevant(tmp_path: Path) -> None:
    """The same anatomy stored RAS (identity affine) and LPS (x, y reversed) gives one output."""
    ras = _one_case(tmp_path / "ras")
    n = 16
    lps_affine = np.array([[-1.0, 0, 0, n - 1], [0, -1.0, 0, n - 1], [0, 0, 1.0, 0], [0, 0, 0, 1.0]])
    site = tmp_path / "lps" / "site"
    for key, path in [*ras.images.items(), ("seg", ras.seg)]:
        data = np.asarray(nib.load(path).dataobj)[::-1, ::-1, :].copy()
        write_nifti(case_path(site, "c1", key), data, lps_affine)
    write_labels_csv(site, [("c1", *ROW)])
    (lps,) = scan_site(site).cases

    a, b = _transform(ras, size=16), _transform(lps, size=16)

    assert torch.count_nonzero(a["seg"]) > 0
    assert torch.equal(a["seg"], b["seg"])
    torch.testing.assert_close(a["image"], b["image"])


def test_augmentation_keeps_missing_channels_and_background_zero(tmp_path: Path) -> None:
    case = _one_case(tmp_path, sequences=("t1ce", "flair"))
    plain = _transform(case, size=16)
    for seed in range(4):
        out = _transform(case, size=16, train=True, seed=seed)
        assert torch.count_nonzero(out["image"][[0, 2]]) == 0
        # flips move voxels but never create or remove brain: same number of non-zero voxels
        assert torch.count_nonzero(out["image"][1]) == torch.count_nonzero(plain["image"][1])
    outs = [_transform(case, size=16, train=True, seed=s)["image"] for s in (7, 7, 8)]
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])


def test_spacing_is_the_network_grid_voxel_size_in_mm(tmp_path: Path) -> None:
    case = _one_case(tmp_path, affine=np.diag([2.0, 2.0, 3.0, 1.0]))
    brain = np.asarray(nib.load(case.images["t1"]).dataobj) != 0
    extent = [int(np.ptp(np.nonzero(brain.any(axis=tuple(a for a in range(3) if a != ax)))[0])) + 1 for ax in range(3)]
    size = 32

    out = _transform(case, size=size)

    # the longest cropped side is resized to `size`, the others keep the voxel aspect ratio
    scale = max(extent) / size
    expected = np.array([2.0, 2.0, 3.0]) * scale
    assert out["spacing"].dtype == torch.float32
    np.testing.assert_allclose(out["spacing"].numpy(), expected, rtol=0.08)
    assert float(out["spacing"][2] / out["spacing"][0]) == pytest.approx(1.5, rel=0.08)


# ------------------------------------------------------------------------------------ dataset / loaders
@pytest.mark.parametrize("cache", [True, False])
def test_loaders_yield_the_documented_batch(site_dir: Path, cache: bool) -> None:
    index = scan_site(site_dir)
    cfg = DataConfig(size=16, batch_size=4, val_fraction=0.34, cache=cache)

    train, val = make_loaders(index, cfg, seed=0)

    assert len(train.dataset) + len(val.dataset) == 6 and len(val.dataset) == 2
    seen = []
    for loader in (train, val):
        labels = loader.dataset.label_matrix()
        assert labels.shape == (len(loader.dataset), len(TASKS)) and labels.dtype == np.int64
        for batch in loader:
            b = len(batch["index"])
            assert set(batch) == set(ITEM_KEYS)
            expect = {"image": ((b, 4, 16, 16, 16), torch.float32), "available": ((b, 4), torch.bool),
                      "seg": ((b, 1, 16, 16, 16), torch.int64), "has_seg": ((b,), torch.bool),
                      "labels": ((b, len(TASKS)), torch.int64), "spacing": ((b, 3), torch.float32),
                      "index": ((b,), torch.int64)}
            for key, (shape, dtype) in expect.items():
                assert (tuple(batch[key].shape), batch[key].dtype) == (shape, dtype), key
            assert torch.equal(batch["labels"], torch.from_numpy(labels[batch["index"].numpy()]))
            assert batch["seg"].max() <= 3
            for i, idx in enumerate(batch["index"].tolist()):
                case = loader.dataset.cases[idx]
                assert batch["available"][i].tolist() == list(case.available)
                assert bool(batch["has_seg"][i]) == (case.seg is not None)
                seen.append(case.case_id)
    assert sorted(seen) == [c.case_id for c in index.cases]  # nothing dropped (no drop_last)


def test_train_loader_is_reproducible_for_a_seed(site_dir: Path) -> None:
    cases = scan_site(site_dir).cases
    cfg = DataConfig(size=16, batch_size=2, cache=True)

    def epoch(seed: int) -> tuple[list[int], torch.Tensor]:
        batches = list(make_loader(cases, cfg, train=True, seed=seed))
        return [i for b in batches for i in b["index"].tolist()], torch.cat([b["image"] for b in batches])

    (order_a, images_a), (order_b, images_b), (order_c, _) = epoch(3), epoch(3), epoch(4)
    assert order_a == order_b and torch.equal(images_a, images_b)
    assert order_a != order_c
    assert order_a != sorted(order_a) or order_c != sorted(order_c)  # shuffled
    val_order = [i for b in make_loader(cases, cfg, train=False) for i in b["index"].tolist()]
    assert val_order == list(range(len(cases)))


def test_label_matrix_needs_no_images(tmp_path: Path) -> None:
    cases = [CaseRecord(f"c{i}", tmp_path, {"t1": tmp_path / "missing.nii.gz"}, None, (i % 2, -1, 1, 0), "brats2021")
             for i in range(3)]
    dataset = SiteDataset(cases, DataConfig(size=16, cache=False), train=False)
    np.testing.assert_array_equal(dataset.label_matrix(), [[0, -1, 1, 0], [1, -1, 1, 0], [0, -1, 1, 0]])


def test_training_flips_only_left_right(tmp_path: Path) -> None:
    """A-P and S-I carry where the tumor is (frontal = an IDH-mutant cue): only L-R may flip."""
    n = 16
    image = np.zeros((n, n, n), np.float32)
    image[1:15, 1:15, 1:15] = 100.0
    seg = np.zeros((n, n, n), np.uint8)
    seg[10:13, 10:13, 10:13] = 2  # right, anterior, superior (identity affine = RAS)
    files = {"t1": write_nifti(tmp_path / "t1.nii.gz", image), "seg": write_nifti(tmp_path / "seg.nii.gz", seg)}
    pipeline = build_transforms(n, train=True)
    sides = set()
    for seed in range(16):
        pipeline.set_random_state(seed=seed)
        out = pipeline({**files, "label_convention": "brats2023", "labels": np.zeros(len(TASKS), np.int64),
                        "survival": np.zeros(2, np.float32), "index": 0})
        centroid = np.argwhere(out["seg"][0].numpy() > 0).mean(0) - (n - 1) / 2
        assert centroid[1] > 0 and centroid[2] > 0, centroid  # still anterior and superior
        sides.add(bool(centroid[0] > 0))
    assert sides == {True, False}  # left-right does flip


def test_a_label_map_is_resized_onto_its_image() -> None:
    """The segmentation is sampled at the same voxel centres as the image (nearest-exact), so a
    box stays where the image's box is after a non-integer resize."""
    from monai.transforms import Resize

    from common.data.transforms import SEG_RESIZE_MODE

    box = torch.zeros(1, 45, 45, 45)
    box[:, 10:31, 12:29, 14:33] = 1.0
    seg = Resize(spatial_size=(32, 32, 32), mode=SEG_RESIZE_MODE)(box.clone()) > 0.5
    image = Resize(spatial_size=(32, 32, 32), mode="trilinear", align_corners=False, anti_aliasing=True)(box.clone()) > 0.5
    assert float((seg & image).sum() / (seg | image).sum()) > 0.97
