"""A site folder: find its cases, parse ``labels.csv``, validate every file, split train/validation.

Layout (DESIGN.md section 3)::

    <site>/labels.csv
    <site>/<case_id>/<case_id>_t1.nii.gz  _t1ce  _t2  _flair  [_seg]    (BraTS 2020/2021 names)
    <site>/<case_id>/<case_id>-t1n.nii.gz -t1c -t2w -t2f [-seg]         (BraTS 2023+ names)

:func:`scan_site` never drops anything silently: every case folder or ``labels.csv`` row that cannot
be used ends up in :attr:`SiteIndex.rejected` with the reason, the fix and a :class:`Category`, and
NIfTI files that match no expected name are listed in :attr:`SiteIndex.ignored`. An entry named like a
sequence file that cannot be read as one (a broken symbolic link, a folder, an unreadable file, two
names differing only by letter case) rejects its case: it is never taken for a missing sequence.
Symbolic links leading out of the site folder reject their case unless allowed: they could pull in
another center's cases (the held-out one). Problems that make the whole site unreadable
(``labels.csv`` missing or malformed, a bad ``site.json``) raise a :class:`SiteError`.

Segmentation label conventions (:data:`common.contract.LABEL_CONVENTIONS`): a site declares one
in ``site.json`` (``{"label_convention": "brats2024-post"}``) or through the caller (the SuperNode's
node config ``label-convention``, ``fedglioma check-site --label-convention``). Undeclared, each
case's file naming chooses between ``brats2021`` (4 = enhancing tumor) and ``brats2023`` (3 =
enhancing tumor) as long as its segmentation values agree; a 4 in BraTS 2023+ names is never
taken for tumor (BraTS 2024 post-treatment uses it for the resection cavity): the case is rejected
until the site declares which it is.

What leaves the site: :meth:`SiteIndex.rejection_counts` / :meth:`SiteIndex.rejection_summary` and
``str(NoUsableCaseError)`` hold counts per category only, never a case ID, file name or path; the
full local text is :attr:`NoUsableCaseError.detail` and ``fedglioma check-site``.

The voxel checks look at the data as training will: scaled by the header's ``scl_slope`` /
``scl_inter`` and converted to float32 (MONAI's ``LoadImaged``), with the mean and standard deviation
of the non-zero voxels that z-scoring (``NormalizeIntensityd(nonzero=True)``) divides by.

This module reads headers and voxels with nibabel only (no torch), so ``fedglioma check-site``
stays light.
"""

from __future__ import annotations

import csv
import difflib
import errno
import gzip
import io
import json
import math
import os
import stat
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Mapping, Sequence

import nibabel as nib
import numpy as np
from nibabel.openers import ImageOpener

