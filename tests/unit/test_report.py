"""report.html and plots from a crafted metrics.json."""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path

import pytest

from server.report import write_report
from server.run_folder import RunFolderError


def history() -> dict:
    def site(dice: float) -> dict:
        return {"dice_wt": dice, "dice_tc": dice / 2, "dice_et": dice / 3, "auc_idh": 0.6}

    def train(accepted: float) -> dict:
        return {"loss": 1.0, "num-examples": 8.0, "n_train": 8.0, "has_t1": 8.0,
                "pseudo_accepted": accepted, "pseudo_idh_accepted": accepted, "pseudo_idh_confidence": 0.97}

    heldout = {"dice_wt": 0.1, "dice_tc": 0.05, "dice_et": 0.01, "hd95_wt": 50.0, "auc_idh": 0.5}
    return {
        "rounds": [
            {"round": 0, "heldout": heldout, "sites": {}, "train": {}},
            {"round": 1, "heldout": {**heldout, "dice_wt": 0.4}, "sites": {"site-a": site(0.7), "site-b": site(0.2)},
             "train": {"site-a": train(3.0), "site-b": train(1.0)}, "failures": {}, "rejected": {}},
            {"round": 2, "heldout": {**heldout, "dice_wt": 0.5}, "sites": {"site-a": site(0.8), "site-b": site(0.3)},
             "train": {"site-a": train(5.0)}, "failures": {"site-b": "NoUsableCaseError: no usable case"},
             "rejected": {}},
        ],
        "final": {"heldout": {**heldout, "dice_wt": 0.5}, "round": 2},
    }


def test_report_has_plots_worst_site_pseudo_labels_per_round_and_failures(tmp_path: Path) -> None:
    (tmp_path / "metrics.json").write_text(json.dumps(history()))
    page = write_report(tmp_path).read_text()
    pngs = sorted(p.name for p in (tmp_path / "plots").glob("*.png"))
    assert "heldout_dice.png" in pngs and "sites_dice_wt.png" in pngs
    assert page.count("<img") == len(pngs)
    assert re.search(r'class="worst"[^>]*>\s*<td>site-b', page)  # lowest final WT Dice
    pseudo = page[page.index("Pseudo-labels accepted per round"):]
    assert re.search(r"<td>1</td>\s*<td>site-b</td>\s*<td>1</td>", pseudo)
    assert re.search(r"<td>2</td>\s*<td>site-a</td>\s*<td>5</td>", pseudo)
    assert "NoUsableCaseError" in page and "site-b" in page


def test_report_shows_head_diagnostics_calibration_and_gradient_shares(tmp_path: Path) -> None:
    data = history()
    data["rounds"][2]["heldout"].update(bacc_idh=0.5, logit_std_idh=0.0123)
    data["rounds"][2]["calibration"] = {"temperature_idh": 2.5, "threshold_idh": 0.4}
    data["rounds"][2]["selection_score"] = 0.61
    data["rounds"][2]["train"]["site-a"]["grad_share_seg"] = 0.875
    (tmp_path / "metrics.json").write_text(json.dumps(data))
    page = write_report(tmp_path).read_text()
    heads = page[page.index("Molecular heads on the held-out center"):]
    assert "logit_std_idh" in heads and "0.012" in heads
    calibration = page[page.index("Calibration and model selection"):]
    assert re.search(r"<td>2</td>\s*<td>0.610</td>\s*<td>2.500</td>\s*<td>0.400</td>", calibration)
    shares = page[page.index("Share of the gradient into the shared encoder"):]
    assert re.search(r"<td>2</td>\s*<td>site-a</td>\s*<td>0.875</td>", shares)


@pytest.mark.parametrize(
    "text, why",
    [
        ('{"rounds": [{"round": 0, "heldou', "not valid JSON"),
        ('{"rounds": [{"round": 0, "sites": {}}]}', "no 'heldout' metrics"),
        ('{"rounds": [{"round": 0, "heldout": {}, "sites": {"site-a": 0.7}}]}', "'sites' is not an object of per-site objects"),
    ],
)
def test_report_of_a_damaged_metrics_json_names_the_file_and_the_fix(tmp_path: Path, text: str, why: str) -> None:
    (tmp_path / "metrics.json").write_text(text)
    with pytest.raises(RunFolderError, match=r"metrics\.json is damaged") as raised:
        write_report(tmp_path)
    assert why in str(raised.value) and "federation.run_name" in str(raised.value)
    assert not (tmp_path / "report.html").exists()


