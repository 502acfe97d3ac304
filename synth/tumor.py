"""Molecular status, the tumor phenotype it makes likely, and tumor growth.

1. :func:`sample_status` draws IDH, 1p/19q, grade and MGMT with the biology's dependencies
   (codeletion only in IDH-mutant tumors; IDH-wildtype mostly grade 4; methylation more frequent
   in IDH-mutant tumors).
2. :func:`sample_phenotype` turns the status into growth and imaging parameters *probabilistically*:
   every trait is a noisy tendency (radiology knowledge), so no single feature gives the status away.
3. :func:`grow_tumor` solves the Fisher-Kolmogorov equation du/dt = div(D grad u) + rho u (1 - u)
   on the tissue maps (explicit Euler, no-flux at the brain boundary and at CSF).
4. :func:`compartments` thresholds the density into edema, non-enhancing/necrotic core and an
   enhancing rim, plus hemorrhage and calcification speckle, and :func:`segmentation` maps those
   compartments onto the internal labels (1 NCR, 2 ED, 3 ET).

Lengths are in the nominal millimetres of the output grid (see ``anatomy.voxel_size_mm``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from common.contract import ED, ET, NCR, TASK_CLASSES, TASK_COLUMNS, TASKS

# ----------------------------------------------------------------------------- molecular status
#: Fraction of IDH-mutant gliomas that are 1p/19q-codeleted (oligodendrogliomas).
P_CODELETED_GIVEN_MUTANT = 0.4
#: P(HGG = WHO grade 4) per tumor type. WHO CNS5: oligodendrogliomas are grade 2-3 (never 4);
#: IDH-mutant astrocytomas are sometimes grade 4; IDH-wildtype diffuse gliomas are mostly
#: glioblastomas (the rest: lower-grade labels in older series).
P_HGG = {"wildtype": 0.88, "astrocytoma": 0.3, "oligodendroglioma": 0.0}
#: P(MGMT promoter methylated) per tumor type.
P_METHYLATED = {"wildtype": 0.4, "astrocytoma": 0.75, "oligodendroglioma": 0.9}


@dataclass(frozen=True)
class MolecularStatus:
    """The true molecular status and grade of one tumor."""

    idh_mutant: bool
    codeleted: bool
    hgg: bool
    methylated: bool

    def index(self, task: str) -> int:
        """Class index for a task of ``common.contract.TASKS`` (1 = the second class name)."""
        return int({"idh": self.idh_mutant, "1p19q": self.codeleted, "grade": self.hgg,
                    "mgmt": self.methylated}[task])

    def labels(self) -> dict[str, str]:
        """labels.csv values keyed by column: ``{"idh": "mutant", "codeletion_1p19q": ..., ...}``."""
        return {TASK_COLUMNS[t]: TASK_CLASSES[t][self.index(t)] for t in TASKS}

    @property
    def tumor_type(self) -> str:
        if not self.idh_mutant:
            return "wildtype"
        return "oligodendroglioma" if self.codeleted else "astrocytoma"


def sample_status(rng: np.random.Generator, p_idh_mutant: float) -> MolecularStatus:
    """Draw one tumor's status; ``p_idh_mutant`` is the site's class balance."""
    mutant = bool(rng.random() < p_idh_mutant)
    codeleted = mutant and bool(rng.random() < P_CODELETED_GIVEN_MUTANT)
    kind = "wildtype" if not mutant else ("oligodendroglioma" if codeleted else "astrocytoma")
    hgg = bool(rng.random() < P_HGG[kind])
    methylated = bool(rng.random() < P_METHYLATED[kind])
    return MolecularStatus(idh_mutant=mutant, codeleted=codeleted, hgg=hgg, methylated=methylated)


# ----------------------------------------------------------------------------- phenotype
#: Mean "aggressiveness" (0 indolent .. 1 glioblastoma-like) per (IDH-mutant, HGG); the case's
#: value adds Gaussian noise of sd AGGRESSIVENESS_SD. Size, margins, enhancement and necrosis all
#: follow it, which is what makes them informative but overlapping.
AGGRESSIVENESS = {(False, True): 0.75, (False, False): 0.5, (True, True): 0.55, (True, False): 0.3}
AGGRESSIVENESS_SD = 0.25


@dataclass(frozen=True)
class TumorPhenotype:
    """Growth and imaging parameters of one tumor (lengths in mm, rates per day)."""

    frontal_bias: float  # log-weight of the seed per unit of normalised anterior position
    depth_bias: float  # log-weight per unit of normalised depth (> 0 deep white matter, < 0 cortical)
    radius_mm: float  # distance the growth front travels once the seed has saturated
    infiltration_mm: float  # L = sqrt(D_white / rho): width of the infiltrative margin (edema)
    rho_per_day: float  # proliferation rate
    white_grey_ratio: float  # D_white / D_grey (diffusion is faster along white matter)
    edema_threshold: float  # density above which tissue is edema/infiltrated (label ED)
    core_threshold: float  # density above which tissue is tumor core (NCR or ET)
    enhancing: bool
    enhancing_coverage: float  # fraction of the rim that enhances (< 1: patchy enhancement)
    rim_mm: float  # thickness of the enhancing rim
    necrotic: bool  # central necrosis inside an enhancing rim (else solid enhancement)
    enhancement_gain: float  # contrast uptake of the enhancing tumor on T1ce
    mismatch: bool  # T2-FLAIR mismatch (IDH-mutant, 1p/19q-intact astrocytoma)
    calcification: float  # fraction of core voxels with calcification-like speckle
    hemorrhage: bool  # blood products in the core (bright on T1 *and* T1ce, dark on T2)
    heterogeneity: float  # relative amplitude of smooth signal variation inside the tumor


def _chance(rng: np.random.Generator, p: float) -> bool:
    return bool(rng.random() < p)


def sample_phenotype(status: MolecularStatus, rng: np.random.Generator) -> TumorPhenotype:
    """Imaging phenotype of a tumor with ``status``; every trait is a noisy tendency.

    IDH-wildtype / HGG: larger, deeper, diffuse margins with more edema, enhancing with necrosis,
    sometimes hemorrhage. IDH-mutant: smaller, frontal, sharp margins, little (patchy) enhancement;
    1p/19q-intact ones often show the T2-FLAIR mismatch, codeleted ones are cortical and
    heterogeneous with calcification-like speckle. MGMT methylation slightly thins the enhancing rim.
    """
    agg = AGGRESSIVENESS[(status.idh_mutant, status.hgg)] + rng.normal(0.0, AGGRESSIVENESS_SD)
    agg = float(np.clip(agg, 0.0, 1.0))
    if status.idh_mutant:
        frontal = rng.normal(2.5, 1.0)
        depth = rng.normal(-2.5, 0.8) if status.codeleted else rng.normal(-0.5, 1.0)
    else:
        frontal = rng.normal(0.3, 1.0)
        depth = rng.normal(1.5, 1.0)
    enhancing = _chance(rng, 0.08 + 0.9 * agg)
    astro = status.tumor_type == "astrocytoma"
    return TumorPhenotype(
        frontal_bias=float(frontal),
        depth_bias=float(depth),
        radius_mm=float((2.0 + 16.0 * agg) * rng.lognormal(0.0, 0.4)),
        infiltration_mm=float((2.0 + 4.0 * agg) * rng.lognormal(0.0, 0.25)),
        rho_per_day=float(rng.uniform(0.01, 0.04)),
        white_grey_ratio=float(rng.uniform(4.0, 8.0)),
        edema_threshold=float(rng.uniform(0.08, 0.16)),
        core_threshold=float(rng.uniform(0.35, 0.55)),
        enhancing=enhancing,
        enhancing_coverage=float(np.clip(0.25 + 0.75 * agg + rng.normal(0.0, 0.15), 0.15, 1.0)),
        rim_mm=float(rng.uniform(4.0, 9.0) * (0.85 if status.methylated else 1.0)),
        necrotic=enhancing and _chance(rng, 0.1 + 0.85 * agg),
        enhancement_gain=float(rng.uniform(0.85, 1.15)),
        mismatch=_chance(rng, (0.3 if status.hgg else 0.55) if astro else 0.02),
        calcification=float(rng.uniform(0.05, 0.15)) if _chance(rng, 0.7 if status.codeleted else 0.05) else 0.0,
        hemorrhage=_chance(rng, 0.3 if (not status.idh_mutant and status.hgg) else 0.05),
        heterogeneity=float(0.22 if status.codeleted else 0.06 + 0.06 * agg),
    )


# ----------------------------------------------------------------------------- growth
#: Adult diffuse gliomas are supratentorial: seeds are drawn above this normalised height (the
#: tentorium of the MNI template sits at about 0.37 of the brain's inferior-superior extent).
MIN_SEED_HEIGHT = 0.4
#: Seeds need this much tissue (GM + WM fraction) and this depth (mm) from the brain surface.
MIN_SEED_TISSUE = 0.7
MIN_SEED_DEPTH_MM = 8.0


def choose_seed(
    gm: np.ndarray, wm: np.ndarray, brain: np.ndarray, phenotype: TumorPhenotype,
    voxel_mm: float, rng: np.random.Generator,
) -> tuple[int, int, int]:
    """Voxel (X, Y, Z) where the tumor starts, drawn with weight
    ``exp(frontal_bias * anterior + depth_bias * depth)`` over supratentorial tissue voxels.

    Args: tissue maps (X, Y, Z) of the grid the tumor grows on; ``voxel_mm`` its voxel size.
    """
    inside = brain > 0.5
    depth_mm = ndimage.distance_transform_edt(inside) * voxel_mm
    coords = np.argwhere(inside)
    lo, hi = coords.min(0), coords.max(0)
    span = np.maximum(hi - lo, 1)
    candidate = inside & ((gm + wm) >= MIN_SEED_TISSUE) & (depth_mm >= MIN_SEED_DEPTH_MM)
    height = (np.arange(gm.shape[2]) - lo[2]) / span[2]
    candidate &= (height >= MIN_SEED_HEIGHT)[None, None, :]
    if not candidate.any():  # tiny grids: fall back to any tissue voxel
        candidate = inside & ((gm + wm) > 0.5)
    idx = np.argwhere(candidate)
    anterior = (idx[:, 1] - lo[1]) / span[1]
    depth = depth_mm[candidate] / depth_mm.max()
    logw = phenotype.frontal_bias * anterior + phenotype.depth_bias * depth
    w = np.exp(logw - logw.max())
    pick = idx[rng.choice(len(idx), p=w / w.sum())]
    return int(pick[0]), int(pick[1]), int(pick[2])


def _face_diffusivity(d: np.ndarray, axis: int) -> np.ndarray:
    """Harmonic mean of D over the faces between neighbours along ``axis`` (zero when either side
    is zero, i.e. no flux into CSF or out of the brain)."""
    a = np.take(d, np.arange(d.shape[axis] - 1), axis=axis)
    b = np.take(d, np.arange(1, d.shape[axis]), axis=axis)
    return (2.0 * a * b / np.maximum(a + b, 1e-12)).astype(np.float32)


#: Time (in units of 1/rho) for the seed to saturate before the front travels: without it
#: diffusive tumors (large L) spread out before any core forms.
ESTABLISH_GROWTH_TIMES = 2.5
#: Upper bound on solver steps (a safety net; the default sizes need 20-150).
MAX_STEPS = 800


def grow_tumor(
    gm: np.ndarray, wm: np.ndarray, brain: np.ndarray, seed: tuple[int, int, int],
    phenotype: TumorPhenotype, voxel_mm: float,
) -> np.ndarray:
    """Tumor cell density u in [0, 1], float32 (X, Y, Z), on the grid of the tissue maps.

    Explicit Euler on du/dt = div(D grad u) + rho u (1 - u) with D = D_white * wm + D_grey * gm
    (0 in CSF and outside the brain) and proliferation only in tissue. The flux form with face
    diffusivities is written out because scipy.ndimage.laplace assumes a constant D; with D = 0
    across the brain boundary the scheme is no-flux there. The time step respects the explicit
    stability limit dt <= h^2 / (6 D_max) and keeps rho dt <= 0.2.
    """
    rho = phenotype.rho_per_day
    d_white = phenotype.infiltration_mm**2 * rho  # L = sqrt(D / rho)
    d = (d_white * wm + d_white / phenotype.white_grey_ratio * gm) * (brain > 0.5)
    faces = [_face_diffusivity(d.astype(np.float32), axis) for axis in range(3)]
    growth = (rho * np.clip(gm + wm, 0.0, 1.0)).astype(np.float32)
    # Front speed of Fisher-KPP is 2 sqrt(D rho): run until the front has covered radius_mm.
    days = phenotype.radius_mm / (2.0 * math.sqrt(d_white * rho)) + ESTABLISH_GROWTH_TIMES / rho
    dt_max = min(0.9 * voxel_mm**2 / (6.0 * d_white), 0.2 / rho)
    steps = min(max(math.ceil(days / dt_max), 20), MAX_STEPS)
    dt = min(days / steps, dt_max)

    grid = np.indices(gm.shape, dtype=np.float32)
    r2 = sum((g - s) ** 2 for g, s in zip(grid, seed)) * voxel_mm**2
    sigma_mm = max(voxel_mm, 4.0)
    u = (np.exp(-r2 / (2.0 * sigma_mm**2)) * (brain > 0.5)).astype(np.float32)
    inv_h2 = np.float32(1.0 / voxel_mm**2)
    div = np.empty_like(u)
    for _ in range(steps):
        div.fill(0.0)
        for axis, face in enumerate(faces):
            flux = face * np.diff(u, axis=axis)  # D du along the axis, on faces (n - 1 long)
            lo = [slice(None)] * 3
            hi = [slice(None)] * 3
            lo[axis], hi[axis] = slice(0, -1), slice(1, None)
            div[tuple(lo)] += flux
            div[tuple(hi)] -= flux
        u += np.float32(dt) * (div * inv_h2 + growth * u * (1.0 - u))
        np.clip(u, 0.0, 1.0, out=u)
    return u


# ----------------------------------------------------------------------------- compartments
#: Compartment codes of :func:`compartments` (richer than the segmentation labels: the imaging
#: model needs to know *why* a core voxel is NCR).
NORMAL, EDEMA, SOLID, NECROSIS, ENHANCING, HEMORRHAGE, CALCIFICATION = range(7)
#: Compartment -> internal segmentation label.
COMPARTMENT_LABEL = {NORMAL: 0, EDEMA: ED, SOLID: NCR, NECROSIS: NCR, ENHANCING: ET,
                     HEMORRHAGE: NCR, CALCIFICATION: NCR}


def smooth_field(shape: tuple[int, ...], sigma_vox: float, rng: np.random.Generator) -> np.ndarray:
    """Zero-mean, unit-variance Gaussian random field (float32) smoothed with ``sigma_vox``."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma_vox)
    return (field / max(float(field.std()), 1e-6)).astype(np.float32)


