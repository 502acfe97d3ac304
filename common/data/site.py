"""A site folder: find its cases, parse ``labels.csv``, validate every file, split train/validation.

Layout (DESIGN.md section 3)::

    <site>/labels.csv
    <site>/<case_id>/<case_id>_t1.nii.gz  _t1ce  _t2  _flair  [_seg]    (BraTS 2020/2021 names)
    <site>/<case_id>/<case_id>-t1n.nii.gz -t1c -t2w -t2f [-seg]         (BraTS 2023+ names)

:func:`scan_site` never drops anything silently: every case folder or ``labels.csv`` row that cannot
be used ends up in :attr:`SiteIndex.rejected` with the reason and the fix, and NIfTI files that match
no expected name are listed in :attr:`SiteIndex.ignored`. Problems that make the whole site
unreadable (``labels.csv`` missing or malformed) raise a :class:`SiteError`.

This module reads headers and voxels with nibabel only (no torch), so ``fedglioma check-site``
stays light.
"""

from __future__ import annotations

import csv
import difflib
import io
import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import nibabel as nib
import numpy as np

from common.contract import (
    ALLOWED_SEG_VALUES,
    LABELS_CSV,
    LABELS_CSV_COLUMNS,
    LABELS_CSV_OPTIONAL,
    LEGACY_ET,
    NAMING,
    NIFTI_EXTENSIONS,
    SEQUENCES,
    TASK_CLASSES,
    TASK_COLUMNS,
    TASKS,
    UNKNOWN_LABEL,
)

#: Largest absolute difference allowed between two files' 4x4 voxel-to-world matrices (mm for
#: the translation column). Exports of one registered study agree to float32 rounding (~1e-5);
#: anything above a thousandth of a millimetre means the volumes are on different grids.
AFFINE_ATOL = 1e-3

#: labels.csv ``grade``: WHO CNS grades accepted besides LGG/HGG (BraTS: LGG = WHO 2-3, HGG = 4).
GRADE_ALIASES: Mapping[str, str] = {"2": "LGG", "3": "LGG", "4": "HGG", "ii": "LGG", "iii": "LGG", "iv": "HGG"}

SEG_KEY = "seg"


class SiteError(Exception):
    """A site folder cannot be used; the message names the file and the fix."""


class SiteNotFoundError(SiteError):
    """The site folder does not exist (or is not a folder)."""


class LabelsCsvError(SiteError):
    """``labels.csv`` is missing or structurally broken (unreadable, columns, duplicate rows)."""


class NoUsableCaseError(SiteError):
    """Every case of the site was rejected."""


@dataclass(frozen=True)
class CaseRecord:
    """One usable case: its files and its labels (validated).

    ``images`` maps each *available* sequence (a subset of SEQUENCES) to its file; ``labels`` holds
    one class index per TASKS entry, UNKNOWN_LABEL where labels.csv left it empty; ``legacy_et``
    is True when the segmentation stores enhancing tumor as 4 (remapped to 3 on load).
    """

    case_id: str
    folder: Path
    images: Mapping[str, Path] = field(hash=False)  # dicts are unhashable; case_id identifies
    seg: Path | None
    labels: tuple[int, ...]
    naming: str
    legacy_et: bool = False

    @property
    def available(self) -> tuple[bool, ...]:
        """Availability of each sequence, in SEQUENCES order (length 4)."""
        return tuple(seq in self.images for seq in SEQUENCES)


@dataclass(frozen=True)
class Rejection:
    """A case (folder or labels.csv row) that is not used: why, and how to fix it."""

    case_id: str
    path: Path
    reason: str
    fix: str


