"""Writers of tiny synthetic BraTS-style cases for tests (no image files live in the repository).

``write_case`` draws a brain-like ellipsoid (background exactly 0) with a spherical tumor
(edema shell, enhancing ring, necrotic core) and writes one NIfTI per requested sequence plus the
segmentation, named in either BraTS convention. Everything is deterministic given ``rng``
(default: seeded from the case ID).
"""

from __future__ import annotations

import csv
import gzip
import zlib
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import nibabel as nib
import numpy as np

from common.contract import ED, ET, LABELS_CSV, LABELS_CSV_COLUMNS, LEGACY_ET, NAMING, NCR, SEQUENCES

#: Mean intensity of (brain, edema, enhancing, necrosis) per sequence: different contrasts, so a
#: channel mix-up shows in tests.
CONTRASTS: Mapping[str, tuple[float, float, float, float]] = {
    "t1": (300.0, 250.0, 280.0, 150.0),
    "t1ce": (320.0, 300.0, 700.0, 120.0),
    "t2": (200.0, 500.0, 350.0, 600.0),
    "flair": (250.0, 600.0, 400.0, 300.0),
}


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    """Write ``data`` (X, Y, Z) with ``affine`` (default identity, 1 mm) to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else np.asarray(affine, dtype=float)), path)
    return path


def patch_header(path: Path, **fields: object) -> Path:
    """Overwrite NIfTI-1 header ``fields`` (e.g. ``pixdim=[...]``, ``dim=[...]``, ``scl_slope=1e37``)
    of the file at ``path`` in place, voxels untouched. Bypasses nibabel's save-time fixes (which
    would, e.g., turn a zero pixdim into 1), to write headers as a broken exporter would."""
    compressed = path.name.endswith(".gz")
    raw = gzip.decompress(path.read_bytes()) if compressed else path.read_bytes()
    header = nib.Nifti1Header(binaryblock=raw[:348], check=False)
    for name, value in fields.items():
        header[name] = value
    patched = header.binaryblock + raw[348:]
    path.write_bytes(gzip.compress(patched) if compressed else patched)
    return path


def case_path(site_dir: Path, case_id: str, key: str, naming: str = "brats2021", ext: str = ".nii.gz") -> Path:
    """Where ``write_case`` puts sequence (or ``"seg"``) ``key`` of a case."""
    return Path(site_dir) / case_id / f"{case_id}{NAMING[naming][key]}{ext}"


def synthetic_volumes(
    shape: Sequence[int], et_label: int = 3, rng: np.random.Generator | None = None
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """One case's images ``{sequence: float32 (X, Y, Z)}`` and segmentation ``uint8 (X, Y, Z)``."""
    rng = rng or np.random.default_rng(0)
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij"))
    center = (np.asarray(shape, dtype=np.float32) - 1) / 2
    radii = np.asarray(shape, dtype=np.float32) * 0.4
    brain = (((grid - center[:, None, None, None]) / radii[:, None, None, None]) ** 2).sum(0) <= 1.0
    tumor_center = center + rng.uniform(-0.08, 0.08, size=3) * np.asarray(shape)
    r = np.sqrt(((grid - tumor_center[:, None, None, None]) ** 2).sum(0)) / min(shape)
    seg = np.zeros(shape, dtype=np.uint8)
    seg[(r <= 0.25) & brain] = ED
    seg[(r <= 0.16) & brain] = et_label
    seg[(r <= 0.08) & brain] = NCR
    region = {0: 0, ED: 1, et_label: 2, NCR: 3}
    images = {}
    for seq, means in CONTRASTS.items():
        img = np.zeros(shape, dtype=np.float32)
        for label, k in region.items():
            m = brain & (seg == label)
            img[m] = means[k] + rng.normal(0.0, 15.0, size=int(m.sum()))
        images[seq] = np.clip(img, 1.0, None) * brain  # background exactly 0, brain strictly > 0
    return images, seg


