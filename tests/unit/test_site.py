"""Site discovery, labels.csv parsing, per-case validation and the train/validation split."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from common.contract import LABELS_CSV_COLUMNS, SEQUENCES, TASKS, UNKNOWN_LABEL
from common.data.site import (
    CaseRecord,
    LabelsCsvError,
    NoUsableCaseError,
    SiteNotFoundError,
    load_site,
    parse_label,
    scan_site,
    split_cases,
)
from tests.helpers import SITE_CASES, case_path, write_case, write_labels_csv, write_nifti

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
    assert index.legacy_et_cases() == ["case-002"]
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
    ("breaker", "file_name", "reason_parts", "fix_part"),
    [
        (_truncate, "bad_t1ce.nii.gz", ["bad_t1ce.nii.gz cannot be read", "EOFError"], "export the file again"),
        (_shape, "bad_t2.nii.gz", ["bad_t2.nii.gz has shape (16, 16, 12) but bad_t1.nii.gz has (16, 16, 16)"],
         "resample bad_t2.nii.gz onto the grid of bad_t1.nii.gz"),
        (_affine, "bad_flair.nii.gz", ["bad_flair.nii.gz's affine differs from bad_t1.nii.gz's by up to 0.5"],
         "share one shape and affine"),
        (_nan, "bad_t1.nii.gz", ["bad_t1.nii.gz has 2 non-finite (NaN/inf) voxels"], "replace its NaN/inf"),
        (_seg_values, "bad_seg.nii.gz", ["bad_seg.nii.gz has label values 5, 7", "found 0, 1, 2, 3, 5, 7"],
         "relabel to 0 background"),
        (_mixed_naming, "bad", ["mixes the two naming conventions", "bad_t1.nii.gz (brats2021)",
                                "bad-t2w.nii.gz (brats2023)"], "rename every file"),
        (_two_extensions, "bad_t1.nii.gz", ["two files for t1: bad_t1.nii.gz, bad_t1.nii"], "keep only one"),
        (_no_image, "bad", ["no image file matching the case name 'bad'", "scan_t1.nii.gz"],
         "name the files after the folder"),
    ],
    ids=["truncated-gzip", "shape", "affine", "nan-inf", "seg-values", "mixed-naming", "two-extensions", "no-image"],
)
def test_broken_case_is_rejected_with_file_reason_and_fix(
    tmp_path: Path, breaker, file_name: str, reason_parts: list[str], fix_part: str
) -> None:
    site = tmp_path / "site-x"
    write_case(site, "good")
    write_case(site, "bad")
    write_labels_csv(site, [("good", *ROW), ("bad", *ROW)])
    breaker(site)

    index = scan_site(site)

    assert [c.case_id for c in index.cases] == ["good"]
    (rejection,) = index.rejected
    assert rejection.case_id == "bad" and rejection.path.name == file_name
    for part in reason_parts:
        assert part in rejection.reason
    assert fix_part in rejection.fix


def test_label_4_is_accepted_and_recorded(tmp_path: Path) -> None:
    site = tmp_path / "s"
    write_case(site, "legacy", et_label=4)
    write_case(site, "modern", et_label=3)
    write_labels_csv(site, [("legacy", *ROW), ("modern", *ROW)])
    index = scan_site(site)
    assert [c.case_id for c in index.cases] == ["legacy", "modern"]
    assert [c.legacy_et for c in index.cases] == [True, False]


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
    assert "site site-z" in str(info.value) and "c1: labels.csv line 2, column idh" in str(info.value)
    assert "fedglioma check-site" in str(info.value)


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
