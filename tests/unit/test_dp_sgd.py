"""Site-level DP-SGD (client.dp_sgd, train.dp_sgd): per-case clipping bounds the update, epsilon
accumulates over a run's messages from the site's state folder, a new run starts at zero, the
budget refuses a message, and the config rejects what has no private form."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from opacus.accountants import RDPAccountant

from client.dp_sgd import (
    ACCOUNTANT_FILE,
    PrivacyBudgetError,
    SiteAccountant,
    case_of,
    load_accountant,
    per_sample_gradients,
    poisson_sample_rate,
)
from client.session import SiteSession
from client.state import RoundTag
from client.training import LocalTrainer
from common.config import ConfigError, compose
from common.data.dataset import make_loader
from common.model import build_model
from common.runtime import configure_runtime

TINY = ["+experiment=tiny", "train.threads=1", "data.size=16", "model.survival_head=false",
        "federation.min_metric_cases=1"]
DP_SGD = ["train.dp_sgd=true", "train.dp_sgd_noise_multiplier=1.0", "train.dp_sgd_max_grad_norm=1.0",
          "train.seg_dice_batch=false"]


def update_norm(site_dir: Path, tmp_path: Path, privacy: SiteAccountant | None, *overrides: str) -> float:
    """L2 norm of the weight change of one plain-SGD step (lr 1 for every parameter: the classifier
    too, train.head_lr_scale=1; no momentum history, no weight decay) over every training case of
    the site (batch_size 8 > the site's 4 training cases, so that a Poisson batch holds every case
    with probability 1)."""
    cfg = compose([*TINY, "train.optimizer=sgd", "train.weight_decay=0", "train.lr=1.0", "train.max_steps=1",
                   "train.grad_clip=0", "train.head_lr_scale=1", "data.batch_size=8", *overrides])
    session = SiteSession.open({"data-path": str(site_dir), "state-path": str(tmp_path / "state")}, cfg)
    model = build_model(cfg.model, cfg.data.size, seed=0)
    before = [p.detach().clone() for p in model.parameters()]
    loader = make_loader(session.train_cases, cfg.data, train=True, seed=0)
    configure_runtime(cfg, torch.device("cpu"))  # train.threads=1, as a site's session does
    trainer = LocalTrainer(model, cfg, torch.device("cpu"), loader.dataset.label_matrix())
    trainer.run(loader, epochs=1, lr=1.0, privacy=privacy)
    return float(torch.sqrt(sum(((p.detach() - b) ** 2).sum() for p, b in zip(model.parameters(), before))))


def test_each_case_clipped_bounds_the_update_where_plain_sgd_is_unbounded(site_dir: Path, tmp_path: Path) -> None:
    # Prepare: no noise, a clipping norm far below the cases' gradient norms
    norm = 1e-3
    privacy = SiteAccountant(RDPAccountant(), noise_multiplier=0.0, max_grad_norm=norm, delta=1e-5)

    # Execute
    private = update_norm(site_dir, tmp_path, privacy)
    plain = update_norm(site_dir, tmp_path, None)

    # Assert: the mean of per-case gradients of norm <= C has norm <= C; without DP the step is far larger
    assert 0.0 < private <= norm * (1 + 1e-4)
    assert plain > 100 * norm
    assert privacy.steps == 1  # the step was counted


def test_each_row_is_the_gradient_of_that_case_alone_also_from_two_copies(site_dir: Path) -> None:
    # Prepare: a batch of two different cases; eval mode, so that dropout draws do not differ
    cfg = compose(TINY)
    session = SiteSession.open({"data-path": str(site_dir)}, cfg)
    loader = make_loader(session.train_cases, cfg.data, train=False)
    batch = next(iter(loader))
    model = build_model(cfg.model, cfg.data.size, seed=0).eval()
    configure_runtime(cfg, torch.device("cpu"))
    trainer = LocalTrainer(model, cfg, torch.device("cpu"), loader.dataset.label_matrix())
    params = [p for p in model.parameters() if p.requires_grad]

    def loss_of(b: dict) -> torch.Tensor:
        return trainer.loss_fn(model(b["image"], b["available"], b.get("spacing")), b, model.task_weighting).total

    # Execute
    per_sample_gradients(params, batch, loss_of, copies=2)

    # Assert: row i = the gradient of the loss of case i as a batch of one; the two rows differ
    for i in range(2):
        alone = torch.autograd.grad(loss_of(case_of(batch, i)), params, allow_unused=True)
        for p, g in zip(params, alone):
            torch.testing.assert_close(p.grad_sample[i], torch.zeros_like(p) if g is None else g, atol=1e-5, rtol=1e-3)
    assert any(not torch.allclose(p.grad_sample[0], p.grad_sample[1]) for p in params)


def train_message(site_dir: Path, state: Path, run_name: str, global_round: int, *overrides: str) -> dict[str, float]:
    cfg = compose([*TINY, *DP_SGD, f"federation.run_name={run_name}", *overrides])
    session = SiteSession.open({"data-path": str(site_dir), "state-path": str(state)}, cfg)
    return session.train(build_model(cfg.model, cfg.data.size, seed=0), {"global-round": global_round})


def test_epsilon_accumulates_across_messages_and_restarts_for_a_new_run(site_dir: Path, tmp_path: Path) -> None:
    # Prepare
    state = tmp_path / "state"

    # Execute: two messages of run "a" (each a fresh session, as each Flower message is a new process),
    # round 2 retried, then run "b", then run "a" anew (a new run under the same name restarts at round 1)
    first = train_message(site_dir, state, "a", 1)
    second = train_message(site_dir, state, "a", 2)
    retried = train_message(site_dir, state, "a", 2)
    other = train_message(site_dir, state, "b", 1)
    again = train_message(site_dir, state, "a", 1)

    # Assert: the second message continued the saved accountant: epsilon of both messages' steps together
    steps = first["dp_sgd_steps"]
    assert steps == first["steps"] > 0 and second["dp_sgd_steps"] == 2 * steps
    rate = poisson_sample_rate(int(first["n_train"]), 2)
    expected = RDPAccountant()
    expected.history = [(1.0, rate, int(2 * steps))]
    assert 0.0 < first["dp_sgd_epsilon"] < second["dp_sgd_epsilon"] == pytest.approx(expected.get_epsilon(1e-5))
    assert retried["dp_sgd_steps"] == 3 * steps  # a retried round is counted on top, never from zero
    for fresh in (other, again):
        assert fresh["dp_sgd_epsilon"] == pytest.approx(first["dp_sgd_epsilon"]) and fresh["dp_sgd_steps"] == steps
    assert "loss" not in first  # the training losses are not covered by the noise: not sent
    assert (state / ACCOUNTANT_FILE).exists()


def test_budget_refuses_the_message_that_would_exceed_it(site_dir: Path, tmp_path: Path) -> None:
    # Prepare: a budget between one message's epsilon and two messages'
    state = tmp_path / "state"
    first = train_message(site_dir, state, "a", 1)
    budget = first["dp_sgd_epsilon"] * 1.05

    # Execute / Assert
    with pytest.raises(PrivacyBudgetError, match="train.dp_sgd_epsilon_budget"):
        train_message(site_dir, state, "a", 2, f"train.dp_sgd_epsilon_budget={budget}")
    assert load_accountant(state, RoundTag("a", 2)).history == [(1.0, poisson_sample_rate(int(first["n_train"]), 2),
                                                     int(first["steps"]))]  # nothing spent by the refusal


def test_a_damaged_accountant_file_is_an_error_naming_it(tmp_path: Path) -> None:
    (tmp_path / ACCOUNTANT_FILE).write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match=f"{ACCOUNTANT_FILE}.*Delete the file"):
        load_accountant(tmp_path, RoundTag("a", 2))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.dp_sgd_noise_multiplier=0", "dp_sgd_noise_multiplier=0.0 must be > 0"),
        ("train.dp_sgd_max_grad_norm=-1", "dp_sgd_max_grad_norm=-1.0 must be > 0"),
        ("train.dp_sgd_delta=1", "dp_sgd_delta=1.0 must be in"),
        ("model.survival_head=true", "model.survival_head=false"),
        ("ssl.enabled=true", "ssl.enabled=false"),
        ("imputation.pretrain_rounds=1", "imputation.pretrain_rounds=0"),
        ("train.seg_dice_batch=true", "train.seg_dice_batch=false"),
    ],
)
def test_config_rejects_what_dp_sgd_cannot_cover(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        compose([*TINY, *DP_SGD, override])
