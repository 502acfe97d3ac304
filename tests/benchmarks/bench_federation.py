"""Federation overhead (issue #13): how much longer a round takes than the sites' own training.

Real processes, as ``make demo`` runs them: a TLS SuperLink with node authentication and one
SuperNode per site on 127.0.0.1, signed app, the demo preset at its default schedule. Three runs
in one invocation, so that every ratio comes from one machine state:

  demo   - the demo schedule as ``make demo`` runs it;
  floor  - the same deployment and rounds, but the sites reply at once with the weights they
           received (``federation.empty_rounds``): what Flower itself costs per round (message
           process start, polling, transfer), measured instead of guessed;
  fp16   - (``--fp16``) the demo schedule with weights sent as float16 both ways
           (``federation.wire_dtype=float16``, float32 averaging): bytes and the held-out effect.

Per round, from each run's metrics.json: the server's wall time of the round's federated phases
(training message, plus the final evaluate message), the slowest site's training time (the
training loop itself), the same site's whole message (site opening, validation of the received
model, pseudo-labels, training), their ratios, the overhead (wall minus the slowest training),
each phase's time and the bytes sent to and received from each site.

    make bench-federation
    make bench-federation ARGS="--fp16"
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=ROOT / "data/demo-cohort", help="cohort (generated when missing)")
    p.add_argument("--preset", default="demo")
    p.add_argument("--out", type=Path, default=ROOT / "runs/bench-federation")
    p.add_argument("--report", type=Path, default=ROOT / "docs/benchmarks/federation.md")
    p.add_argument("--fp16", action="store_true", help="also run with float16 weights on the wire")
    p.add_argument("overrides", nargs="*", help="Hydra overrides for every run")
    from fedglioma.cli import parse_args_with_overrides

    return parse_args_with_overrides(p, argv)


def round_rows(history: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per trained round: wall time, slowest site, ratios, phases, bytes."""
    rows = []
    for entry in history["rounds"]:
        if entry["round"] == 0:
            continue
        seconds = entry.get("seconds") or {}
        wall = float(seconds.get("train", 0.0)) + float(seconds.get("site_eval", 0.0))
        train = entry.get("train") or {}
        slowest = max(train.items(), key=lambda kv: kv[1].get("seconds", 0.0), default=(None, {}))
        site, m = slowest
        training = float(m.get("seconds", 0.0))
        message = float(m.get("message_seconds", 0.0))
        rows.append({
            "round": entry["round"],
            "stage": entry.get("stage"),
            "wall_s": wall,
            "slowest_site": site,
            "slowest_training_s": training,
            "slowest_message_s": message,
            "slowest_open_s": float(m.get("open_seconds", 0.0)),
            "slowest_validation_s": float(m.get("val/seconds", 0.0)) if "val/seconds" in m else None,
            "ratio_training": wall / training if training > 0 else None,
            "ratio_message": wall / message if message > 0 else None,
            "overhead_s": wall - training,
            "phases_s": {k: float(v) for k, v in seconds.items()},
            "bytes": entry.get("bytes") or {},
        })
    return rows


def run(name: str, args: argparse.Namespace, overrides: list[str]) -> dict[str, Any]:
    from deploy.demo import run_demo

    out = args.out / name
    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    run_dir = run_demo(args.data, preset=args.preset, workdir=out / "federation", out=out / "runs",
                       overrides=[*args.overrides, *overrides, f"federation.run_name={name}"])
    history = json.loads((run_dir / "metrics.json").read_text())
    return {"name": name, "overrides": overrides, "seconds": time.perf_counter() - started,
            "rounds": round_rows(history), "final_heldout": history["final"]["heldout"]}


