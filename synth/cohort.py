"""Write a synthetic multi-center glioma cohort in the site data contract (DESIGN.md section 3).

Output layout::

    OUT/cohort.json            what was generated per site (naming, scanner, counts, shape, seed)
    OUT/ground_truth.csv       every case's true status and tumor volumes (benchmarks only)
    OUT/site-a/labels.csv      known labels and survival (days, event); empty = unknown
    OUT/site-a/<case>/<case>_t1.nii.gz ...   (or <case>-t1n.nii.gz ..., per site naming)
    OUT/heldout/...            the independent held-out center (complete sequences and labels)

Every case draws from its own random streams, derived from (seed, site, case index), so the
cohort does not depend on the order in which cases are generated or on the number of workers.
"""

from __future__ import annotations

import csv
import json
import multiprocessing
import os
import zlib
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

import nibabel as nib
import numpy as np
from scipy import ndimage

from common.contract import (
    ET,
    LABELS_CSV,
    LABELS_CSV_COLUMNS,
    LABELS_CSV_OPTIONAL,
    LEGACY_ET,
    NAMING,
    NCR,
    SEQUENCES,
    SURVIVAL_DAYS,
    SURVIVAL_EVENT,
    TASK_CLASSES,
    TASK_COLUMNS,
    TASKS,
)
from synth import anatomy as anat
from synth.mri import ScannerProfile, bias_field, contrasts, scanner_signal
from synth.survival import log_hazard_ratio, sample_survival
from synth.tumor import (
    MolecularStatus,
    TumorPhenotype,
    choose_seed,
    compartments,
    grow_tumor,
    sample_phenotype,
    sample_status,
    segmentation,
)

COHORT_JSON = "cohort.json"
GROUND_TRUTH_CSV = "ground_truth.csv"
HELDOUT = "heldout"
GENERATOR = "fedglioma synth"
#: Written first and removed last: a folder holding it is an interrupted cohort that may be replaced.
IN_PROGRESS = ".synth-in-progress.json"
GROUND_TRUTH_COLUMNS: tuple[str, ...] = (
    "site", "case_id", *(TASK_COLUMNS[t] for t in TASKS),
    "wt_volume_ml", "tc_volume_ml", "et_volume_ml", "enhancing_fraction",
    "necrosis", "t2_flair_mismatch", "calcification", "hemorrhage",
    SURVIVAL_DAYS, SURVIVAL_EVENT, "log_hazard_ratio",
)


class CohortError(Exception):
    """The cohort cannot be written (bad argument or output folder); the message says the fix."""


# ----------------------------------------------------------------------------- profiles
@dataclass(frozen=True)
class SiteProfile:
    """What distinguishes one center: scanner, file naming, missing sequences and labels, class balance.

    ``missing_sequences``/``missing_labels`` give, per sequence/task, the probability that a case
    lacks it (1.0: no case has it), ``missing_survival`` that its survival is unknown; each case
    draws independently.
    """

    key: str
    description: str
    naming: str
    scanner: ScannerProfile
    p_idh_mutant: float
    missing_sequences: Mapping[str, float] = field(default_factory=dict)
    missing_labels: Mapping[str, float] = field(default_factory=dict)
    segmentations: bool = True
    missing_survival: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "profile": self.key, "description": self.description, "naming": self.naming,
            "et_label": LEGACY_ET if self.naming == "brats2021" else ET,
            "scanner": self.scanner.as_dict(), "p_idh_mutant": self.p_idh_mutant,
            "missing_sequences": dict(self.missing_sequences), "missing_labels": dict(self.missing_labels),
            "segmentations": self.segmentations, "missing_survival": self.missing_survival,
        }


