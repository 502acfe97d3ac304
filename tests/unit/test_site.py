"""Site discovery, labels.csv parsing, per-case validation and the train/validation split."""

from __future__ import annotations

import builtins
import errno
import os
import pickle
import random
import tracemalloc
from collections import Counter
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest

from common.contract import LABELS_CSV_COLUMNS, SEQUENCES, TASKS, UNKNOWN_LABEL
from common.data.site import (
    MAX_VOXELS,
    CaseRecord,
    Category,
    LabelsCsvError,
    NoUsableCaseError,
    Rejection,
    SiteDeclarationError,
    SiteNotFoundError,
    load_site,
    parse_label,
    scan_site,
    split_cases,
)
from tests.helpers import SITE_CASES, case_path, patch_header, write_case, write_labels_csv, write_nifti

ROW = ("wildtype", "intact", "HGG", "methylated")


# ------------------------------------------------------------------------------------ discovery
def test_valid_site_both_namings_extensions_and_labels(site_dir: Path) -> None:
    write_case(site_dir, "case-007", naming="brats2023", ext=".nii", sequences=("t1ce", "flair"))
    rows = [(c, *labels) for c, *_, labels in SITE_CASES] + [("case-007", *ROW)]
    write_labels_csv(site_dir, rows)

    index = scan_site(site_dir)

    assert index.rejected == [] and index.ignored == []
    by_id = {c.case_id: c for c in index.cases}
    assert list(by_id) == sorted(by_id) and len(by_id) == 7
    assert Counter(c.naming for c in index.cases) == {"brats2021": 3, "brats2023": 4}
    assert by_id["case-003"].available == (True, False, True, True)
    assert by_id["case-005"].available == (False, False, True, True)
    assert by_id["case-007"].images["t1ce"].name == "case-007-t1c.nii"
    assert by_id["case-004"].seg is None and by_id["case-001"].seg.name == "case-001_seg.nii.gz"
    # labels: class names, case/whitespace ("Mutant "), WHO grades (3 -> LGG, 4 -> HGG, II -> LGG), empty
    assert by_id["case-001"].labels == (0, 0, 1, 1)
    assert by_id["case-003"].labels == (1, 0, 0, UNKNOWN_LABEL)
    assert by_id["case-004"].labels == (0, UNKNOWN_LABEL, 1, 1)
    assert by_id["case-005"].labels == (UNKNOWN_LABEL,) * len(TASKS)
    assert by_id["case-006"].labels == (1, 1, 0, 1)
    assert index.convention_counts() == {"brats2021": 3, "brats2023": 3} and index.label_convention is None
    assert index.sequence_counts() == {"t1": 5, "t1ce": 5, "t2": 6, "flair": 7}
    assert index.pattern_counts()["t1+t1ce+t2+flair"] == 4 and index.n_seg == 6
    assert index.label_counts()["idh"] == {"wildtype": 3, "mutant": 3, "unknown": 1}


@pytest.mark.parametrize(
    ("task", "raw", "expected"),
    [("idh", " Mutant ", 1), ("idh", "WILDTYPE", 0), ("idh", "", UNKNOWN_LABEL), ("1p19q", "codeleted", 1),
     ("grade", "2", 0), ("grade", "iii", 0), ("grade", "IV", 1), ("grade", "hgg", 1), ("mgmt", "Methylated", 1)],
)
def test_parse_label_accepts_documented_spellings(task: str, raw: str, expected: int) -> None:
    assert parse_label(task, raw) == expected


@pytest.mark.parametrize(("task", "raw"), [("idh", "mut"), ("grade", "1"), ("grade", "GBM"), ("mgmt", "yes")])
def test_parse_label_rejects_unknown_strings(task: str, raw: str) -> None:
    with pytest.raises(ValueError, match="unknown value"):
        parse_label(task, raw)


# ------------------------------------------------------------------------------------ bad cases
def _good_and_bad(tmp_path: Path, **bad_case: Any) -> Path:
    """A site ``tmp_path/site-x`` with two valid cases, "good" and "bad" (``write_case`` options)."""
    site = tmp_path / "site-x"
    write_case(site, "good")
    write_case(site, "bad", **bad_case)
    write_labels_csv(site, [("good", *ROW), ("bad", *ROW)])
    return site


