"""Pseudo-labeling ablation (issue #6): do local pseudo-labels and consistency help?

Four federated runs with the same budget (rounds, local epochs, learning rate) on the ``bench``
synthetic cohort, through the real ServerApp and ClientApp (in-process grid):

  none     - supervised only (cases lacking a molecular label train only the tasks they have);
  stage 1  - + uncertainty-aware pseudo-labels (MC dropout, distribution alignment, tau_c/tau_u)
             selected at every site from ``ssl.warmup_rounds`` on;
  stage 2  - + consistency regularization against a local EMA teacher (GMMAS stage 2);
  relaxed  - stage 1 with tau_c lowered to 0.6 (not a paper default): shows what the selection
             accepts, and how precise it is, when the global model is not yet confident enough for
             tau_c 0.95.

Each final global model (last round; never picked on the held-out center) is scored on the
held-out center: AUC/ACC/F1 per task and WT/TC/ET Dice. Pseudo-label precision compares what the
sites stored on their own disk with the cohort's ``ground_truth.csv`` - only this benchmark reads
ground truth; the system never does.

    make bench-ssl
    make bench-ssl ARGS="--rounds 3 --warmup 1"
"""

from __future__ import annotations

import argparse
import csv
import json
import shlex
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from common.contract import TASK_CLASSES, TASK_COLUMNS, TASKS  # noqa: E402

ARMS = {
    "none": ("supervised only", ["ssl.enabled=false"]),
    "stage1": ("+ pseudo-labels", ["ssl.enabled=true", "ssl.consistency=false"]),
    "stage2": ("+ pseudo-labels + consistency", ["ssl.enabled=true", "ssl.consistency=true"]),
    "relaxed": ("+ pseudo-labels, tau_c 0.6", ["ssl.enabled=true", "ssl.consistency=false", "ssl.tau_c=0.6"]),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=ROOT / "data/bench-cohort", help="cohort (generated when missing)")
    p.add_argument("--preset", default="bench", help="synthetic preset used when generating the cohort")
    p.add_argument("--out", type=Path, default=ROOT / "runs/bench-ssl", help="run folders and site state")
    p.add_argument("--report", type=Path, default=ROOT / "docs/benchmarks/pseudo-labels.md")
    p.add_argument("--rounds", type=int, default=5, help="federated rounds (all arms)")
    p.add_argument("--warmup", type=int, default=2, help="supervised warm-up rounds before pseudo-labeling")
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("overrides", nargs="*", help="Hydra overrides for every arm (e.g. ssl.tau_c=0.9)")
    from fedglioma.cli import parse_args_with_overrides

    return parse_args_with_overrides(p, argv)


def arm_config(arm: str, args: argparse.Namespace, data: Path, sites: list[str]):
    from common.config import compose

    return compose([
        "model=tiny", "data=tiny", "train.local_epochs=1", "train.lr=0.002",
        *args.overrides,
        f"train.threads={args.threads}", "train.progress=false",
        f"federation.heldout={data / 'heldout'}", f"federation.out_dir={args.out.resolve()}",
        f"federation.run_name=ssl-{arm}", f"federation.min_nodes={len(sites)}", f"federation.rounds={args.rounds}",
        "federation.evaluate_sites=false", "federation.node_wait_s=5", f"ssl.warmup_rounds={args.warmup}",
        *ARMS[arm][1],
    ])


def ground_truth(data: Path) -> dict[str, list[int]]:
    """case id -> class index per task, from the synthetic cohort's ground_truth.csv."""
    truth = {}
    with open(data / "ground_truth.csv", newline="") as f:
        for row in csv.DictReader(f):
            truth[row["case_id"]] = [TASK_CLASSES[t].index(row[TASK_COLUMNS[t]]) for t in TASKS]
    return truth


def site_majority(data: Path, site: str) -> list[int]:
    """Per task, the most frequent class among the site's real labels (0 when it has none)."""
    from client.pseudo_labels import class_counts, majority_class
    from common.data.site import label_matrix, load_site

    real = label_matrix(load_site(data / site).cases)
    return [majority_class(class_counts(column)) or 0 for column in real.T]


def pseudo_label_precision(
    state_root: Path, data: Path, sites: list[str], truth: dict[str, list[int]]
) -> dict[str, dict[str, float]]:
    """Per task: pseudo-labels accepted at all sites (as stored after the last round), the
    fraction that agree with the ground truth, and - as the chance level to beat - the fraction
    that labeling the same cases with their site's majority real class would get right."""
    from client.pseudo_labels import load_pseudo_labels

    out = {t: {"accepted": 0.0, "correct": 0.0, "majority_correct": 0.0} for t in TASKS}
    for site in sites:
        majority = site_majority(data, site)
        for case_id, labels in load_pseudo_labels(state_root / site).items():
            for j, task in enumerate(TASKS):
                if labels[j] >= 0:
                    out[task]["accepted"] += 1
                    out[task]["correct"] += float(labels[j] == truth[case_id][j])
                    out[task]["majority_correct"] += float(majority[j] == truth[case_id][j])
    for task in TASKS:
        n = out[task]["accepted"]
        out[task]["precision"] = out[task]["correct"] / n if n else float("nan")
        out[task]["majority_precision"] = out[task]["majority_correct"] / n if n else float("nan")
    return out