@dataclass
class SiteIndex:
    """Everything :func:`scan_site` found in one site folder."""

    root: Path
    name: str
    cases: list[CaseRecord]
    rejected: list[Rejection]
    ignored: list[Path] = field(default_factory=list)  # NIfTI files matching no expected name

    def sequence_counts(self) -> dict[str, int]:
        """Number of usable cases having each sequence (SEQUENCES order)."""
        return {seq: sum(seq in c.images for c in self.cases) for seq in SEQUENCES}

    def pattern_counts(self) -> dict[str, int]:
        """Number of usable cases per availability pattern, e.g. ``{"t1+t1ce+t2+flair": 10, "t2+flair": 3}``
        (most frequent first)."""
        counts = Counter(availability_pattern(c.available) for c in self.cases)
        return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))

    def label_counts(self) -> dict[str, dict[str, int]]:
        """Per task, the number of usable cases per class name and ``"unknown"``."""
        out: dict[str, dict[str, int]] = {}
        for t, task in enumerate(TASKS):
            counts = {name: 0 for name in TASK_CLASSES[task]} | {"unknown": 0}
            for case in self.cases:
                label = case.labels[t]
                counts["unknown" if label == UNKNOWN_LABEL else TASK_CLASSES[task][label]] += 1
            out[task] = counts
        return out

    @property
    def n_seg(self) -> int:
        """Usable cases with a segmentation."""
        return sum(c.seg is not None for c in self.cases)

    def legacy_et_cases(self) -> list[str]:
        """IDs of usable cases whose segmentation uses label 4 for enhancing tumor."""
        return [c.case_id for c in self.cases if c.legacy_et]

    def summary(self) -> dict[str, Any]:
        """JSON-serialisable description (what ``fedglioma check-site --json`` prints)."""
        return {
            "site": self.name,
            "root": str(self.root),
            "usable": len(self.cases),
            "rejected_count": len(self.rejected),
            "complete": sum(all(c.available) for c in self.cases),
            "sequences": self.sequence_counts(),
            "patterns": self.pattern_counts(),
            "labels": self.label_counts(),
            "segmentations": self.n_seg,
            "legacy_et_remapped": self.legacy_et_cases(),
            "naming": dict(Counter(c.naming for c in self.cases)),
            "rejected": [
                {"case_id": r.case_id, "path": str(r.path), "reason": r.reason, "fix": r.fix}
                for r in self.rejected
            ],
            "ignored_files": [str(p) for p in self.ignored],
        }



def label_matrix(cases: Sequence[CaseRecord]) -> np.ndarray:
    """(N, T) int64 real labels of ``cases`` (``TASKS`` order), ``UNKNOWN_LABEL`` where unknown."""
    return np.asarray([c.labels for c in cases], dtype=np.int64).reshape(len(cases), len(TASKS))

def availability_pattern(available: Sequence[bool]) -> str:
    """``(True, False, True, True) -> "t1+t2+flair"`` (``"none"`` when nothing is available)."""
    return "+".join(seq for seq, ok in zip(SEQUENCES, available) if ok) or "none"


# --------------------------------------------------------------------------------- labels.csv
def allowed_values(task: str) -> tuple[str, ...]:
    """The strings labels.csv accepts for ``task`` (case-insensitive), empty meaning unknown."""
    extra = tuple(k.upper() if k.isalpha() else k for k in GRADE_ALIASES) if task == "grade" else ()
    return tuple(TASK_CLASSES[task]) + extra


def parse_label(task: str, raw: str) -> int:
    """Class index of a labels.csv value (``" Mutant "`` -> 1), UNKNOWN_LABEL when empty.

    Raises ValueError for any other string: an unknown value is an error, never a silent unknown.
    """
    value = raw.strip().lower()
    if not value:
        return UNKNOWN_LABEL
    if task == "grade":
        value = GRADE_ALIASES.get(value, value).lower()
    classes = [c.lower() for c in TASK_CLASSES[task]]
    if value not in classes:
        raise ValueError(f"unknown value {raw!r} for {task}")
    return classes.index(value)


@dataclass(frozen=True)
class LabelRow:
    """One labels.csv row: the case, its line number, parsed labels and any unknown values."""

    case_id: str
    line: int
    labels: tuple[int, ...]
    problems: tuple[str, ...] = ()


def _csv_error(path: Path, line: int | None, what: str, fix: str) -> LabelsCsvError:
    where = f"{path} line {line}" if line else str(path)
    return LabelsCsvError(f"{where}: {what}. Fix: {fix}")


_HEADER = ",".join(LABELS_CSV_COLUMNS)