def write_case(
    site_dir: Path | str,
    case_id: str,
    shape: Sequence[int] = (16, 16, 16),
    naming: str = "brats2021",
    sequences: Iterable[str] = SEQUENCES,
    seg: bool = True,
    et_label: int | None = None,
    affine: np.ndarray | None = None,
    rng: np.random.Generator | None = None,
    ext: str = ".nii.gz",
) -> Path:
    """Write one case folder ``site_dir/case_id/`` and return it.

    Args:
        shape: volume shape (X, Y, Z) in voxels.
        naming: "brats2021" (``_t1ce``) or "brats2023" (``-t1c``).
        sequences: which of SEQUENCES to write (the others are missing).
        seg: write the segmentation too.
        et_label: value used for enhancing tumor in the segmentation; default: the naming's own
            (4 for brats2021, 3 for brats2023).
        affine: 4x4 voxel-to-world matrix shared by every file (default identity = 1 mm voxels).
        rng: randomness for the tumor position and noise (default: seeded from ``case_id``).
        ext: ".nii.gz" or ".nii".
    """
    rng = rng or np.random.default_rng(zlib.crc32(case_id.encode()))
    if et_label is None:
        et_label = LEGACY_ET if naming == "brats2021" else ET
    images, labels = synthetic_volumes(tuple(shape), et_label, rng)
    for seq in sequences:
        write_nifti(case_path(site_dir, case_id, seq, naming, ext), images[seq], affine)
    if seg:
        write_nifti(case_path(site_dir, case_id, "seg", naming, ext), labels, affine)
    folder = Path(site_dir) / case_id
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def write_labels_csv(
    site_dir: Path | str,
    rows: Iterable[Mapping[str, str] | Sequence[str]],
    columns: Sequence[str] = LABELS_CSV_COLUMNS,
) -> Path:
    """Write ``site_dir/labels.csv`` with header ``columns``; a row is a mapping (missing columns
    are left empty) or a sequence of values in ``columns`` order."""
    path = Path(site_dir) / LABELS_CSV
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(columns)
        for row in rows:
            writer.writerow([row.get(c, "") for c in columns] if isinstance(row, Mapping) else list(row))
    return path


#: The cases of :func:`write_site`: (case_id, naming, sequences, seg, et_label, labels row values).
#: Each case's segmentation follows its naming's label convention (4 = ET in brats2021 names).
SITE_CASES: tuple[tuple[str, str, tuple[str, ...], bool, int, tuple[str, str, str, str]], ...] = (
    ("case-001", "brats2021", SEQUENCES, True, 4, ("wildtype", "intact", "HGG", "methylated")),
    ("case-002", "brats2021", SEQUENCES, True, 4, ("mutant", "codeleted", "LGG", "unmethylated")),
    ("case-003", "brats2021", ("t1", "t2", "flair"), True, 4, ("mutant", "intact", "3", "")),
    ("case-004", "brats2023", SEQUENCES, False, 3, ("wildtype", "", "4", "methylated")),
    ("case-005", "brats2023", ("t2", "flair"), True, 3, ("", "", "", "")),
    ("case-006", "brats2023", SEQUENCES, True, 3, ("Mutant ", "Codeleted", "II", "methylated")),
)


def write_site(site_dir: Path | str, shape: Sequence[int] = (16, 16, 16)) -> Path:
    """A small valid site: the six :data:`SITE_CASES` (both namings and their label conventions,
    missing sequences, a case without segmentation, unknown labels) and their labels.csv."""
    site_dir = Path(site_dir)
    for case_id, naming, sequences, seg, et_label, _ in SITE_CASES:
        write_case(site_dir, case_id, shape=shape, naming=naming, sequences=sequences, seg=seg, et_label=et_label)
    write_labels_csv(site_dir, [(case_id, *labels) for case_id, *_, labels in SITE_CASES])
    return site_dir


class FakeGrid:
    """A Flower Grid stand-in for strategy tests: the connected node ids, nothing else."""

    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)


def set_task_identity() -> None:
    """Creating instruction messages outside a Flower runtime needs these ids (internal API)."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id = TaskIdentity.node_id = TaskIdentity.task_id = 1
