"""Privacy of the updates (issue #15 part 4): what client-level DP's noise (federation.dp) and
SecAgg+ (federation.secure_aggregation) cost the global model.

The real ServerApp and ClientApps in one process (deploy/simulation.py: no SuperLink, the same
server and site code), on a small synthetic cohort, every run with the same training budget
(rounds x local epochs) and seed. Rows: no DP; fixed clipping at dp_clipping_norm with a few
noise multipliers (the smallest one clips with hardly any noise, separating the clipping's cost
from the noise's); adaptive clipping; SecAgg+ (no noise: the sites' updates are summed masked and
quantized; update bounds off, which a masked update cannot have; its bytes include the protocol's
four messages per round and the int64 masked vectors). Per run from metrics.json: held-out WT Dice and mean AUC of
the final round, epsilon at delta after the last round, the noise std per weight, the sites whose
update was clipped, mean round time and bytes per round (all sites, both directions).

    make bench-privacy
    make bench-privacy ARGS="--multipliers 0.1 1.0 --rounds 2"
    make bench-privacy ARGS="--rows none secaggplus --report docs/benchmarks/privacy-secagg.md"

``--rows`` runs some of the rows; their table then goes to another ``--report`` (the default one
keeps all rows).

The noise is drawn from the operating system's entropy (server.strategy.privacy), so a noised row
differs from run to run even with the same seed.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shlex
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

TASKS_AUC = ("auc_idh", "auc_1p19q", "auc_grade", "auc_mgmt")
ROWS = ("none", "fixed", "adaptive", "secaggplus")  # no DP; fixed clipping (one row per multiplier); adaptive; SecAgg+
DEFAULT_REPORT = ROOT / "docs/benchmarks/privacy.md"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=ROOT / "data/bench-privacy-cohort", help="cohort (generated when missing)")
    p.add_argument("--sites", type=int, default=3)
    p.add_argument("--cases", type=int, default=8, help="cases per training site when generating")
    p.add_argument("--heldout", type=int, default=12, help="held-out cases when generating")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=3, help="local epochs per round")
    p.add_argument("--clipping-norm", type=float, default=3.0,
                   help="C of the DP rows (default: about the sites' update norm at 3 local epochs on this cohort)")
    p.add_argument("--multipliers", type=float, nargs="+", default=[0.001, 0.01, 0.1, 1.0])
    p.add_argument("--adaptive", type=float, default=0.1, help="noise multiplier of the adaptive row (0: none)")
    p.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS), help="the rows to run (default: all)")
    p.add_argument("--secagg-threshold", type=int, default=2, help="reconstruction threshold of the SecAgg+ row (3 shares)")
    p.add_argument("--out", type=Path, default=ROOT / "runs/bench-privacy")
    p.add_argument("--report", type=Path, default=DEFAULT_REPORT)
    p.add_argument("overrides", nargs="*", help="Hydra overrides for every run")
    from fedglioma.cli import parse_args_with_overrides

    args = parse_args_with_overrides(p, argv)
    if set(args.rows) != set(ROWS) and args.report.resolve() == DEFAULT_REPORT.resolve():
        p.error(f"--rows {' '.join(args.rows)} would replace the full table of {DEFAULT_REPORT.name} with fewer rows: "
                "pass --report docs/benchmarks/privacy-<rows>.md")
    return args


def cohort(args: argparse.Namespace) -> Path:
    data = args.data.resolve()
    if not (data / "cohort.json").exists():
        from synth import generate_cohort

        generate_cohort(data, preset="tiny", sites=args.sites, cases_per_site=args.cases,
                        heldout_cases=args.heldout, shape=32, seed=11)
    return data


def run(name: str, data: Path, args: argparse.Namespace, dp: list[str], *, rounds: int | None = None) -> dict[str, Any]:
    from common.config import compose
    from common.model import build_model
    from deploy.simulation import run_inprocess, site_nodes

    out = args.out / name
    shutil.rmtree(out, ignore_errors=True)
    names = sorted(p.name for p in data.iterdir() if (p / "labels.csv").exists() and p.name != "heldout")
    cfg = compose(["+experiment=tiny", f"federation.heldout={data / 'heldout'}", f"federation.out_dir={out}",
                   "train.threads=1", "federation.evaluate_sites=false", f"federation.min_nodes={len(names)}",
                   f"federation.rounds={rounds or args.rounds}", f"train.local_epochs={args.epochs}", *dp, *args.overrides])
    weights = sum(int(t.numel()) for t in build_model(cfg.model, cfg.data.size).state_dict().values() if t.is_floating_point())
    started = time.perf_counter()
    run_inprocess(cfg, site_nodes(data, names))
    wall = time.perf_counter() - started
    history = json.loads((out / "tiny/metrics.json").read_text())
    trained = [r for r in history["rounds"] if r["round"] > 0]
    final = history["final"]["heldout"]
    privacy = trained[-1].get("privacy") or {}
    aucs = [float(final[k]) for k in TASKS_AUC if final.get(k) is not None and math.isfinite(float(final[k]))]
    return {
        "name": name,
        "overrides": dp,
        "dice_wt": final.get("dice_wt"),
        "mean_auc": statistics.mean(aucs) if aucs else None,
        "epsilon": privacy.get("epsilon"),
        "delta": privacy.get("delta"),
        "noise_std": privacy.get("noise_std"),
        "weights": weights,
        # the noise on one weight against a clipped update's share of it (an update of norm C
        # spread evenly over the weights): how much of a round's signal survives
        "noise_to_update": (privacy["noise_std"] / (privacy["clipping_norm"] / math.sqrt(weights))
                            if privacy.get("noise_std") else None),
        "clipping_norm": privacy.get("clipping_norm"),
        "clipped": sum(len(r.get("bounded") or {}) for r in trained),
        # SecAgg+: the bound of the quantization error per weight of the last round's mean update
        "secagg_step": (trained[-1].get("secure_aggregation") or {}).get("step"),
        "updates": sum(len(r.get("train") or {}) for r in trained),
        "round_seconds": statistics.mean(float((r.get("seconds") or {}).get("train", 0.0)) for r in trained),
        "round_bytes": statistics.mean(sum(b["sent"] + b["received"] for b in (r.get("bytes") or {}).values())
                                       for r in trained),
        "wall_seconds": wall,
    }


def fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def render(results: list[dict[str, Any]], args: argparse.Namespace, command: str, seconds: float) -> str:
    lines = [
        "# Privacy of the updates: what client-level DP's noise and SecAgg+ cost",
        "",
        f"Command: `{command}` ({platform.node()}, {platform.processor() or platform.machine()}; "
        f"{seconds / 60:.1f} min for all rows). The real ServerApp and ClientApps in one process "
        f"(`deploy/simulation.py`), synthetic `tiny` cohort: {args.sites} training sites x {args.cases} cases at "
        f"32^3, held-out center {args.heldout} cases; `tiny` model; {args.rounds} rounds x {args.epochs} local "
        f"epochs for every row; one seed. DP rows: `federation.dp_clipping_norm={args.clipping_norm:g}` "
        "(adaptive: the initial norm), `dp_delta=1e-5`, RDP accountant, no sampling amplification. SecAgg+ row: "
        f"`federation.secure_aggregation=secaggplus`, 3 shares, reconstruction threshold {args.secagg_threshold}, "
        "Flower's clipping range 8 and max weight 1000, 2^26 quantization levels, `federation.update_bound=off`.",
        "",
        "| run | held-out WT Dice | mean AUC | epsilon after the last round | noise std per weight | "
        "noise / update per weight | updates clipped | SecAgg+ step per weight | s per round | MB per round |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        lines.append(
            f"| {r['name']} | {fmt(r['dice_wt'])} | {fmt(r['mean_auc'])} | {fmt(r['epsilon'])} | {fmt(r['noise_std'])} | "
            f"{fmt(r['noise_to_update'])} | {r['clipped']} of {r['updates']} | {fmt(r.get('secagg_step'))} | "
            f"{r['round_seconds']:.1f} | "
            f"{r['round_bytes'] / 1e6:.1f} |"
        )
    lines += [
        "",
        f"Columns: epsilon at delta 1e-5 after all {args.rounds} rounds; the noise's standard deviation on each "
        f"of the model's {results[0]['weights']} floating-point weights (z*C/N, N = the sites averaged); the same "
        "divided by C/sqrt(weights), the share of one weight in an update of norm C spread evenly, i.e. how "
        "many times a round's clipped signal the noise is; the sites' updates clipped over all rounds (the "
        "report names their norms); the server's wall time of a training phase and the bytes to and from all "
        "sites per round (SecAgg+: its four messages per round, the masked vectors are int64, twice float32's "
        "bytes); SecAgg+ step: the bound of the quantization error per weight of the mean update in the last "
        "round (metrics.json adds the weights' rounding). A warm-up run fills the sites' caches first, so no row pays for them. "
        f"{args.heldout} held-out cases give an AUC standard error near 0.15: the AUC column is not evidence "
        "either way. Raw values: the `.json` file of the same name next to this file.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    started = time.perf_counter()
    data = cohort(args)
    norm = f"federation.dp_clipping_norm={args.clipping_norm}"
    plans: list[tuple[str, list[str]]] = [("no DP", [])] if "none" in args.rows else []
    if "fixed" in args.rows:
        plans += [(f"fixed, z={z:g}", ["federation.dp=fixed", f"federation.dp_noise_multiplier={z}", norm])
                  for z in args.multipliers]
    if args.adaptive > 0 and "adaptive" in args.rows:
        plans.append((f"adaptive, z={args.adaptive:g}",
                      ["federation.dp=adaptive", f"federation.dp_noise_multiplier={args.adaptive}", norm]))
    if "secaggplus" in args.rows:
        plans.append((f"SecAgg+, threshold {args.secagg_threshold}",
                      ["federation.secure_aggregation=secaggplus", "federation.update_bound=off",
                       "federation.secagg_num_shares=3", f"federation.secagg_reconstruction_threshold={args.secagg_threshold}"]))
    run("warm-up", data, args, [], rounds=1)  # the sites' validation and preprocessing caches
    results = []
    for name, dp in plans:
        results.append(run(name.replace(", ", "-").replace("=", "").replace(" ", "-"), data, args, dp))
        results[-1]["name"] = name
        print(json.dumps(results[-1]), flush=True)
    command = "make bench-privacy" + (f" ARGS={shlex.quote(' '.join(argv))}" if argv else "")
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(render(results, args, command, time.perf_counter() - started))
    args.report.with_suffix(".json").write_text(json.dumps(results, indent=1))
    print(args.report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
