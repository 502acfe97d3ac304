"""The ServerApp: configure, initialise or resume, run the strategy, score every global model on
the held-out center, keep the run folder (metrics.json, checkpoints, report) up to date."""

from __future__ import annotations

import math
import time
from logging import INFO
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.supercore import log

from common.config import ExperimentConfig, from_run_config
from common.evaluation.calibration import fit_calibration
from common.evaluation.metrics import selection_score
from common.model import build_model
from common.model.checkpoint import load_weights
from common.wire import load_packed, pack_state
from server.heldout import HeldoutEvaluator
from server.report import write_report
from server.run_folder import RunFolder
from server.schedule import RoundSchedule
from server.strategy import FederationError, build_strategy

app = ServerApp()
IDENTITIES_FILE = "sites.json"  # site names bound to node ids (server.strategy.identity)


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
    schedule = RoundSchedule(cfg, offset=offset)
    identities = folder.root / IDENTITIES_FILE
    if state is None:
        identities.unlink(missing_ok=True)  # a new run binds names afresh; a resumed one keeps them
    strategy = build_strategy(cfg.federation, schedule=schedule, identities=identities)

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        global_round = schedule.global_round(server_round)
        if server_round == 0 and offset > 0:
            return None  # round `offset` was scored before the restart
        load_packed(model, arrays)
        round_log = strategy.pop_round()
        # Calibration and model selection come from the sites' validation of this global model;
        # the held-out center only receives the calibration and is scored, it chooses nothing.
        calibration = fit_calibration(round_log["sites"].values())
        score = selection_score(round_log["sites"])
        started = time.monotonic()
        metrics = heldout.evaluate(model, calibration)
        round_log["seconds"]["heldout"] = time.monotonic() - started
        folder.record_round(
            global_round,
            heldout=metrics,
            sites=round_log["sites"],
            train=round_log["train"],
            extra={
                "stage": "initial" if global_round == 0 else schedule.stage(global_round),
                "rejected": round_log["rejected"],
                "failures": round_log["failures"],
                "bounded": round_log["bounded"],
                "skipped": round_log["skipped"],
                "quorum": round_log["quorum"],
                "seconds": round_log["seconds"],
                "calibration": calibration.as_metrics(),
                "selection_score": score,
            },
        )
        folder.save_checkpoint(global_round, model.state_dict(), score, calibration.to_dict())
        write_report(folder.root)
        log(INFO, "round %d held-out: %s", global_round, _brief(metrics))
        if strategy.stop_reason is not None:
            raise FederationError(strategy.stop_reason)  # after the round was recorded
        return MetricRecord({k: float(v) for k, v in metrics.items() if math.isfinite(float(v))})

    if remaining > 0:
        strategy.start(
            grid=grid,
            initial_arrays=pack_state(model.state_dict()),
            num_rounds=remaining,
            timeout=cfg.federation.round_timeout_s,
            train_config=ConfigRecord({}),
            evaluate_config=ConfigRecord({}),
            evaluate_fn=evaluate_fn,
        )
    else:
        log(INFO, "%s already has all %d rounds; nothing to train", folder.root, cfg.federation.rounds)
    final = folder.finalize(extra={"heldout_cases": heldout.n_cases, "mode": "federated"})
    write_report(folder.root)
    return final


def _brief(metrics: dict[str, float]) -> str:
    keys = ("dice_wt", "dice_tc", "dice_et", "auc_idh", "auc_1p19q", "auc_grade", "auc_mgmt")
    return " ".join(f"{k}={metrics[k]:.3f}" for k in keys if k in metrics)
