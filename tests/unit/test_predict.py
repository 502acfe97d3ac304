"""``fedglioma predict`` (fedglioma.predict): masks on the case's own grid that score what the
evaluation loop scores, per-case reports, both namings, missing sequences, clear errors, batch mode."""

from __future__ import annotations

import base64
import csv
import json
import shutil
from html.parser import HTMLParser
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from common.config import DataConfig, compose, replace, to_mapping
from common.contract import ET, REGIONS, SEQUENCES, TASKS
from common.data.dataset import case_item, make_loader
from common.data.site import load_site, scan_site
from common.evaluation.calibration import Calibration
from common.evaluation.loop import evaluate
from common.evaluation.metrics import segmentation_scores
from common.model import build_model
from common.model.checkpoint import load_model
from fedglioma.cli import main
from fedglioma.predict import (
    PREDICTION_JSON,
    REPORT_HTML,
    SEGMENTATION_FILE,
    SUMMARY_CSV,
    inference_transform,
    low_confidence,
    to_case_grid,
)
from synth import generate_cohort
from tests.helpers import write_case, write_labels_csv

#: Network grid of the test model: coarser than the 32^3 tiny cohort's brain crop (~26 voxels),
#: as every real case is coarser than its 1 mm BraTS grid (see test_masks_... below).
SIZE = 24


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny cohort, shrunk: site-a (BraTS 2021 names, ET = 4) with 1 case, heldout (BraTS 2023) with 3."""
    out = tmp_path_factory.mktemp("cohort")
    generate_cohort(out, "tiny", sites=1, cases_per_site=1, heldout_cases=3, workers=1, force=True)
    return out


@pytest.fixture(scope="module")
def checkpoint(cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model trained for 24 steps on the held-out cases (non-empty masks), with a calibration."""
    from client.training import LocalTrainer

    cfg = replace(compose(["+experiment=tiny", f"data.size={SIZE}", "data.cache=false"]),
                  train={"lr": 0.005, "threads": 2, "amp": False, "progress": False})
    loader = make_loader(load_site(cohort / "heldout").cases, cfg.data, train=True)
    batches = list(loader)
    torch.manual_seed(0)
    model = build_model(cfg.model, SIZE, seed=0)
    trainer = LocalTrainer(model, cfg, torch.device("cpu"), loader.dataset.label_matrix())
    trainer.run(batches * 12, epochs=1)
    calibration = Calibration()
    calibration.temperature["idh"] = 2.0
    calibration.cases["idh"] = 10.0
    path = tmp_path_factory.mktemp("run") / "best.pt"
    torch.save({"round": 3, "state_dict": model.state_dict(), "model": dict(to_mapping(cfg)["model"]),
                "size": SIZE, "calibration": calibration.to_dict()}, path)
    return path


