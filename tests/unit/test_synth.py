"""The synthetic cohort generator (synth/): determinism, the site data contract, biology and
imaging tendencies, and the output-folder rules. Volumes are 16-32^3 so the file runs in seconds."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from common.contract import (
    ALLOWED_SEG_VALUES,
    ED,
    ET,
    LABELS_CSV_COLUMNS,
    LABELS_CSV_OPTIONAL,
    LEGACY_ET,
    NAMING,
    SEQUENCES,
    TASK_CLASSES,
    TASK_COLUMNS,
    TASKS,
)
from synth import PRESETS, CohortError, generate_cohort
from synth.cohort import (
    GROUND_TRUTH_CSV,
    HELDOUT,
    HELDOUT_PROFILE,
    SITE_PROFILES,
    CaseSpec,
    cohort_site_name,
    make_case,
    resolve_preset,
    site_plan,
)
from common.evaluation.survival import concordance_index, kaplan_meier
from synth.survival import log_hazard_ratio, sample_survival
from synth.tumor import MolecularStatus, TumorPhenotype, grow_tumor, sample_phenotype, sample_status

SMALL = dict(sites=2, cases_per_site=3, heldout_cases=3, shape=24)


def nifti_files(root: Path) -> dict[str, Path]:
    return {str(p.relative_to(root)): p for p in sorted(root.rglob("*.nii.gz"))}


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def same_cohort(a: Path, b: Path) -> bool:
    files_a, files_b = nifti_files(a), nifti_files(b)
    if files_a.keys() != files_b.keys():
        return False
    for name in files_a:
        x, y = nib.load(files_a[name]), nib.load(files_b[name])
        if x.get_data_dtype() != y.get_data_dtype():
            return False
        if not np.array_equal(np.asanyarray(x.dataobj), np.asanyarray(y.dataobj)):
            return False
    texts = [p.relative_to(a) for p in a.rglob("*.csv")] + [Path("cohort.json")]
    return all((a / t).read_text() == (b / t).read_text() for t in texts)


@pytest.fixture(scope="module")
def cohort_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "cohort"
    generate_cohort(out, "tiny", seed=1, workers=1, **SMALL)
    return out


@pytest.fixture(scope="module")
def cohort(cohort_dir: Path) -> dict:
    return json.loads((cohort_dir / "cohort.json").read_text())


# ----------------------------------------------------------------------------- determinism
def test_same_seed_gives_identical_cohort_whatever_the_worker_count(cohort_dir: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    returned = generate_cohort(again, "tiny", seed=1, workers=2, **SMALL)

    assert same_cohort(cohort_dir, again)
    assert returned == json.loads((again / "cohort.json").read_text())


def test_different_seed_gives_a_different_cohort(cohort_dir: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    generate_cohort(other, "tiny", seed=2, workers=1, **SMALL)

    flair_a = nib.load(cohort_dir / "heldout/heldout-001/heldout-001-t2f.nii.gz").get_fdata()
    flair_b = nib.load(other / "heldout/heldout-001/heldout-001-t2f.nii.gz").get_fdata()
    assert not np.array_equal(flair_a, flair_b)
    assert not same_cohort(cohort_dir, other)


# ----------------------------------------------------------------------------- the data contract
def test_layout_naming_and_cohort_json(cohort_dir: Path, cohort: dict) -> None:
    assert list(cohort["sites"]) == ["site-a", "site-b", HELDOUT]
    assert (cohort["shape"], cohort["seed"], cohort["preset"]) == ([24, 24, 24], 1, "tiny")
    namings = {site: info["naming"] for site, info in cohort["sites"].items()}
    assert set(namings.values()) == set(NAMING)  # both conventions present
    for site, naming in namings.items():
        for case_id in cohort["sites"][site]["cases"]:
            seg = cohort_dir / site / case_id / f"{case_id}{NAMING[naming]['seg']}.nii.gz"
            assert seg.is_file(), seg
    # the benchmark-only truth lies at the cohort root, never inside a site folder
    assert (cohort_dir / GROUND_TRUTH_CSV).is_file()
    assert not list(cohort_dir.glob(f"*/{GROUND_TRUTH_CSV}"))


def test_segmentation_label_convention_matches_the_site(cohort_dir: Path, cohort: dict) -> None:
    truth = {r["case_id"]: r for r in read_csv(cohort_dir / GROUND_TRUTH_CSV)}
    for site, info in cohort["sites"].items():
        et_value, other = (LEGACY_ET, ET) if info["naming"] == "brats2021" else (ET, LEGACY_ET)
        assert info["et_label"] == et_value
        for case_id in info["cases"]:
            seg_path = cohort_dir / site / case_id / f"{case_id}{NAMING[info['naming']]['seg']}.nii.gz"
            seg = np.asanyarray(nib.load(seg_path).dataobj)
            values = set(np.unique(seg).tolist())
            assert seg.dtype == np.uint8
            assert values <= ALLOWED_SEG_VALUES and other not in values, (seg_path, values)
            assert (et_value in values) == (float(truth[case_id]["et_volume_ml"]) > 0)
            assert ED in values  # every tumor has an infiltrated margin
    assert any(float(r["et_volume_ml"]) > 0 for r in truth.values())


def test_images_are_float32_finite_on_one_grid_with_zero_background(cohort_dir: Path) -> None:
    expected_affine = np.diag([10.0, 10.0, 10.0, 1.0])  # 240 mm / 24 voxels
    expected_affine[:3, 3] = -10.0 * 23 / 2
    for case_dir in sorted(p for p in cohort_dir.glob("*/*") if p.is_dir()):
        images = [nib.load(p) for p in sorted(case_dir.glob("*.nii.gz"))]
        assert len(images) >= 2, case_dir
        for img in images:
            assert img.shape == (24, 24, 24)
            np.testing.assert_allclose(img.affine, expected_affine, atol=1e-5)
            if "seg" in img.get_filename():
                continue
            data = np.asanyarray(img.dataobj)
            assert data.dtype == np.float32 and np.isfinite(data).all()
            assert data[0, 0, 0] == 0.0 and data[-1, -1, -1] == 0.0  # outside the brain
            assert (data > 0).mean() > 0.1  # a brain is there


def test_missing_sequences_match_cohort_json(cohort_dir: Path, cohort: dict) -> None:
    for site, info in cohort["sites"].items():
        counts = {seq: len(list((cohort_dir / site).glob(f"*/*{NAMING[info['naming']][seq]}.nii.gz")))
                  for seq in SEQUENCES}
        assert counts == info["sequences"], site
        for seq, p_missing in info["missing_sequences"].items():
            if p_missing == 1.0:
                assert counts[seq] == 0
    assert cohort["sites"]["site-b"]["sequences"]["t1"] == 0  # profile B has no T1 at all
    assert cohort["sites"][HELDOUT]["sequences"] == {seq: 3 for seq in SEQUENCES}


def test_labels_csv_has_allowed_values_blanks_for_unknown_and_agrees_with_truth(cohort_dir: Path, cohort: dict) -> None:
    truth = {r["case_id"]: r for r in read_csv(cohort_dir / GROUND_TRUTH_CSV)}
    for site, info in cohort["sites"].items():
        path = cohort_dir / site / "labels.csv"
        assert path.read_text().splitlines()[0] == ",".join(LABELS_CSV_COLUMNS + LABELS_CSV_OPTIONAL)
        rows = read_csv(path)
        assert [r["case_id"] for r in rows] == info["cases"]
        for task in TASKS:
            column = TASK_COLUMNS[task]
            values = [r[column] for r in rows]
            assert set(values) <= set(TASK_CLASSES[task]) | {""}
            assert values.count("") == info["labels"][task]["unknown"]
            for row in rows:  # a known label is the true one
                assert row[column] in ("", truth[row["case_id"]][column])
        known = [r for r in rows if r["survival_days"]]
        assert len(known) == info["survival"]["known"]
        for row in known:  # a known survival is the observed one, an event 0/1
            assert (row["survival_days"], row["event"]) == (truth[row["case_id"]]["survival_days"],
                                                             truth[row["case_id"]]["event"])
    heldout_rows = read_csv(cohort_dir / HELDOUT / "labels.csv")
    assert all(all(r[c] for c in LABELS_CSV_COLUMNS + LABELS_CSV_OPTIONAL) for r in heldout_rows)  # held-out: all


def test_the_site_loader_accepts_every_generated_case(cohort_dir: Path, cohort: dict) -> None:
    from common.data.site import scan_site

    for site, info in cohort["sites"].items():
        index = scan_site(cohort_dir / site)
        assert index.rejected == [] and index.ignored == []
        assert [c.case_id for c in index.cases] == info["cases"]
        assert index.sequence_counts() == info["sequences"]


# ----------------------------------------------------------------------------- biology and imaging
def test_codeletion_only_in_idh_mutant_and_grade_mgmt_follow_idh() -> None:
    rng = np.random.default_rng(0)
    statuses = [sample_status(rng, p_idh_mutant=0.5) for _ in range(4000)]
    mutant = [s for s in statuses if s.idh_mutant]
    wildtype = [s for s in statuses if not s.idh_mutant]

    assert not any(s.codeleted for s in wildtype)
    assert 0.3 < np.mean([s.codeleted for s in mutant]) < 0.5
    assert np.mean([s.hgg for s in wildtype]) > 0.8  # IDH-wildtype: mostly grade 4
    assert 0.05 < np.mean([s.hgg for s in mutant]) < 0.35  # IDH-mutant: mostly LGG, some HGG
    assert np.mean([s.methylated for s in mutant]) > np.mean([s.methylated for s in wildtype]) + 0.2


def test_cohort_ground_truth_respects_the_biology(cohort_dir: Path) -> None:
    for row in read_csv(cohort_dir / GROUND_TRUTH_CSV):
        if row["codeletion_1p19q"] == "codeleted":
            assert row["idh"] == "mutant", row


def test_phenotype_tendencies_follow_the_status_with_overlap() -> None:
    rng = np.random.default_rng(1)
    def draw(status_kw: dict, n: int = 600) -> list[TumorPhenotype]:
        from synth.tumor import MolecularStatus
        return [sample_phenotype(MolecularStatus(**status_kw), rng) for _ in range(n)]

    gbm = draw(dict(idh_mutant=False, codeleted=False, hgg=True, methylated=False))
    astro = draw(dict(idh_mutant=True, codeleted=False, hgg=False, methylated=False))
    oligo = draw(dict(idh_mutant=True, codeleted=True, hgg=False, methylated=True))
    mean = lambda ps, f: float(np.mean([f(p) for p in ps]))  # noqa: E731

    assert mean(gbm, lambda p: p.radius_mm) > mean(astro, lambda p: p.radius_mm)
    assert mean(gbm, lambda p: p.infiltration_mm) > mean(astro, lambda p: p.infiltration_mm)  # more edema
    assert mean(gbm, lambda p: p.enhancing) > 0.6 > 0.4 > mean(astro, lambda p: p.enhancing)
    assert 0.0 < mean(astro, lambda p: p.enhancing)  # overlap: some IDH-mutant tumors enhance
    assert mean(astro, lambda p: p.mismatch) > 0.4 > 0.05 > mean(gbm, lambda p: p.mismatch)
    assert mean(oligo, lambda p: p.calcification > 0) > 0.5 > mean(gbm, lambda p: p.calcification > 0)
    assert mean(oligo, lambda p: p.depth_bias) < mean(astro, lambda p: p.depth_bias) < mean(gbm, lambda p: p.depth_bias)
    assert mean(astro, lambda p: p.frontal_bias) > mean(gbm, lambda p: p.frontal_bias) + 1.0


def test_growth_is_faster_in_white_matter_and_stays_in_the_brain() -> None:
    n = 24
    gm, wm, brain = np.zeros((3, n, n, n), dtype=np.float32)
    brain[3:-3, 3:-3, 3:-3] = 1.0
    wm[3 : n // 2, 3:-3, 3:-3] = 1.0  # white matter on the low-X half, grey on the other
    gm[n // 2 : -3, 3:-3, 3:-3] = 1.0
    phenotype = sample_phenotype(sample_status(np.random.default_rng(0), 0.0), np.random.default_rng(0))
    phenotype = dataclasses.replace(phenotype, radius_mm=16.0, infiltration_mm=4.0, white_grey_ratio=5.0)
    u = grow_tumor(gm, wm, brain, (n // 2, n // 2, n // 2), phenotype, voxel_mm=4.0)

    assert np.count_nonzero(u > 0.7) >= 8 and np.all((u >= 0) & (u <= 1))  # a saturated core formed
    assert np.all(u[brain == 0] == 0)  # no-flux boundary: nothing leaves the brain
    # infiltration (u above a typical edema threshold) reaches further into white matter
    reach_white = np.count_nonzero(u[3 : n // 2, n // 2, n // 2] > 0.1)
    reach_grey = np.count_nonzero(u[n // 2 + 1 : -3, n // 2, n // 2] > 0.1)
    assert reach_white >= reach_grey + 2


@pytest.fixture(scope="module")
def cases_32() -> list:
    return [make_case(CaseSpec(HELDOUT, i, 5, 32, HELDOUT_PROFILE, Path("unused"))) for i in range(8)]


def test_tumor_lies_inside_the_brain(cases_32: list) -> None:
    for case in cases_32:
        assert case.seg.any()
        assert not np.any((case.seg > 0) & ~case.brain)
        for image in case.images.values():
            assert np.all(image[~case.brain] == 0)


def test_edema_is_bright_on_flair_and_enhancement_only_on_t1ce(cases_32: list) -> None:
    enhancing_seen = 0
    for case in cases_32:
        normal = case.brain & (case.seg == 0)
        flair = case.images["flair"]
        assert flair[case.seg == ED].mean() > 1.3 * flair[normal].mean()
        et = case.seg == ET
        if et.sum() >= 3:
            enhancing_seen += 1
            ratio = {s: case.images[s][et].mean() / case.images[s][normal].mean() for s in ("t1", "t1ce")}
            assert ratio["t1ce"] > 1.3 and ratio["t1ce"] > 1.5 * ratio["t1"], ratio
    assert enhancing_seen >= 2


# ----------------------------------------------------------------------------- options and output folder
def test_presets_and_overrides() -> None:
    assert (PRESETS["tiny"].sites, PRESETS["tiny"].cases_per_site, PRESETS["tiny"].shape) == (3, 8, 32)
    assert (PRESETS["demo"].sites, PRESETS["demo"].heldout_cases, PRESETS["demo"].shape) == (4, 30, 64)
    assert PRESETS["bench"].cases_per_site == 60
    assert resolve_preset("demo", None, 5, None, 32) == type(PRESETS["demo"])(4, 5, 30, 32)
    with pytest.raises(CohortError, match="unknown preset 'huge'"):
        resolve_preset("huge", None, None, None, None)
    with pytest.raises(CohortError, match="shape must be at least 16"):
        resolve_preset("tiny", None, None, None, 8)


def test_site_names_and_profiles_cycle() -> None:
    assert [cohort_site_name(i) for i in (0, 1, 25, 26)] == ["site-a", "site-b", "site-z", "site-ba"]
    plan = site_plan(resolve_preset("tiny", len(SITE_PROFILES) + 1, 1, 1, 16))
    assert plan["site-a"][1] is plan[cohort_site_name(len(SITE_PROFILES))][1] is SITE_PROFILES[0]
    assert plan[HELDOUT] == ("heldout", HELDOUT_PROFILE)


ONE = dict(sites=1, cases_per_site=1, heldout_cases=1, shape=24, workers=1)  # shape 24: anatomy already cached


def test_refuses_a_foreign_non_empty_folder_unless_forced(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(CohortError, match="not empty.*--force"):
        generate_cohort(tmp_path, **ONE)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]

    generate_cohort(tmp_path, force=True, **ONE)
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert (tmp_path / "site-a" / "labels.csv").is_file()


def test_regenerating_replaces_a_previous_cohort_but_keeps_user_files(tmp_path: Path) -> None:
    generate_cohort(tmp_path, **{**ONE, "cases_per_site": 2})
    (tmp_path / "site-a" / "README.txt").write_text("site notes")
    generate_cohort(tmp_path, **ONE)  # no --force needed: it is our own cohort

    assert sorted(p.name for p in (tmp_path / "site-a").iterdir()) == ["README.txt", "labels.csv", "site-a-001"]
    assert not (tmp_path / ".synth-in-progress.json").exists()


def test_an_interrupted_cohort_is_replaced_without_force(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import synth.cohort as cohort_module

    real = cohort_module.generate_and_write
    calls = []

    def crash_on_second_case(spec: CaseSpec) -> dict:
        calls.append(spec.case_id)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(spec)

    monkeypatch.setattr(cohort_module, "generate_and_write", crash_on_second_case)
    with pytest.raises(KeyboardInterrupt):
        generate_cohort(tmp_path, **{**ONE, "cases_per_site": 2})
    assert (tmp_path / ".synth-in-progress.json").is_file() and not (tmp_path / "cohort.json").exists()
    monkeypatch.setattr(cohort_module, "generate_and_write", real)

    generate_cohort(tmp_path, **ONE)

    assert sorted(p.name for p in (tmp_path / "site-a").iterdir()) == ["labels.csv", "site-a-001"]
    assert (tmp_path / "cohort.json").is_file() and not (tmp_path / ".synth-in-progress.json").exists()


def test_cli_writes_the_cohort_and_prints_a_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fedglioma.cli import main

    args = ["synth", str(tmp_path / "c"), "--sites", "1", "--cases-per-site", "1", "--heldout-cases", "1",
            "--shape", "24", "--workers", "1", "--seed", "3"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "site-a" in out and "heldout" in out and "24x24x24" in out
    assert json.loads((tmp_path / "c" / "cohort.json").read_text())["seed"] == 3

    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x").write_text("")
    assert main(["synth", str(tmp_path / "d"), "--shape", "24"]) == 2
    assert "--force" in capsys.readouterr().err


# ----------------------------------------------------------------------------- survival
def test_synthetic_survival_follows_grade_and_molecular_status() -> None:
    """Many patients drawn like the cohort's: the true risk ranks the observed survival (C-index
    > 0.6), grade 4 dies sooner than grade 2-3, IDH-mutant later than wildtype, and some are censored."""
    rng = np.random.default_rng(0)
    statuses = [sample_status(rng, 0.4) for _ in range(2000)]
    survival = np.asarray([sample_survival(s, rng) for s in statuses])
    risk = np.asarray([log_hazard_ratio(s) for s in statuses])

    assert concordance_index(risk, survival) > 0.6
    hgg = np.asarray([s.hgg for s in statuses])
    grade_only = concordance_index(hgg.astype(float), survival)
    assert grade_only > 0.6  # grade alone already ranks survival
    dead = survival[:, 1] == 1
    assert np.median(survival[dead & hgg, 0]) < np.median(survival[dead & ~hgg, 0])
    mutant = np.asarray([s.idh_mutant for s in statuses])
    assert survival[mutant, 1].mean() < survival[~mutant, 1].mean()  # fewer deaths within follow-up
    assert 0.1 < 1 - dead.mean() < 0.9  # censoring happens, not everywhere


def test_reference_group_median_and_hazard_ratios() -> None:
    gbm = MolecularStatus(idh_mutant=False, codeleted=False, hgg=True, methylated=False)
    oligo = MolecularStatus(idh_mutant=True, codeleted=True, hgg=False, methylated=True)
    assert log_hazard_ratio(gbm) == 0.0
    assert np.exp(log_hazard_ratio(oligo)) == pytest.approx(0.35 * 0.4 * 0.5 * 0.5)
    rng = np.random.default_rng(1)
    days, event = torch.tensor([sample_survival(gbm, rng) for _ in range(3000)], dtype=torch.float64).T
    curve = kaplan_meier(event == 1, days)
    median = next(t for t, p in zip(curve["time"], curve["survival"]) if p <= 0.5)
    assert 0.75 < float(event.mean()) < 1.0 and 350 < median < 420  # 12.7 months = 387 days