def read_labels_csv(path: Path | str) -> dict[str, LabelRow]:
    """Parse a site's labels.csv into ``{case_id: LabelRow}``.

    Header names and values are case- and whitespace-tolerant; extra columns are allowed. Raises
    :class:`LabelsCsvError` naming the file, line and fix when the file is missing or unreadable,
    lacks a required column, has a row of the wrong width or without case_id, or lists a case twice.
    Unknown label values do not raise: they are returned in :attr:`LabelRow.problems` so that only
    that case is rejected.
    """
    path = Path(path)
    if not path.is_file():
        sites = sorted(p.parent.name for p in path.parent.glob(f"*/{LABELS_CSV}")) if path.parent.is_dir() else []
        hint = (
            f"; {path.parent} looks like a cohort folder holding the sites {', '.join(sites)}:"
            " check each site folder instead" if sites else ""
        )
        raise _csv_error(
            path, None, "labels.csv is missing",
            f"create it with the header line '{_HEADER}' and one row per case folder; "
            f"leave a value empty when a label is unknown{hint}",
        )
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: tolerate the BOM spreadsheet programs write
    except (OSError, UnicodeDecodeError) as exc:
        raise _csv_error(path, None, f"cannot be read ({exc})", "save it as UTF-8 comma-separated text") from exc
    reader = csv.reader(io.StringIO(text))
    rows: list[tuple[int, list[str]]] = []
    try:
        for row in reader:
            rows.append((reader.line_num, row))
    except csv.Error as exc:
        raise _csv_error(path, reader.line_num, f"is not valid CSV ({exc})", "fix the quoting on that line") from exc
    rows = [(n, r) for n, r in rows if any(v.strip() for v in r)]  # blank lines carry nothing
    if not rows:
        raise _csv_error(path, None, "is empty", f"add the header line '{_HEADER}' and one row per case")

    header_line, header = rows[0]
    columns = [c.strip().lower() for c in header]
    missing = [c for c in LABELS_CSV_COLUMNS if c not in columns]
    if missing:
        hints = []
        for name in missing:
            close = difflib.get_close_matches(name, columns, n=1)
            if close:
                hints.append(f"{close[0]!r} -> {name!r}?")
        if len(header) == 1 and ";" in header[0]:
            hints.append("the file looks semicolon-separated: save it comma-separated")
        raise _csv_error(
            path, header_line,
            f"missing required column(s) {', '.join(missing)} (header is {','.join(header)!r})",
            f"the header must contain {_HEADER} (optional: {','.join(LABELS_CSV_OPTIONAL)})"
            + (f"; {'; '.join(hints)}" if hints else ""),
        )
    duplicated = sorted(c for c, n in Counter(columns).items() if n > 1 and c)
    if duplicated:
        raise _csv_error(path, header_line, f"column(s) {', '.join(duplicated)} appear twice", "keep one of each")

    out: dict[str, LabelRow] = {}
    for line, row in rows[1:]:
        if len(row) != len(columns):
            raise _csv_error(
                path, line, f"has {len(row)} values but the header has {len(columns)} columns",
                "give every row one value per column (empty for unknown); quote values containing commas",
            )
        values = dict(zip(columns, row))
        case_id = values["case_id"].strip()
        if not case_id:
            raise _csv_error(path, line, "has no case_id", "write the case folder's name in the case_id column")
        if case_id in out:
            raise _csv_error(
                path, line, f"case_id {case_id!r} is listed twice (lines {out[case_id].line} and {line})",
                "keep exactly one row per case",
            )
        labels, problems = [], []
        for task in TASKS:
            column = TASK_COLUMNS[task]
            try:
                labels.append(parse_label(task, values[column]))
            except ValueError:
                labels.append(UNKNOWN_LABEL)
                problems.append(
                    f"{LABELS_CSV} line {line}, column {column}: unknown value {values[column]!r} "
                    f"(allowed: {', '.join(allowed_values(task))}, or empty for unknown)"
                )
        out[case_id] = LabelRow(case_id, line, tuple(labels), tuple(problems))
    return out


# --------------------------------------------------------------------------------- case files
@dataclass(frozen=True)
class Problem:
    """One thing wrong with a case: the file (or folder) at fault, why, and the fix."""

    path: Path
    reason: str
    fix: str


def _is_nifti(name: str) -> bool:
    return name.lower().endswith(NIFTI_EXTENSIONS)


def _expected_names(case_id: str, naming: str, key: str) -> list[str]:
    return [f"{case_id}{NAMING[naming][key]}{ext}" for ext in NIFTI_EXTENSIONS]


@dataclass
class CaseFiles:
    """What :func:`find_case_files` matched in one case folder."""

    naming: str = ""
    images: dict[str, Path] = field(default_factory=dict)
    seg: Path | None = None
    ignored: list[Path] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)


