"""Real brain anatomy for the synthetic cohort: nilearn's bundled MNI152 (ICBM 2009a) template.

:func:`load_anatomy` crops the 1 mm template, grey- and white-matter maps and brain mask to the
brain, pads the crop to a cube (aspect ratio kept) and resamples it to ``shape**3`` voxels; the
result is cached per shape in this process. :func:`deform` poses one case's head with a small
random rotation, scale and shift.

Array axes are (X, Y, Z) = (right, anterior, superior), i.e. RAS like the template, so "frontal"
means large Y. The brain is scaled to fill the cube: the nominal voxel size written to the NIfTI
affine (:func:`voxel_size_mm`, 240 mm / shape as for BraTS' 240 mm field of view) is about 1.1x the
true MNI voxel size of the crop.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

#: Field of view of the written volumes (mm): a 64^3 volume has 3.75 mm voxels.
FIELD_OF_VIEW_MM = 240.0
#: Empty border around the brain in the cube, as a fraction of the brain's largest extent, so the
#: per-case deformation (scale up to +5 %, shift, rotation) does not cut the brain off.
CROP_MARGIN = 0.08


@dataclass(frozen=True)
class Anatomy:
    """Tissue maps on one cubic grid, float32 (X, Y, Z), background 0.

    ``gm``, ``wm`` and ``csf`` are tissue fractions in [0, 1] that sum to ``brain`` (CSF is the
    part of the brain mask that is neither grey nor white matter). ``brain`` is the (soft, after
    resampling) brain mask in [0, 1]. ``texture`` is the template T1 minus its best fit from the
    tissue fractions, scaled to unit variance inside the brain: real anatomical detail (deep grey
    nuclei, cortical ribbon) that the three fractions miss.
    """

    gm: np.ndarray
    wm: np.ndarray
    csf: np.ndarray
    brain: np.ndarray
    texture: np.ndarray

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.gm.shape)  # type: ignore[return-value]

    def stack(self) -> np.ndarray:
        """(gm, wm, brain, texture) as one float32 array (4, X, Y, Z), e.g. to deform them together."""
        return np.stack([self.gm, self.wm, self.brain, self.texture])

    @classmethod
    def from_stack(cls, maps: np.ndarray) -> "Anatomy":
        """Inverse of :meth:`stack` after resampling: clips the fractions and re-derives CSF as the
        rest of the brain, so that gm + wm + csf = brain again."""
        gm, wm, brain, texture = (np.asarray(m, dtype=np.float32) for m in maps)
        brain = np.clip(brain, 0.0, 1.0)
        gm, wm = np.clip(gm, 0.0, 1.0), np.clip(wm, 0.0, 1.0)
        csf = np.clip(brain - gm - wm, 0.0, 1.0)
        return cls(gm=gm, wm=wm, csf=csf, brain=brain, texture=texture * (brain > 0.5))


def voxel_size_mm(shape: int) -> float:
    """Nominal isotropic voxel size (mm) of a ``shape**3`` volume."""
    return FIELD_OF_VIEW_MM / shape


def nifti_affine(shape: int) -> np.ndarray:
    """4x4 RAS voxel-to-world matrix: isotropic :func:`voxel_size_mm`, volume centred on 0 mm."""
    v = voxel_size_mm(shape)
    affine = np.diag([v, v, v, 1.0])
    affine[:3, 3] = -v * (shape - 1) / 2.0
    return affine


def _template_1mm() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(t1, gm, wm, brain mask) at the template's native 1 mm, float32 (197, 233, 189).

    nilearn ships these files inside the package: no download happens. Resolution 1 is asked
    for explicitly because nilearn's own 2 mm resampling is slower than cropping first.
    """
    from nilearn import datasets  # heavy import (~3 s): only when anatomy is first needed

    def data(img) -> np.ndarray:
        return np.asarray(img.get_fdata(dtype=np.float32), dtype=np.float32)

    t1 = data(datasets.load_mni152_template(resolution=1))
    gm = data(datasets.load_mni152_gm_template(resolution=1))
    wm = data(datasets.load_mni152_wm_template(resolution=1))
    mask = data(datasets.load_mni152_brain_mask(resolution=1)) > 0.5
    return t1, gm, wm, mask.astype(np.float32)


def _crop_to_cube(mask: np.ndarray, shape: int) -> tuple[np.ndarray, np.ndarray]:
    """Matrix and offset mapping output voxels of a ``shape**3`` cube to 1 mm template voxels.

    The cube is centred on the brain's bounding box, its side the largest extent plus
    :data:`CROP_MARGIN` on each side; the same scale is used on every axis (no distortion).
    """
    idx = np.argwhere(mask > 0.5)
    lo, hi = idx.min(0), idx.max(0)
    centre = (lo + hi) / 2.0
    side = float((hi - lo).max() + 1) * (1.0 + 2.0 * CROP_MARGIN)
    step = side / shape  # template voxels per output voxel
    # output voxel centre i maps to centre + (i - (shape - 1) / 2) * step
    offset = centre - step * (shape - 1) / 2.0
    return np.diag([step] * 3), offset