def _only_bad_rejected(site: Path, category: Category, *reason_parts: str, **scan: Any) -> Rejection:
    """Scan ``site`` (it must not raise): "good" stays usable, "bad" alone is rejected with
    ``category`` and a reason holding every part."""
    index = scan_site(site, **scan)
    assert [c.case_id for c in index.cases] == ["good"]
    (rejection,) = index.rejected
    assert rejection.case_id == "bad" and rejection.category == category, rejection
    for part in reason_parts:
        assert part in rejection.reason
    return rejection


def _rewrite(path: Path, edit) -> None:
    """Load a NIfTI, change its data/affine with ``edit(data, affine) -> (data, affine)``, save."""
    img = nib.load(path)
    data, affine = edit(np.asarray(img.dataobj).copy(), img.affine.copy())
    write_nifti(path, data, affine)


def _truncate(site: Path) -> None:
    path = case_path(site, "bad", "t1ce")
    path.write_bytes(path.read_bytes()[:-200])


def _shape(site: Path) -> None:
    write_nifti(case_path(site, "bad", "t2"), np.ones((16, 16, 12), np.float32) * np.arange(12, dtype=np.float32))


def _affine(site: Path) -> None:
    def shift(data, affine):
        affine[1, 3] += 0.5
        return data, affine

    _rewrite(case_path(site, "bad", "flair"), shift)


def _nan(site: Path) -> None:
    def poison(data, affine):
        data[4, 5, 6] = np.nan
        data[1, 1, 1] = np.inf
        return data, affine

    _rewrite(case_path(site, "bad", "t1"), poison)


def _seg_values(site: Path) -> None:
    def relabel(data, affine):
        data[0, 0, 0], data[0, 0, 1] = 7, 5
        return data, affine

    _rewrite(case_path(site, "bad", "seg"), relabel)


def _mixed_naming(site: Path) -> None:
    write_case(site, "bad", naming="brats2023", sequences=("t2",), seg=False)


def _two_extensions(site: Path) -> None:
    write_case(site, "bad", sequences=("t1",), seg=False, ext=".nii")


def _no_image(site: Path) -> None:
    for seq in SEQUENCES:
        case_path(site, "bad", seq).rename(site / "bad" / f"scan_{seq}.nii.gz")


@pytest.mark.parametrize(
    ("breaker", "file_name", "reason_parts", "fix_part", "category"),
    [
        (_truncate, "bad_t1ce.nii.gz", ["bad_t1ce.nii.gz cannot be read", "EOFError"], "export the file again",
         Category.TRUNCATED),
        (_shape, "bad_t2.nii.gz", ["bad_t2.nii.gz has shape (16, 16, 12) but bad_t1.nii.gz has (16, 16, 16)"],
         "resample bad_t2.nii.gz onto the grid of bad_t1.nii.gz", Category.SHAPE_MISMATCH),
        (_affine, "bad_flair.nii.gz", ["bad_flair.nii.gz's affine differs from bad_t1.nii.gz's by up to 0.5"],
         "share one shape and affine", Category.AFFINE_MISMATCH),
        (_nan, "bad_t1.nii.gz", ["bad_t1.nii.gz has 2 non-finite (NaN/inf) voxels"], "replace its NaN/inf",
         Category.NON_FINITE),
        (_seg_values, "bad_seg.nii.gz", ["bad_seg.nii.gz has label values 5, 7", "found 0, 1, 2, 4, 5, 7"],
         "relabel to one of the label conventions", Category.SEG_VALUES),
        (_mixed_naming, "bad", ["mixes the two naming conventions", "bad_t1.nii.gz (brats2021)",
                                "bad-t2w.nii.gz (brats2023)"], "rename every file", Category.FILE_NAMING),
        (_two_extensions, "bad_t1.nii.gz", ["two files for t1: bad_t1.nii.gz, bad_t1.nii"], "keep only one",
         Category.FILE_NAMING),
        (_no_image, "bad", ["no image file matching the case name 'bad'", "scan_t1.nii.gz"],
         "name the files after the folder", Category.NO_IMAGE),
    ],
    ids=["truncated-gzip", "shape", "affine", "nan-inf", "seg-values", "mixed-naming", "two-extensions", "no-image"],
)
def test_broken_case_is_rejected_with_file_reason_and_fix(
    tmp_path: Path, breaker, file_name: str, reason_parts: list[str], fix_part: str, category: Category
) -> None:
    site = _good_and_bad(tmp_path)
    breaker(site)

    rejection = _only_bad_rejected(site, category, *reason_parts)

    assert rejection.path.name == file_name
    assert fix_part in rejection.fix


