"""GMMAS's tumor-protect crop, as a second look at the tumor at a finer resolution.

With ``model.tumor_crop_size = G`` the data layer delivers the brain on a fine grid of side
N = ``data.size`` and the network works on G^3 < N^3 twice (:meth:`MultiTaskGliomaNet.forward`):

1. **whole brain**: the fine grid area-averaged to G^3; its segmentation finds the tumor;
2. **tumor crop**: a cube around the tumor's bounding box (plus ``model.tumor_crop_margin`` of
   its size on each side), at least G fine voxels wide, cut from the fine grid and area-averaged
   to G^3 - up to N/G times finer than pass 1. The classifier reads this pass only; its tumor
   descriptors keep their whole-brain meaning (volumes from the crop's voxel size, location in
   the brain's normalized coordinates, :func:`brain_frame`).

The segmentation on the fine grid is pass 1 upsampled, with the logits of both passes averaged
inside the crop (a two-scale ensemble that trains both scales where the tumor is).

Which box: in training, the reference segmentation's tumor where the case has one, with the cube
placed at random wherever it still holds the whole box (GMMAS: a random crop that never cuts the
tumor), else the tumor predicted by pass 1; at validation, on the held-out center and in
``fedglioma predict`` always the predicted one, centred. No predicted tumor: the whole grid.

Written here because MONAI's crops (``RandCropByLabelClassesd``, ``CropForegroundd``) run in the
data pipeline on one fixed label map, while this crop follows the network's own prediction
inside the forward pass, per case of a batch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

#: How a label map is resized (nearest neighbour at voxel centres, as in the data layer).
LABEL_MODE = "nearest-exact"


def bounding_boxes(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(lo (B, 3), hi (B, 3), found (B,)) of ``mask`` (B, N, N, N) bool: first and last voxel
    index per axis holding True; an empty mask gives the whole grid and ``found`` False."""
    b, *grid = mask.shape
    lo = torch.zeros((b, 3), dtype=torch.long, device=mask.device)
    hi = torch.tensor(grid, device=mask.device).sub(1).expand(b, 3).clone()
    found = mask.flatten(1).any(1)
    for axis in range(3):
        along = mask.any(dim=[d for d in (1, 2, 3) if d != axis + 1])  # (B, n) slices with a True
        index = torch.arange(grid[axis], device=mask.device)
        first = torch.where(along, index, grid[axis]).amin(1)
        last = torch.where(along, index, -1).amax(1)
        lo[:, axis] = torch.where(found, first, lo[:, axis])
        hi[:, axis] = torch.where(found, last, hi[:, axis])
    return lo, hi, found


