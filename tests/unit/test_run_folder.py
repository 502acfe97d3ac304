from __future__ import annotations

import argparse
import json
import logging
import math
import os
import stat
from pathlib import Path

import pytest
import torch

from common.config import compose, replace, to_mapping
from common.contract import METRIC_KEYS
from common.model import build_model
from common.model.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_model,
    load_weights,
)
from fedglioma.cli import main
from server.report import write_report
from server.run_folder import RunFolder, RunFolderError


def heldout(dice: float, auc: float) -> dict[str, float]:
    metrics = {k: 0.5 for k in METRIC_KEYS}
    metrics.update(dice_wt=dice, auc_idh=auc, auc_1p19q=auc, auc_grade=auc, auc_mgmt=float("nan"))
    return metrics


def state(value: float) -> dict[str, torch.Tensor]:
    return {"w": torch.full((2,), value)}


def test_rounds_checkpoints_and_best_selection_on_site_validation_only(tmp_path) -> None:
    folder = RunFolder(tmp_path / "run", compose())
    # (validation score of the sites, held-out dice, held-out auc): the held-out center peaks at
    # round 2, the sites' validation at round 1; best.pt must follow the sites.
    rounds = [(float("nan"), 0.1, 0.5), (0.7, 0.4, 0.6), (0.5, 0.9, 0.9)]
    for r, (score, dice, auc) in enumerate(rounds):
        folder.record_round(r, heldout=heldout(dice, auc), sites={"site-a": {"dice_wt": dice, "cal_nll_idh": [1.0]}},
                            extra={"selection_score": score})
        folder.save_checkpoint(r, state(float(r)), score)
    final = folder.finalize()
    saved = json.loads((tmp_path / "run/metrics.json").read_text())
    assert [r["round"] for r in saved["rounds"]] == [0, 1, 2]
    assert saved["rounds"][0]["heldout"]["auc_mgmt"] is None  # NaN written as JSON null
    assert final["best_round"] == 1 and saved["final"]["round"] == 2
    assert "held-out center is only reported" in final["selection"]
    assert "cal_nll_idh" not in saved["rounds"][1]["sites"]["site-a"]  # calibration statistics stay out
    best = load_checkpoint(tmp_path / "run/checkpoints/best.pt")
    assert best["round"] == 1 and torch.equal(best["state_dict"]["w"], state(1.0)["w"])
    assert load_checkpoint(tmp_path / "run/checkpoints/last.pt")["round"] == 2
    assert (tmp_path / "run/checkpoints/round-000.pt").exists()
    assert (tmp_path / "run/config.yaml").exists()


def test_resume_continues_after_last_checkpoint_and_drops_later_history(tmp_path) -> None:
    cfg = compose()
    folder = RunFolder(tmp_path / "run", cfg)
    for r in range(3):
        folder.record_round(r, heldout=heldout(0.1 * r, 0.5))
        if r < 2:  # the process died after writing metrics of round 2, before its checkpoint
            folder.save_checkpoint(r, state(float(r)), 0.1 * r)
    again = RunFolder(tmp_path / "run", cfg, resume=True)
    resumed = again.resume_state()
    assert resumed is not None and resumed.next_round == 2
    assert torch.equal(resumed.state_dict["w"], state(1.0)["w"])
    assert [r["round"] for r in again.history["rounds"]] == [0, 1]


def test_existing_results_are_never_overwritten_without_resume(tmp_path) -> None:
    folder = RunFolder(tmp_path / "run", compose())
    folder.record_round(0, heldout=heldout(0.1, 0.5))
    with pytest.raises(RunFolderError, match="already holds a run"):
        RunFolder(tmp_path / "run", compose(), resume=False)


def test_resume_with_a_different_model_is_refused(tmp_path) -> None:
    folder = RunFolder(tmp_path / "run", compose())
    folder.record_round(0, heldout=heldout(0.1, 0.5))
    with pytest.raises(RunFolderError, match="model config differs"):
        RunFolder(tmp_path / "run", compose(["model=demo"]))