# ------------------------------------------------------------------------------------ label conventions
def _cavity_site(tmp_path: Path, naming: str = "brats2023") -> Path:
    """Two cases named ``naming``: "tumor" (ET = 3) and "post-op" (ET = 3 plus a cavity of 8 voxels of 4)."""
    site = tmp_path / "site-p"
    write_case(site, "tumor", naming=naming, et_label=3)
    write_case(site, "post-op", naming=naming, et_label=3)

    def cavity(data, affine):
        data[1:3, 1:3, 1:3] = 4  # 8 voxels of 1 mm^3
        return data, affine

    _rewrite(case_path(site, "post-op", "seg", naming), cavity)
    write_labels_csv(site, [("tumor", *ROW), ("post-op", *ROW)])
    return site


def test_undeclared_convention_follows_each_case_naming(tmp_path: Path) -> None:
    site = tmp_path / "s"
    write_case(site, "old", naming="brats2021")  # ET written as 4
    write_case(site, "new", naming="brats2023")  # ET written as 3
    write_labels_csv(site, [("old", *ROW), ("new", *ROW)])

    index = scan_site(site)

    assert {c.case_id: c.label_convention for c in index.cases} == {"new": "brats2023", "old": "brats2021"}
    assert index.label_convention is None and index.convention_source is None and index.cavity_ml == {}


def test_label_4_in_brats2023_names_without_declaration_is_rejected_not_taken_for_tumor(tmp_path: Path) -> None:
    site = _cavity_site(tmp_path)

    index = scan_site(site)

    assert [c.case_id for c in index.cases] == ["tumor"]
    (rejection,) = index.rejected
    assert rejection.case_id == "post-op" and rejection.category == Category.LABEL_CONVENTION
    assert "post-op-seg.nii.gz uses label 4 (8 voxels, 0.008 mL)" in rejection.reason
    assert "brats2024-post" in rejection.fix and "brats2021" in rejection.fix and "site.json" in rejection.fix


@pytest.mark.parametrize("declare", ["site.json", "argument"])
def test_brats2024_post_maps_the_cavity_to_background_and_measures_it(tmp_path: Path, declare: str) -> None:
    site = _cavity_site(tmp_path)
    if declare == "site.json":
        (site / "site.json").write_text('{"label_convention": "brats2024-post"}')
    index = scan_site(site, label_convention="brats2024-post" if declare == "argument" else None)

    assert index.rejected == [] and [c.label_convention for c in index.cases] == ["brats2024-post"] * 2
    assert index.label_convention == "brats2024-post"
    assert index.convention_source == (str(site.resolve() / "site.json") if declare == "site.json" else "label-convention")
    assert index.cavity_ml == {"post-op": 0.008}


def test_declared_brats2021_reads_4_as_enhancing_tumor_in_brats2023_names(tmp_path: Path) -> None:
    site = tmp_path / "s"
    write_case(site, "c1", naming="brats2023", et_label=4)
    write_labels_csv(site, [("c1", *ROW)])
    assert scan_site(site).cases == []  # undeclared: rejected
    (case,) = scan_site(site, label_convention="brats2021").cases
    assert case.label_convention == "brats2021"


@pytest.mark.parametrize(
    ("naming", "et_label", "declared", "reason", "fix"),
    [
        ("brats2021", 3, None, "which its brats2021 file names' convention", '"brats2023"'),
        ("brats2023", 3, "brats2021", "which the declared label convention brats2021", "fit brats2023 or brats2024-post"),
        ("brats2021", 4, "brats2023", "label value(s) 4, which the declared label convention brats2023",
         "fit brats2021 or brats2024-post"),
    ],
    ids=["3-in-2021-names", "3-declared-2021", "4-declared-2023"],
)
def test_values_contradicting_the_convention_reject_the_case(
    tmp_path: Path, naming: str, et_label: int, declared: str | None, reason: str, fix: str
) -> None:
    site = tmp_path / "s"
    write_case(site, "c1", naming=naming, et_label=et_label)
    write_labels_csv(site, [("c1", *ROW)])

    index = scan_site(site, label_convention=declared)

    (rejection,) = index.rejected
    assert rejection.category == Category.LABEL_CONVENTION and reason in rejection.reason and fix in rejection.fix


