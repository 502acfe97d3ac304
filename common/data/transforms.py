"""MONAI dictionary transforms from a case's file paths to the network's fixed-size input.

Input dict (built by :mod:`common.data.dataset` from a :class:`common.data.site.CaseRecord`): one key per
*available* sequence (``"t1"``, ``"t1ce"``, ``"t2"``, ``"flair"``) and optionally ``"seg"``, each a
NIfTI path, plus ``"labels"`` (len(TASKS),), ``"survival"`` (2,) and ``"index"``; with ``"seg"`` also
``"label_convention"`` (a :data:`common.contract.LABEL_CONVENTIONS` key).

Output dict (exactly these keys):

* ``image``     float32 (4, S, S, S), channels in SEQUENCES order, missing sequences all zeros,
  z-scored over the non-zero (brain) voxels of each channel
* ``available`` bool (4,)
* ``seg``       int64 (1, S, S, S), values in {0, 1, 2, 3} (file values mapped by the case's label
  convention: brats2021 4 -> 3, brats2024-post resection cavity 4 -> 0); zeros when absent
* ``has_seg``   bool ()
* ``labels``    int64 (len(TASKS),), UNKNOWN_LABEL where unknown
* ``survival``  float32 (2,): (days, event) with event 1 death, 0 censored, UNKNOWN_LABEL unknown
* ``spacing``   float32 (3,), voxel size in mm of the S^3 network grid (for HD95 in mm)
* ``index``     int64 ()

Pipeline: load (nibabel) -> channel first -> stack into 4 channels -> label convention -> RAS -> crop to the
union foreground of the available sequences -> resize the longest side to S keeping the aspect
ratio (images trilinear with anti-aliasing, the label map nearest) -> pad to S^3 -> z-score ->
[train: left-right flip, intensity scale/shift] -> record spacing -> types.
"""

from __future__ import annotations

from typing import Any, Hashable, Mapping

import numpy as np
import torch
from monai.data import MetaTensor
from monai.data.image_reader import NibabelReader
from monai.data.utils import affine_to_spacing
from monai.transforms import (
    Compose,
    CropForegroundd,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    MapLabelValue,
    MapTransform,
    NormalizeIntensityd,
    Orientationd,
    RandFlipd,
    RandScaleIntensityd,
    RandStdShiftIntensityd,
    Resized,
    ResizeWithPadOrCropd,
    SelectItemsd,
)

from common.contract import LABEL_CONVENTIONS, SEQUENCES

IMAGE, SEG, AVAILABLE, HAS_SEG, LABELS, SURVIVAL, SPACING, INDEX = (
    "image", "seg", "available", "has_seg", "labels", "survival", "spacing", "index",
)
#: Input key naming the case's segmentation label convention (consumed by :class:`MapSegLabelsd`).
LABEL_CONVENTION = "label_convention"
#: The keys of every item and batch, in a fixed order.
ITEM_KEYS: tuple[str, ...] = (IMAGE, AVAILABLE, SEG, HAS_SEG, LABELS, SURVIVAL, SPACING, INDEX)


def nonzero(x: torch.Tensor) -> torch.Tensor:
    """Foreground = any voxel that is not exactly 0 (BraTS background is 0, and 0 is also what
    NormalizeIntensityd(nonzero=True) treats as background). A module-level function so the
    pipeline stays picklable for DataLoader workers."""
    return x != 0


class StackSequencesd(MapTransform):
    """Stack the available sequences into one fixed 4-channel image and record availability.

    Reads the per-sequence keys present in the dict (each a (1, X, Y, Z) MetaTensor on one shared
    grid), writes ``image`` (4, X, Y, Z) in SEQUENCES order with all-zero channels for missing
    sequences, ``available`` bool (4,), ``has_seg`` and, when the case has no segmentation, an
    all-zero ``seg`` (1, X, Y, Z) on the same grid; the per-sequence keys are removed.

    Written here because MONAI's ConcatItemsd needs every key present: it cannot zero-fill a
    missing sequence nor say which channels are real.
    """

    def __init__(self, sequences: tuple[str, ...] = SEQUENCES, seg_key: str = SEG) -> None:
        super().__init__(keys=sequences, allow_missing_keys=True)
        self.sequences = sequences
        self.seg_key = seg_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        present = [s for s in self.sequences if s in d]
        if not present:
            raise ValueError(f"case has none of the sequences {self.sequences}; keys: {sorted(map(str, d))}")
        ref = d[present[0]]
        if not isinstance(ref, MetaTensor):  # spatial transforms below need the affine
            raise TypeError(f"{present[0]!r} must be a MetaTensor (load it with LoadImaged), got {type(ref)}")
        zeros = torch.zeros_like(ref.as_tensor())
        channels = [d.pop(s).as_tensor() if s in present else zeros for s in self.sequences]
        d[IMAGE] = MetaTensor(torch.cat(channels, dim=0))
        d[IMAGE].copy_meta_from(ref)  # affine and source metadata of the shared grid
        d[AVAILABLE] = torch.tensor([s in present for s in self.sequences], dtype=torch.bool)
        d[HAS_SEG] = torch.tensor(self.seg_key in d, dtype=torch.bool)
        if self.seg_key not in d:
            d[self.seg_key] = MetaTensor(zeros.clone())
            d[self.seg_key].copy_meta_from(ref)
        return d