def test_selection_score_weighs_sites_by_validation_cases_and_ignores_missing_aucs() -> None:
    from common.evaluation.metrics import selection_score

    a = {**heldout(0.6, 0.8), "n_cases": 3.0}
    b = {**heldout(0.2, 0.4), "n_cases": 1.0}
    assert math.isclose(selection_score({"a": a}), (0.6 + 0.8) / 2)
    assert math.isclose(selection_score({"a": a, "b": b}), (3 * 0.7 + 1 * 0.3) / 4)
    assert math.isnan(selection_score({}))


def test_without_validation_scores_best_follows_the_last_round(tmp_path) -> None:
    folder = RunFolder(tmp_path / "run", compose())
    for r in range(3):
        folder.record_round(r, heldout=heldout(0.9 - 0.1 * r, 0.9))  # held-out best at round 0
        folder.save_checkpoint(r, state(float(r)), float("nan"))
    final = folder.finalize()
    assert final["best_round"] == 2 and "no validation metrics" in final["selection"]
    assert load_checkpoint(tmp_path / "run/checkpoints/best.pt")["round"] == 2


# ------------------------------------------------------------------ damaged or missing files


def run_with_rounds(root, n: int, scores: list[float] | None = None) -> RunFolder:
    """A run folder with rounds 0..n-1 recorded and checkpointed (weights = the round number)."""
    folder = RunFolder(root, compose())
    for r in range(n):
        score = scores[r] if scores else 0.1 * r
        folder.record_round(r, heldout=heldout(0.1 * r, 0.5), extra={"selection_score": score})
        folder.save_checkpoint(r, state(float(r)), score)
    return folder


def recorded(root) -> list[int]:
    return [r["round"] for r in json.loads((root / "metrics.json").read_text())["rounds"]]


def test_deleted_last_pt_with_history_refuses_and_offers_the_latest_round_checkpoint(tmp_path) -> None:
    run_with_rounds(tmp_path / "run", 4)
    (tmp_path / "run/checkpoints/last.pt").unlink()
    again = RunFolder(tmp_path / "run", compose())
    with pytest.raises(RunFolderError, match=r"last\.pt is missing") as refused:
        again.resume_state()
    assert "federation.resume_from=round-003.pt" in str(refused.value)
    assert recorded(tmp_path / "run") == [0, 1, 2, 3]  # nothing wiped


def test_damaged_last_pt_names_it_and_skips_damaged_round_checkpoints(tmp_path) -> None:
    run_with_rounds(tmp_path / "run", 4)
    ckpt = tmp_path / "run/checkpoints"
    (ckpt / "last.pt").write_bytes((ckpt / "last.pt").read_bytes()[:100])
    (ckpt / "round-003.pt").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match=r"last\.pt cannot be read") as refused:
        RunFolder(tmp_path / "run", compose()).resume_state()
    assert "federation.resume_from=round-002.pt" in str(refused.value)
    assert "weights_only=False" not in str(refused.value)


def test_round_zero_recorded_but_never_saved_starts_afresh(tmp_path) -> None:
    folder = RunFolder(tmp_path / "run", compose())
    folder.record_round(0, heldout=heldout(0.1, 0.5))  # the run died before saving round 0
    again = RunFolder(tmp_path / "run", compose())
    assert again.resume_state() is None and recorded(tmp_path / "run") == []


def test_resume_from_a_round_checkpoint_truncates_history_and_rounds_follow_once(tmp_path) -> None:
    run_with_rounds(tmp_path / "run", 5, scores=[0.1, 0.5, 0.3, 0.9, 0.2]).finalize()  # best: round 3
    cfg = replace(compose(), federation={"resume_from": "round-002.pt"})
    folder = RunFolder(tmp_path / "run", cfg)
    resumed = folder.resume_state()
    assert resumed is not None and resumed.next_round == 3
    assert torch.equal(resumed.state_dict["w"], state(2.0)["w"])
    assert recorded(tmp_path / "run") == [0, 1, 2]
    assert json.loads((tmp_path / "run/metrics.json").read_text())["final"] == {}
    # a crash now resumes from round 2 again; best.pt is the best round kept, not round 3
    assert load_checkpoint(tmp_path / "run/checkpoints/last.pt")["round"] == 2
    assert load_checkpoint(tmp_path / "run/checkpoints/best.pt")["round"] == 1
    for r in (3, 4):
        folder.record_round(r, heldout=heldout(0.1, 0.5), extra={"selection_score": 0.0})
        folder.save_checkpoint(r, state(10.0 + r), 0.0)
    final = folder.finalize()
    assert recorded(tmp_path / "run") == [0, 1, 2, 3, 4] and final["best_round"] == 1
    assert load_checkpoint(tmp_path / "run/checkpoints/best.pt")["round"] == 1


