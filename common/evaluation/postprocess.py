"""Post-processing of a predicted label map, as selectable steps.

Every step takes an internal label map (X, Y, Z) int (0 background, 1 NCR, 2 ED, 3 ET; any grid:
the case's own or the network's) and returns a new one; none changes the input array.

* ``density`` - GMMAS Algorithm 1 (appendix), the tumor filter: when the predicted tumor voxels
  are scattered, keep the dense tumor cluster(s) and drop the rest (:func:`density_filter`).
* ``small-components`` - remove connected tumor components below a volume in mL
  (:func:`remove_small_components`).
* ``holes`` - MMRAN's prior-knowledge post-processing: fill the holes inside the tumor
  (:func:`fill_holes`).

:func:`postprocess` applies a selection in the fixed order of :data:`STEPS` (density first: it
reasons about the raw scatter; holes last: a removed component leaves no hole to fill).

Connectivity is 26 (full 3x3x3 neighbourhood) for tumor components everywhere, as BraTS 2023's
lesion-wise evaluation counts lesions. scipy.ndimage does the labelling, counting, filling and
distance transforms. MONAI's ``RemoveSmallObjects`` needs scikit-image (not a dependency) and counts
voxels, not mL; its ``KeepLargestConnectedComponent`` would drop every focus of a multifocal
tumor but one; its ``FillHoles`` floods per label value, so the necrotic core inside an enhancing
ring would become enhancing tumor. Hence the steps below.
"""

from __future__ import annotations

import difflib
from typing import Iterable, Sequence

import numpy as np
from scipy import ndimage

from common.contract import BACKGROUND, REGIONS

#: The steps, in the order :func:`postprocess` applies them.
STEPS: tuple[str, ...] = ("density", "small-components", "holes")

#: GMMAS Algorithm 1 line 5: the filter runs only when the tumor fills less than this share of its
#: bounding box (scattered voxels make the box large and sparse).
DENSITY_FILL_RATIO = 0.1
#: GMMAS Algorithm 1 line 8: the dense cluster(s) kept must hold at least this share of the tumor voxels.
DENSITY_KEEP_FRACTION = 0.6
#: Smallest tumor component kept by ``small-components``, in mL (0.5 mL = 500 voxels of 1 mm).
MIN_COMPONENT_ML = 0.5
#: Regions whose holes ``holes`` fills, outermost first. Not ET: an enhancing ring encloses the
#: necrotic core by nature, that is no hole.
HOLE_REGIONS: tuple[str, ...] = ("wt", "tc")

#: 26-connectivity in 3-D.
_FULL = np.ones((3, 3, 3), dtype=bool)


def parse_steps(names: Iterable[str]) -> tuple[str, ...]:
    """Validated step names in :data:`STEPS` order; ``"all"`` selects every step, ``"none"`` none.

    Raises ValueError for an unknown name, with the closest known one.
    """
    chosen: set[str] = set()
    for name in names:
        key = name.strip().lower()
        if key == "all":
            chosen.update(STEPS)
        elif key in STEPS:
            chosen.add(key)
        elif key not in ("none", ""):
            close = difflib.get_close_matches(key, [*STEPS, "all", "none"], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"unknown post-processing step {name!r}{hint}; choose from {', '.join(STEPS)}, all or none")
    return tuple(s for s in STEPS if s in chosen)


