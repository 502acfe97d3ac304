"""How far did a run's classifier move from its start, and what do its predicted segmentations hold?

For a run folder: per classifier output layer (each head's last layer, the descriptor paths), the
norm of its start (``round-000.pt``) and how far the final checkpoint moved from it; then, on the
held-out center, the AUC of the network's own calibrated probabilities against a logistic
regression on five features of the same network's predicted segmentation (bench-cls's ``lr-pred``
features, fit on the training sites' known labels). A head whose layers barely moved ranks the
cases as its random start does (issue #12: the demo's inverted IDH head).

    python tests/benchmarks/probe_heads.py runs/demo data/demo-cohort
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests/benchmarks"))

import bench_cls  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="run folder with checkpoints/round-000.pt and metrics.json")
    parser.add_argument("cohort", type=Path, help="the cohort it trained on (with ground_truth.csv)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    import torch
    from sklearn.metrics import roc_auc_score

    from common.contract import TASKS
    from common.data.site import load_site

    start = torch.load(args.run / "checkpoints/round-000.pt", weights_only=True)["state_dict"]
    final = torch.load(args.run / "checkpoints/last.pt", weights_only=True)["state_dict"]
    for task in TASKS:
        for layer in (f"classifier.direct.{task}.weight", f"classifier.heads.{task}.2.weight"):
            if layer in start:
                w0, w1 = start[layer].float(), final[layer].float()
                print(f"{layer}: start norm {float(w0.norm()):.3f}, moved {float((w1 - w0).norm()):.3f}")

    outputs = bench_cls.network_outputs(args.run, args.cohort.resolve(), argparse.Namespace(threads=args.threads))
    _, truth, _ = bench_cls.ground_truth(args.cohort.resolve())
    y = np.stack([truth[c.case_id] for c in load_site(args.cohort / "heldout").cases])
    print(f"held-out center, best.pt (round {outputs['best_round']}), {len(y)} cases:")
    for i, task in enumerate(TASKS):
        known = outputs["train_labels"][:, i] >= 0
        p = bench_cls.regression(outputs["train_feats"][known], outputs["train_labels"][known, i], outputs["heldout_feats"])
        print(f"  {task}: network AUC {roc_auc_score(y[:, i], outputs['probs'][task]):.3f}, "
              f"regression on its predicted segmentation {roc_auc_score(y[:, i], p):.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
