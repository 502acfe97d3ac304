"""``fedglioma check-site``: exit codes, the readable report and the JSON report."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from client import check_site as site_check
from tests.helpers import SITE_CASES, case_path, write_case, write_labels_csv, write_nifti

ROW = ("wildtype", "intact", "HGG", "methylated")


def check(*argv: str | Path) -> int:
    parser = argparse.ArgumentParser()
    site_check.add_arguments(parser)
    return site_check.run(parser.parse_args([str(a) for a in argv]))


def json_report(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, dict]:
    code = check(*argv, "--json")
    return code, json.loads(capsys.readouterr().out)  # fails unless stdout is pure JSON


def test_good_site_reports_counts(site_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = json_report(capsys, site_dir)
    assert code == 0 and out["ok"] is True
    (site,) = out["sites"]
    assert site["site"] == "site-a" and site["usable"] == 6 and site["rejected"] == [] and "error" not in site
    assert site["sequences"] == {"t1": 5, "t1ce": 4, "t2": 6, "flair": 6}
    assert site["patterns"] == {"t1+t1ce+t2+flair": 4, "t1+t2+flair": 1, "t2+flair": 1}
    assert site["labels"]["grade"] == {"LGG": 3, "HGG": 2, "unknown": 1}
    assert site["labels"]["1p19q"] == {"intact": 2, "codeleted": 2, "unknown": 2}
    assert site["segmentations"] == 5 and site["resection_cavity_ml"] == {}
    assert site["label_convention"] == {"declared": None, "source": None, "cases": {"brats2021": 3, "brats2023": 2}}
    assert site["naming"] == {"brats2021": 3, "brats2023": 3} and site["complete"] == 4

    assert check(site_dir) == 0
    text = capsys.readouterr().out
    assert "usable cases: 6 of 6" in text and "label convention: not declared" in text
    assert "brats2021: 3 segmentation(s) (BraTS 2020/2021: 1 necrotic core, 2 edema, 4 enhancing tumor)" in text
    assert "t2+flair" in text and "unknown 1" in text
    assert "survival: 0 known (0 deaths, 0 censored), 6 unknown" in text and site["survival"]["unknown"] == 6


def test_mixed_site_lists_every_rejection_with_reason_and_fix(
    site_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_case(site_dir, "broken")
    path = case_path(site_dir, "broken", "flair")
    path.write_bytes(path.read_bytes()[:-100])
    write_case(site_dir, "unlisted")
    rows = [(c, *labels) for c, *_, labels in SITE_CASES] + [("broken", *ROW), ("ghost", *ROW)]
    write_labels_csv(site_dir, rows)

    code, out = json_report(capsys, site_dir)

    assert code == 0
    (site,) = out["sites"]
    assert site["usable"] == 6 and site["rejected_count"] == 3
    rejected = {r["case_id"]: r for r in site["rejected"]}
    assert set(rejected) == {"broken", "unlisted", "ghost"}
    assert rejected["broken"]["path"].endswith("broken_flair.nii.gz") and "cannot be read" in rejected["broken"]["reason"]
    assert "add a row for unlisted" in rejected["unlisted"]["fix"]
    assert "no folder" in rejected["ghost"]["reason"]
    assert {k: r["category"] for k, r in rejected.items()} == {
        "broken": "truncated file", "unlisted": "no labels.csv row", "ghost": "no case folder"}
    assert site["rejection_counts"] == {"no case folder": 1, "no labels.csv row": 1, "truncated file": 1}

    assert check(site_dir) == 0
    text = capsys.readouterr().out
    assert "Rejected cases (3): 1 no case folder, 1 no labels.csv row, 1 truncated file" in text
    assert "broken  [truncated file]" in text
    assert text.count("reason:") == 3 and text.count("fix:") == 3


def test_site_with_nothing_usable_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    site = tmp_path / "site-c"
    write_case(site, "c1")
    write_labels_csv(site, [("c1", "IDH-mutant", "", "", "")])

    code, out = json_report(capsys, site)

    assert code == 1 and out["ok"] is False
    (report,) = out["sites"]
    assert report["usable"] == 0 and "no usable case" in report["error"]
    assert "unknown value 'IDH-mutant'" in report["rejected"][0]["reason"]
    assert check(site) == 1
    captured = capsys.readouterr()
    assert "ERROR: site site-c has no usable case (1 of 1 cases rejected: 1 unknown label)" in captured.out
    assert "unusable: site-c" in captured.err


def test_broken_labels_csv_exits_1_and_missing_folder_exits_2(
    site_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (site_dir / "labels.csv").write_text("case_id,idh\ncase-001,mutant\n")
    code, out = json_report(capsys, site_dir)
    assert code == 1 and "missing required column(s) codeletion_1p19q, grade, mgmt" in out["sites"][0]["error"]

    code, out = json_report(capsys, tmp_path / "nope")
    assert code == 2 and "does not exist" in out["sites"][0]["error"]
    assert check(tmp_path / "nope") == 2
    assert "does not exist" in capsys.readouterr().out


def test_cohort_folder_is_explained(site_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = json_report(capsys, site_dir.parent)
    assert code == 1 and "looks like a cohort folder holding the sites site-a" in out["sites"][0]["error"]


def test_shallow_mode_skips_voxels(site_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = case_path(site_dir, "case-001", "t1")
    path.write_bytes(path.read_bytes()[:-100])
    _, shallow = json_report(capsys, site_dir, "--shallow")
    _, deep = json_report(capsys, site_dir)
    assert shallow["sites"][0]["usable"] == 6 and shallow["sites"][0]["deep"] is False
    assert deep["sites"][0]["usable"] == 5 and deep["sites"][0]["rejected"][0]["case_id"] == "case-001"


def test_links_out_of_the_site_need_the_flag(site_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_case(tmp_path / "other-center", "linked")
    (site_dir / "linked").symlink_to(tmp_path / "other-center" / "linked", target_is_directory=True)
    write_labels_csv(site_dir, [(c, *labels) for c, *_, labels in SITE_CASES] + [("linked", *ROW)])

    code, out = json_report(capsys, site_dir)
    assert code == 0 and out["sites"][0]["usable"] == 6 and out["sites"][0]["allow_external_links"] is False
    (rejection,) = out["sites"][0]["rejected"]
    assert rejection["case_id"] == "linked" and rejection["category"] == "external symlink"
    assert "--allow-external-links" in rejection["fix"]

    code, out = json_report(capsys, site_dir, "--allow-external-links")
    assert code == 0 and out["sites"][0]["usable"] == 7 and out["sites"][0]["rejected"] == []


def _post_treatment_site(tmp_path: Path) -> Path:
    """One BraTS 2024 post-treatment case (BraTS 2023+ names): ET = 3 and a 27-voxel resection cavity (4)
    of 2 mm voxels (8 uL each)."""
    site = tmp_path / "site-post"
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    write_case(site, "p1", naming="brats2023", affine=affine)
    seg_path = case_path(site, "p1", "seg", "brats2023")
    seg = np.asarray(nib.load(seg_path).dataobj).copy()
    seg[0:3, 0:3, 0:3] = 4
    write_nifti(seg_path, seg, affine)
    write_labels_csv(site, [("p1", *ROW)])
    return site


def test_label_4_in_brats2023_names_asks_the_site_to_declare(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    site = _post_treatment_site(tmp_path)

    code, out = json_report(capsys, site)

    assert code == 1
    (rejection,) = out["sites"][0]["rejected"]
    assert rejection["category"] == "label convention" and "uses label 4 (27 voxels, 0.216 mL)" in rejection["reason"]
    assert '"brats2024-post"' in rejection["fix"] and '"brats2021"' in rejection["fix"]


@pytest.mark.parametrize("declare", ["flag", "site.json"])
def test_declared_post_treatment_convention_is_shown_with_cavity_volumes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], declare: str
) -> None:
    site = _post_treatment_site(tmp_path)
    flags = ["--label-convention", "brats2024-post"] if declare == "flag" else []
    if declare == "site.json":
        (site / "site.json").write_text('{"label_convention": "brats2024-post"}')

    code, out = json_report(capsys, site, *flags)

    assert code == 0
    (report,) = out["sites"]
    assert report["label_convention"]["declared"] == "brats2024-post"
    assert report["resection_cavity_ml"] == {"p1": 0.216}
    assert check(site, *flags) == 0
    text = capsys.readouterr().out
    assert "label convention: brats2024-post (declared by " in text and "4 resection cavity" in text
    assert "resection cavity (label 4, background for WT/TC/ET): 1 case(s), 0.216 mL in all" in text
    assert "p1: 0.216 mL" in text


def test_contradicting_declarations_exit_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    site = _post_treatment_site(tmp_path)
    (site / "site.json").write_text('{"label_convention": "brats2021"}')
    code, out = json_report(capsys, site, "--label-convention", "brats2024-post")
    assert code == 1 and "declares the label convention brats2021 but" in out["sites"][0]["error"]