def find_case_files(folder: Path) -> CaseFiles:
    """Match the files of one case folder against both naming conventions.

    File names are matched case-insensitively (``_T1ce.nii.gz`` is accepted). Problems: a folder
    mixing the two conventions, two files for one sequence (``.nii`` and ``.nii.gz``), or no image.
    """
    case_id = folder.name
    files = {p.name.lower(): p for p in sorted(folder.iterdir()) if p.is_file()}
    found: dict[str, dict[str, list[Path]]] = {}
    for naming in NAMING:
        matches = {
            key: [files[n.lower()] for n in _expected_names(case_id, naming, key) if n.lower() in files]
            for key in (*SEQUENCES, SEG_KEY)
        }
        matches = {k: v for k, v in matches.items() if v}
        if matches:
            found[naming] = matches
    result = CaseFiles()
    used = {p for m in found.values() for paths in m.values() for p in paths}
    result.ignored = [p for p in files.values() if _is_nifti(p.name) and p not in used]

    if len(found) > 1:
        examples = [f"{m[next(iter(m))][0].name} ({n})" for n, m in found.items()]
        result.problems.append(Problem(
            folder, f"mixes the two naming conventions: {' and '.join(examples)}",
            "rename every file of the case to one convention: "
            + " or ".join(f"{case_id}{NAMING[n]['t1']}.nii.gz" for n in NAMING) + " style",
        ))
        return result
    if not found or not any(k in found[next(iter(found))] for k in SEQUENCES):
        present = ", ".join(p.name for p in files.values() if _is_nifti(p.name)) or "no NIfTI file"
        expected = " or ".join(_expected_names(case_id, n, "t1")[0] for n in NAMING)
        result.problems.append(Problem(
            folder, f"has no image file matching the case name {case_id!r} (found: {present})",
            f"name the files after the folder, e.g. {expected} (and _t1ce/_t2/_flair/_seg, or -t1c/-t2w/-t2f/-seg)",
        ))
        return result
    result.naming, matches = next(iter(found.items()))
    for key, paths in matches.items():
        if len(paths) > 1:
            result.problems.append(Problem(
                paths[0], f"has two files for {key}: {', '.join(p.name for p in paths)}", "keep only one of them",
            ))
            continue
        if key == SEG_KEY:
            result.seg = paths[0]
        else:
            result.images[key] = paths[0]
    result.images = {s: result.images[s] for s in SEQUENCES if s in result.images}
    return result


# --------------------------------------------------------------------------------- validation
_REEXPORT = "copy or export the file again from the source (it is truncated or corrupt)"


def _regrid_fix(path: Path, reference: Path) -> str:
    return (
        f"register/resample {path.name} onto the grid of {reference.name} so that every sequence and "
        "the segmentation share one shape and affine (e.g. with the BraTS preprocessing pipeline)"
    )