def _top_fraction(mask: np.ndarray, field: np.ndarray, fraction: float) -> np.ndarray:
    """The ``fraction`` of ``mask`` voxels where ``field`` is largest (smooth blobs for a smooth field)."""
    if not mask.any() or fraction <= 0.0:
        return np.zeros_like(mask)
    cut = np.quantile(field[mask], 1.0 - min(fraction, 1.0))
    return mask & (field >= cut)


def bounding_box(mask: np.ndarray, margin: int) -> tuple[slice, ...]:
    """Slices of the smallest box holding every True voxel of ``mask``, grown by ``margin`` voxels
    (clipped to the array). Tumor work is done inside this box: it is a small part of the volume."""
    idx = np.argwhere(mask)
    lo = np.maximum(idx.min(0) - margin, 0)
    hi = np.minimum(idx.max(0) + margin + 1, mask.shape)
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))


def compartments(
    u: np.ndarray, brain: np.ndarray, phenotype: TumorPhenotype, voxel_mm: float, rng: np.random.Generator,
) -> np.ndarray:
    """Compartment codes (uint8, X, Y, Z) from the density ``u`` (X, Y, Z) of one tumor.

    Edema where u >= edema_threshold; the core (u >= core_threshold) is non-enhancing solid
    tumor, or for enhancing tumors an enhancing rim of ``rim_mm`` (at least one voxel; patchy when
    ``enhancing_coverage`` < 1) around necrosis or solid enhancement. Hemorrhage and calcification
    speckle replace some core voxels. Everything stays inside the brain mask.
    """
    inside = brain > 0.5
    out = np.zeros(u.shape, dtype=np.uint8)
    tumor = (u >= phenotype.edema_threshold) & inside
    if not tumor.any():
        return out
    box = bounding_box(tumor, margin=2)  # the margin keeps the core off the box edge (EDT below)
    out[box] = _compartments_in_box(u[box], inside[box], phenotype, voxel_mm, rng)
    return out