@pytest.mark.parametrize(
    ("content", "argument", "message"),
    [
        ('{"label_convention": "brats2024"}', None, "unknown label convention 'brats2024' (did you mean 'brats2024-post'?)"),
        ('{"label_conventions": "brats2021"}', None, "did you mean 'label_convention'?"),
        ("[1]", None, "not a JSON object"),
        ("{", None, "cannot be read as JSON"),
        ('{"label_convention": "brats2021"}', "brats2024-post", "declares the label convention brats2021 but"),
        (None, "brats2022", "unknown label convention 'brats2022'"),
    ],
    ids=["unknown-value", "unknown-key", "not-object", "bad-json", "disagree", "bad-argument"],
)
def test_bad_declarations_raise_naming_the_file_and_fix(
    tmp_path: Path, content: str | None, argument: str | None, message: str
) -> None:
    site = tmp_path / "s"
    write_case(site, "c1")
    write_labels_csv(site, [("c1", *ROW)])
    if content is not None:
        (site / "site.json").write_text(content)
    with pytest.raises(SiteDeclarationError, match="Fix:") as info:
        scan_site(site, label_convention=argument)
    assert message in str(info.value)


def test_shallow_scan_reads_no_values_and_takes_the_declared_convention(tmp_path: Path) -> None:
    site = _cavity_site(tmp_path)
    assert len(scan_site(site, deep=False).cases) == 2  # values unread: nothing to contradict
    index = scan_site(site, deep=False, label_convention="brats2024-post")
    assert {c.label_convention for c in index.cases} == {"brats2024-post"} and index.cavity_ml == {}


def test_csv_row_problems_reject_only_that_case(tmp_path: Path) -> None:
    site = tmp_path / "site-x"
    for case_id in ("good", "typo", "no-row"):
        write_case(site, case_id)
    write_labels_csv(site, [("good", *ROW), ("typo", "mut", "", "5", ""), ("ghost", *ROW)])

    index = scan_site(site)

    assert [c.case_id for c in index.cases] == ["good"]
    rejected = {r.case_id: r for r in index.rejected}
    assert set(rejected) == {"typo", "no-row", "ghost"}
    typo = rejected["typo"]
    assert typo.path.name == "labels.csv"
    assert "labels.csv line 3, column idh: unknown value 'mut' (allowed: wildtype, mutant" in typo.reason
    assert "column grade: unknown value '5'" in typo.reason and "IV" in typo.reason
    assert "has no row in labels.csv" in rejected["no-row"].reason
    assert "add a row for no-row" in rejected["no-row"].fix and "empty values mark labels unknown" in rejected["no-row"].fix
    ghost = rejected["ghost"]
    assert "listed in labels.csv (line 4) but no folder" in ghost.reason and ghost.path == site.resolve() / "ghost"


# ------------------------------------------------------------------------------------ labels.csv structure
@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "labels.csv is missing"),
        ("case_id,idh,grade,mgmt\nc1,mutant,LGG,\n", "line 1: missing required column(s) codeletion_1p19q"),
        ("case_id,idh,codeletion_1p19q,grade,mgmt\nc1,mutant,,,\nc2,,,,\nc1,,,,\n",
         "line 4: case_id 'c1' is listed twice (lines 2 and 4)"),
        ("case_id,idh,codeletion_1p19q,grade,mgmt\nc1,mutant,,\n", "line 2: has 4 values but the header has 5 columns"),
        ("case_id;idh;codeletion_1p19q;grade;mgmt\nc1;mutant;;;\n", "semicolon-separated"),
        ("", "is empty"),
    ],
    ids=["missing-file", "missing-column", "duplicate-row", "row-width", "semicolons", "empty"],
)
def test_structural_labels_csv_problems_raise(tmp_path: Path, content: str | None, message: str) -> None:
    site = tmp_path / "site-x"
    write_case(site, "c1")
    if content is not None:
        (site / "labels.csv").write_text(content)
    with pytest.raises(LabelsCsvError, match="Fix:") as info:
        scan_site(site)
    assert str(site.resolve() / "labels.csv") in str(info.value)
    assert message in str(info.value)


def test_labels_csv_header_is_case_whitespace_and_bom_tolerant(tmp_path: Path) -> None:
    site = tmp_path / "site-x"
    write_case(site, "c1")
    header = ",".join(f" {c.upper()} " for c in LABELS_CSV_COLUMNS) + ",age"
    (site / "labels.csv").write_text("\ufeff" + header + "\n c1 ,Mutant,,iv,,63\n\n", encoding="utf-8")
    (case,) = scan_site(site).cases
    assert case.labels == (1, UNKNOWN_LABEL, 1, UNKNOWN_LABEL)