def test_resume_from_a_file_that_is_not_there_suggests_the_closest(tmp_path) -> None:
    run_with_rounds(tmp_path / "run", 3)
    cfg = replace(compose(), federation={"resume_from": "round-02.pt"})
    with pytest.raises(RunFolderError, match=r"does not exist \(did you mean 'round-002.pt'\?\)"):
        RunFolder(tmp_path / "run", cfg).resume_state()


def test_resume_from_without_resume_is_refused_not_ignored(tmp_path) -> None:
    cfg = replace(compose(), federation={"resume_from": "round-002.pt", "resume": False})
    with pytest.raises(RunFolderError, match="needs federation.resume=true"):
        RunFolder(tmp_path / "run", cfg, resume=False)


def test_checkpoint_of_a_round_metrics_json_does_not_record_is_refused(tmp_path) -> None:
    run_with_rounds(tmp_path / "run", 3)
    (tmp_path / "run/metrics.json").unlink()  # lost, while the checkpoints are there
    with pytest.raises(RunFolderError, match=r"holds round 2, but .*metrics\.json records no round"):
        RunFolder(tmp_path / "run", compose()).resume_state()


def test_resume_from_a_checkpoint_of_another_model_is_refused(tmp_path) -> None:
    other = RunFolder(tmp_path / "other", compose(["model=demo"]))
    other.record_round(2, heldout=heldout(0.1, 0.5))
    other.save_checkpoint(2, state(2.0), 0.5)
    run_with_rounds(tmp_path / "run", 3)
    cfg = replace(compose(), federation={"resume_from": str(tmp_path / "other/checkpoints/round-002.pt")})
    with pytest.raises(CheckpointError, match=r"other/checkpoints/round-002\.pt holds another model .*model\.base_channels"):
        RunFolder(tmp_path / "run", cfg).resume_state()


