"""How predictable are the synthetic cohort's molecular labels from tumor size and enhancement alone?

A cross-validated logistic regression (scikit-learn) on two ground-truth features of every case,
log tumor volume (WT, mL) and enhancing fraction (ET / tumor core), predicts each task; its AUC
should stay well below 1.0 (the generator aims at IDH AUC ~0.7-0.85), so that a model must use
the images (location, margins, T2-FLAIR mismatch, calcification, ...) to do better.

Run directly (not collected by pytest)::

    python tests/benchmarks/synth_separability.py                 # generates a 'bench' cohort in a temp folder
    python tests/benchmarks/synth_separability.py data/demo-cohort   # reads an existing cohort's ground_truth.csv
    python tests/benchmarks/synth_separability.py --cases-per-site 30 --heldout-cases 30   # quicker
"""

from __future__ import annotations

import argparse
import csv
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a script from anywhere: make `common` importable
    sys.path.insert(0, str(ROOT))

from common.contract import TASK_CLASSES, TASK_COLUMNS, TASKS  # noqa: E402
from synth import generate_cohort  # noqa: E402
from synth.cohort import GROUND_TRUTH_CSV  # noqa: E402

FEATURES = ("log_wt_volume_ml", "enhancing_fraction")


def load_ground_truth(cohort: Path) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Features (N, 2) and per-task binary targets (N,) from ``cohort/ground_truth.csv``."""
    path = cohort / GROUND_TRUTH_CSV
    if not path.is_file():
        raise SystemExit(f"{path} not found: pass a folder written by `fedglioma synth`")
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    x = np.array([[np.log1p(float(r["wt_volume_ml"])), float(r["enhancing_fraction"])] for r in rows])
    y = {t: np.array([TASK_CLASSES[t].index(r[TASK_COLUMNS[t]]) for r in rows]) for t in TASKS}
    return x, y


def cross_validated_auc(x: np.ndarray, y: np.ndarray, folds: int, seed: int) -> float:
    """Out-of-fold ROC AUC of a standardised logistic regression on ``x`` (N, F)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    folds = min(folds, int(np.bincount(y).min()))
    if folds < 2:
        return float("nan")  # one class (almost) absent: no AUC
    model = make_pipeline(StandardScaler(), LogisticRegression())
    cv = StratifiedKFold(folds, shuffle=True, random_state=seed)
    proba = cross_val_predict(model, x, y, cv=cv, method="predict_proba")[:, 1]
    return float(roc_auc_score(y, proba))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("cohort", nargs="?", type=Path, help="existing cohort folder (default: generate one)")
    parser.add_argument("--preset", default="bench", help="preset when generating (default bench)")
    parser.add_argument("--cases-per-site", type=int, help="override the preset when generating")
    parser.add_argument("--heldout-cases", type=int, help="override the preset when generating")
    parser.add_argument("--shape", type=int, help="override the preset when generating")
    parser.add_argument("--seed", type=int, default=0, help="cohort seed when generating (default 0)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--folds", type=int, default=5)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="synth-bench-") as tmp:
        cohort = args.cohort
        if cohort is None:
            cohort = Path(tmp) / "cohort"
            start = time.perf_counter()
            generate_cohort(cohort, args.preset, cases_per_site=args.cases_per_site,
                            heldout_cases=args.heldout_cases, shape=args.shape, seed=args.seed,
                            workers=args.workers)
            print(f"generated the '{args.preset}' cohort in {time.perf_counter() - start:.0f} s")
        x, targets = load_ground_truth(cohort)

    print(f"{len(x)} cases; cross-validated ({args.folds}-fold) logistic regression on "
          f"{' + '.join(FEATURES)}\n")
    print("| task  | positives | AUC both | AUC volume only | AUC enhancing fraction only |")
    print("|-------|-----------|----------|-----------------|-----------------------------|")
    for task in TASKS:
        y = targets[task]
        aucs = [cross_validated_auc(x[:, cols], y, args.folds, args.seed) for cols in ([0, 1], [0], [1])]
        print(f"| {task:<5} | {int(y.sum()):>4}/{len(y):<4} | {aucs[0]:8.3f} | {aucs[1]:15.3f} | {aucs[2]:27.3f} |")
    return 0


if __name__ == "__main__":  # the generator's process pool re-imports this module in its workers
    sys.exit(main())
