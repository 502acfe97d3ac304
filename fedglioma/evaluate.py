"""``fedglioma evaluate --model CKPT SITE_DIR``: score a saved model on a site folder."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("site", type=Path, help="site folder to score on (e.g. DATA/heldout)")
    parser.add_argument("--model", type=Path, required=True, help="checkpoint (runs/<name>/checkpoints/best.pt)")
    parser.add_argument("--out", type=Path, help="write the metrics as JSON here (default: next to the run folder)")
    parser.add_argument("--mc-passes", type=int, default=0, help="MC-dropout passes (0 = deterministic)")
    parser.add_argument("--device", default="auto")


def run(args: argparse.Namespace) -> int:
    # Heavy (torch, flwr): imported when the command runs, so that `fedglioma --help` stays fast.
    from common.config import DataConfig
    from common.data.dataset import make_loader
    from common.data.site import load_site
    from common.evaluation.calibration import Calibration
    from common.evaluation.loop import evaluate
    from common.io import atomic_write, json_safe
    from common.model.checkpoint import CheckpointError, load_model
    from common.runtime import select_device

    try:
        model, payload = load_model(args.model)
    except (CheckpointError, FileNotFoundError) as exc:
        raise SystemExit(f"error: {exc}") from None  # the message names the file and the fix
    index = load_site(args.site)
    for rejection in index.rejected:
        print(f"skipped {rejection.case_id}: {rejection.reason}")
    loader = make_loader(index.cases, DataConfig(size=int(payload["size"]), cache=False), train=False)
    device = select_device(args.device)
    # the temperature and thresholds fit on the sites' validation when this checkpoint was chosen
    calibration = Calibration.from_dict(payload.get("calibration"))
    metrics = evaluate(model, loader, device, mc_passes=args.mc_passes, progress=True, calibration=calibration)
    width = max(len(k) for k in metrics)
    for key, value in metrics.items():
        print(f"{key:<{width}}  {value:.4f}")
    out = args.out or args.model.resolve().parent.parent / f"evaluate-{args.site.resolve().name}.json"
    text = json.dumps({"model": str(args.model), "site": str(args.site), "round": payload.get("round"),
                       "metrics": json_safe(metrics)}, indent=1)
    atomic_write(out, lambda tmp: tmp.write_text(text))  # owner-only, like the run folder
    print(f"wrote {out}")
    return 0