# ------------------------------------------------------------------------------------ site-level errors
def test_missing_folder_and_no_usable_case_errors(tmp_path: Path) -> None:
    with pytest.raises(SiteNotFoundError, match="does not exist"):
        scan_site(tmp_path / "nowhere")
    site = tmp_path / "site-z"
    write_case(site, "c1")
    write_labels_csv(site, [("c1", "maybe", "", "", "")])
    assert scan_site(site).cases == []
    with pytest.raises(NoUsableCaseError) as info:
        load_site(site)
    assert "1 of 1 cases rejected: 1 unknown label" in str(info.value)
    assert "fedglioma check-site" in str(info.value)
    assert "site site-z" in info.value.detail and "c1 (" in info.value.detail
    assert "labels.csv line 2, column idh" in info.value.detail


def test_shallow_scan_checks_headers_but_not_voxels(tmp_path: Path) -> None:
    site = tmp_path / "site-x"
    for case_id in ("trunc", "shape"):
        write_case(site, case_id)
    write_labels_csv(site, [("trunc", *ROW), ("shape", *ROW)])
    path = case_path(site, "trunc", "t2")
    path.write_bytes(path.read_bytes()[:-200])
    write_nifti(case_path(site, "shape", "seg"), np.zeros((8, 16, 16), np.uint8))

    shallow, deep = scan_site(site, deep=False), scan_site(site, deep=True)

    assert [c.case_id for c in shallow.cases] == ["trunc"] and [r.case_id for r in shallow.rejected] == ["shape"]
    assert deep.cases == [] and sorted(r.case_id for r in deep.rejected) == ["shape", "trunc"]


# ------------------------------------------------------------------------------------ what training would see
def _as_float64_with_1e39(site: Path) -> None:
    def poison(data, affine):
        data = data.astype(np.float64)
        data[8, 8, 8] = 1e39  # finite in float64, inf once loaded as float32
        return data, affine

    _rewrite(case_path(site, "bad", "t1"), poison)


def _huge_scl_slope(site: Path) -> None:
    patch_header(case_path(site, "bad", "t1"), scl_slope=1e37)  # 300 * 1e37 overflows float32


def _sum_beyond_float32(site: Path) -> None:
    # every voxel fits float32 (< 1e38), but their sum, which z-scoring takes in float32, does not
    _rewrite(case_path(site, "bad", "t1"), lambda data, affine: (data * np.float32(1e35), affine))


@pytest.mark.parametrize(
    ("breaker", "reason_parts", "fix_part"),
    [
        (_as_float64_with_1e39, ["bad_t1.nii.gz has 1 voxel beyond the float32 range"], "usual range"),
        (_huge_scl_slope, ["bad_t1.nii.gz has", "beyond the float32 range", "scl_slope 1e+37"], "scl_slope"),
        (_sum_beyond_float32, ["bad_t1.nii.gz's non-zero voxels sum to", "z-scoring them for training gives NaN"],
         "usual range"),
    ],
    ids=["float64-1e39", "scl_slope-1e37", "float32-sum-overflow"],
)
def test_values_are_checked_as_float32_like_training_loads_them(
    tmp_path: Path, breaker, reason_parts: list[str], fix_part: str
) -> None:
    site = _good_and_bad(tmp_path)
    breaker(site)
    rejection = _only_bad_rejected(site, Category.NON_FINITE, *reason_parts)
    assert fix_part in rejection.fix and rejection.path.name == "bad_t1.nii.gz"


# ------------------------------------------------------------------------------------ entries that are not files
def _replace_t2(site: Path, make) -> None:
    path = case_path(site, "bad", "t2")
    path.unlink()
    make(path)