def _predict(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, str]:
    code = main(["predict", *map(str, argv)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


class _Report(HTMLParser):
    """Table cells by table id, and the images."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.images: list[dict[str, str]] = []
        self._table: str | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "table":
            self._table = a.get("id", "")
            self.tables[self._table] = []
        elif tag == "tr" and self._table is not None:
            self.tables[self._table].append([])
        elif tag in ("td", "th") and self._table is not None:
            self._cell = []
        elif tag == "img":
            self.images.append(a)

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None and self._table is not None:
            self.tables[self._table][-1].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


# ---------------------------------------------------------------------------------- done-when
def test_masks_keep_the_case_grid_and_score_what_evaluate_scores(
    cohort: Path, checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare
    heldout = cohort / "heldout"
    index = load_site(heldout)
    model, payload = load_model(checkpoint)
    data = DataConfig(size=payload["size"], cache=False)
    reference = evaluate(model, make_loader(index.cases, data, train=False))
    assert reference["dice_wt"] > 0.05  # the model's masks are not trivial

    # Execute
    code, out, err = _predict(capsys, heldout, "--model", checkpoint, "--out", tmp_path / "out", "--mc-passes", 0)

    # Assert: every mask has the input's shape and affine...
    assert code == 0, err
    resampled = tmp_path / "resampled"  # the cases again, with predict's masks as their segmentation
    resampled.mkdir()
    shutil.copy(heldout / "labels.csv", resampled / "labels.csv")
    for case in index.cases:
        written = nib.load(tmp_path / "out" / case.case_id / SEGMENTATION_FILE)
        source = nib.load(case.images["t1ce"])
        assert written.shape == source.shape
        np.testing.assert_allclose(written.affine, source.affine, atol=1e-5)
        mask = np.asarray(written.dataobj)
        assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1, 2, 3} and mask.any()
        folder = resampled / case.case_id
        folder.mkdir()
        for path in case.images.values():
            shutil.copy(path, folder / path.name)
        shutil.copy(tmp_path / "out" / case.case_id / SEGMENTATION_FILE, folder / f"{case.case_id}-seg.nii.gz")
    # ... and, taken to the network grid as the evaluation takes the reference, scores its Dice.
    # The network grid (24^3) is coarser than the case's, so the way back is exact (on a finer
    # network grid, extra voxels cannot all be represented on the case's: see the README).
    dice = []
    for ours, theirs in zip(make_loader(load_site(resampled).cases, data, train=False),
                            make_loader(index.cases, data, train=False)):
        scores = segmentation_scores(ours["seg"], theirs["seg"], theirs["spacing"])
        dice.append(torch.stack([scores[f"dice_{r}"] for r in REGIONS], dim=1))
    ours_mean = torch.cat(dice).mean(0).tolist()
    for region, value in zip(REGIONS, ours_mean):
        assert value == pytest.approx(reference[f"dice_{region}"], abs=0.01)


def test_the_way_back_to_the_case_grid_inverts_the_preprocessing(tmp_path: Path) -> None:
    # Prepare: a case stored LPS with permuted axes (not RAS), network grid finer than the brain crop
    affine = np.array([[0.0, -1.2, 0.0, 20.0], [0.0, 0.0, -1.0, 30.0], [0.9, 0.0, 0.0, -10.0], [0, 0, 0, 1]])
    write_case(tmp_path / "site", "c1", shape=(18, 16, 14), affine=affine, naming="brats2023")
    write_labels_csv(tmp_path / "site", [("c1", "", "", "", "")])
    (case,) = scan_site(tmp_path / "site").cases

    for size in (24, 9):
        item = inference_transform(size)(case_item(case, 0))
        grid = item["seg"][0].numpy().astype(np.uint8)

        # Execute
        back = to_case_grid(grid, item["image"].applied_operations)

        # Assert: the case's shape, and the reference segmentation itself when the network grid is
        # finer (24); when it is coarser (9), going back and forth again changes nothing
        native = np.asarray(nib.load(case.seg).dataobj)
        assert back.shape == native.shape
        if size == 24:
            np.testing.assert_array_equal(back, native)
        else:
            again = case_item(case, 0) | {"seg": str(_save(tmp_path / "back.nii.gz", back, affine))}
            np.testing.assert_array_equal(inference_transform(size)(again)["seg"][0].numpy(), grid)


def _save(path: Path, labels: np.ndarray, affine: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(labels.astype(np.uint8), affine), path)
    return path


# ---------------------------------------------------------------------------------- the report
def test_report_shows_volumes_markers_and_slices(
    cohort: Path, checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    case = cohort / "heldout" / "heldout-001"

    code, out, err = _predict(capsys, case, "--model", checkpoint, "--out", tmp_path, "--mc-passes", 3)

    assert code == 0, err
    record = json.loads((tmp_path / "heldout-001" / PREDICTION_JSON).read_text())
    mask = np.asarray(nib.load(tmp_path / "heldout-001" / SEGMENTATION_FILE).dataobj)
    voxel_ml = 7.5**3 / 1000
    assert record["volumes_ml"]["wt"] == pytest.approx((mask > 0).sum() * voxel_ml)
    assert record["volumes_ml"]["et"] == pytest.approx((mask == ET).sum() * voxel_ml)
    idh = record["markers"]["idh"]
    assert idh["calibrated"] and not record["markers"]["mgmt"]["calibrated"]
    assert 0.0 <= idh["probability"] <= 1.0 and idh["uncertainty"] >= 0.0
    assert idh["low_confidence"] == low_confidence(idh["probability"], idh["threshold"], idh["uncertainty"])
    assert record["sequences"] == {"present": list(SEQUENCES), "imputed": [], "zero_filled": []}
    assert not (tmp_path / SUMMARY_CSV).exists()  # one case: no batch summary

    report = _Report()
    report.feed((tmp_path / "heldout-001" / REPORT_HTML).read_text())
    volumes = {row[0]: float(row[1]) for row in report.tables["volumes"][1:]}
    assert volumes == pytest.approx({r.upper(): v for r, v in record["volumes_ml"].items()}, abs=0.01)
    markers = {row[0]: row for row in report.tables["markers"][1:]}
    assert sorted(markers) == sorted(TASKS)
    assert markers["idh"][1] == f"P(mutant) = {idh['probability']:.3f}"
    assert markers["idh"][5] == ("LOW CONFIDENCE" if idh["low_confidence"] else "ok")
    assert [img["alt"].split()[0] for img in report.images] == ["t1ce", "flair"]
    for img in report.images:
        png = base64.b64decode(img["src"].removeprefix("data:image/png;base64,"))
        assert png.startswith(b"\x89PNG")


def test_calibration_of_the_checkpoint_sets_the_probability(cohort: Path, checkpoint: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    from fedglioma.predict import Predictor, read_case

    case = read_case(cohort / "heldout" / "heldout-002")
    predictor = Predictor(checkpoint, mc_passes=0)
    model, _ = load_model(checkpoint)
    item = predictor.transform({s: str(p) for s, p in case.images.items()})
    with torch.no_grad():
        logits = model(item["image"].as_tensor()[None], item["available"][None], item["spacing"][None]).cls_logits
    z = {t: float(v[0, 1] - v[0, 0]) for t, v in logits.items()}

    markers = predictor.infer(case).markers

    assert markers["idh"].probability == pytest.approx(1 / (1 + np.exp(-z["idh"] / 2.0)), abs=1e-5)  # T = 2
    assert markers["mgmt"].probability == pytest.approx(1 / (1 + np.exp(-z["mgmt"])), abs=1e-5)  # identity
    assert markers["idh"].uncertainty is None


# ---------------------------------------------------------------------------------- inputs
def test_brats2021_names_write_enhancing_tumor_as_4(cohort: Path, checkpoint: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    case = cohort / "site-a" / "site-a-001"  # BraTS 2021 names

    code, _, err = _predict(capsys, case, "--model", checkpoint, "--out", tmp_path / "a", "--mc-passes", 0)
    code_23, _, _ = _predict(capsys, case, "--model", checkpoint, "--out", tmp_path / "b", "--mc-passes", 0,
                             "--label-convention", "brats2023")

    assert code == code_23 == 0, err
    record = json.loads((tmp_path / "a" / "site-a-001" / PREDICTION_JSON).read_text())
    assert record["naming"] == "brats2021" and record["segmentation"]["values"] == {"ncr": 1, "ed": 2, "et": 4}
    as_2021 = np.asarray(nib.load(tmp_path / "a" / "site-a-001" / SEGMENTATION_FILE).dataobj)
    as_2023 = np.asarray(nib.load(tmp_path / "b" / "site-a-001" / SEGMENTATION_FILE).dataobj)
    assert set(np.unique(as_2021)) <= {0, 1, 2, 4}
    np.testing.assert_array_equal(as_2021, np.where(as_2023 == ET, 4, as_2023))


def test_the_written_values_follow_the_convention(tmp_path: Path) -> None:
    from fedglioma.predict import CaseInput, CaseResult, Inference, write_segmentation

    affine = np.diag([2.0, 2.0, 3.0, 1.0])
    header = nib.Nifti1Image(np.zeros((4, 4, 4), dtype=np.float32), affine).header
    labels = np.array([0, 1, 2, 3] * 16, dtype=np.uint8).reshape(4, 4, 4)
    case = CaseInput("c", tmp_path, "brats2023", {"t1": tmp_path / "c-t1n.nii.gz"})
    inference = Inference(case, labels, labels, affine, header, {})
    for convention, et in (("brats2021", 4), ("brats2023", 3)):
        write_segmentation(CaseResult(inference, labels, convention, (), False, {}, (2.0, 2.0, 3.0)), tmp_path / "s.nii.gz")
        written = nib.load(tmp_path / "s.nii.gz")
        np.testing.assert_array_equal(np.asarray(written.dataobj), np.where(labels == 3, et, labels))
        np.testing.assert_array_equal(written.affine, affine)


def test_a_case_with_two_sequences_is_zero_filled_or_imputed(cohort: Path, checkpoint: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    source = cohort / "heldout" / "heldout-003"
    case = tmp_path / "site" / "heldout-003"
    case.mkdir(parents=True)
    for suffix in ("t1c", "t2f"):  # T1ce and FLAIR only
        shutil.copy(source / f"heldout-003-{suffix}.nii.gz", case)
    cfg = compose(["+experiment=tiny", f"data.size={SIZE}", "model.imputation=true"])
    imputing = tmp_path / "imputing.pt"
    torch.save({"round": 0, "state_dict": build_model(cfg.model, SIZE, seed=0).state_dict(),
                "model": dict(to_mapping(cfg)["model"]), "size": SIZE}, imputing)

    code, _, err = _predict(capsys, case, "--model", checkpoint, "--out", tmp_path / "a", "--mc-passes", 0)
    code_imputing, _, _ = _predict(capsys, case, "--model", imputing, "--out", tmp_path / "b", "--mc-passes", 0)

    assert code == code_imputing == 0, err
    zero_filled = json.loads((tmp_path / "a" / "heldout-003" / PREDICTION_JSON).read_text())["sequences"]
    imputed = json.loads((tmp_path / "b" / "heldout-003" / PREDICTION_JSON).read_text())["sequences"]
    assert zero_filled == {"present": ["t1ce", "flair"], "imputed": [], "zero_filled": ["t1", "t2"]}
    assert imputed == {"present": ["t1ce", "flair"], "imputed": ["t1", "t2"], "zero_filled": []}
    assert nib.load(tmp_path / "a" / "heldout-003" / SEGMENTATION_FILE).shape == nib.load(case / "heldout-003-t1c.nii.gz").shape


def test_a_tumor_crop_model_predicts_on_the_case_grid(cohort: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """A checkpoint with model.tumor_crop_size (the network at 16^3, the data at 32^3) predicts a
    new case like any other: its mask on the case's own grid, markers and volumes in the report."""
    cfg = compose(["+experiment=tiny", "data.size=32", "model.tumor_crop_size=16"])
    path = tmp_path / "crop.pt"
    torch.save({"round": 0, "state_dict": build_model(cfg.model, 32, seed=0).state_dict(),
                "model": dict(to_mapping(cfg)["model"]), "size": 32}, path)
    case = cohort / "heldout" / "heldout-001"
    code, _, err = _predict(capsys, case, "--model", path, "--out", tmp_path / "out", "--mc-passes", 2)
    assert code == 0, err
    written = tmp_path / "out" / "heldout-001"
    assert nib.load(written / SEGMENTATION_FILE).shape == nib.load(case / "heldout-001-t1c.nii.gz").shape
    report = json.loads((written / PREDICTION_JSON).read_text())
    assert set(report["markers"]) == set(TASKS)


def test_a_corrupt_nifti_is_named_without_a_traceback(cohort: Path, checkpoint: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    case = tmp_path / "heldout-002"
    shutil.copytree(cohort / "heldout" / "heldout-002", case)
    (case / "heldout-002-t2w.nii.gz").write_bytes(b"not a NIfTI file at all")

    code, _, err = _predict(capsys, case, "--model", checkpoint, "--out", tmp_path / "out")

    assert code == 1
    assert "heldout-002-t2w.nii.gz" in err and "Fix:" in err and "Traceback" not in err
    assert not (tmp_path / "out" / "heldout-002").exists()


def test_unusable_model_or_input_folder_exit_non_zero(cohort: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    broken = tmp_path / "best.pt"
    broken.write_bytes(b"\x00" * 64)

    code, _, err = _predict(capsys, cohort / "heldout", "--model", broken, "--out", tmp_path / "out")
    assert code == 1 and str(broken) in err

    code, _, err = _predict(capsys, tmp_path / "nowhere", "--model", broken, "--out", tmp_path / "out")
    assert code == 2 and "nowhere" in err

    code, _, err = _predict(capsys, cohort / "heldout", "--model", broken, "--out", tmp_path / "o",
                            "--postprocess", "hole")
    assert code == 1 and "did you mean 'holes'" in err


def test_batch_mode_writes_the_summary_and_reports_failures(cohort: Path, checkpoint: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    site = tmp_path / "site"
    for name in ("heldout-001", "heldout-002"):
        shutil.copytree(cohort / "heldout" / name, site / name)
    (site / "heldout-002" / "heldout-002-t1n.nii.gz").write_bytes(b"\x1f\x8b broken gzip")

    code, out, err = _predict(capsys, site, "--model", checkpoint, "--out", site / "predictions", "--mc-passes", 0,
                              "--postprocess", "all")

    assert code == 1 and "heldout-002-t1n.nii.gz" in err
    with (site / "predictions" / SUMMARY_CSV).open() as fh:
        rows = {row["case_id"]: row for row in csv.DictReader(fh)}
    assert sorted(rows) == ["heldout-001", "heldout-002"]  # the output folder is not taken for a case
    assert rows["heldout-001"]["status"] == "ok" and float(rows["heldout-001"]["wt_ml"]) >= 0
    assert rows["heldout-002"]["status"] == "error" and "heldout-002-t1n.nii.gz" in rows["heldout-002"]["error"]
    index = (site / "predictions" / "index.html").read_text()
    assert 'href="heldout-001/report.html"' in index
    record = json.loads((site / "predictions" / "heldout-001" / PREDICTION_JSON).read_text())
    assert record["postprocess"] == ["density", "small-components", "holes"]


def test_low_confidence_rule() -> None:
    assert low_confidence(0.64, 0.5, 0.01) and low_confidence(0.36, 0.5, None)
    assert not low_confidence(0.66, 0.5, 0.05) and not low_confidence(0.2, 0.5, None)
    assert low_confidence(0.9, 0.5, 0.2)  # confident mean, but the passes disagree
    assert low_confidence(0.3, 0.2, None) and not low_confidence(0.5, 0.2, 0.0)  # around the fit threshold
