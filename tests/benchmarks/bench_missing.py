"""Missing-sequence ablation (issue #5): does imputation + expert fusion beat the alternatives?

Three federated runs with the same supervised budget on the ``bench`` synthetic cohort, through
the real ServerApp and ClientApp (in-process grid, see ``deploy/simulation.py``):

  (a) complete-case-only training   - ``data.complete_only=true``: cases missing any sequence are
                                      left out of training (sites without complete cases sit out);
  (b) all cases, zero-filled        - missing sequences are zeros, availability-weighted fusion;
  (c) all cases, imputation + DWEFM - GMENet's generative imputer (CGGM) pre-trained
                                      self-supervised for ``--pretrain-rounds`` extra rounds that
                                      train only the imputer, then expert fusion.

Each final global model (the last round, never a model picked on the held-out center) is scored
on the held-out center with every sequence present and with each single sequence and each pair
removed. The table goes to ``--report`` (markdown) and the raw figures to ``<report>.json``.

    make bench-missing                      # defaults below
    make bench-missing ARGS="--rounds 2 --cases-per-site 12"   # a quicker look
"""

from __future__ import annotations

import argparse
import itertools
import json
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from common.contract import SEQUENCES, TASKS  # noqa: E402

ARMS = {
    "a": ("complete cases only", ["data.complete_only=true"]),
    "b": ("all cases, zero-filled", []),
    "c": ("all cases, imputation + DWEFM", ["model.imputation=true", "model.fusion=experts"]),
}


def conditions() -> list[tuple[str, ...]]:
    """Sequences removed at test time: none, each single one, each pair (11 conditions)."""
    return [()] + [(s,) for s in SEQUENCES] + list(itertools.combinations(SEQUENCES, 2))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=ROOT / "data/bench-cohort", help="cohort (generated when missing)")
    p.add_argument("--preset", default="bench", help="synthetic preset used when generating the cohort")
    p.add_argument("--cases-per-site", type=int, default=None, help="override the preset when generating")
    p.add_argument("--out", type=Path, default=ROOT / "runs/bench-missing", help="run folders")
    p.add_argument("--report", type=Path, default=ROOT / "docs/benchmarks/missing-sequences.md")
    p.add_argument("--rounds", type=int, default=4, help="supervised federated rounds (all arms)")
    p.add_argument("--pretrain-rounds", type=int, default=1, help="extra imputer pre-training rounds of arm (c)")
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--fresh", action="store_true", help="delete earlier run folders instead of resuming them")
    p.add_argument("overrides", nargs="*", help="Hydra overrides for every arm (e.g. model=demo data.size=48)")
    from fedglioma.cli import parse_args_with_overrides

    return parse_args_with_overrides(p, argv)


def ensure_cohort(args: argparse.Namespace) -> Path:
    from synth import generate_cohort

    data = args.data.resolve()
    if not (data / "cohort.json").exists():
        extra = {} if args.cases_per_site is None else {"cases_per_site": args.cases_per_site}
        print(f"generating the '{args.preset}' cohort in {data} ...", flush=True)
        generate_cohort(data, preset=args.preset, **extra)
    return data


def arm_config(arm: str, args: argparse.Namespace, data: Path, sites: list[str]):
    from common.config import compose

    overrides = [
        "model=tiny", "data=tiny", "train.local_epochs=1", "train.lr=0.002",
        *args.overrides,
        f"train.threads={args.threads}", "train.progress=false",
        f"federation.heldout={data / 'heldout'}", f"federation.out_dir={args.out.resolve()}",
        f"federation.run_name=arm-{arm}", f"federation.min_nodes={len(sites)}",
        "federation.evaluate_sites=false", "federation.node_wait_s=5",
        *ARMS[arm][1],
    ]
    rounds = args.rounds
    if arm == "c" and args.pretrain_rounds > 0:
        overrides.append(f"imputation.pretrain_rounds={args.pretrain_rounds}")
        rounds += args.pretrain_rounds  # pre-training rounds train only the imputer: extra, not instead
    overrides.append(f"federation.rounds={rounds}")
    return compose(overrides)


def training_cases(run_dir: Path) -> float:
    """Cases that took part in the last (supervised) round, summed over sites (from metrics.json)."""
    history = json.loads((run_dir / "metrics.json").read_text())
    last = history["rounds"][-1]["train"]
    return float(sum(m.get("num-examples", 0.0) for m in last.values()))