def accepted_per_round(history: dict) -> list[float]:
    return [sum(m.get("pseudo_accepted", 0.0) for m in r["train"].values()) for r in history["rounds"][1:]]


def candidate_confidence(history: dict) -> dict[str, float]:
    """Per task, the candidates' mean aligned confidence at the last selection (weighted by the
    sites' candidate counts): how far the global model was from tau_c."""
    last = history["rounds"][-1]["train"].values()
    out = {}
    for task in TASKS:
        n = sum(m.get(f"pseudo_{task}_candidates", 0.0) for m in last)
        total = sum(m.get(f"pseudo_{task}_candidates", 0.0) * m.get(f"pseudo_{task}_candidate_confidence", 0.0)
                    for m in last)
        out[task] = total / n if n else float("nan")
    return out


def score(run_dir: Path, cfg) -> dict[str, float]:
    from common.data.dataset import make_loader
    from common.data.site import load_site
    from common.evaluation.loop import evaluate
    from common.model.checkpoint import load_model

    model, _ = load_model(run_dir / "checkpoints/last.pt")
    loader = make_loader(load_site(Path(cfg.federation.heldout)).cases, cfg.data, train=False)
    return evaluate(model, loader)


def write_report(
    path: Path, command: str, args, results: dict, precision: dict, accepted: dict, confidence: dict, seconds: dict
) -> None:
    arms = [a for a in ARMS if a in results]
    lines = [
        "# Pseudo-labeling ablation (issue #6)", "",
        f"Command: `{command}`", "",
        f"Cohort `{args.data.name}`; {args.rounds} federated rounds per arm, pseudo-labeling from round "
        f"{args.warmup + 1}; final-round global model on the held-out center.", "",
        "| held-out metric | " + " | ".join(f"{a}: {ARMS[a][0]}" for a in arms) + " |",
        "| --- | " + " | ".join("---:" for _ in arms) + " |",
    ]
    keys = ["dice_wt", "dice_tc", "dice_et"] + [f"{m}_{t}" for t in TASKS for m in ("auc", "acc", "f1")]
    for key in keys:
        lines.append(f"| {key} | " + " | ".join(f"{results[a][key]:.3f}" for a in arms) + " |")
    lines.append("| mean AUC | " + " | ".join(
        f"{sum(results[a][f'auc_{t}'] for t in TASKS) / len(TASKS):.3f}" for a in arms) + " |")
    lines.append("| wall time | " + " | ".join(f"{seconds[a]:.0f} s" for a in arms) + " |")
    lines += ["", "Pseudo-labels stored at the sites after the last round, against the synthetic ground truth:", "",
              "| arm | task | candidates' mean confidence (last round) | accepted | precision "
              "| site-majority precision on the same cases |",
              "| --- | --- | ---: | ---: | ---: | ---: |"]
    for a in arms:
        if a not in precision:
            continue
        for t in TASKS:
            p = precision[a][t]
            lines.append(f"| {a} | {t} | {confidence[a][t]:.3f} | {p['accepted']:.0f} | {p['precision']:.3f} "
                         f"| {p['majority_precision']:.3f} |")
    lines += ["", "Pseudo-labels accepted per round (all sites): "
              + "; ".join(f"{a}: {accepted[a]}" for a in arms if a in precision)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    path.with_suffix(".json").write_text(json.dumps(
        {"command": command, "results": results, "precision": precision, "accepted_per_round": accepted,
         "candidate_confidence": confidence, "seconds": seconds}, indent=1, default=float))


def main(argv: list[str] | None = None) -> int:
    from deploy.simulation import run_inprocess, site_nodes
    from synth import generate_cohort

    args = parse_args(argv)
    command = "python tests/benchmarks/bench_ssl.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    data = args.data.resolve()
    if not (data / "cohort.json").exists():
        print(f"generating the '{args.preset}' cohort in {data} ...", flush=True)
        generate_cohort(data, preset=args.preset)
    sites = sorted(p.name for p in data.iterdir() if (p / "labels.csv").exists() and p.name != "heldout")
    truth = ground_truth(data)
    results, precision, accepted, confidence, seconds = {}, {}, {}, {}, {}
    for arm in args.arms:
        cfg = arm_config(arm, args, data, sites)
        run_dir = args.out.resolve() / cfg.federation.run_name
        state_root = args.out.resolve() / f"state-{arm}"
        for old in (run_dir, state_root):  # every arm starts from scratch: no stale pseudo-labels
            shutil.rmtree(old, ignore_errors=True)
        print(f"arm {arm} ({ARMS[arm][0]}): {args.rounds} rounds -> {run_dir}", flush=True)
        start = time.perf_counter()
        run_inprocess(cfg, site_nodes(data, sites, state_root=state_root))
        seconds[arm] = time.perf_counter() - start
        results[arm] = score(run_dir, cfg)
        if cfg.ssl.enabled:
            precision[arm] = pseudo_label_precision(state_root, data, sites, truth)
            history = json.loads((run_dir / "metrics.json").read_text())
            accepted[arm] = accepted_per_round(history)
            confidence[arm] = candidate_confidence(history)
        print(f"  {seconds[arm]:.0f} s; dice_wt={results[arm]['dice_wt']:.3f} "
              + " ".join(f"auc_{t}={results[arm][f'auc_{t}']:.3f}" for t in TASKS), flush=True)
    write_report(args.report, command, args, results, precision, accepted, confidence, seconds)
    print(args.report.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