def scale_boxes(lo: torch.Tensor, hi: torch.Tensor, factor: float, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Voxel boxes of a coarse grid on a grid ``factor`` times finer (side ``size``): every fine
    voxel under the coarse box's voxels."""
    fine_lo = torch.floor(lo.double() * factor).long().clamp(0, size - 1)
    fine_hi = (torch.ceil((hi.double() + 1) * factor).long() - 1).clamp(0, size - 1)
    return fine_lo, fine_hi


def crop_cubes(
    lo: torch.Tensor, hi: torch.Tensor, size: int, grid: int, margin: float, *, jitter: bool,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(start (B, 3), side (B,)) of the cubes around the boxes ``lo``..``hi`` on a grid of side ``size``.

    The side is the box's longest extent plus ``margin`` of it on both sides, at least ``grid``
    (the network's side: the crop is never finer than the data) and at most ``size``. Centred on
    the box, or with ``jitter`` at a uniformly random place that still holds the whole box.
    """
    extent = (hi - lo + 1).amax(1).double()
    side = torch.ceil(extent * (1.0 + 2.0 * margin)).long().clamp(min(grid, size), size)
    centred = torch.round((lo + hi).double() / 2 - (side[:, None].double() - 1) / 2).long()
    start = torch.minimum(torch.maximum(centred, torch.zeros_like(centred)), size - side[:, None])
    if jitter:
        first = torch.clamp(hi - side[:, None] + 1, min=0)  # the box's far end still inside
        last = torch.minimum(lo, size - side[:, None])  # its near end still inside
        last = torch.maximum(last, first)
        u = torch.rand(first.shape, generator=generator, device="cpu" if generator is not None else None)
        start = first + torch.floor(u.to(first.device) * (last - first + 1).double()).long().clamp(max=(last - first))
    return start, side


def cut(x: torch.Tensor, start: torch.Tensor, side: torch.Tensor, grid: int, mode: str = "area") -> torch.Tensor:
    """The cubes ``start``/``side`` of ``x`` (B, C, N, N, N), each resized to ``grid``^3: (B, C, G, G, G).

    ``mode``: "area" (the average of the fine voxels, for intensities) or :data:`LABEL_MODE`
    (label maps, given as float)."""
    out = []
    for b in range(x.shape[0]):
        (i, j, k), c = start[b].tolist(), int(side[b])
        cube = x[b : b + 1, :, i : i + c, j : j + c, k : k + c]
        out.append(cube if c == grid else F.interpolate(cube, size=(grid,) * 3, mode=mode))
    return torch.cat(out, dim=0)


def paste_mean(full: torch.Tensor, crops: torch.Tensor, start: torch.Tensor, side: torch.Tensor) -> torch.Tensor:
    """``full`` (B, K, N, N, N) with the mean of itself and ``crops`` (B, K, G, G, G), resized
    back to each cube (trilinear), inside the cubes ``start``/``side``; differentiable in both."""
    out = []
    for b in range(full.shape[0]):
        (i, j, k), c = start[b].tolist(), int(side[b])
        crop = crops[b : b + 1]
        if crop.shape[-1] != c:
            crop = F.interpolate(crop, size=(c,) * 3, mode="trilinear", align_corners=False)
        n = full.shape[-1]
        # the crop placed on the full grid (zeros outside) and where it lies
        placed = F.pad(crop, (k, n - k - c, j, n - j - c, i, n - i - c))
        inside = torch.zeros((1, 1, n, n, n), dtype=torch.bool, device=full.device)
        inside[..., i : i + c, j : j + c, k : k + c] = True
        out.append(torch.where(inside, (full[b : b + 1] + placed) / 2, full[b : b + 1]))
    return torch.cat(out, dim=0)


def brain_frame(brain: torch.Tensor, start: torch.Tensor, side: torch.Tensor, grid: int) -> torch.Tensor:
    """(B, 2, 3): where the first and last voxel centres of each crop (resized to ``grid``) lie in
    the brain's normalized coordinates (its bounding box in ``brain`` (B, N, N, N) bool mapped to
    [-1, 1] per axis, as :func:`common.model.classifier.tumor_descriptors` measures location)."""
    n = brain.shape[-1]
    lo, hi, found = bounding_boxes(brain)
    lo = torch.where(found[:, None], lo, torch.zeros_like(lo)).double()
    hi = torch.where(found[:, None], hi, torch.full_like(hi, n - 1)).double()
    centre, half = (lo + hi) / 2, ((hi - lo) / 2).clamp_min(0.5)
    step = side.double()[:, None] / grid  # fine voxels per crop voxel
    first = start.double() - 0.5 + 0.5 * step
    last = start.double() - 0.5 + (grid - 0.5) * step
    return torch.stack([(first - centre) / half, (last - centre) / half], dim=1).float()


def check_crop(grid: int, size: int, margin: float) -> None:
    """Fail fast on settings that make no crop, naming the config keys."""
    if grid and grid >= size:
        raise ValueError(
            f"model.tumor_crop_size={grid} must be smaller than data.size={size}: the crop is the finer look "
            f"(e.g. data.size={2 * grid} with model.tumor_crop_size={grid}), or 0 for no crop"
        )
    if not (math.isfinite(margin) and 0.0 <= margin <= 2.0):
        raise ValueError(f"model.tumor_crop_margin={margin} must be in [0, 2] (a fraction of the tumor's extent)")
