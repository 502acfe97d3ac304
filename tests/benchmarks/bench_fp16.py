"""float16 weights on the wire (federation.wire_dtype) against float32: bytes and the held-out effect.

The real ServerApp and ClientApps in one process (deploy/simulation.py), tiny synthetic cohort
(3 sites x 8 cases, 12 held-out cases), 3 rounds x 3 local epochs, one seed: a quick check, not
the demo preset (`make bench-federation ARGS=--fp16` runs that with real processes).

    .venv/bin/python tests/benchmarks/bench_fp16.py [OUT_DIR]
"""
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from common.config import compose
from deploy import simulation

def main():
    from synth import generate_cohort
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/bench-fp16"); cohort = root / "cohort"
    if not (cohort / "cohort.json").exists():
        generate_cohort(cohort, preset="tiny", sites=3, cases_per_site=8, heldout_cases=12, shape=32, seed=7, workers=1)
    out = {}
    for dtype in ("float32", "float16"):
        cfg = compose(["+experiment=tiny", f"federation.heldout={cohort / 'heldout'}", f"federation.out_dir={root / dtype}",
                       "train.threads=2", "federation.rounds=3", "train.local_epochs=3", "federation.min_nodes=3",
                       "federation.min_metric_cases=1", f"federation.wire_dtype={dtype}", "federation.resume=false"])
        t = time.perf_counter()
        simulation.run_inprocess(cfg, simulation.site_nodes(cohort, ["site-a", "site-b", "site-c"], root / dtype / "state"))
        h = json.loads((root / dtype / "tiny" / "metrics.json").read_text())
        f = h["final"]["heldout"]; b = h["rounds"][1]["bytes"]
        out[dtype] = {k: f.get(k) for k in ("dice_wt", "dice_tc", "dice_et", "auc_idh", "auc_grade")}
        out[dtype]["bytes_sent_round1"] = sum(v["sent"] for v in b.values()); out[dtype]["bytes_received_round1"] = sum(v["received"] for v in b.values())
        out[dtype]["seconds"] = time.perf_counter() - t
    print(json.dumps(out, indent=1))

if __name__ == "__main__":
    main()