def test_report_and_plots_are_written_atomically_for_the_owner_only(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "metrics.json").write_text(json.dumps(history()))
    old = os.umask(0o022)
    try:
        page = write_report(tmp_path)
    finally:
        os.umask(old)
    assert stat.S_IMODE(page.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "plots").stat().st_mode) == 0o700
    assert {stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "plots").iterdir()} == {0o600}
    before = page.read_text()

    def fails(*args, **kwargs) -> str:
        raise RuntimeError("crashed while rendering")

    monkeypatch.setattr("server.report.render_html", fails)
    with pytest.raises(RuntimeError):
        write_report(tmp_path)
    assert page.read_text() == before and not list(tmp_path.glob(".*.tmp"))


def test_report_shows_bounded_updates_and_rounds_below_quorum(tmp_path: Path) -> None:
    data = history()
    data["rounds"][1]["bounded"] = {"site-b": "num-examples 1e+09 capped to 80 (10x the median of the other sites)"}
    data["rounds"][2]["quorum"] = {"expected": 3, "needed": 2, "replied": 1, "applied": False,
                                   "missing": {"site-b": "NoUsableCaseError: no usable case", "site-c": "not connected"}}
    (tmp_path / "metrics.json").write_text(json.dumps(data))
    page = write_report(tmp_path).read_text()
    assert "capped to 80" in page
    below = page[page.index("Rounds below quorum"):]
    assert re.search(r"<td>2</td>\s*<td>1</td>\s*<td>2</td>\s*<td>[^<]*site-c: not connected", below)


def test_report_shows_lesion_wise_scores_every_round(tmp_path: Path) -> None:
    data = history()
    for r in data["rounds"]:
        r["heldout"].update(lesion_dice_wt=0.25 * (r["round"] + 1), lesion_hd95_wt=187.0)
    (tmp_path / "metrics.json").write_text(json.dumps(data))
    page = write_report(tmp_path).read_text()
    lesions = page[page.index("Lesion-wise Dice and HD95 (BraTS 2023+)"):]
    assert re.search(r"<td>2</td>\s*<td>0.750</td>", lesions) and "187" in lesions
    assert (tmp_path / "plots" / "heldout_lesion_dice.png").is_file()


def test_report_shows_the_cindex_every_round_and_kaplan_meier_by_predicted_risk(tmp_path: Path) -> None:
    data = history()
    for r in data["rounds"]:
        r["heldout"].update(cindex=0.5 + 0.1 * r["round"], n_survival=30.0)
    data["rounds"][-1]["heldout"]["km_risk_groups"] = {
        "threshold": 0.1,
        "low": {"n": 15, "events": 4, "time": [0.0, 400.0, 900.0], "survival": [1.0, 0.8, 0.7]},
        "high": {"n": 15, "events": 12, "time": [0.0, 200.0, 350.0], "survival": [1.0, 0.5, 0.2]},
    }
    (tmp_path / "metrics.json").write_text(json.dumps(data))
    page = write_report(tmp_path).read_text()
    survival = page[page.index("Survival head on the held-out center"):]
    assert re.search(r"<td>2</td>\s*<td>0.700</td>\s*<td>30</td>", survival)
    pngs = {p.name for p in (tmp_path / "plots").glob("*.png")}
    assert {"heldout_cindex.png", "heldout_km.png"} <= pngs and 'alt="heldout_km"' in page


def test_report_without_survival_has_no_survival_plots(tmp_path: Path) -> None:
    (tmp_path / "metrics.json").write_text(json.dumps(history()))
    page = write_report(tmp_path).read_text()
    assert "Survival head" not in page and not (tmp_path / "plots" / "heldout_km.png").exists()