def validate_case_files(
    images: Mapping[str, Path], seg: Path | None, *, deep: bool = True
) -> tuple[list[Problem], bool]:
    """Check the files of one case; returns (problems, uses_legacy_et_label).

    Header checks (always): readable NIfTI, 3-D, every file on the grid of the first image (same
    shape; affines within :data:`AFFINE_ATOL`). Voxel checks (``deep``; each file is read exactly
    once, one at a time): images finite and not constant; segmentation finite and its values
    within ALLOWED_SEG_VALUES.
    """
    problems: list[Problem] = []
    headers: dict[str, Any] = {}
    files = dict(images) | ({SEG_KEY: seg} if seg is not None else {})
    for key, path in files.items():
        try:
            img = nib.load(path)  # reads the header only; voxels stay on disk
        except Exception as exc:  # any failure to parse means the file is unusable; say why
            problems.append(Problem(path, f"{path.name} cannot be read as NIfTI ({type(exc).__name__}: {exc})", _REEXPORT))
            continue
        if len(img.shape) != 3:
            problems.append(Problem(
                path, f"{path.name} has shape {tuple(img.shape)}, expected a 3-D volume",
                "save each sequence (and the segmentation) as its own 3-D volume",
            ))
            continue
        headers[key] = img

    reference_key = next((k for k in files if k in headers), None)
    if reference_key is not None:
        ref = headers[reference_key]
        ref_path = files[reference_key]
        for key, img in headers.items():
            if key == reference_key:
                continue
            path = files[key]
            if tuple(img.shape) != tuple(ref.shape):
                problems.append(Problem(
                    path, f"{path.name} has shape {tuple(img.shape)} but {ref_path.name} has {tuple(ref.shape)}",
                    _regrid_fix(path, ref_path),
                ))
                continue
            diff = float(np.abs(np.asarray(img.affine) - np.asarray(ref.affine)).max())
            if not diff <= AFFINE_ATOL:  # also catches NaN affines
                problems.append(Problem(
                    path,
                    f"{path.name}'s affine differs from {ref_path.name}'s by up to {diff:.4g} "
                    f"(max absolute difference of the voxel-to-world matrices; tolerance {AFFINE_ATOL})",
                    _regrid_fix(path, ref_path),
                ))

    legacy = False
    if not deep:
        return problems, legacy
    for key, img in headers.items():
        path = files[key]
        try:
            data = np.asanyarray(img.dataobj)  # decompresses once; no float64 copy unless scaled
        except Exception as exc:  # truncated gzip -> EOFError/zlib.error, short .nii -> OSError
            problems.append(Problem(path, f"{path.name} cannot be read ({type(exc).__name__}: {exc})", _REEXPORT))
            continue
        if data.dtype.kind in "fc":
            bad = int(np.size(data) - np.count_nonzero(np.isfinite(data)))
            if bad:
                problems.append(Problem(
                    path, f"{path.name} has {bad} non-finite (NaN/inf) voxels",
                    f"re-export {path.name} or replace its NaN/inf voxels (e.g. by 0 outside the brain)",
                ))
                continue
        if key == SEG_KEY:
            values = np.unique(data)
            unexpected = [v for v in values.tolist() if v not in ALLOWED_SEG_VALUES]
            if unexpected:
                shown = ", ".join(f"{v:g}" for v in unexpected[:10]) + (" ..." if len(unexpected) > 10 else "")
                problems.append(Problem(
                    path,
                    f"{path.name} has label values {shown} (found {', '.join(f'{v:g}' for v in values[:10].tolist())}"
                    f"{' ...' if len(values) > 10 else ''}; allowed: {', '.join(map(str, sorted(ALLOWED_SEG_VALUES)))})",
                    "relabel to 0 background, 1 necrotic/non-enhancing core, 2 edema, 3 enhancing tumor "
                    f"({LEGACY_ET} is accepted as legacy enhancing tumor)",
                ))
            legacy = LEGACY_ET in values
        elif data.size and data.min() == data.max():
            problems.append(Problem(
                path, f"{path.name} is constant (every voxel is {float(data.flat[0]):g})",
                f"re-export {path.name}: an empty volume carries no image, or delete it to mark the sequence missing",
            ))
    return problems, legacy


