"""``fedglioma train``: the non-federated reference points a federation is compared with.

* ``--mode centralized``: all training sites' training splits pooled in one place (the upper
  reference: what the federation would reach if the data could be shared);
* ``--mode local --site NAME``: one site alone (what a hospital gets without the federation).

Both use the federation's budget: ``federation.rounds`` rounds of ``train.local_epochs`` epochs,
scored on the held-out center after every round, written to the same run folder layout.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

HELDOUT_DIRNAME = "heldout"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data", type=Path, help="cohort folder holding one folder per site (and heldout/)")
    parser.add_argument("--mode", choices=("centralized", "local"), required=True)
    parser.add_argument("--site", help="site folder name for --mode local")
    parser.add_argument("--heldout", type=Path, help="held-out center folder (default: DATA/heldout)")
    parser.add_argument("--out", type=Path, default=Path("runs"), help="parent folder of run folders (default: runs)")
    parser.add_argument("--name", help="run folder name (default: centralized / local-<site>)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. +experiment=demo federation.rounds=4")


def training_sites(data: Path, heldout: Path) -> list[Path]:
    """Every site folder under ``data`` (it has a labels.csv), except the held-out center."""
    if not data.is_dir():
        raise FileNotFoundError(f"{data} is not a folder; create a cohort with `fedglioma synth {data}`")
    sites = sorted(p for p in data.iterdir() if (p / "labels.csv").exists() and p.resolve() != heldout.resolve())
    if not sites:
        raise FileNotFoundError(f"no site folder (with a labels.csv) under {data}")
    return sites


def run_baseline(
    data: Path,
    mode: str,
    *,
    site: str | None = None,
    heldout: Path | None = None,
    out: Path = Path("runs"),
    name: str | None = None,
    overrides: list[str] | None = None,
    device: str = "auto",
) -> dict[str, Any]:
    """Train a baseline; returns metrics.json's ``final``."""
    # Heavy (torch, flwr): imported when the command runs, so that `fedglioma --help` stays fast.
    from client.dp_sgd import SiteAccountant
    from client.state import RoundTag
    from client.training import LocalTrainer
    from common.config import compose, replace
    from common.data.dataset import make_loader
    from common.data.site import load_site, split_cases
    from common.evaluation.calibration import fit_calibration
    from common.evaluation.loop import evaluate
    from common.evaluation.metrics import selection_score
    from common.model import build_model
    from common.model.checkpoint import load_weights
    from common.runtime import configure_runtime, select_device
    from server.report import write_report
    from server.run_folder import RunFolder

    heldout = (heldout or data / HELDOUT_DIRNAME).expanduser()
    sites = training_sites(data, heldout)
    if mode == "local":
        chosen = [p for p in sites if p.name == site]
        if not chosen:
            raise SystemExit(f"--mode local needs --site NAME, one of: {', '.join(p.name for p in sites)}")
        sites = chosen
    run_name = name or ("centralized" if mode == "centralized" else f"local-{site}")
    cfg = compose(list(overrides or []))
    cfg = replace(cfg, federation={"run_name": run_name, "out_dir": str(out.expanduser().resolve())})
    dev = select_device(device)
    configure_runtime(cfg, dev)

    train_cases, val_by_site = [], {}
    for path in sites:
        index = load_site(path)
        tr, va = split_cases(index.cases, cfg.data.val_fraction, cfg.data.split_seed)
        train_cases += tr
        val_by_site[path.name] = make_loader(va, cfg.data, train=False)
    heldout_loader = make_loader(load_site(heldout).cases, cfg.data, train=False)
    train_loader = make_loader(train_cases, cfg.data, train=True)

    folder = RunFolder(Path(cfg.federation.out_dir) / run_name, cfg, resume=cfg.federation.resume)
    model = build_model(cfg.model, cfg.data.size)
    state = folder.resume_state()
    start = 1
    if state is not None:
        load_weights(model, state.state_dict, state.source)  # CheckpointError naming the file
        start = state.next_round
    trainer = LocalTrainer(model, cfg, dev, train_loader.dataset.label_matrix())
    train_key = "pooled" if mode == "centralized" else sites[0].name

    def score(round_: int, train_metrics: dict[str, float] | None, stage: str) -> None:
        # As in the federation: calibration and best.pt from the sites' validation splits only.
        site_metrics = {s: evaluate(model, loader, dev, calibration_stats=True) for s, loader in val_by_site.items()}
        calibration = fit_calibration(site_metrics.values())
        selection = selection_score(site_metrics)
        heldout_metrics = evaluate(model, heldout_loader, dev, progress=cfg.train.progress, desc="held-out",
                                   calibration=calibration, survival_curves=True)
        folder.record_round(
            round_, heldout=heldout_metrics, sites=site_metrics,
            train={train_key: train_metrics} if train_metrics else {},
            extra={"stage": stage, "calibration": calibration.as_metrics(), "selection_score": selection},
        )
        folder.save_checkpoint(round_, model.state_dict(), selection, calibration.to_dict())
        print(f"round {round_}: held-out dice_wt={heldout_metrics['dice_wt']:.3f} "
              f"auc_idh={heldout_metrics['auc_idh']:.3f}", flush=True)

    if start == 1:
        score(0, None, "initial")
    for round_ in range(start, cfg.federation.rounds + 1):
        # train.dp_sgd: DP-SGD over the pooled (or the one site's) cases; the accountant lives in the
        # run folder, so that a resumed baseline continues its epsilon
        tag = RoundTag(run_name, round_)
        privacy = SiteAccountant.for_round(folder.root, cfg.train, tag) if cfg.train.dp_sgd else None
        result = trainer.run(train_loader, stage="supervised", epochs=cfg.train.local_epochs, desc=f"round {round_}",
                             privacy=privacy)
        metrics = {**result.metrics, "n_train": float(len(train_cases)), "num-examples": float(len(train_cases))}
        if privacy is not None:
            metrics.update(privacy.save(folder.root, tag))
        score(round_, metrics, "supervised")
    final = folder.finalize(extra={"mode": mode, "sites": [p.name for p in sites]})
    report = write_report(folder.root)
    print(f"run folder: {folder.root}\nreport: {report}")
    return final


def run(args: argparse.Namespace) -> int:
    run_baseline(
        args.data, args.mode, site=args.site, heldout=args.heldout, out=args.out,
        name=args.name, overrides=args.overrides, device=args.device,
    )
    return 0
