"""A site's local state between rounds: the optimizer state (train.keep_optimizer_state)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from client.state import OPTIMIZER_FILE, RoundTag, load_optimizer_state, save_optimizer_state
from client.training import LocalTrainer
from common.config import compose, replace
from common.model import build_model


def batches(n: int = 2) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [{"image": torch.randn(2, 4, 32, 32, 32, generator=g), "available": torch.ones(2, 4, dtype=torch.bool),
             "seg": torch.randint(0, 4, (2, 1, 32, 32, 32), generator=g), "has_seg": torch.ones(2, dtype=torch.bool),
             "labels": torch.tensor([[0, 1, 0, 1], [1, 0, 1, 0]]), "spacing": torch.ones(2, 3)} for _ in range(n)]


def test_optimizer_state_carries_over_to_the_next_round_of_the_same_run_only(tmp_path: Path) -> None:
    cfg = replace(compose(["train.threads=1"]), train={"progress": False, "amp": False})
    model = build_model(cfg.model, cfg.data.size, seed=0)
    trainer = LocalTrainer(model, cfg, torch.device("cpu"), batches()[0]["labels"].numpy())
    first = trainer.run(batches(), epochs=1)
    assert first.metrics["optimizer_state_restored"] == 0.0
    save_optimizer_state(first.optimizer_state, tmp_path, RoundTag("run", 1))

    state = load_optimizer_state(tmp_path, RoundTag("run", 2))
    assert state is not None
    second = trainer.run(batches(), epochs=1, optimizer_state=state, lr=5e-4)
    assert second.metrics["optimizer_state_restored"] == 1.0
    steps = [s["step"] for s in second.optimizer_state["state"].values()]
    assert all(float(s) == 4.0 for s in steps)  # 2 steps per round, continued across rounds
    assert all(g["lr"] == 5e-4 for g in second.optimizer_state["param_groups"])  # this round's lr

    assert load_optimizer_state(tmp_path, RoundTag("other-run", 2)) is None  # another run
    assert load_optimizer_state(tmp_path, RoundTag("run", 1)) is None  # not an earlier round


def test_a_damaged_optimizer_state_is_an_error_naming_the_file(tmp_path: Path) -> None:
    (tmp_path / OPTIMIZER_FILE).write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="optimizer.pt.*Delete the file"):
        load_optimizer_state(tmp_path, RoundTag("run", 2))


def test_a_kept_validation_goes_with_the_next_reply_of_the_same_model_only(tmp_path: Path) -> None:
    """federation.site_validation=after_reply: what the worker keeps (floats, NaN and the cal_*
    lists) comes back once, for the model it validated; kept metrics of another model or run are
    removed, never sent; a damaged file is an error naming it."""
    import math

    from client.state import PENDING_VALIDATION_FILE, save_pending_validation, take_pending_validation

    metrics = {"dice_wt": 0.8, "auc_idh": float("nan"), "cal_idh_logit": [0.5, -1.25], "global-round": 3.0}
    save_pending_validation(tmp_path, RoundTag("demo", 3), metrics)
    assert (tmp_path / PENDING_VALIDATION_FILE).stat().st_mode & 0o077 == 0
    taken = take_pending_validation(tmp_path, RoundTag("demo", 3))
    assert taken is not None and taken["dice_wt"] == 0.8 and math.isnan(taken["auc_idh"])
    assert taken["cal_idh_logit"] == [0.5, -1.25]
    assert take_pending_validation(tmp_path, RoundTag("demo", 3)) is None  # sent once
    for other in (RoundTag("demo", 4), RoundTag("other-run", 3)):
        save_pending_validation(tmp_path, RoundTag("demo", 3), metrics)
        assert take_pending_validation(tmp_path, other) is None
        assert not (tmp_path / PENDING_VALIDATION_FILE).exists()
    (tmp_path / PENDING_VALIDATION_FILE).write_text("{not json")
    with pytest.raises(ValueError, match=PENDING_VALIDATION_FILE):
        take_pending_validation(tmp_path, RoundTag("demo", 3))