# --------------------------------------------------------------------------------- the site
def _case_folders(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _rejection(case_id: str, problems: Sequence[Problem]) -> Rejection:
    fixes = list(dict.fromkeys(p.fix for p in problems))  # de-duplicated, in order
    return Rejection(case_id, problems[0].path, "; ".join(p.reason for p in problems), " ".join(
        f if f.endswith(".") else f + "." for f in fixes))


def scan_site(root: Path | str, *, deep: bool = True) -> SiteIndex:
    """Discover and validate every case of a site folder.

    Args:
        root: the site folder (one subfolder per case and a labels.csv).
        deep: also read every voxel (truncated files, NaN/inf, constant volumes, segmentation
            values); False checks names, labels.csv and headers only (shape, affine).

    Returns:
        The :class:`SiteIndex`: usable cases sorted by case_id, and a rejection for every folder or
        labels.csv row that cannot be used. Zero usable cases is not an error here (see
        :func:`load_site`).

    Raises:
        SiteNotFoundError: ``root`` is not a folder.
        LabelsCsvError: labels.csv is missing or structurally broken.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise SiteNotFoundError(
            f"site folder {root} does not exist or is not a folder. Fix: pass the folder that holds "
            f"the case subfolders and {LABELS_CSV}"
        )
    root = root.resolve()
    csv_path = root / LABELS_CSV
    rows = read_labels_csv(csv_path)
    index = SiteIndex(root=root, name=root.name, cases=[], rejected=[])
    index.ignored = sorted(p for p in root.iterdir() if p.is_file() and _is_nifti(p.name))

    folders = _case_folders(root)
    for folder in folders:
        case_id = folder.name
        found = find_case_files(folder)
        index.ignored += found.ignored
        problems = list(found.problems)
        row = rows.get(case_id)
        if row is None:
            problems.append(Problem(
                csv_path, f"has no row in {LABELS_CSV}",
                f"add a row for {case_id} to {csv_path} (e.g. '{case_id},,,,'; empty values mark labels unknown)",
            ))
        else:
            problems += [Problem(csv_path, p, f"correct {LABELS_CSV} line {row.line} or leave the value empty "
                                  "to mark the label unknown") for p in row.problems]
        legacy = False
        if found.images:
            file_problems, legacy = validate_case_files(found.images, found.seg, deep=deep)
            problems += file_problems
        if problems:
            index.rejected.append(_rejection(case_id, problems))
            continue
        assert row is not None
        index.cases.append(CaseRecord(
            case_id=case_id, folder=folder, images=found.images, seg=found.seg,
            labels=row.labels, naming=found.naming, legacy_et=legacy,
        ))

    folder_names = {f.name for f in folders}
    for case_id, row in rows.items():
        if case_id not in folder_names:
            index.rejected.append(Rejection(
                case_id, root / case_id,
                f"listed in {LABELS_CSV} (line {row.line}) but no folder {case_id}/ exists",
                f"add the folder {root / case_id} with its images, or remove line {row.line} from {LABELS_CSV}.",
            ))
    index.ignored.sort()
    return index


def load_site(root: Path | str) -> SiteIndex:
    """:func:`scan_site` (deep) for training/evaluation; raises :class:`NoUsableCaseError` naming
    the site and summarising the rejection reasons when no case is usable."""
    index = scan_site(root, deep=True)
    if not index.cases:
        shown = "; ".join(f"{r.case_id}: {r.reason}" for r in index.rejected[:5])
        more = f" (and {len(index.rejected) - 5} more)" if len(index.rejected) > 5 else ""
        raise NoUsableCaseError(
            f"site {index.name} ({index.root}) has no usable case"
            + (f": {len(index.rejected)} rejected - {shown}{more}" if index.rejected else ": it holds no case folder")
            + f". Fix: run `fedglioma check-site {index.root}` for every reason and fix."
        )
    return index


# --------------------------------------------------------------------------------- split
def _stratum(case: CaseRecord) -> tuple[Any, ...]:
    """Which labels exist (one bool per task) and the IDH class."""
    known = tuple(label != UNKNOWN_LABEL for label in case.labels)
    return known, case.labels[TASKS.index("idh")]


def split_cases(
    cases: Sequence[CaseRecord], val_fraction: float, seed: int
) -> tuple[list[CaseRecord], list[CaseRecord]]:
    """Deterministic stratified train/validation split.

    Strata are (which task labels are known, IDH class). The validation size is
    ``round(N * val_fraction)`` clamped to [1, N-1] when N >= 2 (0 when N == 1: train is never
    empty); it is shared among strata proportionally to their size (largest remainder, ties broken
    by the seed), and each stratum's members are drawn by a seeded permutation. The result depends
    only on the set of cases, ``val_fraction`` and ``seed`` (not on input order); both lists are
    sorted by case_id.

    Hand-written because scikit-learn's ``train_test_split(stratify=...)`` refuses strata with a
    single member, which small sites always have.
    """
    if not cases:
        raise ValueError("split_cases needs at least one case")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction} must be in [0, 1)")
    ordered = sorted(cases, key=lambda c: c.case_id)
    n = len(ordered)
    n_val = 0 if n < 2 else min(max(math.floor(n * val_fraction + 0.5), 1), n - 1)

    strata: dict[tuple[Any, ...], list[CaseRecord]] = defaultdict(list)
    for case in ordered:
        strata[_stratum(case)].append(case)
    keys = sorted(strata)
    rng = np.random.default_rng(seed)
    quotas = {k: len(strata[k]) * n_val / n for k in keys}
    take = {k: math.floor(q) for k, q in quotas.items()}
    tiebreak = dict(zip(keys, rng.permutation(len(keys)).tolist()))
    by_remainder = sorted(keys, key=lambda k: (-(quotas[k] - take[k]), tiebreak[k]))
    for k in by_remainder[: n_val - sum(take.values())]:
        take[k] += 1

    val: list[CaseRecord] = []
    for k in keys:
        members = strata[k]
        order = rng.permutation(len(members))
        val += [members[i] for i in order[: take[k]]]
    val_ids = {c.case_id for c in val}
    train = [c for c in ordered if c.case_id not in val_ids]
    return train, sorted(val, key=lambda c: c.case_id)