def _resample(volume: np.ndarray, matrix: np.ndarray, offset: np.ndarray, shape: int) -> np.ndarray:
    """Anti-aliased linear resampling of a 1 mm volume onto the output cube (float32)."""
    step = float(matrix[0, 0])
    if step > 1.0:  # low-pass first so the downsampled maps are partial-volume fractions, not aliased samples
        volume = ndimage.gaussian_filter(volume, sigma=0.42 * step)
    out = ndimage.affine_transform(
        volume, matrix, offset=offset, output_shape=(shape,) * 3, order=1, mode="constant", cval=0.0
    )
    return out.astype(np.float32)


#: Resampled anatomy per shape, for this process (see :func:`load_anatomy`).
_CACHE: dict[int, Anatomy] = {}


def register_anatomy(shape: int, anatomy: Anatomy) -> None:
    """Seed this process's cache (worker processes receive the parent's anatomy this way)."""
    _CACHE[shape] = anatomy


def load_anatomy(shape: int) -> Anatomy:
    """The MNI152 anatomy cropped to the brain and resampled to ``shape**3`` (cached per shape).

    Raises:
        ValueError: ``shape`` is below 8 voxels (no brain left to draw).
    """
    preload((shape,))
    return _CACHE[shape]


def preload(shapes: tuple[int, ...]) -> None:
    """Build the anatomy of every shape not cached yet, reading the template once."""
    missing = [s for s in dict.fromkeys(shapes) if s not in _CACHE]
    for shape in missing:
        if shape < 8:
            raise ValueError(f"shape {shape} is too small for a brain; use --shape 16 or more")
    if missing:
        template = _template_1mm()
        for shape in missing:
            _CACHE[shape] = _build_anatomy(shape, *template)


def _build_anatomy(shape: int, t1: np.ndarray, gm: np.ndarray, wm: np.ndarray, mask: np.ndarray) -> Anatomy:
    matrix, offset = _crop_to_cube(mask, shape)
    brain = _resample(mask, matrix, offset, shape)
    gm = _resample(gm * mask, matrix, offset, shape)
    wm = _resample(wm * mask, matrix, offset, shape)
    t1 = _resample(t1 * mask, matrix, offset, shape)
    inside = brain > 0.5
    brain = np.where(inside, brain, 0.0).astype(np.float32)
    # GM/WM probabilities can exceed the (resampled) mask at its edge: renormalise so that
    # gm + wm <= brain and the rest of the brain is CSF.
    tissue = gm + wm
    scale = np.where(tissue > brain, brain / np.maximum(tissue, 1e-6), 1.0)
    gm, wm = gm * scale * inside, wm * scale * inside
    csf = np.clip(brain - gm - wm, 0.0, 1.0)
    texture = _texture(t1, gm, wm, csf, inside)
    return Anatomy(gm=gm.astype(np.float32), wm=wm.astype(np.float32), csf=csf.astype(np.float32),
                   brain=brain, texture=texture)


def _texture(t1: np.ndarray, gm: np.ndarray, wm: np.ndarray, csf: np.ndarray, inside: np.ndarray) -> np.ndarray:
    """Unit-variance residual of the template T1 after a least-squares fit ``a gm + b wm + c csf``."""
    design = np.stack([gm[inside], wm[inside], csf[inside]], axis=1)
    coef, *_ = np.linalg.lstsq(design, t1[inside], rcond=None)
    residual = np.zeros_like(t1)
    residual[inside] = t1[inside] - design @ coef
    std = float(residual[inside].std()) or 1.0
    return (residual / std).astype(np.float32)


@dataclass(frozen=True)
class Pose:
    """A small rigid-plus-scale pose of one case's head (degrees, scale factors, voxels)."""

    rotation_deg: tuple[float, float, float]
    scale: tuple[float, float, float]
    shift_vox: tuple[float, float, float]


def sample_pose(rng: np.random.Generator, shape: int) -> Pose:
    """Random pose: rotation within +-6 degrees per axis, scale 0.92-1.05, shift within 3 % of the side."""
    return Pose(
        rotation_deg=tuple(rng.uniform(-6.0, 6.0, 3).tolist()),
        scale=tuple(rng.uniform(0.92, 1.05, 3).tolist()),
        shift_vox=tuple((rng.uniform(-0.03, 0.03, 3) * shape).tolist()),
    )


def _rotation(angles_deg: tuple[float, float, float]) -> np.ndarray:
    ax, ay, az = np.deg2rad(angles_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def deform(maps: np.ndarray, pose: Pose) -> np.ndarray:
    """Apply ``pose`` to every map of ``maps`` (C, X, Y, Z), linear interpolation, zero outside.

    The pose acts about the volume centre: an output voxel ``o`` samples the input at
    ``A^-1 (o - c - shift) + c`` with ``A = R S``.
    """
    shape = np.asarray(maps.shape[1:], dtype=float)
    centre = (shape - 1) / 2.0
    inverse = np.linalg.inv(_rotation(pose.rotation_deg) @ np.diag(pose.scale))
    offset = centre - inverse @ (centre + np.asarray(pose.shift_vox))
    return np.stack([
        ndimage.affine_transform(m, inverse, offset=offset, order=1, mode="constant", cval=0.0)
        for m in maps
    ]).astype(np.float32)