class MapSegLabelsd(MapTransform):
    """Map a segmentation's file values to internal labels with the case's label convention.

    Reads (and removes) ``label_convention``; a case with a segmentation must name one (the site
    scan decides it, :func:`common.data.site.case_label_convention`). Written here because MONAI's
    MapLabelValued applies one fixed table, while pooled cases of several sites may follow
    different conventions; the mapping itself is MONAI's MapLabelValue.
    """

    def __init__(self, seg_key: str = SEG, convention_key: str = LABEL_CONVENTION) -> None:
        super().__init__(keys=seg_key)
        self.seg_key = seg_key
        self.convention_key = convention_key
        self.maps = {
            name: MapLabelValue(orig_labels=list(table), target_labels=list(table.values()))
            for name, table in LABEL_CONVENTIONS.items()
        }

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        convention = d.pop(self.convention_key, None)
        if not bool(d[HAS_SEG]):
            return d
        if convention not in self.maps:
            raise ValueError(
                f"a case with a segmentation needs {self.convention_key!r} set to one of {sorted(self.maps)}, "
                f"got {convention!r}: build items with common.data.dataset.case_item from a scanned CaseRecord"
            )
        d[self.seg_key] = self.maps[convention](d[self.seg_key])
        return d


class RecordSpacingd(MapTransform):
    """Store the voxel spacing (mm) of ``image``'s current grid as ``spacing`` float32 (3,).

    Written here because MONAI keeps the spacing only inside the image's affine (which
    Resized/Orientationd update) and collation drops it once the image is a plain tensor; HD95
    in mm needs it per case.
    """

    def __init__(self, key: str = IMAGE, spacing_key: str = SPACING) -> None:
        super().__init__(keys=key)
        self.key = key
        self.spacing_key = spacing_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        affine = d[self.key].affine
        d[self.spacing_key] = torch.as_tensor(
            np.asarray(affine_to_spacing(affine, r=3), dtype=np.float32), dtype=torch.float32
        )
        return d


#: How a label map is resized: nearest neighbour at voxel centres, as trilinear samples the image.
#: torch's legacy "nearest" floors instead, which put the labels up to half a voxel off their images
#: (a box resized 45 -> 32 voxels: IoU 0.82 with the image's box, 1.0 with "nearest-exact").
SEG_RESIZE_MODE = "nearest-exact"


def build_transforms(size: int, train: bool) -> Compose:
    """Path dict -> network item (see the module docstring for the exact output keys).

    Args:
        size: cubic output size S in voxels.
        train: add light augmentation applied identically to image and segmentation: a random
            left-right flip, per-channel intensity scaling, and per-channel intensity shift of the
            non-zero voxels only.
    """
    if size < 1:
        raise ValueError(f"size must be a positive number of voxels, got {size}")
    files = (*SEQUENCES, SEG)
    spatial = (IMAGE, SEG)
    steps: list[Any] = [
        LoadImaged(keys=files, reader=NibabelReader, image_only=True, allow_missing_keys=True),
        EnsureChannelFirstd(keys=files, channel_dim="no_channel", allow_missing_keys=True),
        StackSequencesd(),
        MapSegLabelsd(),
        Orientationd(keys=spatial, axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
        CropForegroundd(keys=spatial, source_key=IMAGE, select_fn=nonzero, allow_smaller=True,
                        start_coord_key=None, end_coord_key=None),
        # Longest side -> size with the voxel aspect ratio kept (anatomy is not stretched). A label map is
        # only ever resampled with nearest neighbour.
        Resized(keys=spatial, spatial_size=size, size_mode="longest", mode=("trilinear", SEG_RESIZE_MODE),
                align_corners=(False, None), anti_aliasing=(True, False)),
        ResizeWithPadOrCropd(keys=spatial, spatial_size=(size, size, size)),
        NormalizeIntensityd(keys=IMAGE, nonzero=True, channel_wise=True),
        # before any random step: everything up to here is deterministic and may be cached on disk
        # without the image metadata (common.data.cache), which this step reads
        RecordSpacingd(),
    ]
    if train:
        # Left-right only (axis 0 after RAS): flipping anterior-posterior or superior-inferior would
        # erase where the tumor sits (a frontal location is an IDH-mutant cue).
        steps.append(RandFlipd(keys=spatial, prob=0.5, spatial_axis=0))
        steps += [
            RandScaleIntensityd(keys=IMAGE, factors=0.1, prob=0.5, channel_wise=True),
            # Shift only non-zero voxels (by a fraction of their std, ~1 after z-scoring):
            # RandShiftIntensityd would shift the zero-filled channels of missing sequences and
            # the background too, breaking the "missing = zeros" contract.
            RandStdShiftIntensityd(keys=IMAGE, factors=0.1, prob=0.5, nonzero=True, channel_wise=True),
        ]
    steps += [
        EnsureTyped(keys=(IMAGE, SEG, LABELS, SURVIVAL, INDEX),
                    dtype=(torch.float32, torch.int64, torch.int64, torch.float32, torch.int64),
                    track_meta=False),
        SelectItemsd(keys=ITEM_KEYS),
    ]
    return Compose(steps)