def _compartments_in_box(
    u: np.ndarray, inside: np.ndarray, phenotype: TumorPhenotype, voxel_mm: float, rng: np.random.Generator,
) -> np.ndarray:
    out = np.zeros(u.shape, dtype=np.uint8)
    out[(u >= phenotype.edema_threshold) & inside] = EDEMA
    core = (u >= phenotype.core_threshold) & inside
    out[core] = SOLID
    if not core.any():
        return out
    patches = smooth_field(u.shape, sigma_vox=max(6.0 / voxel_mm, 0.8), rng=rng)
    if phenotype.enhancing:
        depth_vox = ndimage.distance_transform_edt(core)
        rim = core & (depth_vox <= max(1.0, phenotype.rim_mm / voxel_mm))
        centre = core & ~rim
        out[_top_fraction(rim, patches, phenotype.enhancing_coverage)] = ENHANCING
        out[centre] = NECROSIS if phenotype.necrotic else ENHANCING
    if phenotype.hemorrhage:
        host = (out == NECROSIS) if (out == NECROSIS).any() else core
        out[_top_fraction(host, -patches, 0.25)] = HEMORRHAGE
    if phenotype.calcification > 0.0:
        speckle = core & (rng.random(u.shape) < phenotype.calcification)
        out[speckle] = CALCIFICATION
    return out


def segmentation(codes: np.ndarray) -> np.ndarray:
    """Internal segmentation labels (uint8: 0, 1 NCR, 2 ED, 3 ET) of a compartment map."""
    lut = np.zeros(max(COMPARTMENT_LABEL) + 1, dtype=np.uint8)
    for code, label in COMPARTMENT_LABEL.items():
        lut[code] = label
    return lut[codes]