def _truncated(path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _garbage(path) -> None:
    path.write_bytes(bytes(range(256)) * 4)


def _empty(path) -> None:
    path.write_bytes(b"")


def _python_object(path) -> None:
    torch.save(argparse.Namespace(round=1), path)  # not unpickled under weights_only


def _plain_list(path) -> None:
    torch.save([1, 2, 3], path)


def _no_tensors(path) -> None:
    torch.save({"round": 1, "state_dict": {"w": "not a tensor"}, "model": {}, "size": 32}, path)


@pytest.mark.parametrize("damage", [_truncated, _garbage, _empty, _python_object, _plain_list, _no_tensors])
def test_damaged_checkpoint_raises_checkpoint_error_naming_the_file(tmp_path, damage) -> None:
    run_with_rounds(tmp_path / "run", 1)
    path = tmp_path / "run/checkpoints/round-000.pt"
    damage(path)
    with pytest.raises(CheckpointError, match="round-000.pt") as raised:
        load_checkpoint(path)
    assert "weights_only=False" not in str(raised.value) and "backup" in str(raised.value)
    with pytest.raises(CheckpointError, match="round-000.pt"):
        load_model(path)


def test_checkpoint_with_weights_of_another_network_shape_is_refused(tmp_path) -> None:
    cfg = compose()
    network = build_model(cfg.model, cfg.data.size)
    weights = {k: torch.zeros(3, *v.shape) if i == 0 else v for i, (k, v) in enumerate(network.state_dict().items())}
    path = tmp_path / "odd.pt"
    torch.save({"round": 1, "state_dict": weights, "model": to_mapping(cfg)["model"], "size": cfg.data.size}, path)
    with pytest.raises(CheckpointError, match=r"odd\.pt holds the weights of another network: 1 shapes differ"):
        load_model(path)
    with pytest.raises(CheckpointError, match=r"odd\.pt holds the weights of another network: 1 weights missing"):
        load_weights(network, {"w": torch.zeros(2), **dict(list(network.state_dict().items())[1:])}, path)


def test_broken_best_pt_does_not_stop_the_next_round_and_is_rewritten_at_the_end(tmp_path, caplog) -> None:
    folder = run_with_rounds(tmp_path / "run", 2, scores=[0.1, 0.9])
    (tmp_path / "run/checkpoints/best.pt").write_bytes(b"garbage")
    folder.record_round(2, heldout=heldout(0.3, 0.5), extra={"selection_score": 0.2})
    folder.save_checkpoint(2, state(2.0), 0.2)  # reading best.pt here used to raise
    with caplog.at_level(logging.WARNING):
        assert folder.finalize()["best_round"] == 1
    assert load_checkpoint(tmp_path / "run/checkpoints/best.pt")["round"] == 1
    assert "best.pt cannot be read" in caplog.text and "rewritten from round-001.pt" in caplog.text


def test_a_crash_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch) -> None:
    folder = run_with_rounds(tmp_path / "run", 2)
    folder.record_round(2, heldout=heldout(0.3, 0.5))

    def dies_halfway(obj, path) -> None:
        Path(path).write_bytes(b"PK\x03\x04half")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        folder.save_checkpoint(2, state(2.0), 0.2)
    assert load_checkpoint(tmp_path / "run/checkpoints/last.pt")["round"] == 1
    assert not list((tmp_path / "run/checkpoints").glob(".*.tmp"))


@pytest.mark.parametrize(
    "text, why",
    [
        ('{"rounds": [{"round": 0, "heldout": {', "not valid JSON"),
        ("\xff\xfe garbage", "not valid JSON"),
        ('[1, 2]', "JSON list"),
        ('{"rounds": {"0": {}}}', "'rounds' must be a list"),
        ('{"rounds": [{"round": 0}]}', "no 'heldout' metrics"),
        ('{"rounds": [{"round": 0, "heldout": {}}, {"round": 0, "heldout": {}}]}', "round number of its own"),
    ],
)
def test_damaged_metrics_json_names_the_file_and_the_fix(tmp_path, text, why) -> None:
    run_with_rounds(tmp_path / "run", 1)
    (tmp_path / "run/metrics.json").write_bytes(text.encode("latin-1"))
    with pytest.raises(RunFolderError, match=r"metrics\.json is damaged") as raised:
        RunFolder(tmp_path / "run", compose())
    assert why in str(raised.value) and "federation.run_name" in str(raised.value)


def test_run_folder_is_readable_by_its_owner_only(tmp_path) -> None:
    old = os.umask(0o022)  # the usual umask, which leaves files readable by everyone
    try:
        folder = run_with_rounds(tmp_path / "runs/run", 2)
        folder.finalize()
        write_report(folder.root)
    finally:
        os.umask(old)
    made = [p for p in (tmp_path / "runs").rglob("*")]
    assert {p.name for p in made} >= {"metrics.json", "config.yaml", "report.html", "best.pt", "heldout_dice.png"}
    modes = {p.relative_to(tmp_path).as_posix(): oct(stat.S_IMODE(p.stat().st_mode)) for p in [tmp_path / "runs", *made]}
    assert modes == {k: oct(0o700 if (tmp_path / k).is_dir() else 0o600) for k in modes}


def test_evaluate_command_on_a_damaged_checkpoint_exits_with_the_message(tmp_path) -> None:
    run_with_rounds(tmp_path / "run", 1)
    _truncated(tmp_path / "run/checkpoints/best.pt")
    with pytest.raises(SystemExit, match=r"error: .*best\.pt cannot be read as a checkpoint: .*truncated"):
        main(["evaluate", str(tmp_path / "site"), "--model", str(tmp_path / "run/checkpoints/best.pt")])