@pytest.mark.parametrize(
    ("make", "category", "reason_part"),
    [
        (lambda p: p.symlink_to("gone_t2.nii.gz"), Category.BROKEN_SYMLINK,
         "bad_t2.nii.gz is a symbolic link to gone_t2.nii.gz, which does not exist"),
        (lambda p: p.symlink_to(p.name), Category.BROKEN_SYMLINK, "bad_t2.nii.gz is a symbolic link that loops"),
        (lambda p: p.mkdir(), Category.NOT_A_FILE, "bad_t2.nii.gz is a folder, not a file"),
        (lambda p: os.mkfifo(p), Category.NOT_A_FILE, "bad_t2.nii.gz is not a regular file"),
    ],
    ids=["dangling-symlink", "looping-symlink", "folder", "named-pipe"],
)
def test_entry_named_like_a_sequence_but_not_a_file_rejects_the_case(
    tmp_path: Path, make, category: Category, reason_part: str
) -> None:
    # before: skipped as if the sequence were missing, and the case was used without its T2
    site = _good_and_bad(tmp_path)
    _replace_t2(site, make)
    rejection = _only_bad_rejected(site, category, reason_part)
    assert rejection.path.name == "bad_t2.nii.gz"


def test_names_differing_only_by_case_reject_the_case(tmp_path: Path) -> None:
    # before: one of the two files was silently dropped
    site = _good_and_bad(tmp_path)
    (site / "bad" / "bad_T1.nii.gz").write_bytes(case_path(site, "bad", "t2").read_bytes())
    rejection = _only_bad_rejected(site, Category.FILE_NAMING, "bad_T1.nii.gz and bad_t1.nii.gz differ only by letter case")
    assert "keep exactly one" in rejection.fix