def score(run_dir: Path, cfg) -> dict[str, dict[str, float]]:
    """Held-out metrics of the run's last global model under every test-time condition."""
    from common.data.dataset import make_loader
    from common.data.site import load_site
    from common.evaluation.loop import drop_sequences, evaluate
    from common.model.checkpoint import load_model

    model, _ = load_model(run_dir / "checkpoints/last.pt")
    loader = make_loader(load_site(Path(cfg.federation.heldout)).cases, cfg.data, train=False)
    batches = list(loader)  # decode the held-out center once for all conditions
    out = {}
    for drop in conditions():
        metrics = evaluate(model, drop_sequences(batches, drop))
        aucs = [metrics[f"auc_{t}"] for t in TASKS]
        out["-" + "-".join(drop) if drop else "all"] = {
            "dice_wt": metrics["dice_wt"], "dice_tc": metrics["dice_tc"], "dice_et": metrics["dice_et"],
            "auc_mean": float(sum(aucs) / len(aucs)), **{f"auc_{t}": metrics[f"auc_{t}"] for t in TASKS},
        }
    return out


def mean_over(results: dict[str, dict[str, float]], key: str, names: list[str]) -> float:
    return sum(results[n][key] for n in names) / len(names)


def _cohort_summary(data: Path) -> str:
    info = json.loads((data / "cohort.json").read_text())
    sites = {k: v for k, v in info.get("sites", {}).items() if k != "heldout"}
    cases = sum(int(v.get("n_cases", 0)) for v in sites.values())
    return f"preset {info.get('preset', '?')}, {len(sites)} sites, {cases} cases, held-out center " \
           f"{info.get('sites', {}).get('heldout', {}).get('n_cases', '?')} cases"


def write_report(path: Path, args: argparse.Namespace, command: str, table: dict, cases: dict, seconds: dict) -> None:
    arms = [a for a in ARMS if a in table]
    names = list(next(iter(table.values())))
    lines = [
        "# Missing-sequence ablation (issue #5)",
        "",
        f"Command: `{command}`",
        "",
        f"Cohort: `{args.data.name}` ({_cohort_summary(args.data)}); {args.rounds} supervised federated rounds per arm"
        + (f", plus {args.pretrain_rounds} imputer pre-training round(s) for (c)" if "c" in arms else "")
        + ". Final-round global model on the held-out center; '-x' = sequence x removed at test time.",
        "",
        "| arm | training cases (last round) | vs (a) | wall time |",
        "| --- | ---: | ---: | ---: |",
    ]
    for a in arms:
        ratio = cases[a] / cases["a"] - 1 if "a" in cases and cases["a"] > 0 else float("nan")
        lines.append(f"| ({a}) {ARMS[a][0]} | {cases[a]:.0f} | {ratio:+.0%} | {seconds[a]:.0f} s |")
    lines += ["", "| test-time input | " + " | ".join(f"({a}) WT Dice | ({a}) ET Dice | ({a}) mean AUC" for a in arms) + " |",
              "| --- | " + " | ".join("---: | ---: | ---:" for _ in arms) + " |"]
    for n in names:
        cells = [f"{table[a][n]['dice_wt']:.3f} | {table[a][n]['dice_et']:.3f} | {table[a][n]['auc_mean']:.3f}" for a in arms]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    groups = {"mean, all 11": names, "mean, 1 removed": [n for n in names if n.count("-") == 1],
              "mean, 2 removed": [n for n in names if n.count("-") == 2]}
    for label, members in groups.items():
        cells = [" | ".join(f"{mean_over(table[a], k, members):.3f}" for k in ("dice_wt", "dice_et", "auc_mean")) for a in arms]
        lines.append(f"| **{label}** | " + " | ".join(cells) + " |")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    path.with_suffix(".json").write_text(json.dumps({"command": command, "cases": cases, "seconds": seconds,
                                                      "results": table}, indent=1))


def main(argv: list[str] | None = None) -> int:
    import shutil

    from deploy.simulation import run_inprocess, site_nodes

    args = parse_args(argv)
    command = "python tests/benchmarks/bench_missing.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    data = ensure_cohort(args)
    sites = sorted(p.name for p in data.iterdir() if (p / "labels.csv").exists() and p.name != "heldout")
    table, cases, seconds = {}, {}, {}
    for arm in args.arms:
        cfg = arm_config(arm, args, data, sites)
        run_dir = args.out.resolve() / cfg.federation.run_name
        if args.fresh and run_dir.exists():
            shutil.rmtree(run_dir)
        print(f"arm ({arm}) {ARMS[arm][0]}: {cfg.federation.rounds} rounds -> {run_dir}", flush=True)
        start = time.perf_counter()
        run_inprocess(cfg, site_nodes(data, sites))  # resumes a finished/partial run folder
        seconds[arm] = time.perf_counter() - start
        cases[arm] = training_cases(run_dir)
        table[arm] = score(run_dir, cfg)
        print(f"  {cases[arm]:.0f} training cases, {seconds[arm]:.0f} s; all sequences: "
              + ", ".join(f"{k}={v:.3f}" for k, v in table[arm]["all"].items()), flush=True)
    write_report(args.report, args, command, table, cases, seconds)
    print(args.report.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
