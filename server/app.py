"""The ServerApp: configure, initialise or resume, run the strategy, score every global model on
the held-out center, keep the run folder (metrics.json, checkpoints, report) up to date."""

from __future__ import annotations

import math
import time
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.supercore import log

from common.arrays import copy_arrays
from common.config import ExperimentConfig, from_run_config, replace
from common.evaluation.calibration import Calibration, fit_calibration
from common.evaluation.metrics import selection_score
from common.model import build_model
from common.model.checkpoint import load_weights
from common.wire import load_packed, pack_state
from server.heldout import HeldoutEvaluator
from server.report import write_report
from server.run_folder import RunFolder
from server.schedule import RoundSchedule
from server.strategy import FederationError, build_privacy, build_strategy
from server.strategy.secure import start_secure

app = ServerApp()
IDENTITIES_FILE = "sites.json"  # site names bound to node ids (server.strategy.identity)
PRIVACY_FILE = "privacy.json"  # the DP accountant's state (server.strategy.privacy)


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_federation(grid, from_run_config(context.run_config))


def run_federation(grid: Grid, cfg: ExperimentConfig) -> dict[str, Any]:
    """Run (or resume) the configured federation on ``grid``; returns metrics.json's ``final``."""
    # The ServerApp runs in the SuperLink's working directory: only absolute paths are safe.
    out_dir = Path(cfg.federation.out_dir)
    if not out_dir.is_absolute():
        raise ValueError(
            f"federation.out_dir={cfg.federation.out_dir!r} must be an absolute path: the ServerApp "
            "runs in the SuperLink's working directory (fedglioma demo sets it for you)"
        )
    heldout = HeldoutEvaluator(cfg.federation.heldout, cfg)
    folder = RunFolder(out_dir / cfg.federation.run_name, cfg, resume=cfg.federation.resume)
    model = build_model(cfg.model, cfg.data.size, seed=cfg.train.seed)  # reproducible round 0
    state = folder.resume_state()
    offset = 0
    if state is not None:
        load_weights(model, state.state_dict, state.source)  # CheckpointError naming the file if it does not fit
        offset = state.next_round - 1
        log(INFO, "resuming %s after round %d", folder.root, offset)
    remaining = cfg.federation.rounds - offset
    identities = folder.root / IDENTITIES_FILE
    privacy_state = folder.root / PRIVACY_FILE
    if state is None:
        identities.unlink(missing_ok=True)  # a new run binds names afresh; a resumed one keeps them
        privacy_state.unlink(missing_ok=True)  # ...and accounts afresh; a resumed one continues
    privacy = build_privacy(cfg.federation, privacy_state)
    # the rounds the privacy budget allows; its last one is the run's last (validated by the sites)
    allowed, budget_stop = privacy.plan(offset + 1, remaining) if privacy is not None else (remaining, None)
    if budget_stop is not None:
        if offset == 0 and allowed == 0:
            raise FederationError(f"{budget_stop} Not even one round fits: raise federation.dp_epsilon_budget or "
                                  "federation.dp_noise_multiplier.")
        log(WARNING, "%s", budget_stop)
        remaining = allowed
    schedule = RoundSchedule(replace(cfg, federation={"rounds": offset + remaining}) if budget_stop else cfg, offset=offset)
    strategy = build_strategy(cfg.federation, schedule=schedule, identities=identities, privacy=privacy)

    latest = {"calibration": Calibration()}  # the latest fit, for models the sites do not validate
    # global models waiting for their sites' validation in later replies ({global round: model})
    pending: dict[int, dict[str, Any]] = {}

    def complete(global_round: int, arrays: ArrayRecord, round_log: dict[str, Any], sites: dict[str, Any]) -> dict[str, float]:
        """Score and record the global model of ``global_round`` once its site validation is in."""
        load_packed(model, arrays)
        # Calibration and model selection come from the sites' validation of this global model;
        # the held-out center only receives the calibration and is scored, it chooses nothing.
        calibration = fit_calibration(sites.values()) if sites else latest["calibration"]
        latest["calibration"] = calibration
        score = selection_score(sites)
        started = time.monotonic()
        metrics = heldout.evaluate(model, calibration)
        round_log["seconds"]["heldout"] = time.monotonic() - started
        folder.record_round(
            global_round,
            heldout=metrics,
            sites=sites,
            train=round_log["train"],
            extra={
                "stage": schedule.stage_name(global_round),
                "rejected": round_log["rejected"],
                "failures": round_log["failures"],
                "validation_failures": round_log.get("validation_failures", {}),
                "bounded": round_log["bounded"],
                "skipped": round_log["skipped"],
                "quorum": round_log["quorum"],
                "seconds": round_log["seconds"],
                "bytes": round_log["bytes"],
                "calibration": calibration.as_metrics(),
                "selection_score": score,
                **{key: round_log[key] for key in ("privacy", "secure_aggregation") if key in round_log},
            },
        )
        folder.save_checkpoint(global_round, model.state_dict(), score, calibration.to_dict())
        write_report(folder.root)
        log(INFO, "round %d held-out: %s", global_round, _brief(metrics))
        return metrics

    def on_validation(by_round: dict[int, dict[str, Any]], upto: int) -> None:
        """Replies brought the sites' validation of the pending global models in ``by_round``; those
        up to round ``upto`` have all theirs now (validation_lag) and are recorded, in order."""
        for global_round, sites in by_round.items():
            if global_round in pending:
                pending[global_round]["sites"].update(sites)
            else:  # e.g. a site's kept validation from before a restart: that model is recorded already
                log(WARNING, "validation of global model %d from %s arrived when no such model was waiting; "
                    "ignored", global_round, ", ".join(sorted(sites)))
        flush(upto)

    def flush(upto: int) -> None:
        """Record the pending models, in order, up to the first one after ``upto`` that still
        waits for validation (a model no site validates waits only for those before it)."""
        for global_round in sorted(pending):
            if global_round > upto and pending[global_round]["awaits"]:
                break
            entry = pending.pop(global_round)
            complete(global_round, entry["arrays"], entry["round_log"], entry["sites"])

    strategy.on_validation = on_validation

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        global_round = schedule.global_round(server_round)
        if server_round == 0 and offset > 0:
            return None  # round `offset` was scored before the restart
        round_log = strategy.pop_round()
        awaits = schedule.validated_in_train(global_round) and strategy.stop_reason is None
        if awaits or pending:
            # recorded when later training replies bring the sites' validation, or, for a model the
            # sites do not validate (validate_every), after the models before it (rounds in order).
            # A copy: with after_reply a model waits two rounds while the strategy goes on from it.
            pending[global_round] = {"arrays": copy_arrays(arrays), "round_log": round_log,
                                     "sites": {} if awaits else round_log["sites"], "awaits": awaits}
            if strategy.stop_reason is None:
                flush(-1)
                return None
            flush(global_round)  # the run stops: record what there is, then say why
            raise FederationError(strategy.stop_reason)
        metrics = complete(global_round, arrays, round_log, round_log["sites"])
        if strategy.stop_reason is not None:
            raise FederationError(strategy.stop_reason)  # after the round was recorded
        # scalars only: km_risk_groups (the Kaplan-Meier curves) goes to metrics.json, not to Flower
        return MetricRecord({k: float(v) for k, v in metrics.items() if isinstance(v, float) and math.isfinite(v)})

    if remaining > 0:
        run = dict(grid=grid, initial_arrays=pack_state(model.state_dict()), num_rounds=remaining,
                   timeout=cfg.federation.round_timeout_s, evaluate_fn=evaluate_fn)
        try:
            if cfg.federation.secure_aggregation == "secaggplus":
                start_secure(strategy, cfg.federation, **run)  # Flower's SecAgg+ workflow (legacy path)
            else:
                strategy.start(**run, train_config=ConfigRecord({}), evaluate_config=ConfigRecord({}))
        finally:
            if pending:  # the run stopped before the sites validated these: keep them
                flush(max(pending))
    elif budget_stop is not None:
        log(WARNING, "%s: the privacy budget is spent; nothing to train", folder.root)
    else:
        log(INFO, "%s already has all %d rounds; nothing to train", folder.root, cfg.federation.rounds)
    extra: dict[str, Any] = {"heldout_cases": heldout.n_cases, "mode": "federated"}
    if privacy is not None:
        extra["privacy"] = {**privacy.record(), **({"stopped": budget_stop} if budget_stop else {})}
    if cfg.federation.secure_aggregation != "off":
        extra["secure_aggregation"] = {
            "protocol": cfg.federation.secure_aggregation,
            "note": "the server saw only the sum of the sites' updates; per-site update screening "
                    "(bounds, clipping, weight caps) and per-head averaging did not apply",
        }
    final = folder.finalize(extra=extra)
    if budget_stop is not None:
        log(WARNING, "%s", budget_stop)
    write_report(folder.root)
    return final


def _brief(metrics: dict[str, float]) -> str:
    keys = ("dice_wt", "dice_tc", "dice_et", "auc_idh", "auc_1p19q", "auc_grade", "auc_mgmt")
    return " ".join(f"{k}={metrics[k]:.3f}" for k in keys if k in metrics)