def _deny(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``path`` unreadable: chmod 000, or, as root (who reads everything), have the listing and
    opening of exactly that path fail with EACCES as the OS would."""
    if os.geteuid() != 0:
        path.chmod(0)
        return
    real_iterdir, real_open = Path.iterdir, builtins.open

    def refuse(target: object) -> None:
        raise PermissionError(errno.EACCES, "Permission denied", str(target))

    monkeypatch.setattr(Path, "iterdir", lambda self: refuse(self) if self == path else real_iterdir(self))
    monkeypatch.setattr(builtins, "open", lambda file, *a, **k: refuse(file) if str(file) == str(path)
                        else real_open(file, *a, **k))


@pytest.mark.parametrize(
    ("target", "category", "reason_part"),
    [
        (lambda site: site / "bad", Category.UNREADABLE_FOLDER, "the case folder bad/ cannot be listed (PermissionError"),
        (lambda site: case_path(site, "bad", "t1ce"), Category.UNREADABLE_FILE,
         "bad_t1ce.nii.gz cannot be read (PermissionError"),
    ],
    ids=["folder", "file"],
)
def test_permission_denied_rejects_that_case_not_the_scan(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, target, category: Category, reason_part: str
) -> None:
    # before: an unreadable folder crashed the scan; an unreadable file was "corrupt, export again"
    site = _good_and_bad(tmp_path)
    path = target(site.resolve())
    _deny(path, monkeypatch)
    try:
        rejection = _only_bad_rejected(site, category, reason_part)
    finally:
        path.chmod(0o755)  # let pytest clean up
    assert "read access" in rejection.fix


# ------------------------------------------------------------------------------------ headers
@pytest.mark.parametrize(
    ("ext", "dim", "category", "reason_part"),
    [
        (".nii.gz", 1200, Category.BAD_HEADER,
         f"bad_t1.nii.gz's header declares 1200x1200x1200 = 1,728,000,000 voxels, more than the {MAX_VOXELS:,}"),
        (".nii.gz", 256, Category.TRUNCATED, "but the file decompresses to only"),
        (".nii", 128, Category.TRUNCATED, "but the file holds only"),
    ],
    ids=["beyond-max-voxels", "gzip-shorter-than-header", "nii-shorter-than-header"],
)
def test_declared_size_is_checked_before_voxels_are_read(
    tmp_path: Path, ext: str, dim: int, category: Category, reason_part: str
) -> None:
    site = _good_and_bad(tmp_path, ext=ext)
    path = case_path(site, "bad", "t1", ext=ext)
    patch_header(path, dim=[3, dim, dim, dim, 1, 1, 1, 1])

    tracemalloc.start()
    try:
        rejection = _only_bad_rejected(site, category, reason_part)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # before: nibabel allocated the declared size (7 GB for 1200^3 float32) before finding it missing
    assert peak < 32 * 2**20, peak
    assert rejection.path == path.resolve()


@pytest.mark.parametrize("size", [0.0, -1.0, float("nan")])
def test_non_positive_voxel_size_is_rejected(tmp_path: Path, size: float) -> None:
    # before: nibabel turned 0 into 1 mm and -1 into 1 mm without a word
    site = _good_and_bad(tmp_path)
    patch_header(case_path(site, "bad", "t2"), pixdim=[1, 1, size, 1, 1, 1, 1, 1])
    rejection = _only_bad_rejected(site, Category.BAD_HEADER, "bad_t2.nii.gz's header has voxel size (pixdim) 1, ")
    assert "real voxel size" in rejection.fix


# ------------------------------------------------------------------------------------ symbolic links
def _link_case_folder(site: Path, outside: Path) -> None:
    (site / "bad").rename(outside / "bad")
    (site / "bad").symlink_to(outside / "bad", target_is_directory=True)


def _link_file(site: Path, outside: Path) -> None:
    path = case_path(site, "bad", "t1")
    path.rename(outside / path.name)
    path.symlink_to(outside / path.name)


@pytest.mark.parametrize(
    ("link", "reason_part"),
    [(_link_case_folder, "the case folder bad/ is a symbolic link to "),
     (_link_file, "bad_t1.nii.gz is a symbolic link to ")],
    ids=["case-folder", "file"],
)
def test_symlinks_out_of_the_site_are_rejected_unless_allowed(tmp_path: Path, link, reason_part: str) -> None:
    # before: followed, so another center's (e.g. the held-out center's) case could train here
    site = _good_and_bad(tmp_path)
    outside = tmp_path / "heldout"
    outside.mkdir()
    link(site, outside)
    # a link that stays inside the site folder is fine
    pool = site / ".pool"
    pool.mkdir()
    flair = case_path(site, "good", "flair")
    flair.rename(pool / flair.name)
    flair.symlink_to(pool / flair.name)

    rejection = _only_bad_rejected(site, Category.EXTERNAL_SYMLINK, reason_part, "outside the site folder")

    assert "--allow-external-links" in rejection.fix
    allowed = scan_site(site, allow_external_links=True)
    assert [c.case_id for c in allowed.cases] == ["bad", "good"] and allowed.rejected == []


def test_listed_case_whose_folder_is_a_broken_link_says_so(tmp_path: Path) -> None:
    site = _good_and_bad(tmp_path)
    (site / "bad").rename(tmp_path / "moved")
    (site / "bad").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    _only_bad_rejected(site, Category.BROKEN_SYMLINK, "labels.csv (line 3) but the case folder bad is a symbolic link")


# ------------------------------------------------------------------------------------ what may leave the site
def test_no_usable_case_error_text_holds_no_case_id_file_name_or_path(tmp_path: Path) -> None:
    site = tmp_path / "hospital-x-private"
    ids = ["BraTS-GLI-00017", "BraTS-GLI-00042", "BraTS-GLI-00101", "BraTS-GLI-00230"]
    for case_id in ids[:3]:
        write_case(site, case_id)
    write_labels_csv(site, [(ids[0], "maybe", "", "", ""), (ids[1], *ROW), (ids[3], *ROW)])  # 00101: no row
    write_nifti(case_path(site, ids[1], "t2"), np.ones((16, 16, 8), np.float32))

    with pytest.raises(NoUsableCaseError) as info:
        load_site(site)

    public = str(info.value)
    assert "4 of 4 cases rejected: 1 no case folder, 1 no labels.csv row, 1 shape mismatch, 1 unknown label" in public
    assert "`fedglioma check-site <site folder>`" in public
    secrets = [*ids, site.name, str(tmp_path), str(site.resolve()), "nii", "labels.csv line", "/"]
    secrets += [p.name for p in site.rglob("*") if p.name != "labels.csv"]  # the contract's name, the same everywhere
    assert [s for s in secrets if s in public] == []
    assert scan_site(site).rejection_summary() in public
    detail = info.value.detail
    assert str(site.resolve()) in detail and all(case_id in detail for case_id in ids)
    assert "BraTS-GLI-00042_t2.nii.gz has shape (16, 16, 8)" in detail
    assert pickle.loads(pickle.dumps(info.value)).detail == detail


# ------------------------------------------------------------------------------------ split
def _fake_cases(n: int, seed: int = 0) -> list[CaseRecord]:
    """Cases without files: IDH labels mostly known, 1p/19q known for every other case."""
    rng = np.random.default_rng(seed)
    cases = []
    for i in range(n):
        idh = int(rng.integers(0, 2)) if i % 5 else UNKNOWN_LABEL
        codel = int(rng.integers(0, 2)) if i % 2 else UNKNOWN_LABEL
        cases.append(CaseRecord(f"c{i:03d}", Path(f"/x/c{i:03d}"), {"t1": Path("t1.nii.gz")}, None,
                                (idh, codel, UNKNOWN_LABEL, UNKNOWN_LABEL), "brats2021"))
    return cases


def _stratum(case: CaseRecord) -> tuple:
    return tuple(v != UNKNOWN_LABEL for v in case.labels), case.labels[0]


def test_split_is_deterministic_and_independent_of_input_order() -> None:
    cases = _fake_cases(40)
    shuffled = cases[:]
    random.Random(1).shuffle(shuffled)
    train, val = split_cases(cases, 0.25, seed=7)
    train2, val2 = split_cases(shuffled, 0.25, seed=7)
    assert [c.case_id for c in val] == [c.case_id for c in val2]
    assert [c.case_id for c in train] == [c.case_id for c in train2]
    assert {c.case_id for c in train} | {c.case_id for c in val} == {c.case_id for c in cases}
    assert not {c.case_id for c in train} & {c.case_id for c in val}
    assert len(val) == 10
    assert [c.case_id for c in split_cases(cases, 0.25, seed=8)[1]] != [c.case_id for c in val]


def test_split_is_stratified_by_known_labels_and_idh() -> None:
    cases = _fake_cases(60, seed=3)
    train, val = split_cases(cases, 0.2, seed=0)
    totals, in_val = Counter(map(_stratum, cases)), Counter(map(_stratum, val))
    assert len(totals) >= 4
    for key, n in totals.items():
        # largest-remainder allocation: each stratum within one case of its proportional share
        assert abs(in_val[key] - n * len(val) / len(cases)) < 1.0, (key, n, in_val[key])


@pytest.mark.parametrize(("n", "fraction", "n_val"), [(1, 0.2, 0), (2, 0.2, 1), (3, 0.01, 1), (5, 0.9, 4)])
def test_split_sizes_keep_train_and_val_nonempty(n: int, fraction: float, n_val: int) -> None:
    train, val = split_cases(_fake_cases(n), fraction, seed=0)
    assert len(val) == n_val and len(train) == n - n_val >= 1


# ------------------------------------------------------------------------------------ survival columns
def _survival_site(tmp_path: Path, rows: list[tuple[str, str]]) -> Path:
    site = tmp_path / "site-s"
    columns = (*LABELS_CSV_COLUMNS, "survival_days", "event")
    for i in range(len(rows)):
        write_case(site, f"c{i}")
    write_labels_csv(site, [(f"c{i}", *ROW, days, event) for i, (days, event) in enumerate(rows)], columns)
    return site


def test_survival_columns_are_parsed_and_counted(tmp_path: Path) -> None:
    index = scan_site(_survival_site(tmp_path, [("412", "1"), (" 1200.5 ", "0"), ("", ""), ("0", "1")]))

    assert [c.survival for c in index.cases] == [(412.0, 1), (1200.5, 0), None, (0.0, 1)]
    assert index.survival_counts() == {"known": 3, "events": 2, "unknown": 1}
    assert scan_site(tmp_path / "site-s").summary()["survival"]["known"] == 3


@pytest.mark.parametrize(
    ("days", "event", "message"),
    [
        ("12O", "1", "survival_days '12O' is not a number of days"),
        ("-3", "1", "survival_days '-3' must be a finite number of days >= 0"),
        ("nan", "0", "survival_days 'nan' must be a finite number"),
        ("300", "2", "event '2' must be 1 (death observed) or 0 (censored"),
        ("300", "", "survival_days='300' and event='': give both or leave both empty"),
    ],
    ids=["not-a-number", "negative", "nan", "event-2", "event-missing"],
)
def test_bad_survival_values_reject_the_case_naming_file_and_line(tmp_path: Path, days: str, event: str, message: str) -> None:
    index = scan_site(_survival_site(tmp_path, [("100", "1"), (days, event)]))

    assert [c.case_id for c in index.cases] == ["c0"]
    (rejection,) = index.rejected
    assert rejection.category == Category.BAD_SURVIVAL and rejection.path.name == "labels.csv"
    assert f"labels.csv line 3: {message}" in rejection.reason
    assert "correct labels.csv line 3" in rejection.fix and "leave both empty" in rejection.fix
