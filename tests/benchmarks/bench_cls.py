"""Classification benchmark: do the molecular heads learn, measured on a held-out center of 200+ cases?

Arms, all scored on the same held-out cases (``bench-cls`` cohort: 4 training sites x 60 cases,
held-out center 200 cases):

* ``prior``            the training sites' class prior (a constant: AUC 0.5, balanced accuracy 0.5);
* ``lr-gt``            logistic regression on ground-truth tumor features (log WT/TC/ET volume,
                       enhancing fraction, necrosis; ``ground_truth.csv``, which only benchmarks
                       read), trained on the training sites' *known* labels;
* ``lr-pred``          the same regression on the same features measured from the federated
                       tumor-aware network's predicted segmentation;
* ``central-tumor``    the network trained on the pooled sites (same epochs);
* ``fed-tumor``        the network trained federated (FedAvg; per-head averaging) - the system;
* ``fed-global``       the same with whole-volume GAP+GMP pooling (the ablation);
* ``fed-clsonly``      a classification-only network of the same encoder (whole-volume pooling, no
                       segmentation loss): does multi-task beat single-task?
* ``fed-tumor-keepopt`` ``fed-tumor`` with each site's AdamW state kept between rounds
                       (``train.keep_optimizer_state``) instead of restarting every round;
* ``fed-tumor-12r``    ``fed-tumor`` with the same optimizer steps over twice the rounds (12 rounds
                       of 12 local steps instead of 6 of one epoch = 24 steps at 48 cases a site);
* ``fed-tumor-fedavgm``, ``-fedadam``, ``-fedyogi`` ``fed-tumor`` with Flower's server-side
                       optimizers (FedAvgM, FedAdam, FedYogi) in place of FedAvg;
* ``fed-tumor-headlr1`` ``fed-tumor`` with the classifier at the encoder's learning rate
                       (``train.head_lr_scale=1``; the default is 10);
* ``fed-tumor-randinit`` ``fed-tumor`` with the classifier's output layers at a random start
                       (``model.classifier_head_init=random``; the default is zero);
* ``fed-tumor-crop``     ``fed-tumor`` with GMMAS's tumor-protect crop (``model.tumor_crop_size=32``
                       on ``data.size=64``: the whole brain at 32^3, then the tumor at up to 64^3's
                       resolution, :mod:`common.model.tumor_crop`);
* ``fed-tumor-refregions``, ``central-tumor-refregions`` the classifier trained on the reference
                       segmentation's tumor regions (``train.cls_reference_regions``), the predicted
                       ones at validation and on the held-out center.

Every network run selects ``best.pt`` and fits its calibration on the sites' validation splits;
the held-out center is only scored. Per task: AUC, balanced accuracy, sensitivity, specificity and
ECE, the mean over the training seeds, with a 95% bootstrap CI of that mean (1000 resamples of the
held-out cases, paired across arms and seeds).

    python tests/benchmarks/bench_cls.py --seeds 0 1 2            # make bench-cls
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from common.contract import ET, NCR, TASK_CLASSES, TASK_COLUMNS, TASKS, UNKNOWN_LABEL  # noqa: E402

NETWORK_ARMS: dict[str, list[str]] = {
    "central-tumor": [],
    "fed-tumor": [],
    # the classifier at the encoder's learning rate (the default is 10x: a FedAvg round moves the
    # heads about as far as one site's local steps, a centralized epoch as far as all sites' together)
    "fed-tumor-headlr1": ["train.head_lr_scale=1"],
    # the classifier's output layers at PyTorch's random init instead of zero
    "fed-tumor-randinit": ["model.classifier_head_init=random"],
    "fed-global": ["model.classifier_pooling=global"],
    "fed-clsonly": ["model.classifier_pooling=global", "train.segmentation=false"],
    "fed-tumor-keepopt": ["train.keep_optimizer_state=true"],
    # the same optimizer steps as 6 rounds x 1 epoch (24 steps a site), averaged twice as often
    "fed-tumor-12r": ["federation.rounds=12", "train.max_steps=12"],
    # Flower's server-side optimizers on the averaged update, at their configured defaults
    # (federation.server_momentum / server_lr): issue #13 asks how they move the centralized gap
    "fed-tumor-fedavgm": ["federation.strategy=fedavgm"],
    "fed-tumor-fedadam": ["federation.strategy=fedadam"],
    "fed-tumor-fedyogi": ["federation.strategy=fedyogi"],
    # the segmentation's Dice per case, the default until a863aac (today's default is the batch Dice:
    # a case without enhancing tumor no longer loses its whole ET term to a few false voxels; README)
    "fed-tumor-casedice": ["train.seg_dice_batch=false"],
    # the heads trained on the reference segmentation's tumor regions (predicted ones at validation)
    "fed-tumor-refregions": ["train.cls_reference_regions=true"],
    "central-tumor-refregions": ["train.cls_reference_regions=true"],
    # GMMAS's tumor-protect crop: the data at 64^3, the network at 32^3 on the whole brain, then on a
    # cube around its (predicted; in training the reference) tumor cut from the 64^3 grid
    "fed-tumor-crop": ["data.size=64", "model.tumor_crop_size=32"],
}
ARMS = ("prior", "lr-gt", "lr-pred", *NETWORK_ARMS)
SCORES = ("auc", "bacc", "sen", "spe", "ece")
FEATURES = ("log_ml_wt", "log_ml_tc", "log_ml_et", "enhancing_fraction", "necrosis")


# ------------------------------------------------------------------------------------ training
def train_arm(arm: str, seed: int, cohort: Path, out: Path, args: argparse.Namespace) -> Path:
    """Train one network arm for one seed (skipped when its run folder is complete); returns it."""
    from common.config import compose
    from deploy.simulation import run_inprocess, site_nodes
    from fedglioma.baselines import run_baseline

    name = f"{arm}-s{seed}"
    run_dir = out / name
    if (run_dir / "metrics.json").exists() and json.loads((run_dir / "metrics.json").read_text()).get("final"):
        return run_dir
    common = [f"+experiment={args.experiment}", f"train.seed={seed}", f"train.threads={args.threads}",
              "train.progress=false", *args.overrides, *NETWORK_ARMS[arm]]
    started = time.perf_counter()
    if arm.startswith("central"):
        # the same budget: every training case seen rounds x local_epochs times
        run_baseline(cohort, "centralized", out=out, name=name, overrides=[
            *common, f"federation.rounds={args.rounds * args.local_epochs}", "train.local_epochs=1"])
    else:
        sites = sorted(p.name for p in cohort.iterdir() if (p / "labels.csv").exists() and p.name != "heldout")
        # the arm's own overrides come last, so an arm may change the number of rounds
        cfg = compose([*common, f"federation.rounds={args.rounds}", f"train.local_epochs={args.local_epochs}",
                       f"federation.heldout={cohort / 'heldout'}", f"federation.out_dir={out}",
                       f"federation.run_name={name}", f"federation.min_nodes={len(sites)}", *NETWORK_ARMS[arm]])
        run_inprocess(cfg, site_nodes(cohort, sites, state_root=out / f"{name}-state"))
    print(f"  {name}: trained in {time.perf_counter() - started:.0f} s", flush=True)
    return run_dir


def network_outputs(run_dir: Path, cohort: Path, args: argparse.Namespace) -> dict[str, object]:
    """best.pt (chosen on the sites' validation) applied to the held-out center and the training
    sites: per-case calibrated probabilities, thresholds and predicted-segmentation features."""
    import torch

    from common.config import DataConfig
    from common.data.dataset import make_loader
    from common.data.site import load_site
    from common.evaluation.calibration import Calibration
    from common.model.checkpoint import load_model

    history = json.loads((run_dir / "metrics.json").read_text())
    best = next(r for r in history["rounds"] if r["round"] == history["final"]["best_round"])
    cal = best.get("calibration") or {}
    calibration = Calibration(
        temperature={t: float(cal.get(f"temperature_{t}", 1.0)) for t in TASKS},
        logit_threshold={t: 0.0 for t in TASKS},
    )
    thresholds = {t: float(cal.get(f"threshold_{t}", 0.5)) for t in TASKS}
    model, payload = load_model(run_dir / "checkpoints/best.pt")
    torch.set_num_threads(args.threads)
    data = DataConfig(size=int(payload["size"]), batch_size=4, cache=False)

    def run(folder: Path) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
        cases = load_site(folder).cases
        probs: dict[str, list[float]] = {t: [] for t in TASKS}
        feats, labels = [], []
        with torch.no_grad():
            for batch in make_loader(cases, data, train=False):
                out = model(batch["image"], batch["available"], batch["spacing"])
                for t in TASKS:
                    z = (out.cls_logits[t][:, 1] - out.cls_logits[t][:, 0]).float().numpy()
                    probs[t] += calibration.probability(t, z).tolist()
                seg = out.seg_logits.argmax(1)
                ml = batch["spacing"].prod(1).numpy() / 1000.0
                wt = (seg > 0).flatten(1).sum(1).numpy() * ml
                et = (seg == ET).flatten(1).sum(1).numpy() * ml
                ncr = (seg == NCR).flatten(1).sum(1).numpy() * ml
                tc = et + ncr
                feats += np.stack([np.log1p(wt), np.log1p(tc), np.log1p(et), np.where(tc > 0, et / np.maximum(tc, 1e-9), 0.0),
                                   (ncr > 0).astype(float)], axis=1).tolist()
                labels += batch["labels"].tolist()
        return {t: np.asarray(v) for t, v in probs.items()}, np.asarray(feats), np.asarray(labels)

    heldout_probs, heldout_feats, _ = run(cohort / "heldout")
    train_feats, train_labels = [], []
    for site in sorted(p for p in cohort.iterdir() if (p / "labels.csv").exists() and p.name != "heldout"):
        _, f, y = run(site)
        train_feats.append(f)
        train_labels.append(y)
    return {"probs": heldout_probs, "thresholds": thresholds, "heldout_feats": heldout_feats,
            "train_feats": np.concatenate(train_feats), "train_labels": np.concatenate(train_labels),
            "best_round": best["round"], "final": history["final"]}


# ------------------------------------------------------------------------------- regressions
def ground_truth(cohort: Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, np.ndarray]]:
    """GT features per case id, true labels per case id (held-out scoring), and the training
    sites' *known* labels per case id (labels.csv; unknown stays unknown)."""
    feats, truth = {}, {}
    with (cohort / "ground_truth.csv").open(newline="") as fh:
        for r in csv.DictReader(fh):
            tc, et = float(r["tc_volume_ml"]), float(r["et_volume_ml"])
            feats[r["case_id"]] = np.array([np.log1p(float(r["wt_volume_ml"])), np.log1p(tc), np.log1p(et),
                                            float(r["enhancing_fraction"]), float(r["necrosis"])])
            truth[r["case_id"]] = np.array([TASK_CLASSES[t].index(r[TASK_COLUMNS[t]]) for t in TASKS])
    known = {}
    for site in sorted(p for p in cohort.iterdir() if (p / "labels.csv").exists() and p.name != "heldout"):
        with (site / "labels.csv").open(newline="") as fh:
            for r in csv.DictReader(fh):
                known[r["case_id"]] = np.array([TASK_CLASSES[t].index(r[TASK_COLUMNS[t]]) if r[TASK_COLUMNS[t]] else UNKNOWN_LABEL
                                                for t in TASKS])
    return feats, truth, known


def regression(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray) -> np.ndarray:
    """Probabilities of a standardised, class-balanced logistic regression (scikit-learn)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), LogisticRegression(class_weight="balanced", max_iter=1000))
    return model.fit(x_train, y_train).predict_proba(x_test)[:, 1]


# ----------------------------------------------------------------------------------- scoring
def scores(prob: np.ndarray, y: np.ndarray, threshold: float) -> dict[str, float]:
    from common.evaluation.metrics import classification_scores

    s = classification_scores(np.clip(prob, 0.0, 1.0), y, threshold)
    return {k: s[k] for k in SCORES}


def bootstrap(per_seed: list[tuple[np.ndarray, float]], y: np.ndarray, rng_seed: int, n_boot: int) -> dict[str, list[float]]:
    """Mean over seeds of each score and its 95% CI over paired bootstrap resamples of the cases."""
    mean = {k: float(np.nanmean([scores(p, y, t)[k] for p, t in per_seed])) for k in SCORES}
    rng = np.random.default_rng(rng_seed)
    draws = {k: [] for k in SCORES}
    for _ in range(n_boot):
        idx = rng.integers(0, len(y), len(y))
        if np.unique(y[idx]).size < 2:
            continue
        s = [scores(p[idx], y[idx], t) for p, t in per_seed]
        for k in SCORES:
            draws[k].append(float(np.nanmean([x[k] for x in s])))
    return {k: [mean[k], float(np.nanpercentile(draws[k], 2.5)), float(np.nanpercentile(draws[k], 97.5))] for k in SCORES}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cohort", type=Path, help="existing bench-cls cohort (default: generate under --out)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs/bench-cls")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rounds", type=int, default=4, help="federated rounds (centralized: rounds x local epochs)")
    parser.add_argument("--local-epochs", type=int, default=2)
    parser.add_argument("--experiment", default="tiny", help="experiment preset (tiny: 32^3 on CPU)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--arms", nargs="+", default=list(NETWORK_ARMS), choices=list(NETWORK_ARMS))
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--docs", type=Path, default=ROOT / "docs/benchmarks")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every network arm")
    args = parser.parse_args(argv)

    out = args.out.expanduser().resolve()
    cohort = (args.cohort or out / "cohort").expanduser().resolve()
    if not (cohort / "cohort.json").exists():
        from synth import generate_cohort

        print(f"generating the bench-cls cohort in {cohort} ...", flush=True)
        generate_cohort(cohort, preset="bench-cls")
    started = time.perf_counter()
    outputs: dict[str, list[dict[str, object]]] = {}
    for seed in args.seeds:
        for arm in args.arms:
            run_dir = train_arm(arm, seed, cohort, out, args)
            outputs.setdefault(arm, []).append(network_outputs(run_dir, cohort, args))
    train_seconds = time.perf_counter() - started

    feats, truth, known = ground_truth(cohort)
    from common.data.site import load_site

    heldout_ids = [c.case_id for c in load_site(cohort / "heldout").cases]  # the order the loaders use
    train_ids = [c.case_id for site in sorted(p for p in cohort.iterdir() if (p / "labels.csv").exists() and p.name != "heldout")
                 for c in load_site(site).cases]
    y_heldout = np.stack([truth[c] for c in heldout_ids])
    y_known = np.stack([known[c] for c in train_ids])
    x_gt_train, x_gt_test = np.stack([feats[c] for c in train_ids]), np.stack([feats[c] for c in heldout_ids])

    results: dict[str, dict[str, dict[str, list[float]]]] = {}
    for t, task in enumerate(TASKS):
        y = y_heldout[:, t]
        mask = y_known[:, t] != UNKNOWN_LABEL
        prior = float(y_known[mask, t].mean())
        per_arm: dict[str, list[tuple[np.ndarray, float]]] = {
            "prior": [(np.full(len(y), prior), 0.5)],
            "lr-gt": [(regression(x_gt_train[mask], y_known[mask, t], x_gt_test), 0.5)],
        }
        if "fed-tumor" in outputs:
            per_arm["lr-pred"] = [
                (regression(o["train_feats"][mask], y_known[mask, t], o["heldout_feats"]), 0.5) for o in outputs["fed-tumor"]
            ]
        for arm, runs in outputs.items():
            per_arm[arm] = [(o["probs"][task], o["thresholds"][task]) for o in runs]
        for arm, per_seed in per_arm.items():
            results.setdefault(arm, {})[task] = bootstrap(per_seed, y, 1000 + t, args.bootstrap)

    seg = {arm: float(np.mean([o["final"]["best_heldout"]["dice_wt"] for o in runs])) for arm, runs in outputs.items()}
    record = {
        "command": "python tests/benchmarks/bench_cls.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "cohort": "bench-cls: 4 training sites x 60 cases at 64^3, held-out center 200 cases",
        "seeds": args.seeds, "rounds": args.rounds, "local_epochs": args.local_epochs,
        "experiment": args.experiment, "overrides": args.overrides, "bootstrap": args.bootstrap,
        "heldout_cases": len(heldout_ids), "heldout_positives": {t: int(y_heldout[:, i].sum()) for i, t in enumerate(TASKS)},
        "train_seconds": round(train_seconds), "results": results, "heldout_dice_wt_best": seg,
        "best_rounds": {arm: [o["best_round"] for o in runs] for arm, runs in outputs.items()},
    }
    args.docs.mkdir(parents=True, exist_ok=True)
    (args.docs / "classification.json").write_text(json.dumps(record, indent=1))
    print(table(record))
    return 0


def table(record: dict) -> str:
    """The markdown table of a benchmark record (mean over seeds [95% CI])."""
    lines = [f"| arm | task | {' | '.join(SCORES)} |", "| --- | --- |" + " ---: |" * len(SCORES)]
    for arm in ARMS:
        for task in TASKS:
            r = record["results"].get(arm, {}).get(task)
            if r is None:
                continue
            cells = [f"{m:.3f} [{lo:.2f}, {hi:.2f}]" if not math.isnan(m) else "n/a" for m, lo, hi in (r[k] for k in SCORES)]
            lines.append(f"| {arm} | {task} | {' | '.join(cells)} |")
    return "\n".join(lines)


if __name__ == "__main__":  # the cohort generator's process pool re-imports this module
    sys.exit(main())