def _check(labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 3 or labels.dtype.kind not in "iu":
        raise ValueError(f"expected an integer label map (X, Y, Z), got {labels.dtype} of shape {labels.shape}")
    return labels


def _components(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """26-connected components of ``mask``: (component index per voxel, 0 outside; voxels per
    component, index 0 = outside)."""
    components, _ = ndimage.label(mask, structure=_FULL)
    return components, np.bincount(components.ravel())


def density_filter(
    labels: np.ndarray, *, fill_ratio: float = DENSITY_FILL_RATIO, keep_fraction: float = DENSITY_KEEP_FRACTION
) -> np.ndarray:
    """GMMAS Algorithm 1: keep the dense tumor cluster(s) of a scattered prediction.

    1. ``post.crop``: D = share of tumor voxels (label != 0) in the tumor's bounding box. When
       D >= ``fill_ratio`` the prediction is compact and is returned unchanged.
    2. ``find_center``: the density of each tumor voxel = number of tumor voxels in its 3x3x3
       neighbourhood (itself included). The paper sums the neighbours' *values*; on a label map
       that would weigh enhancing tumor (3) three times necrosis (1), so tumor voxels count 1.
    3. ``create_mask``: the maximum density spreads to the tumor voxels connected to it: the
       26-connected component(s) holding the densest voxel.
    4. If that cluster holds at least ``keep_fraction`` of the tumor voxels, everything else is
       removed. Otherwise (lines 12-16) the next densest cluster is added, and so on, until the
       clusters kept hold ``keep_fraction``: a multifocal tumor keeps its foci, isolated noise
       voxels (density 1-2) go. The pseudo-code's loop never updates its condition and would drop
       the first cluster when taking the second; this accumulating reading is what the paper's
       Figure 7 shows (multifocal tumor retained, noise removed).

    Args:
        labels: (X, Y, Z) internal labels.
        fill_ratio: D below which the filter runs (paper: 0.1).
        keep_fraction: share of the tumor voxels the kept clusters must reach (paper: 0.6).

    Returns:
        (X, Y, Z) labels, the removed voxels set to background.
    """
    labels = _check(labels)
    tumor = labels != BACKGROUND
    if not tumor.any():
        return labels.copy()
    (box,) = ndimage.find_objects(tumor.astype(np.int8))
    if tumor[box].mean() >= fill_ratio:
        return labels.copy()
    density = ndimage.convolve(tumor.astype(np.int32), np.ones((3, 3, 3), dtype=np.int32), mode="constant") * tumor
    components, sizes = _components(tumor)
    n = len(sizes) - 1
    peaks = np.asarray(ndimage.maximum(density, components, index=np.arange(1, n + 1)))
    # densest first; among equal peaks the larger cluster first
    order = np.lexsort((-sizes[1:], -peaks)) + 1
    kept = np.cumsum(sizes[order]) / tumor.sum()
    keep = order[: int(np.searchsorted(kept, keep_fraction - 1e-12)) + 1]
    out = labels.copy()
    out[tumor & ~np.isin(components, keep)] = BACKGROUND
    return out


def remove_small_components(
    labels: np.ndarray, spacing_mm: Sequence[float], *, min_volume_ml: float = MIN_COMPONENT_ML
) -> np.ndarray:
    """Remove the 26-connected components of the whole tumor smaller than ``min_volume_ml``.

    Args:
        labels: (X, Y, Z) internal labels.
        spacing_mm: (3,) voxel size in mm along X, Y, Z.
        min_volume_ml: the smallest component kept (1 mL = 1000 mm^3).

    Returns:
        (X, Y, Z) labels, every voxel of a removed component set to background.
    """
    labels = _check(labels)
    voxel_ml = float(np.prod(np.asarray(spacing_mm, dtype=np.float64))) / 1000.0
    components, sizes = _components(labels != BACKGROUND)
    small = np.flatnonzero(sizes * voxel_ml < min_volume_ml)
    small = small[small != 0]
    out = labels.copy()
    out[np.isin(components, small)] = BACKGROUND
    return out


def fill_holes(labels: np.ndarray, regions: Sequence[str] = HOLE_REGIONS) -> np.ndarray:
    """Fill the holes inside each region of ``regions`` (MMRAN section 3.5, in 3-D).

    A hole of a region is a set of voxels outside it that cannot reach the volume's border without
    crossing it (``scipy.ndimage.binary_fill_holes``; MMRAN floods 2-D slices from the border and
    merges the inverse). A hole voxel takes the label of the nearest voxel of the region, so a hole
    in the edema becomes edema and one in the necrotic core necrosis.

    Args:
        labels: (X, Y, Z) internal labels.
        regions: keys of :data:`common.contract.REGIONS`, outermost first (default WT, then TC).

    Returns:
        (X, Y, Z) labels with the holes filled.
    """
    labels = _check(labels)
    unknown = [r for r in regions if r not in REGIONS]
    if unknown:
        raise ValueError(f"unknown region(s) {unknown}; choose from {', '.join(REGIONS)}")
    out = labels.copy()
    for region in regions:
        inside = np.isin(out, REGIONS[region])
        holes = ndimage.binary_fill_holes(inside) & ~inside
        if not holes.any():
            continue
        nearest = ndimage.distance_transform_edt(~inside, return_distances=False, return_indices=True)
        out[holes] = out[tuple(axis[holes] for axis in nearest)]
    return out


def postprocess(
    labels: np.ndarray, spacing_mm: Sequence[float], steps: Iterable[str], *, min_volume_ml: float = MIN_COMPONENT_ML
) -> np.ndarray:
    """Apply the selected ``steps`` (names from :data:`STEPS`, or "all") in :data:`STEPS` order.

    Args:
        labels: (X, Y, Z) internal labels. spacing_mm: (3,) voxel size in mm.
        min_volume_ml: threshold of ``small-components``.
    """
    out = _check(labels).copy()
    for step in parse_steps(steps):
        if step == "density":
            out = density_filter(out)
        elif step == "small-components":
            out = remove_small_components(out, spacing_mm, min_volume_ml=min_volume_ml)
        else:
            out = fill_holes(out)
    return out