def fmt(value: Any, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def render(results: list[dict[str, Any]], command: str) -> str:
    by = {r["name"]: r for r in results}
    lines = [
        "# Federation overhead: round wall time vs the sites' own training",
        "",
        f"Command: `{command}` ({platform.node()}, {platform.processor() or platform.machine()}; "
        "2 shared CPU cores, no GPU). All runs in one invocation; ratios are within one run.",
        "",
        "Real processes: TLS SuperLink with node authentication, one SuperNode per site on 127.0.0.1,",
        "signed app. *wall*: the server's time for the round's federated phases (training message and,",
        "after the last round, the evaluate message); *training*: the slowest site's training loop;",
        "*message*: that site's whole ClientApp call (opening the site, validating the received model,",
        "training); *overhead* = wall - training.",
        "",
    ]
    for result in results:
        lines += [f"## {result['name']} ({' '.join(result['overrides']) or 'demo defaults'}; "
                  f"{result['seconds']:.0f} s in all)", "",
                  "| round | stage | wall s | slowest site | training s | message s | open s | validation s | wall/training | wall/message | overhead s |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for row in result["rounds"]:
            lines.append("| " + " | ".join([
                str(row["round"]), str(row["stage"]), fmt(row["wall_s"], 1), str(row["slowest_site"]),
                fmt(row["slowest_training_s"], 1), fmt(row["slowest_message_s"], 1), fmt(row["slowest_open_s"], 1),
                fmt(row["slowest_validation_s"], 1), fmt(row["ratio_training"]), fmt(row["ratio_message"]),
                fmt(row["overhead_s"], 1)]) + " |")
        lines.append("")
        first = result["rounds"][0] if result["rounds"] else None
        if first and first["bytes"]:
            lines.append("Bytes per site in round 1 (sent to / received from): " + ", ".join(
                f"{site} {b['sent'] / 1e6:.2f} / {b['received'] / 1e6:.2f} MB" for site, b in sorted(first["bytes"].items())))
            lines.append("")
    if "demo" in by and "floor" in by:
        demo = [r for r in by["demo"]["rounds"] if r["round"] >= 2]
        floor = [r for r in by["floor"]["rounds"] if r["round"] >= 2]
        if demo and floor:
            ratio = sum(r["ratio_training"] or 0 for r in demo) / len(demo)
            overhead = sum(r["overhead_s"] for r in demo) / len(demo)
            empty = sum(r["wall_s"] for r in floor) / len(floor)
            lines += ["## Against the target (rounds 2+)", "",
                      f"- mean wall/training ratio: {ratio:.2f} (target at most 1.10);",
                      f"- mean overhead {overhead:.1f} s vs the empty-round floor {empty:.1f} s: "
                      f"{overhead / empty:.2f}x (target at most 1.5x where the ratio cannot be met).", ""]
    if "fp16" in by and "demo" in by:
        keys = ("dice_wt", "dice_tc", "dice_et", "auc_idh", "auc_1p19q", "auc_grade", "auc_mgmt")
        a, b = by["demo"]["final_heldout"], by["fp16"]["final_heldout"]
        sent = [sum(x["sent"] for x in r["rounds"][0]["bytes"].values()) for r in (by["demo"], by["fp16"])]
        lines += ["## float16 on the wire", "",
                  f"Bytes sent in round 1, all sites: float32 {sent[0] / 1e6:.2f} MB, float16 {sent[1] / 1e6:.2f} MB.", "",
                  "| held-out (final) | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|",
                  "| float32 | " + " | ".join(fmt(a.get(k), 3) for k in keys) + " |",
                  "| float16 | " + " | ".join(fmt(b.get(k), 3) for k in keys) + " |", "",
                  "One seed each; the held-out center of the demo cohort is small, so differences below "
                  "~0.1 AUC or ~0.02 Dice are within noise.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    runs = [("demo", []), ("floor", ["federation.empty_rounds=true"])]
    if args.fp16:
        runs.append(("fp16", ["federation.wire_dtype=float16"]))
    results = [run(name, args, overrides) for name, overrides in runs]
    command = "make bench-federation" + (f" ARGS={shlex.quote(' '.join(argv))}" if argv else "")
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(render(results, command))
    args.report.with_suffix(".json").write_text(json.dumps(results, indent=1))
    print(f"wrote {args.report}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
