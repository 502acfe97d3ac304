"""MR contrasts of one case and the scanner that records them.

:func:`contrasts` mixes tissue-specific intensities (normalised units, roughly 0-1) from the
tissue fractions and the tumor compartments, so that each sequence shows something the others
do not:

* T1: baseline; blood products (hemorrhage) are bright only on T1 and T1ce, so T1 tells them
  apart from enhancement.
* T1ce: the enhancing rim is bright only here; necrosis and calcification are dark.
* T2: edema, necrosis and CSF bright; calcification dark; the T2-FLAIR mismatch needs T2 and FLAIR.
* FLAIR: CSF suppressed, edema bright; in mismatch tumors a dark centre inside a bright rim.

:func:`scanner_signal` then applies a site's scanner: gamma, scale and offset, a smooth
multiplicative bias field, through-plane blur (slice thickness) and Rician noise, with the
background (outside the brain) exactly zero.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping

import numpy as np
from scipy import ndimage

from common.contract import SEQUENCES
from synth.anatomy import Anatomy
from synth.tumor import (
    CALCIFICATION,
    EDEMA,
    ENHANCING,
    HEMORRHAGE,
    NECROSIS,
    SOLID,
    TumorPhenotype,
    bounding_box,
    smooth_field,
)


def _intensities(t1: float, t1ce: float, t2: float, flair: float) -> Mapping[str, float]:
    """Read-only ``{sequence: intensity}`` in SEQUENCES order (normalised units)."""
    return MappingProxyType(dict(zip(SEQUENCES, (t1, t1ce, t2, flair))))


#: Normal tissue intensities.
TISSUE: Mapping[str, Mapping[str, float]] = MappingProxyType({
    "csf": _intensities(0.12, 0.14, 1.00, 0.08),  # FLAIR suppresses free water
    "gm": _intensities(0.48, 0.50, 0.58, 0.55),
    "wm": _intensities(0.70, 0.70, 0.40, 0.45),
})
#: Tumor compartment intensities.
COMPARTMENT: Mapping[int, Mapping[str, float]] = MappingProxyType({
    EDEMA: _intensities(0.38, 0.40, 0.82, 0.88),
    SOLID: _intensities(0.33, 0.35, 0.80, 0.80),  # non-enhancing tumor
    NECROSIS: _intensities(0.22, 0.16, 0.95, 0.50),  # dark on T1ce, bright on T2
    ENHANCING: _intensities(0.42, 1.25, 0.62, 0.72),  # bright only on T1ce (the brightest tissue there)
    HEMORRHAGE: _intensities(0.85, 0.88, 0.20, 0.55),  # bright on T1 and T1ce, dark on T2
    CALCIFICATION: _intensities(0.45, 0.12, 0.10, 0.20),  # dark speckle on T2/T1ce
})
#: T2-FLAIR mismatch: T2 homogeneously bright, FLAIR dark centre with a bright rim.
MISMATCH_T2 = 0.93
MISMATCH_FLAIR_CENTRE = 0.32
MISMATCH_FLAIR_RIM = 0.82
#: Weight of the template's anatomical texture per sequence (sign: T1-like or T2-like contrast).
TEXTURE_WEIGHT: Mapping[str, float] = MappingProxyType({"t1": 0.04, "t1ce": 0.04, "t2": -0.03, "flair": -0.02})
#: Partial-volume blur of tumor boundaries (voxels).
TUMOR_EDGE_SIGMA = 0.5


def contrasts(
    anatomy: Anatomy, codes: np.ndarray, density: np.ndarray, phenotype: TumorPhenotype,
    rng: np.random.Generator,
) -> dict[str, np.ndarray]:
    """Noise-free images ``{sequence: float32 (X, Y, Z)}`` in normalised units, 0 outside the brain.

    Args:
        anatomy: the case's (posed) tissue maps.
        codes: tumor compartments (uint8, X, Y, Z) from ``tumor.compartments``.
        density: tumor cell density (X, Y, Z) in [0, 1]; grades how strongly edema shows.
        phenotype: the tumor's imaging traits (mismatch, heterogeneity, enhancement gain).
    """
    inside = anatomy.brain > 0.5
    images = {}
    for seq in SEQUENCES:
        normal = (anatomy.csf * TISSUE["csf"][seq] + anatomy.gm * TISSUE["gm"][seq] + anatomy.wm * TISSUE["wm"][seq]
                  + TEXTURE_WEIGHT[seq] * anatomy.texture * anatomy.brain)
        images[seq] = normal.astype(np.float32)
    if codes.any():
        # the lesion only changes voxels near the tumor: work in its box (margin > 4 edge sigmas)
        box = bounding_box(codes > 0, margin=3)
        lesion = _lesion(codes[box], density[box], phenotype, rng)
        for seq, (weighted, weight) in lesion.items():
            images[seq][box] = (1.0 - weight) * images[seq][box] + weighted
    return {seq: np.where(inside, np.clip(img, 0.0, None), 0.0).astype(np.float32) for seq, img in images.items()}


def _lesion(
    codes: np.ndarray, density: np.ndarray, phenotype: TumorPhenotype, rng: np.random.Generator,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per sequence, the tumor's (weighted signal, weight) with blurred (partial-volume) edges;
    the image is ``(1 - weight) * normal + weighted signal``."""
    tumor = codes > 0
    # Edema is infiltrated tissue: its signal grows with the density from the edema threshold
    # (half edema, half normal tissue) to the core threshold (pure edema signal).
    span = max(phenotype.core_threshold - phenotype.edema_threshold, 1e-3)
    ramp = 0.5 + 0.5 * np.clip((density - phenotype.edema_threshold) / span, 0.0, 1.0)
    alpha = (np.where(codes == EDEMA, ramp, 1.0) * tumor).astype(np.float32)
    variation = 1.0 + phenotype.heterogeneity * smooth_field(codes.shape, 1.5, rng)
    mismatch = (codes == SOLID) & phenotype.mismatch
    if mismatch.any():
        # the bright FLAIR rim is the outermost voxel of the core (and the edema around it);
        # the mismatch is homogeneous: no heterogeneity there
        core_depth = ndimage.distance_transform_edt(tumor & (codes != EDEMA))
        mismatch_centre = mismatch & (core_depth > 1.0)
        variation = np.where(mismatch, 1.0, variation)
    weight = ndimage.gaussian_filter(alpha, TUMOR_EDGE_SIGMA)
    out = {}
    for seq in SEQUENCES:
        signal = np.zeros(codes.shape, dtype=np.float32)
        for code, table in COMPARTMENT.items():
            signal[codes == code] = table[seq]
        if seq == "t1ce":
            signal[codes == ENHANCING] *= phenotype.enhancement_gain
        if mismatch.any() and seq == "t2":
            signal[mismatch] = MISMATCH_T2
        if mismatch.any() and seq == "flair":
            signal[mismatch] = MISMATCH_FLAIR_RIM
            signal[mismatch_centre] = MISMATCH_FLAIR_CENTRE
        out[seq] = (ndimage.gaussian_filter(alpha * signal * variation, TUMOR_EDGE_SIGMA), weight)
    return out