from common.contract import (
    ALLOWED_SEG_VALUES,
    LABEL_CONVENTION_TEXT,
    LABEL_CONVENTIONS,
    LABELS_CSV,
    LABELS_CSV_COLUMNS,
    LABELS_CSV_OPTIONAL,
    NAMING,
    NAMING_CONVENTION,
    NIFTI_EXTENSIONS,
    RESECTION_CAVITY,
    SEQUENCES,
    SITE_JSON,
    SURVIVAL_DAYS,
    SURVIVAL_EVENT,
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

#: Largest number of voxels one file's header may declare. A BraTS sequence holds 240x240x155 (9e6)
#: voxels; 512^3 (1.3e8) is 15 times that, and reading it costs at most 1 GiB (float64) plus its
#: float32 copy. A header declaring more is rejected before any voxel is read, so a corrupt
#: ``dim`` field cannot make the scan allocate gigabytes.
MAX_VOXELS = 512**3

SEG_KEY = "seg"

_FLOAT32_MAX = float(np.finfo(np.float32).max)


class SiteError(Exception):
    """A site folder cannot be used; the message names the file and the fix."""


class SiteNotFoundError(SiteError):
    """The site folder does not exist (or is not a folder)."""


class LabelsCsvError(SiteError):
    """``labels.csv`` is missing or structurally broken (unreadable, columns, duplicate rows)."""


class SiteDeclarationError(SiteError):
    """``site.json`` is unreadable or names an unknown value, or it contradicts the label convention
    the caller declared (node config ``label-convention``, ``--label-convention``)."""


class NoUsableCaseError(SiteError):
    """Every case of the site was rejected.

    ``str(error)`` is the public text: counts per :class:`Category` and the fix, with no case ID, file
    name or path (not even the site folder's), so it may be reported off the site. ``detail`` is the
    full local text (site folder, every case ID, path, reason and fix) for the site's own log.
    """

    def __init__(self, public: str, detail: str) -> None:
        super().__init__(public)
        self.detail = detail

    def __reduce__(self) -> tuple[Any, ...]:  # keep ``detail`` through pickling (worker processes)
        return type(self), (str(self), self.detail)


class Category(StrEnum):
    """The kind of a rejection: a few words free of case IDs, file names and paths, so that counts
    per category may leave the site."""

    UNREADABLE_FOLDER = "unreadable folder"
    UNREADABLE_FILE = "unreadable file"
    NOT_A_FILE = "not a file"
    BROKEN_SYMLINK = "broken symlink"
    EXTERNAL_SYMLINK = "external symlink"
    FILE_NAMING = "file naming"
    NO_IMAGE = "no image file"
    TRUNCATED = "truncated file"
    BAD_HEADER = "bad header"
    NOT_3D = "not 3-D"
    SHAPE_MISMATCH = "shape mismatch"
    AFFINE_MISMATCH = "affine mismatch"
    NON_FINITE = "non-finite values"
    CONSTANT = "constant image"
    SEG_VALUES = "bad segmentation values"
    LABEL_CONVENTION = "label convention"
    UNKNOWN_LABEL = "unknown label"
    BAD_SURVIVAL = "bad survival value"
    NO_LABEL_ROW = "no labels.csv row"
    NO_FOLDER = "no case folder"


@dataclass(frozen=True)
class CaseRecord:
    """One usable case: its files and its labels (validated).

    ``images`` maps each *available* sequence (a subset of SEQUENCES) to its file; ``labels`` holds
    one class index per TASKS entry, UNKNOWN_LABEL where labels.csv left it empty;
    ``label_convention`` (a :data:`LABEL_CONVENTIONS` key) says how the segmentation's values map to
    internal labels on load (declared by the site, or implied by the naming and checked against the
    values; see the module docstring); ``survival`` is (days, event: 1 death observed, 0
    censored) from labels.csv's optional columns, None when unknown.
    """

    case_id: str
    folder: Path
    images: Mapping[str, Path] = field(hash=False)  # dicts are unhashable; case_id identifies
    seg: Path | None
    labels: tuple[int, ...]
    naming: str
    label_convention: str | None = None
    survival: tuple[float, int] | None = None

    @property
    def available(self) -> tuple[bool, ...]:
        """Availability of each sequence, in SEQUENCES order (length 4)."""
        return tuple(seq in self.images for seq in SEQUENCES)


@dataclass(frozen=True)
class Rejection:
    """A case (folder or labels.csv row) that is not used: why, how to fix it, and the category of
    its first problem."""

    case_id: str
    path: Path
    reason: str
    fix: str
    category: Category


def _most_frequent_first(counts: Counter[str]) -> dict[str, int]:
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


@dataclass
class SiteIndex:
    """Everything :func:`scan_site` found in one site folder."""

    root: Path
    name: str
    cases: list[CaseRecord]
    rejected: list[Rejection]
    ignored: list[Path] = field(default_factory=list)  # NIfTI files matching no expected name
    #: The declared label convention (None: inferred per case from its naming) and who declared it.
    label_convention: str | None = None
    convention_source: str | None = None
    #: Resection-cavity volume (mL) of each usable case whose segmentation has one (brats2024-post).
    cavity_ml: dict[str, float] = field(default_factory=dict)

    def sequence_counts(self) -> dict[str, int]:
        """Number of usable cases having each sequence (SEQUENCES order)."""
        return {seq: sum(seq in c.images for c in self.cases) for seq in SEQUENCES}

    def pattern_counts(self) -> dict[str, int]:
        """Number of usable cases per availability pattern, e.g. ``{"t1+t1ce+t2+flair": 10, "t2+flair": 3}``
        (most frequent first)."""
        return _most_frequent_first(Counter(availability_pattern(c.available) for c in self.cases))

    def rejection_counts(self) -> dict[str, int]:
        """Rejected cases per :class:`Category`, most frequent first; no case ID, file name or path."""
        return _most_frequent_first(Counter(str(r.category) for r in self.rejected))

    def rejection_summary(self) -> str:
        """``"12 of 30 cases rejected: 8 shape mismatch, 4 unknown label"``: counts only, so it may
        leave the site."""
        text = f"{len(self.rejected)} of {len(self.cases) + len(self.rejected)} cases rejected"
        counts = self.rejection_counts()
        return text + (": " + ", ".join(f"{n} {category}" for category, n in counts.items()) if counts else "")

    def survival_counts(self) -> dict[str, int]:
        """Usable cases with a known survival, and how many of them died (the others are censored)."""
        known = [c.survival for c in self.cases if c.survival is not None]
        return {"known": len(known), "events": sum(event for _, event in known), "unknown": len(self.cases) - len(known)}

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

    def convention_counts(self) -> dict[str, int]:
        """Usable cases with a segmentation per label convention they are read with."""
        return _most_frequent_first(Counter(str(c.label_convention) for c in self.cases if c.seg is not None))

    def summary(self) -> dict[str, Any]:
        """JSON-serialisable description (what ``fedglioma check-site --json`` prints)."""
        return {
            "site": self.name,
            "root": str(self.root),
            "usable": len(self.cases),
            "rejected_count": len(self.rejected),
            "rejection_counts": self.rejection_counts(),
            "complete": sum(all(c.available) for c in self.cases),
            "sequences": self.sequence_counts(),
            "patterns": self.pattern_counts(),
            "labels": self.label_counts(),
            "survival": self.survival_counts(),
            "segmentations": self.n_seg,
            "label_convention": {
                "declared": self.label_convention,
                "source": self.convention_source,
                "cases": self.convention_counts(),
            },
            "resection_cavity_ml": dict(self.cavity_ml),
            "naming": dict(Counter(c.naming for c in self.cases)),
            "rejected": [
                {"case_id": r.case_id, "path": str(r.path), "category": str(r.category), "reason": r.reason, "fix": r.fix}
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


def parse_survival(days: str, event: str) -> tuple[float, int] | None:
    """``("412", "1") -> (412.0, 1)``: survival in days and the event (1 death, 0 censored); None
    when both are empty.

    Raises ValueError saying what is wrong: only one of the two given, days not a finite number or
    negative, an event other than 0 or 1.
    """
    days, event = days.strip(), event.strip()
    if not days and not event:
        return None
    if not days or not event:
        raise ValueError(f"{SURVIVAL_DAYS}={days!r} and {SURVIVAL_EVENT}={event!r}: give both or leave both empty")
    try:
        value = float(days)
    except ValueError:
        raise ValueError(f"{SURVIVAL_DAYS} {days!r} is not a number of days") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{SURVIVAL_DAYS} {days!r} must be a finite number of days >= 0")
    if event not in ("0", "1"):
        raise ValueError(f"{SURVIVAL_EVENT} {event!r} must be 1 (death observed) or 0 (censored, alive at last follow-up)")
    return value, int(event)


@dataclass(frozen=True)
class LabelRow:
    """One labels.csv row: the case, its line number, parsed labels and survival, and what was
    wrong with its values (``problems``: labels; ``survival_problems``: the survival columns)."""

    case_id: str
    line: int
    labels: tuple[int, ...]
    problems: tuple[str, ...] = ()
    survival: tuple[float, int] | None = None
    survival_problems: tuple[str, ...] = ()


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
    that case is rejected; likewise bad survival values (optional columns ``survival_days`` and
    ``event``, :func:`parse_survival`) in :attr:`LabelRow.survival_problems`.
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
        survival, survival_problems = None, []
        try:
            survival = parse_survival(values.get(SURVIVAL_DAYS, ""), values.get(SURVIVAL_EVENT, ""))
        except ValueError as exc:
            survival_problems.append(f"{LABELS_CSV} line {line}: {exc}")
        out[case_id] = LabelRow(case_id, line, tuple(labels), tuple(problems), survival, tuple(survival_problems))
    return out


# --------------------------------------------------------------------------------- case files
@dataclass(frozen=True)
class Problem:
    """One thing wrong with a case: the file (or folder) at fault, why, the fix, and its kind."""

    path: Path
    reason: str
    fix: str
    category: Category


_REEXPORT = "copy or export the file again from the source (it is truncated or corrupt)"
_PERMISSION_FIX = (
    "give the account that runs fedglioma read access to the case folder and its files "
    "(e.g. `chmod -R u+rX` on the case folder, or ask whoever owns the data)"
)
_LINK_FIX = "point the symbolic link at the real file (or copy the file in its place), or delete it"
_EXTERNAL_FIX = (
    "copy the data into the site folder, or allow links out of it (`fedglioma check-site "
    "--allow-external-links`, allow_external_links=True) if they are intended: a link out of the site "
    "folder can pull in another center's cases, such as the held-out center's"
)


def _is_nifti(name: str) -> bool:
    return name.lower().endswith(NIFTI_EXTENSIONS)


def _expected_names(case_id: str, naming: str, key: str) -> list[str]:
    return [f"{case_id}{NAMING[naming][key]}{ext}" for ext in NIFTI_EXTENSIONS]


def _read_failure(path: Path, exc: BaseException, what: str = "cannot be read") -> Problem:
    """The problem of a file that could not be opened, parsed or decompressed."""
    reason = f"{path.name} {what} ({type(exc).__name__}: {exc})"
    if isinstance(exc, PermissionError):
        return Problem(path, reason, _PERMISSION_FIX, Category.UNREADABLE_FILE)
    truncated = isinstance(exc, EOFError)  # gzip stream ending early
    return Problem(path, reason, _REEXPORT, Category.TRUNCATED if truncated else Category.UNREADABLE_FILE)


def _broken_link(path: Path) -> str | None:
    """Why the symbolic link ``path`` leads to nothing; None when it is not a broken link."""
    if not path.is_symlink():
        return None
    try:
        path.stat()
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return f"{path.name} is a symbolic link that loops back on itself"
        if exc.errno == errno.ENOENT:
            return f"{path.name} is a symbolic link to {os.readlink(path)}, which does not exist"
    return None


def _entry_problem(path: Path) -> Problem | None:
    """Why the folder entry ``path``, named like a sequence file, cannot be read as a file (None
    when it is a readable regular file). Never opens anything but a regular file (a named pipe
    would block)."""
    try:
        mode = path.stat().st_mode  # follows symbolic links
    except OSError as exc:
        broken = _broken_link(path)
        if broken:
            return Problem(path, broken, _LINK_FIX, Category.BROKEN_SYMLINK)
        return _read_failure(path, exc)
    if stat.S_ISDIR(mode):
        return Problem(
            path, f"{path.name} is a folder, not a file",
            f"put the NIfTI file itself at {path.name} (move it out of the folder {path.name}/ and remove the folder)",
            Category.NOT_A_FILE,
        )
    if not stat.S_ISREG(mode):
        return Problem(path, f"{path.name} is not a regular file (a pipe, socket or device)",
                       f"replace {path.name} by the NIfTI file itself", Category.NOT_A_FILE)
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        return _read_failure(path, exc)
    return None


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

    File names are matched case-insensitively (``_T1ce.nii.gz`` is accepted). Problems: the folder
    cannot be listed; an entry named like a sequence file that is not a readable file (broken or
    looping symbolic link, folder, pipe, no read permission); two names differing only by letter
    case; a folder mixing the two conventions; two files for one sequence (``.nii`` and
    ``.nii.gz``); no image.
    """
    case_id = folder.name
    result = CaseFiles()
    try:
        entries = sorted(folder.iterdir())
    except OSError as exc:
        result.problems.append(Problem(folder, f"the case folder {case_id}/ cannot be listed ({type(exc).__name__}: {exc})",
                                       _PERMISSION_FIX, Category.UNREADABLE_FOLDER))
        return result
    keys = (*SEQUENCES, SEG_KEY)
    expected = {name.lower() for naming in NAMING for key in keys for name in _expected_names(case_id, naming, key)}
    by_name: dict[str, list[Path]] = defaultdict(list)
    for entry in entries:
        by_name[entry.name.lower()].append(entry)

    files: dict[str, Path] = {}  # lower-case expected name -> readable regular file
    for name, paths in by_name.items():
        if name not in expected:
            result.ignored += [p for p in paths if _is_nifti(p.name) and _entry_problem(p) is None]
            continue
        if len(paths) > 1:  # one would shadow the other: which one is the sequence?
            result.problems.append(Problem(
                paths[0], f"{' and '.join(p.name for p in paths)} differ only by letter case",
                "keep exactly one of them (delete or rename the others)", Category.FILE_NAMING,
            ))
            continue
        problem = _entry_problem(paths[0])
        if problem is not None:
            result.problems.append(problem)
            continue
        files[name] = paths[0]
    if result.problems:  # the case is rejected; report these before guessing what else is wrong
        return result
    found: dict[str, dict[str, list[Path]]] = {}
    for naming in NAMING:
        matches = {
            key: [files[n.lower()] for n in _expected_names(case_id, naming, key) if n.lower() in files]
            for key in keys
        }
        matches = {k: v for k, v in matches.items() if v}
        if matches:
            found[naming] = matches

    if len(found) > 1:
        examples = [f"{m[next(iter(m))][0].name} ({n})" for n, m in found.items()]
        result.problems.append(Problem(
            folder, f"mixes the two naming conventions: {' and '.join(examples)}",
            "rename every file of the case to one convention: "
            + " or ".join(f"{case_id}{NAMING[n]['t1']}.nii.gz" for n in NAMING) + " style",
            Category.FILE_NAMING,
        ))
        return result
    if not found or not any(k in found[next(iter(found))] for k in SEQUENCES):
        present = ", ".join(sorted(p.name for p in [*files.values(), *result.ignored])) or "no NIfTI file"
        example = " or ".join(_expected_names(case_id, n, "t1")[0] for n in NAMING)
        result.problems.append(Problem(
            folder, f"has no image file matching the case name {case_id!r} (found: {present})",
            f"name the files after the folder, e.g. {example} (and _t1ce/_t2/_flair/_seg, or -t1c/-t2w/-t2f/-seg)",
            Category.NO_IMAGE,
        ))
        return result
    result.naming, matches = next(iter(found.items()))
    for key, paths in matches.items():
        if len(paths) > 1:
            result.problems.append(Problem(
                paths[0], f"has two files for {key}: {', '.join(p.name for p in paths)}", "keep only one of them",
                Category.FILE_NAMING,
            ))
            continue
        if key == SEG_KEY:
            result.seg = paths[0]
        else:
            result.images[key] = paths[0]
    result.images = {s: result.images[s] for s in SEQUENCES if s in result.images}
    return result


def _external_links(root: Path, folder: Path, files: CaseFiles) -> list[Problem]:
    """Problems for the case folder or its files when a symbolic link leads out of ``root``
    (resolved)."""
    target = folder.resolve()
    if not target.is_relative_to(root):
        return [Problem(folder, f"the case folder {folder.name}/ is a symbolic link to {target}, outside the site "
                        f"folder {root}", _EXTERNAL_FIX, Category.EXTERNAL_SYMLINK)]
    problems = []
    for path in [*files.images.values(), *([files.seg] if files.seg is not None else [])]:
        target = path.resolve()
        if not target.is_relative_to(root):
            problems.append(Problem(path, f"{path.name} is a symbolic link to {target}, outside the site folder {root}",
                                    _EXTERNAL_FIX, Category.EXTERNAL_SYMLINK))
    return problems


# --------------------------------------------------------------------------------- validation
def _regrid_fix(path: Path, reference: Path) -> str:
    return (
        f"register/resample {path.name} onto the grid of {reference.name} so that every sequence and "
        "the segmentation share one shape and affine (e.g. with the BraTS preprocessing pipeline)"
    )


def _declared_bytes(img: Any) -> int:
    """Bytes a NIfTI file must hold (uncompressed) for its header: voxel offset + voxels x item size."""
    return int(img.dataobj.offset) + math.prod(int(n) for n in img.shape) * img.get_data_dtype().itemsize


def _gzip_length(path: Path, at_least: int) -> int:
    """Decompressed length of a gzip file, counted (not kept) until it reaches ``at_least``.

    The trailer's ISIZE field (last 4 bytes) is the uncompressed length modulo 2^32 of the last
    gzip member: never more than the real length, so ISIZE >= ``at_least`` settles it by reading 4
    bytes (always, for the files nibabel, ITK or dcm2niix write: one member, far below 4 GiB).
    Otherwise (a header that lies, a truncated or multi-member file) the stream is decompressed in
    chunks and counted. Raises what reading raises (EOFError when truncated).
    """
    with open(path, "rb") as fh:
        fh.seek(-4, os.SEEK_END)
        isize = int.from_bytes(fh.read(4), "little")
    if isize >= at_least:
        return isize
    total = 0
    with gzip.open(path, "rb") as fh:
        while total < at_least:
            chunk = fh.read(1 << 24)
            if not chunk:
                break
            total += len(chunk)
    return total


def _size_problem(path: Path, img: Any, max_voxels: int, deep: bool) -> Problem | None:
    """Whether the header's declared size is sane (non-empty, at most ``max_voxels``) and held by
    the file: its size for ``.nii``; for ``.nii.gz`` (``deep`` only: it may mean decompressing) the
    decompressed length. Checked before nibabel allocates the declared size to read the voxels."""
    shape = tuple(int(n) for n in img.shape)
    n_voxels = math.prod(shape)
    if n_voxels == 0:
        return Problem(path, f"{path.name}'s header declares an empty volume (shape {shape})", _REEXPORT,
                       Category.BAD_HEADER)
    if n_voxels > max_voxels:
        return Problem(
            path, f"{path.name}'s header declares {'x'.join(map(str, shape))} = {n_voxels:,} voxels, more than the "
            f"{max_voxels:,} allowed per file",
            "check the file's header (dim field; a brain MRI sequence holds about 240x240x155 voxels); if the volume "
            "really is that large, resample it to about 1 mm voxels or raise max_voxels",
            Category.BAD_HEADER,
        )
    declared = _declared_bytes(img)
    if not path.name.lower().endswith(".gz"):
        held, holds = path.stat().st_size, "the file holds only"
    elif deep:
        held, holds = _gzip_length(path, declared), "the file decompresses to only"
    else:
        return None
    if held >= declared:
        return None
    return Problem(
        path, f"{path.name}'s header declares {shape} voxels of {img.get_data_dtype()} ({declared:,} bytes with the "
        f"header) but {holds} {held:,} bytes", _REEXPORT, Category.TRUNCATED,
    )


def _header_problem(path: Path, img: Any, max_voxels: int, deep: bool) -> Problem | None:
    """What is wrong with a loaded file's header (no voxel is read): declared size
    (:func:`_size_problem`), dimensionality, voxel size and affine."""
    size_problem = _size_problem(path, img, max_voxels, deep)
    if size_problem is not None:
        return size_problem
    shape = tuple(int(n) for n in img.shape)
    if len(shape) != 3:
        return Problem(path, f"{path.name} has shape {shape}, expected a 3-D volume",
                       "save each sequence (and the segmentation) as its own 3-D volume", Category.NOT_3D)
    # nib.load replaces a zero voxel size by 1 mm and a negative one by its absolute value (and an
    # affine built from the qform would use that guess): read the stored pixdim.
    with ImageOpener(path) as fh:
        raw = type(img.header).from_fileobj(fh, check=False)
    pixdim = np.asarray(raw["pixdim"][1:4], dtype=np.float64)
    if not (np.isfinite(pixdim).all() and (pixdim > 0).all()):
        return Problem(
            path, f"{path.name}'s header has voxel size (pixdim) {', '.join(f'{v:g}' for v in pixdim)} mm: every "
            "spatial voxel size must be positive", f"export {path.name} again with its real voxel size", Category.BAD_HEADER,
        )
    affine = np.asarray(img.affine, dtype=np.float64)
    if not (np.isfinite(affine).all() and abs(np.linalg.det(affine[:3, :3])) > 0):
        return Problem(path, f"{path.name}'s voxel-to-world matrix (affine) is not finite or not invertible",
                       f"export {path.name} again with a valid orientation (qform/sform)", Category.BAD_HEADER)
    return None


def _values_problem(key: str, path: Path, img: Any, data: np.ndarray, as_float32: np.ndarray) -> Problem | None:
    """Non-finite values: in the file, or appearing when training converts the (scaled) data to
    float32; for images also a mean or standard deviation of the non-zero voxels (what z-scoring
    divides by) beyond float32."""
    in_file = int(data.size - np.count_nonzero(np.isfinite(data))) if data.dtype.kind in "fc" else 0
    if in_file:
        return Problem(path, f"{path.name} has {in_file} non-finite (NaN/inf) voxels",
                       f"re-export {path.name} or replace its NaN/inf voxels (e.g. by 0 outside the brain)",
                       Category.NON_FINITE)
    slope, inter = float(img.dataobj.slope), float(img.dataobj.inter)
    scaling = f" once the header's scl_slope {slope:g} and scl_inter {inter:g} are applied" if (slope, inter) != (1.0, 0.0) else ""
    fix = (f"re-export {path.name} with intensities in a usual range"
           + (" and the header's scl_slope/scl_inter set to what the scanner wrote (usually 1 and 0)" if scaling else ""))
    overflow = int(as_float32.size - np.count_nonzero(np.isfinite(as_float32)))
    if overflow:
        return Problem(path, f"{path.name} has {overflow} voxel{'s' * (overflow != 1)} beyond the float32 range "
                       f"(|value| > {_FLOAT32_MAX:.3g})"
                       f"{scaling}; training loads images as float32", fix, Category.NON_FINITE)
    if key == SEG_KEY:
        return None
    brain = as_float32[as_float32 != 0]
    if brain.size:
        # z-scoring sums in float32: that sum and the standard deviation must stay finite there
        total, std = float(brain.sum(dtype=np.float64)), float(brain.std(dtype=np.float64))
        if not (abs(total) <= _FLOAT32_MAX and std <= _FLOAT32_MAX):
            return Problem(
                path, f"{path.name}'s non-zero voxels sum to {total:.3g} with standard deviation {std:.3g}{scaling}: "
                f"beyond float32 (max {_FLOAT32_MAX:.3g}), so z-scoring them for training gives NaN", fix,
                Category.NON_FINITE,
            )
    return None


def _content_problem(key: str, path: Path, values: np.ndarray, as_float32: np.ndarray) -> Problem | None:
    """Segmentation values outside ALLOWED_SEG_VALUES, or a constant image."""
    if key == SEG_KEY:
        unexpected = [v for v in values.tolist() if v not in ALLOWED_SEG_VALUES]
        if not unexpected:
            return None
        shown = ", ".join(f"{v:g}" for v in unexpected[:10]) + (" ..." if len(unexpected) > 10 else "")
        return Problem(
            path,
            f"{path.name} has label values {shown} (found {', '.join(f'{v:g}' for v in values[:10].tolist())}"
            f"{' ...' if len(values) > 10 else ''}; allowed: {', '.join(map(str, sorted(ALLOWED_SEG_VALUES)))})",
            "relabel to one of the label conventions ("
            + "; ".join(f"{name}: {text}" for name, text in LABEL_CONVENTION_TEXT.items()) + ")",
            Category.SEG_VALUES,
        )
    if as_float32.size and as_float32.min() == as_float32.max():
        return Problem(
            path, f"{path.name} is constant (every voxel is {float(as_float32.flat[0]):g})",
            f"re-export {path.name}: an empty volume carries no image, or delete it to mark the sequence missing",
            Category.CONSTANT,
        )
    return None


@dataclass(frozen=True)
class SegContent:
    """What a segmentation file holds: the number of voxels of each value and one voxel's volume."""

    counts: Mapping[int, int]
    voxel_ml: float

    @property
    def values(self) -> frozenset[int]:
        return frozenset(self.counts)

    def volume_ml(self, value: int) -> float:
        """Volume (mL) of the voxels holding ``value``."""
        return self.counts.get(value, 0) * self.voxel_ml


def validate_case_files(
    images: Mapping[str, Path], seg: Path | None, *, deep: bool = True, max_voxels: int = MAX_VOXELS
) -> tuple[list[Problem], SegContent | None]:
    """Check the files of one case; returns (problems, what the segmentation holds).

    Header checks (always): readable NIfTI; declared size at most ``max_voxels`` voxels and held by
    the file (for ``.nii.gz`` only when ``deep``); 3-D; positive voxel sizes; a finite invertible
    affine; every file on the grid of the first image (same shape; affines within
    :data:`AFFINE_ATOL`). Voxel checks (``deep``; each file is read exactly once, one at a time):
    finite once scaled and converted to float32 as training loads it; images not constant and with
    a mean/standard deviation that z-scoring can use; segmentation values within
    ALLOWED_SEG_VALUES. The :class:`SegContent` is None without ``deep``, without a segmentation or
    when the segmentation has a problem; whether its values fit a label convention is
    :func:`case_label_convention`'s question.
    """
    problems: list[Problem] = []
    headers: dict[str, Any] = {}
    files = dict(images) | ({SEG_KEY: seg} if seg is not None else {})
    for key, path in files.items():
        try:
            img = nib.load(path)  # reads the header only; voxels stay on disk
            problem = _header_problem(path, img, max_voxels, deep)
        except Exception as exc:  # any failure to parse means the file is unusable; say why
            problems.append(_read_failure(path, exc, "cannot be read as NIfTI"))
            continue
        if problem is not None:
            problems.append(problem)
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
                    _regrid_fix(path, ref_path), Category.SHAPE_MISMATCH,
                ))
                continue
            diff = float(np.abs(np.asarray(img.affine) - np.asarray(ref.affine)).max())
            if not diff <= AFFINE_ATOL:  # also catches NaN affines
                problems.append(Problem(
                    path,
                    f"{path.name}'s affine differs from {ref_path.name}'s by up to {diff:.4g} "
                    f"(max absolute difference of the voxel-to-world matrices; tolerance {AFFINE_ATOL})",
                    _regrid_fix(path, ref_path), Category.AFFINE_MISMATCH,
                ))

    content: SegContent | None = None
    if not deep:
        return problems, content
    for key, img in headers.items():
        path = files[key]
        try:
            data = np.asanyarray(img.dataobj)  # decompresses once; scaled (float64) when the header scales
        except Exception as exc:  # truncated gzip -> EOFError/zlib.error, short .nii -> OSError
            problems.append(_read_failure(path, exc))
            continue
        with np.errstate(over="ignore", invalid="ignore"):  # overflow is what _values_problem looks for
            as_float32 = np.asarray(data, dtype=np.float32)  # what MONAI's LoadImaged hands to training
        problem = _values_problem(key, path, img, data, as_float32)
        if problem is None:
            if key == SEG_KEY:
                values, counts = np.unique(as_float32, return_counts=True)
                problem = _content_problem(key, path, values, as_float32)
                if problem is None:
                    voxel_ml = abs(float(np.linalg.det(np.asarray(img.affine)[:3, :3]))) / 1000.0
                    content = SegContent({int(v): int(n) for v, n in zip(values.tolist(), counts.tolist())}, voxel_ml)
            else:
                problem = _content_problem(key, path, as_float32, as_float32)
        if problem is not None:
            problems.append(problem)
    return problems, content


# --------------------------------------------------------------------------------- label conventions
def _declare_fix(root: Path, *conventions: str) -> str:
    options = " or ".join(f'"{c}" ({LABEL_CONVENTION_TEXT[c]})' for c in conventions)
    return (f'declare the site\'s label convention: write {{"label_convention": ...}} with {options} into '
            f"{root / SITE_JSON}, or pass it as --label-convention to check-site and as label-convention in the "
            "SuperNode's node config")


def case_label_convention(
    root: Path, seg: Path, naming: str, content: SegContent | None, declared: str | None, source: str | None
) -> tuple[str, Problem | None]:
    """The convention a case's segmentation is read with, and the problem when its values do not fit.

    ``declared`` (with the ``source`` that declared it) wins; otherwise the naming implies one
    (:data:`NAMING_CONVENTION`). ``content`` None (a shallow scan) checks nothing.
    """
    convention = declared or NAMING_CONVENTION[naming]
    if content is None:
        return convention, None
    outside = sorted(content.values - set(LABEL_CONVENTIONS[convention]))
    if not outside:
        return convention, None
    shown = ", ".join(map(str, outside))
    if declared is not None:
        fitting = [c for c, table in LABEL_CONVENTIONS.items() if content.values <= set(table)]
        return convention, Problem(
            seg, f"{seg.name} has label value(s) {shown}, which the declared label convention {declared} "
            f"({source}; {LABEL_CONVENTION_TEXT[declared]}) does not use",
            f"check which convention the site's segmentations follow"
            + (f" (these values fit {' or '.join(fitting)})" if fitting else "")
            + f" and declare it in {source}, or relabel {seg.name}",
            Category.LABEL_CONVENTION,
        )
    if convention == "brats2023" and RESECTION_CAVITY in outside:
        voxels = content.counts[RESECTION_CAVITY]
        return convention, Problem(
            seg, f"{seg.name} uses label {RESECTION_CAVITY} ({voxels} voxels, "
            f"{content.volume_ml(RESECTION_CAVITY):.3g} mL) and the site declares no label convention: with BraTS "
            f"2023+ file names a {RESECTION_CAVITY} is enhancing tumor only in relabelled BraTS 2021 data and the "
            "resection cavity in BraTS 2024 post-treatment data (outside the tumor), so it is not guessed",
            _declare_fix(root, "brats2024-post", "brats2021"), Category.LABEL_CONVENTION,
        )
    return convention, Problem(
        seg, f"{seg.name} has label value(s) {shown}, which its {naming} file names' convention "
        f"({LABEL_CONVENTION_TEXT[convention]}) does not use, and the site declares no label convention",
        _declare_fix(root, *(c for c, table in LABEL_CONVENTIONS.items() if content.values <= set(table))),
        Category.LABEL_CONVENTION,
    )


def read_site_json(root: Path) -> str | None:
    """The label convention ``root/site.json`` declares (None without the file or the key).

    Raises:
        SiteDeclarationError: the file is not a JSON object, has an unknown key, or names an unknown
            convention.
    """
    path = root / SITE_JSON
    if not path.exists():
        return None
    example = '{"label_convention": "brats2024-post"}'
    try:
        declared = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SiteDeclarationError(f"{path} cannot be read as JSON ({exc}). Fix: write a JSON object such as "
                                   f"{example}, or delete the file") from exc
    if not isinstance(declared, dict):
        raise SiteDeclarationError(f"{path} holds {type(declared).__name__}, not a JSON object. Fix: write {example}")
    unknown = sorted(set(declared) - {"label_convention"})
    if unknown:
        close = difflib.get_close_matches(unknown[0], ["label_convention"], n=1)
        raise SiteDeclarationError(f"{path}: unknown key(s) {', '.join(map(repr, unknown))}"
                                   + (f" (did you mean {close[0]!r}?)" if close else "")
                                   + f". Fix: the file may hold only label_convention, e.g. {example}")
    value = declared.get("label_convention")
    return None if value is None else check_label_convention(value, str(path))


def check_label_convention(value: Any, source: str) -> str:
    """``value`` if it names a :data:`LABEL_CONVENTIONS` entry; otherwise a
    :class:`SiteDeclarationError` naming ``source``, the value and the choices."""
    if isinstance(value, str) and value.strip().lower() in LABEL_CONVENTIONS:
        return value.strip().lower()
    text = str(value).strip().lower()
    close = [c for c in LABEL_CONVENTIONS if c.startswith(text) and text] or difflib.get_close_matches(
        text, list(LABEL_CONVENTIONS), n=1)
    raise SiteDeclarationError(
        f"{source}: unknown label convention {value!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
        + ". Fix: use one of " + "; ".join(f"{c} ({t})" for c, t in LABEL_CONVENTION_TEXT.items())
    )


def declared_label_convention(root: Path, label_convention: str | None) -> tuple[str | None, str | None]:
    """(convention, where it was declared) from the caller's ``label_convention`` and ``site.json``;
    (None, None) when neither declares one. The two must agree when both are given."""
    from_file = read_site_json(root)
    if label_convention is None:
        return from_file, (str(root / SITE_JSON) if from_file else None)
    given = check_label_convention(label_convention, "label-convention")
    if from_file is not None and from_file != given:
        raise SiteDeclarationError(
            f"{root / SITE_JSON} declares the label convention {from_file} but label-convention (node config or "
            f"--label-convention) says {given}. Fix: keep one declaration, or make them agree"
        )
    return given, "label-convention" + (f" and {root / SITE_JSON}" if from_file else "")


# --------------------------------------------------------------------------------- the site
def _case_folders(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _rejection(case_id: str, problems: Sequence[Problem]) -> Rejection:
    fixes = list(dict.fromkeys(p.fix for p in problems))  # de-duplicated, in order
    return Rejection(case_id, problems[0].path, "; ".join(p.reason for p in problems), " ".join(
        f if f.endswith(".") else f + "." for f in fixes), problems[0].category)


def scan_site(
    root: Path | str, *, deep: bool = True, allow_external_links: bool = False, max_voxels: int = MAX_VOXELS,
    label_convention: str | None = None, validation_cache: Any = None,
) -> SiteIndex:
    """Discover and validate every case of a site folder.

    Args:
        root: the site folder (one subfolder per case and a labels.csv).
        deep: also read every voxel (truncated files, NaN/inf or float32 overflow, constant
            volumes, segmentation values); False checks names, labels.csv and headers only (shape,
            affine, voxel size, declared size).
        allow_external_links: accept case folders and files that are symbolic links leading out of
            ``root``. Off by default: such a link can pull another center's cases (the held-out
            one) into this site's training.
        max_voxels: largest number of voxels a file's header may declare (:data:`MAX_VOXELS`).
        label_convention: the segmentation label convention (:data:`LABEL_CONVENTIONS`) as the caller
            declares it (node config ``label-convention``, ``--label-convention``); it must agree with
            ``site.json`` when that declares one too. None: ``site.json``'s, else inferred per case
            (:func:`case_label_convention`).
        validation_cache: a :class:`common.data.cache.ValidationCache` that keeps each case's file
            validation while its files are unchanged (saved at the end), or None.

    Returns:
        The :class:`SiteIndex`: usable cases sorted by case_id, and a rejection for every folder or
        labels.csv row that cannot be used. Zero usable cases is not an error here (see
        :func:`load_site`).

    Raises:
        SiteNotFoundError: ``root`` is not a folder.
        LabelsCsvError: labels.csv is missing or structurally broken.
        SiteDeclarationError: site.json is broken, or the declarations disagree.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise SiteNotFoundError(
            f"site folder {root} does not exist or is not a folder. Fix: pass the folder that holds "
            f"the case subfolders and {LABELS_CSV}"
        )
    root = root.resolve()
    csv_path = root / LABELS_CSV
    declared, source = declared_label_convention(root, label_convention)
    rows = read_labels_csv(csv_path)
    index = SiteIndex(root=root, name=root.name, cases=[], rejected=[], label_convention=declared,
                      convention_source=source)
    index.ignored = sorted(p for p in root.iterdir() if p.is_file() and _is_nifti(p.name))

    folders = _case_folders(root)
    for folder in folders:
        case_id = folder.name
        found = find_case_files(folder)
        index.ignored += found.ignored
        problems = list(found.problems)
        external = [] if allow_external_links else _external_links(root, folder, found)
        problems += external
        row = rows.get(case_id)
        if row is None:
            problems.append(Problem(
                csv_path, f"has no row in {LABELS_CSV}",
                f"add a row for {case_id} to {csv_path} (e.g. '{case_id},,,,'; empty values mark labels unknown)",
                Category.NO_LABEL_ROW,
            ))
        else:
            problems += [Problem(csv_path, p, f"correct {LABELS_CSV} line {row.line} or leave the value empty "
                                 "to mark the label unknown", Category.UNKNOWN_LABEL) for p in row.problems]
            problems += [Problem(csv_path, p, f"correct {LABELS_CSV} line {row.line}: {SURVIVAL_DAYS} is the time from "
                                 f"diagnosis to death or last follow-up in days, {SURVIVAL_EVENT} 1 if death was observed "
                                 "and 0 if censored; leave both empty when unknown", Category.BAD_SURVIVAL)
                         for p in row.survival_problems]
        content, convention = None, declared
        if found.images and not external:  # data from outside the site is not read
            if validation_cache is not None:
                file_problems, content = validation_cache.validate(case_id, found.images, found.seg, deep=deep,
                                                                   max_voxels=max_voxels)
            else:
                file_problems, content = validate_case_files(found.images, found.seg, deep=deep, max_voxels=max_voxels)
            problems += file_problems
            if found.seg is not None and not file_problems:
                convention, problem = case_label_convention(root, found.seg, found.naming, content, declared, source)
                problems += [problem] if problem is not None else []
        if problems:
            index.rejected.append(_rejection(case_id, problems))
            continue
        assert row is not None
        index.cases.append(CaseRecord(
            case_id=case_id, folder=folder, images=found.images, seg=found.seg,
            labels=row.labels, naming=found.naming, label_convention=convention or NAMING_CONVENTION[found.naming],
            survival=row.survival,
        ))
        if content is not None and convention == "brats2024-post" and RESECTION_CAVITY in content.values:
            index.cavity_ml[case_id] = round(content.volume_ml(RESECTION_CAVITY), 3)

    folder_names = {f.name for f in folders}
    for case_id, row in rows.items():
        if case_id in folder_names:
            continue
        broken = _broken_link(root / case_id)
        if broken:
            index.rejected.append(Rejection(
                case_id, root / case_id, f"listed in {LABELS_CSV} (line {row.line}) but the case folder {broken}",
                f"point the symbolic link {root / case_id} at the real case folder (or move the folder in its place), "
                f"or remove line {row.line} from {LABELS_CSV}.", Category.BROKEN_SYMLINK,
            ))
            continue
        index.rejected.append(Rejection(
            case_id, root / case_id,
            f"listed in {LABELS_CSV} (line {row.line}) but no folder {case_id}/ exists",
            f"add the folder {root / case_id} with its images, or remove line {row.line} from {LABELS_CSV}.",
            Category.NO_FOLDER,
        ))
    index.ignored.sort()
    if validation_cache is not None:
        validation_cache.save(keep={f.name for f in folders})
    return index


def load_site(
    root: Path | str, *, allow_external_links: bool = False, max_voxels: int = MAX_VOXELS,
    label_convention: str | None = None, validation_cache: Any = None,
) -> SiteIndex:
    """:func:`scan_site` (deep) for training/evaluation.

    Raises:
        NoUsableCaseError: no case is usable. Its text holds counts per category only (it may
            leave the site); its ``detail`` names the site folder and every rejected case.
    """
    index = scan_site(root, deep=True, allow_external_links=allow_external_links, max_voxels=max_voxels,
                      label_convention=label_convention, validation_cache=validation_cache)
    if index.cases:
        return index
    what = index.rejection_summary() if index.rejected else "the site folder holds no case folder"
    public = (f"no usable case at this site ({what}). Fix: run `fedglioma check-site <site folder>` at the site "
              "for each case's reason and fix")
    lines = [f"site {index.name} ({index.root}) has no usable case: {what}"]
    lines += [f"  {r.case_id} ({r.path}) [{r.category}]: {r.reason}. Fix: {r.fix}" for r in index.rejected]
    lines.append(f"Fix: run `fedglioma check-site {index.root}` for every reason and fix.")
    raise NoUsableCaseError(public, "\n".join(lines))


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