#: Training-site profiles; site i (site-a, site-b, ...) uses profile i modulo their number.
SITE_PROFILES: tuple[SiteProfile, ...] = (
    SiteProfile(
        "A", "complete sequences, all labels; 3T, isotropic", "brats2021",
        ScannerProfile(scale=1000.0, offset=0.0, gamma=1.0, noise=0.025, bias=0.12),
        p_idh_mutant=0.35,
    ),
    SiteProfile(
        "B", "no T1 at all; thick axial slices; 20-50 % labels missing", "brats2023",
        ScannerProfile(scale=450.0, offset=20.0, gamma=0.85, noise=0.04, bias=0.22, slice_mm=7.0, slice_axis=2),
        p_idh_mutant=0.45,
        missing_sequences={"t1": 1.0},
        missing_labels={"idh": 0.3, "1p19q": 0.5, "grade": 0.2, "mgmt": 0.4},
        missing_survival=0.3,
    ),
    SiteProfile(
        "C", "only T1ce and FLAIR; noisy 1.5T, thick sagittal slices; 60 % labels missing", "brats2021",
        ScannerProfile(scale=2500.0, offset=100.0, gamma=1.15, noise=0.05, bias=0.28, slice_mm=6.0, slice_axis=0),
        p_idh_mutant=0.3,
        missing_sequences={"t1": 1.0, "t2": 1.0},
        missing_labels={t: 0.6 for t in TASKS},
        missing_survival=0.6,
    ),
    SiteProfile(
        "D", "T2 missing for ~40 % of cases; MGMT rarely tested", "brats2023",
        ScannerProfile(scale=1.0, offset=0.0, gamma=1.05, noise=0.03, bias=0.18, slice_mm=5.0, slice_axis=1),
        p_idh_mutant=0.4,
        missing_sequences={"t2": 0.4},
        missing_labels={"mgmt": 0.5},
        missing_survival=0.2,
    ),
    SiteProfile(
        "E", "FLAIR missing for ~25 % of cases; 40 % labels missing", "brats2021",
        ScannerProfile(scale=700.0, offset=5.0, gamma=0.95, noise=0.035, bias=0.15, slice_mm=4.5, slice_axis=2),
        p_idh_mutant=0.5,
        missing_sequences={"flair": 0.25},
        missing_labels={t: 0.4 for t in TASKS},
        missing_survival=0.4,
    ),
)
#: The independent held-out center: its own scanner and class balance, complete data.
HELDOUT_PROFILE = SiteProfile(
    "H", "held-out center: complete sequences and labels, own scanner", "brats2023",
    ScannerProfile(scale=1500.0, offset=30.0, gamma=0.92, noise=0.035, bias=0.2, slice_mm=5.5, slice_axis=2),
    p_idh_mutant=0.5,
)


@dataclass(frozen=True)
class Preset:
    """Cohort size: training sites, cases per site, held-out cases, cubic shape (voxels)."""

    sites: int
    cases_per_site: int
    heldout_cases: int
    shape: int


PRESETS: Mapping[str, Preset] = MappingProxyType({
    "tiny": Preset(sites=3, cases_per_site=8, heldout_cases=8, shape=32),
    "demo": Preset(sites=4, cases_per_site=30, heldout_cases=30, shape=64),
    "bench": Preset(sites=4, cases_per_site=60, heldout_cases=60, shape=64),
    # classification benchmark: a held-out center large enough for AUC claims (SE ~0.03 at 200)
    "bench-cls": Preset(sites=4, cases_per_site=60, heldout_cases=200, shape=64),
})


def cohort_site_name(index: int) -> str:
    """``0 -> "site-a"``, ``25 -> "site-z"``, ``26 -> "site-ba"`` (letters as base-26 digits)."""
    letters = ""
    n = index
    while True:
        letters = chr(ord("a") + n % 26) + letters
        n //= 26
        if n == 0:
            return f"site-{letters}"


