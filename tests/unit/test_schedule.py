from __future__ import annotations

from common.config import compose
from server.schedule import RoundSchedule


def test_stages_follow_pretraining_then_warmup_then_pseudo_labels() -> None:
    cfg = compose(["model.imputation=true", "imputation.pretrain_rounds=2", "ssl.enabled=true", "ssl.warmup_rounds=1"])
    schedule = RoundSchedule(cfg)
    stages = [schedule.train_config(r)["stage"] for r in range(1, 6)]
    pseudo = [schedule.train_config(r)["pseudo-label"] for r in range(1, 6)]
    assert stages == ["pretrain_imputer"] * 2 + ["supervised"] * 3
    assert pseudo == [False, False, False, True, True]
    assert schedule.train_config(3)["freeze-imputer"] is True
    assert schedule.train_config(1)["local-epochs"] == cfg.imputation.pretrain_epochs


def test_resume_offset_numbers_rounds_globally() -> None:
    cfg = compose(["model.imputation=true", "imputation.pretrain_rounds=2"])
    resumed = RoundSchedule(cfg, offset=2)
    assert resumed.global_round(1) == 3
    assert resumed.train_config(1)["stage"] == "supervised"


def test_without_imputer_there_is_no_pretraining_stage() -> None:
    cfg = compose(["imputation.pretrain_rounds=3"])
    assert RoundSchedule(cfg).train_config(1)["stage"] == "supervised"


def test_rounds_that_select_pseudo_labels_are_named_so() -> None:
    cfg = compose(["model.imputation=true", "imputation.pretrain_rounds=1", "ssl.enabled=true", "ssl.warmup_rounds=2"])
    schedule = RoundSchedule(cfg)
    assert [schedule.stage_name(r) for r in range(0, 6)] == [
        "initial", "pretrain_imputer", "supervised", "supervised", "pseudo_label", "pseudo_label"]