@dataclass(frozen=True)
class ScannerProfile:
    """How one site's scanner records the normalised contrasts.

    Intensities become ``scale * x**gamma + offset`` inside the brain; ``noise`` is the Rician
    noise sd as a fraction of ``scale``; ``bias`` the sd of the log of the smooth multiplicative
    bias field; ``slice_mm`` the through-plane resolution (FWHM of the blur along ``slice_axis``,
    0 for isotropic acquisitions).
    """

    scale: float
    offset: float
    gamma: float
    noise: float
    bias: float
    slice_mm: float = 0.0
    slice_axis: int = 2

    def as_dict(self) -> dict[str, float | int]:
        return {"scale": self.scale, "offset": self.offset, "gamma": self.gamma, "noise": self.noise,
                "bias": self.bias, "slice_mm": self.slice_mm, "slice_axis": self.slice_axis}


def bias_field(shape: tuple[int, int, int], strength: float, rng: np.random.Generator) -> np.ndarray:
    """Smooth multiplicative field ``exp(strength * z)`` (float32, X, Y, Z).

    z is a random quadratic polynomial of the normalised coordinates (unit sd over the volume),
    the usual low-order model of coil sensitivity (as in N3/N4 bias correction); evaluated
    separably, so it costs a few array operations instead of a spline upsampling.
    """
    axes = [np.linspace(-1.0, 1.0, n, dtype=np.float32) for n in shape]
    x, y, zc = np.meshgrid(*axes, indexing="ij", sparse=True)
    c = rng.standard_normal(9)
    z = (c[0] * x + c[1] * y + c[2] * zc + c[3] * x * y + c[4] * x * zc + c[5] * y * zc
         + c[6] * (x * x - 1 / 3) + c[7] * (y * y - 1 / 3) + c[8] * (zc * zc - 1 / 3))
    z = z / max(float(z.std()), 1e-6)
    return np.exp(strength * z).astype(np.float32)


def scanner_signal(
    image: np.ndarray, brain: np.ndarray, scanner: ScannerProfile, voxel_mm: float,
    bias: np.ndarray, rng: np.random.Generator, gain: float = 1.0,
) -> np.ndarray:
    """Record a normalised image (X, Y, Z) with ``scanner``: float32, zero outside ``brain`` > 0.5.

    ``bias`` is the case's bias field (shared by its sequences, as on a real scanner where it
    comes from the coil); ``gain`` a per-case jitter of the scale.
    """
    inside = brain > 0.5
    x = image * bias
    if scanner.slice_mm > voxel_mm:
        sigma = np.sqrt(scanner.slice_mm**2 - voxel_mm**2) / (2.355 * voxel_mm)  # FWHM -> sd, in voxels
        x = ndimage.gaussian_filter1d(x, sigma, axis=scanner.slice_axis)
    x = scanner.scale * gain * np.clip(x[inside], 0.0, None) ** scanner.gamma + scanner.offset
    sd = scanner.noise * scanner.scale * gain
    # Rician magnitude noise |signal + complex Gaussian noise|, drawn inside the brain only (the
    # background is zero in skull-stripped BraTS data anyway)
    noisy = np.hypot(x + rng.normal(0.0, sd, x.shape), rng.normal(0.0, sd, x.shape))
    out = np.zeros(image.shape, dtype=np.float32)
    out[inside] = noisy
    return out