def solver_grid(shape: int) -> int:
    """Grid (voxels per side) the reaction-diffusion runs on: about half the output resolution,
    never below 24 (or the output itself); the density is upsampled linearly afterwards."""
    return min(shape, max(24, shape // 2))


# ----------------------------------------------------------------------------- one case
@dataclass(frozen=True)
class CaseSpec:
    """Everything a worker needs to generate and write one case."""

    site: str
    index: int
    seed: int
    shape: int
    profile: SiteProfile
    out: Path

    @property
    def case_id(self) -> str:
        return f"{self.site}-{self.index + 1:03d}"


@dataclass
class SyntheticCase:
    """One generated case in memory (before missingness is applied to the files).

    ``images``: all four sequences, float32 (X, Y, Z); ``seg``: internal labels uint8 (X, Y, Z);
    ``brain``: the case's brain mask (bool); ``available``/``known``: what the site provides;
    ``survival``: observed (days, event) (:func:`synth.survival.sample_survival`), in labels.csv
    when ``survival_known``.
    """

    spec: CaseSpec
    images: dict[str, np.ndarray]
    seg: np.ndarray
    brain: np.ndarray
    status: MolecularStatus
    phenotype: TumorPhenotype
    available: tuple[str, ...]
    known: tuple[str, ...]
    survival: tuple[float, int] = (0.0, 0)
    survival_known: bool = False


def case_rngs(seed: int, site: str, index: int) -> dict[str, np.random.Generator]:
    """Independent random streams of one case, derived from (seed, site, case index) only."""
    # new streams go last: spawning more children leaves the first ones (and so the voxels) as they were
    names = ("status", "phenotype", "seed", "pose", "compartments", "contrast", "scanner", "availability", "survival")
    root = np.random.SeedSequence(entropy=seed, spawn_key=(zlib.crc32(site.encode()), index))
    return {name: np.random.default_rng(child) for name, child in zip(names, root.spawn(len(names)))}


def make_case(spec: CaseSpec) -> SyntheticCase:
    """Generate one case: status -> phenotype -> tumor growth -> pose -> contrasts -> scanner."""
    rng = case_rngs(spec.seed, spec.site, spec.index)
    profile = spec.profile
    status = sample_status(rng["status"], profile.p_idh_mutant)
    phenotype = sample_phenotype(status, rng["phenotype"])

    fine = anat.load_anatomy(spec.shape)
    n_solver = solver_grid(spec.shape)
    coarse = anat.load_anatomy(n_solver)
    coarse_mm = anat.voxel_size_mm(n_solver)
    seed_vox = choose_seed(coarse.gm, coarse.wm, coarse.brain, phenotype, coarse_mm, rng["seed"])
    density = grow_tumor(coarse.gm, coarse.wm, coarse.brain, seed_vox, phenotype, coarse_mm)
    if n_solver != spec.shape:
        density = ndimage.zoom(density, spec.shape / n_solver, order=1, mode="nearest", grid_mode=True)

    # The tumor grew in template space; the case's head pose moves anatomy and tumor together.
    pose = anat.sample_pose(rng["pose"], spec.shape)
    posed = anat.deform(np.concatenate([fine.stack(), density[None]]), pose)
    anatomy = anat.Anatomy.from_stack(posed[:-1])
    density = np.clip(posed[-1], 0.0, 1.0)
    voxel_mm = anat.voxel_size_mm(spec.shape)
    codes = compartments(density, anatomy.brain, phenotype, voxel_mm, rng["compartments"])
    clean = contrasts(anatomy, codes, density, phenotype, rng["contrast"])

    scanner_rng = rng["scanner"]
    bias = bias_field((spec.shape,) * 3, profile.scanner.bias, scanner_rng)
    gain = float(scanner_rng.uniform(0.93, 1.07))
    images = {
        seq: scanner_signal(clean[seq], anatomy.brain, profile.scanner, voxel_mm, bias, scanner_rng, gain)
        for seq in SEQUENCES
    }
    avail_rng = rng["availability"]
    draws = avail_rng.random(len(SEQUENCES))  # always one draw per sequence and per task, so that
    label_draws = avail_rng.random(len(TASKS))  # a profile change never shifts other streams
    available = tuple(s for s, d in zip(SEQUENCES, draws) if d >= profile.missing_sequences.get(s, 0.0))
    if not available:  # a case without any image is no case; no profile asks for it, but be safe
        available = (SEQUENCES[-1],)
    known = tuple(t for t, d in zip(TASKS, label_draws) if d >= profile.missing_labels.get(t, 0.0))
    survival = sample_survival(status, rng["survival"])
    survival_known = bool(rng["survival"].random() >= profile.missing_survival)
    return SyntheticCase(spec, images, segmentation(codes), anatomy.brain > 0.5, status, phenotype, available, known,
                         survival, survival_known)


def case_file(folder: Path, case_id: str, naming: str, key: str) -> Path:
    """Path of sequence (or ``"seg"``) ``key`` of a case in ``naming``."""
    return folder / case_id / f"{case_id}{NAMING[naming][key]}.nii.gz"


def write_case(case: SyntheticCase) -> dict[str, Any]:
    """Write the case's available sequences and segmentation; return its ground-truth record."""
    spec = case.spec
    naming = spec.profile.naming
    site_dir = spec.out / spec.site
    affine = anat.nifti_affine(spec.shape)
    (site_dir / spec.case_id).mkdir(parents=True, exist_ok=True)
    def save(data: np.ndarray, key: str) -> None:
        img = nib.Nifti1Image(data, affine, dtype=data.dtype)
        img.header.set_xyzt_units("mm")
        nib.save(img, case_file(site_dir, spec.case_id, naming, key))

    for seq in case.available:
        save(case.images[seq], seq)  # float32
    if spec.profile.segmentations:
        seg = case.seg.copy()  # uint8
        if naming == "brats2021":
            seg[seg == ET] = LEGACY_ET
        save(seg, "seg")
    return ground_truth_record(case)


def ground_truth_record(case: SyntheticCase) -> dict[str, Any]:
    """The row of ground_truth.csv plus what cohort.json counts (availability, known labels)."""
    ml = anat.voxel_size_mm(case.spec.shape) ** 3 / 1000.0
    wt = int(np.count_nonzero(case.seg))
    et = int(np.count_nonzero(case.seg == ET))
    tc = et + int(np.count_nonzero(case.seg == NCR))
    p = case.phenotype
    return {
        "site": case.spec.site, "case_id": case.spec.case_id, **case.status.labels(),
        "wt_volume_ml": round(wt * ml, 3), "tc_volume_ml": round(tc * ml, 3), "et_volume_ml": round(et * ml, 3),
        "enhancing_fraction": round(et / tc, 4) if tc else 0.0,
        "necrosis": int(p.necrotic), "t2_flair_mismatch": int(p.mismatch),
        "calcification": int(p.calcification > 0), "hemorrhage": int(p.hemorrhage),
        SURVIVAL_DAYS: int(case.survival[0]), SURVIVAL_EVENT: case.survival[1],
        "log_hazard_ratio": round(log_hazard_ratio(case.status), 4),
        "_available": list(case.available), "_known": list(case.known), "_survival_known": case.survival_known,
    }


def generate_and_write(spec: CaseSpec) -> dict[str, Any]:
    """Worker entry point: generate one case and write it (see :func:`write_case`)."""
    return write_case(make_case(spec))


def _init_worker(anatomies: dict[int, anat.Anatomy]) -> None:
    """Hand the parent's resampled anatomy to a worker so it does not load nilearn again."""
    for shape, anatomy in anatomies.items():
        anat.register_anatomy(shape, anatomy)


# ----------------------------------------------------------------------------- output folder
def _previous_cohort(out: Path) -> dict[str, Any] | None:
    """The record of a cohort this generator wrote into ``out`` (finished or interrupted), else None."""
    for name in (IN_PROGRESS, COHORT_JSON):
        path = out / name
        if path.is_file():
            try:
                record = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            if isinstance(record, dict) and record.get("generator") == GENERATOR:
                return record
    return None


def _plain_name(name: Any, where: Path) -> str:
    """A site or case name from a previous cohort record, refused if it could point outside ``out``."""
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name:
        raise CohortError(f"{where} lists {name!r}, which is not a plain folder name; delete that cohort by hand")
    return name


def _remove_previous(out: Path, record: Mapping[str, Any]) -> None:
    """Delete exactly the files a previous cohort wrote (never anything else), then empty folders."""
    for site, info in record.get("sites", {}).items():
        site_dir = out / _plain_name(site, out)
        naming = info.get("naming", "brats2021")
        if naming not in NAMING:
            raise CohortError(
                f"{out / COHORT_JSON} names an unknown file naming {naming!r}; delete that cohort by hand"
            )
        for name in info.get("cases", []):
            case_id = _plain_name(name, out)
            for key in (*SEQUENCES, "seg"):
                case_file(site_dir, case_id, naming, key).unlink(missing_ok=True)
            _rmdir_if_empty(site_dir / case_id)
        (site_dir / LABELS_CSV).unlink(missing_ok=True)
        _rmdir_if_empty(site_dir)
    for name in (GROUND_TRUTH_CSV, COHORT_JSON, IN_PROGRESS):
        (out / name).unlink(missing_ok=True)


def _rmdir_if_empty(path: Path) -> None:
    if path.is_dir() and not any(path.iterdir()):
        path.rmdir()


def prepare_output(out: Path, force: bool) -> None:
    """Make ``out`` ready: create it, or replace a previous cohort there; refuse other content.

    Raises:
        CohortError: ``out`` is a file, or a non-empty folder that is not a previous cohort and
            ``force`` is False. With ``force`` the cohort is written next to the existing files
            (files with a cohort file's name are overwritten; nothing else is deleted).
    """
    if out.exists() and not out.is_dir():
        raise CohortError(f"{out} exists and is not a folder; choose another OUT path")
    out.mkdir(parents=True, exist_ok=True)
    previous = _previous_cohort(out)
    if previous is not None:
        _remove_previous(out, previous)
    elif any(out.iterdir()) and not force:
        shown = ", ".join(sorted(p.name for p in out.iterdir())[:5])
        raise CohortError(
            f"{out} is not empty ({shown}, ...) and holds no previous synthetic cohort ({COHORT_JSON}); "
            "choose an empty or new folder, or pass --force (force=True) to write the cohort next to "
            "the existing files (nothing else is deleted)"
        )


# ----------------------------------------------------------------------------- the cohort
def resolve_preset(
    preset: str, sites: int | None, cases_per_site: int | None, heldout_cases: int | None, shape: int | None
) -> Preset:
    """The preset with explicit values overriding it; validates every value."""
    if preset not in PRESETS:
        raise CohortError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    base = PRESETS[preset]
    chosen = Preset(
        sites=base.sites if sites is None else sites,
        cases_per_site=base.cases_per_site if cases_per_site is None else cases_per_site,
        heldout_cases=base.heldout_cases if heldout_cases is None else heldout_cases,
        shape=base.shape if shape is None else shape,
    )
    for name in ("sites", "cases_per_site", "heldout_cases"):
        if getattr(chosen, name) < 1:
            raise CohortError(f"{name.replace('_', '-')} must be at least 1 (got {getattr(chosen, name)})")
    if chosen.shape < 16:
        raise CohortError(f"shape must be at least 16 voxels (got {chosen.shape}); a brain needs room")
    return chosen


def site_plan(size: Preset) -> dict[str, tuple[str, SiteProfile]]:
    """``{site name: (role, profile)}``: training sites cycling through SITE_PROFILES, then heldout."""
    plan = {cohort_site_name(i): ("train", SITE_PROFILES[i % len(SITE_PROFILES)]) for i in range(size.sites)}
    plan[HELDOUT] = ("heldout", HELDOUT_PROFILE)
    return plan


def _site_summary(role: str, profile: SiteProfile, records: list[dict[str, Any]]) -> dict[str, Any]:
    labels: dict[str, dict[str, int]] = {}
    for task in TASKS:
        column = TASK_COLUMNS[task]
        known = [r[column] for r in records if task in r["_known"]]
        labels[task] = {"known": len(known), "unknown": len(records) - len(known),
                        **{name: known.count(name) for name in TASK_CLASSES[task]}}
    return {
        "role": role, **profile.as_dict(), "n_cases": len(records),
        "sequences": {s: sum(s in r["_available"] for r in records) for s in SEQUENCES},
        "segmentation_count": len(records) if profile.segmentations else 0,
        "labels": labels,
        "survival": {"known": sum(r["_survival_known"] for r in records),
                     "events": sum(r[SURVIVAL_EVENT] for r in records if r["_survival_known"])},
        "cases": [r["case_id"] for r in records],
    }


def _write_labels_csv(site_dir: Path, records: list[dict[str, Any]]) -> None:
    with (site_dir / LABELS_CSV).open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(LABELS_CSV_COLUMNS + LABELS_CSV_OPTIONAL)
        for r in records:
            survival = [r[SURVIVAL_DAYS], r[SURVIVAL_EVENT]] if r["_survival_known"] else ["", ""]
            writer.writerow([r["case_id"], *(r[TASK_COLUMNS[t]] if t in r["_known"] else "" for t in TASKS), *survival])


def _write_ground_truth(out: Path, records: list[dict[str, Any]]) -> None:
    with (out / GROUND_TRUTH_CSV).open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=GROUND_TRUTH_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(records)


def _run_cases(specs: list[CaseSpec], workers: int, shapes: tuple[int, ...]) -> list[dict[str, Any]]:
    anat.preload(shapes)
    if workers <= 1 or len(specs) <= 1:
        return [generate_and_write(s) for s in specs]
    anatomies = {s: anat.load_anatomy(s) for s in shapes}
    # forkserver/spawn: never fork a parent that may run threads (torch, BLAS); the anatomy is
    # handed over once per worker instead of being recomputed there.
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
    try:
        with ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_init_worker,
                                 initargs=(anatomies,)) as pool:
            return list(pool.map(generate_and_write, specs, chunksize=max(1, len(specs) // (4 * workers))))
    except (BrokenProcessPool, BrokenPipeError) as exc:
        raise CohortError(
            f"a worker process of the cohort generator died ({type(exc).__name__}: {exc}). If you call "
            "generate_cohort from a script, put the call under `if __name__ == \"__main__\":` (workers "
            "re-import the main module), or pass workers=1"
        ) from exc


def generate_cohort(
    out: Path,
    preset: str = "tiny",
    *,
    sites: int | None = None,
    cases_per_site: int | None = None,
    heldout_cases: int | None = None,
    shape: int | None = None,
    seed: int = 0,
    force: bool = False,
    workers: int = 2,
) -> dict[str, Any]:
    """Write a synthetic multi-center cohort to ``out`` and return the content of its cohort.json.

    Args:
        out: output folder (created; a previous cohort there is replaced).
        preset: "tiny", "demo" or "bench" (see PRESETS); the other size arguments override it.
        sites: number of training sites (site-a, site-b, ...; profiles cycle).
        cases_per_site: cases per training site.
        heldout_cases: cases of the held-out center (``out/heldout``).
        shape: cubic volume size in voxels (voxel size 240 mm / shape).
        seed: the cohort's seed; the same arguments give the same voxels and labels.
        force: write into a non-empty folder that is not a previous cohort.
        workers: processes generating cases in parallel (1: in this process). The workers are
            started with forkserver/spawn, which re-import the main module: call this from a
            script under ``if __name__ == "__main__":``.

    Raises:
        CohortError: a bad argument or an output folder that may not be written.
    """
    size = resolve_preset(preset, sites, cases_per_site, heldout_cases, shape)
    if workers < 1:
        raise CohortError(f"workers must be at least 1 (got {workers})")
    out = Path(out).expanduser().resolve()
    plan = site_plan(size)
    specs = {
        site: [CaseSpec(site, i, seed, size.shape, profile, out)
               for i in range(size.heldout_cases if role == "heldout" else size.cases_per_site)]
        for site, (role, profile) in plan.items()
    }
    prepare_output(out, force)
    cohort: dict[str, Any] = {
        "generator": GENERATOR, "format": 1, "preset": preset, "seed": seed,
        "shape": [size.shape] * 3, "voxel_mm": anat.voxel_size_mm(size.shape),
        "solver_grid": solver_grid(size.shape), "ground_truth": GROUND_TRUTH_CSV,
        "sites": {site: {"naming": p.naming, "cases": [s.case_id for s in specs[site]]}
                  for site, (_, p) in plan.items()},
    }
    (out / IN_PROGRESS).write_text(json.dumps(cohort, indent=1))  # lets a re-run clean up after a crash

    flat = [s for site_specs in specs.values() for s in site_specs]
    records = _run_cases(flat, workers, (size.shape, solver_grid(size.shape)))
    by_site: dict[str, list[dict[str, Any]]] = {site: [] for site in plan}
    for record in records:
        by_site[record["site"]].append(record)
    for site, site_records in by_site.items():
        _write_labels_csv(out / site, site_records)
    _write_ground_truth(out, records)
    cohort["sites"] = {site: _site_summary(role, profile, by_site[site]) for site, (role, profile) in plan.items()}
    tmp = out / (COHORT_JSON + ".tmp")
    tmp.write_text(json.dumps(cohort, indent=1))
    os.replace(tmp, out / COHORT_JSON)
    (out / IN_PROGRESS).unlink()
    return cohort


def format_summary(cohort: Mapping[str, Any]) -> str:
    """A short per-site table of a cohort.json: naming, cases, sequences, labels known, IDH-mutant share."""
    header = f"{'site':<9} {'role':<8} {'naming':<10} {'cases':>5}  {'t1':>4} {'t1ce':>4} {'t2':>4} {'flair':>5}  " \
             f"{'labels known (idh/1p19q/grade/mgmt)':<36} {'IDH-mut':>7}"
    lines = [header, "-" * len(header)]
    for site, s in cohort["sites"].items():
        seqs = s["sequences"]
        known = "/".join(str(s["labels"][t]["known"]) for t in TASKS)
        idh = s["labels"]["idh"]
        mutant = f"{idh['mutant'] / idh['known']:.0%}" if idh["known"] else "n/a"
        lines.append(
            f"{site:<9} {s['role']:<8} {s['naming']:<10} {s['n_cases']:>5}  {seqs['t1']:>4} {seqs['t1ce']:>4} "
            f"{seqs['t2']:>4} {seqs['flair']:>5}  {known:<36} {mutant:>7}"
        )
    shape = "x".join(map(str, cohort["shape"]))
    lines.append(
        f"shape {shape} ({cohort['voxel_mm']:.2f} mm voxels), seed {cohort['seed']}, preset {cohort['preset']}"
    )
    return "\n".join(lines)
