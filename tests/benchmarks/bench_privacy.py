"""Privacy of the updates (issue #15 part 4): what client-level DP (federation.dp), site-level
DP-SGD (train.dp_sgd) and SecAgg+ (federation.secure_aggregation) cost the global model.

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

Site-level DP-SGD (train.dp_sgd, issue #15 part 2) has its own rows: each site clips every case's
gradient to --dpsgd-norm and adds noise per step, for a few --dpsgd-multipliers; the epsilon column
is then the largest of the sites' per-case epsilons. With DP-SGD rows every row of the run drops
the survival head (DP-SGD cannot train it), so the no-DP row is the same model; the cost of one
training step, DP-SGD against plain on the same batch, is measured first (--step-presets):

    make bench-privacy ARGS="--rows none dpsgd --report docs/benchmarks/privacy-dpsgd.md"
    make bench-privacy ARGS="--rows none secaggplus --report docs/benchmarks/privacy-secagg.md"

``--rows`` runs some of the rows; their table then goes to another ``--report`` (the default one
keeps all rows).

The noise is drawn from the operating system's entropy (server.strategy.privacy, client.dp_sgd),
so a noised row differs from run to run even with the same seed.
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
#: no DP; client-level fixed clipping (a row per multiplier); adaptive; DP-SGD (a row per multiplier); SecAgg+
ROWS = ("none", "client", "adaptive", "dpsgd", "secaggplus")
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
    p.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS),
                   help="which rows (default: all): none (no DP), client (fixed clipping, --multipliers), adaptive, "
                        "dpsgd (site-level DP-SGD, --dpsgd-multipliers, with the step-cost table), secaggplus")
    p.add_argument("--secagg-threshold", type=int, default=2, help="reconstruction threshold of the SecAgg+ row (3 shares)")
    p.add_argument("--dpsgd-multipliers", type=float, nargs="+", default=[0.0001, 0.001, 0.01, 0.5, 1.0, 2.0],
                   help="noise multipliers of the DP-SGD rows (the smallest: clipping with hardly any noise)")
    p.add_argument("--dpsgd-norm", type=float, default=1.0, help="train.dp_sgd_max_grad_norm of the DP-SGD rows")
    p.add_argument("--step-presets", nargs="*", default=["tiny", "demo"],
                   help="model/data presets whose DP-SGD step cost is measured (with dpsgd rows)")
    p.add_argument("--step-repeats", type=int, default=5, help="timed steps of each kind per preset")
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
    # with DP-SGD rows every row drops the survival head (DP-SGD has no per-case Cox gradient)
    common = ["model.survival_head=false"] if "dpsgd" in args.rows else []
    cfg = compose(["+experiment=tiny", f"federation.heldout={data / 'heldout'}", f"federation.out_dir={out}",
                   "train.threads=1", "federation.evaluate_sites=false", f"federation.min_nodes={len(names)}",
                   f"federation.rounds={rounds or args.rounds}", f"train.local_epochs={args.epochs}", *common, *dp,
                   *args.overrides])
    weights = sum(int(t.numel()) for t in build_model(cfg.model, cfg.data.size).state_dict().values() if t.is_floating_point())
    started = time.perf_counter()
    run_inprocess(cfg, site_nodes(data, names))
    wall = time.perf_counter() - started
    history = json.loads((out / "tiny/metrics.json").read_text())
    trained = [r for r in history["rounds"] if r["round"] > 0]
    final = history["final"]["heldout"]
    privacy = trained[-1].get("privacy") or {}
    # site-level DP-SGD: each site's epsilon for its own cases; the row shows the largest
    site_epsilons = [m["dp_sgd_epsilon"] for m in trained[-1]["train"].values() if "dp_sgd_epsilon" in m]
    aucs = [float(final[k]) for k in TASKS_AUC if final.get(k) is not None and math.isfinite(float(final[k]))]
    return {
        "name": name,
        "overrides": dp,
        "dice_wt": final.get("dice_wt"),
        "mean_auc": statistics.mean(aucs) if aucs else None,
        "epsilon": privacy.get("epsilon"),
        "dp_sgd_epsilon": max(site_epsilons) if site_epsilons else None,
        # DP-SGD's noise on one weight per step (z C / expected batch) against the clipped mean
        # gradient's share of it (norm <= C spread evenly over the weights): z sqrt(weights) / batch
        "dp_sgd_noise_to_gradient": (cfg.train.dp_sgd_noise_multiplier * math.sqrt(weights) / cfg.data.batch_size
                                     if cfg.train.dp_sgd else None),
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


def step_cost(data: Path, preset: str, args: argparse.Namespace) -> dict[str, Any]:
    """Seconds of one training step, plain and DP-SGD, on the same batch of two cases of the
    cohort's first site, ``preset``'s model and input size, one thread; medians of interleaved steps.
    DP-SGD: each case's gradient of the whole loss (client.dp_sgd.per_sample_gradients), then
    Opacus' DPOptimizer (clip, sum, noise, scale) and the optimizer's step."""
    import torch
    from opacus.optimizers import DPOptimizer

    from client.dp_sgd import case_copies, per_sample_gradients
    from client.session import SiteSession
    from client.training import LocalTrainer, build_optimizer
    from common.config import compose
    from common.data.dataset import make_loader
    from common.model import build_model
    from common.runtime import configure_runtime, move_batch

    cfg = compose([f"model={preset}", f"data={preset}", "model.survival_head=false", "train.threads=1",
                   "train.progress=false", "data.batch_size=2"])
    site = sorted(p for p in data.iterdir() if (p / "labels.csv").exists() and p.name != "heldout")[0]
    session = SiteSession.open({"data-path": str(site), "site-name": site.name}, cfg)
    device = torch.device("cpu")
    configure_runtime(cfg, device)
    # no site cache: its preprocessed cases are those of the warm-up's data.size (32), whatever this preset's is
    loader = make_loader(session.train_cases, cfg.data, train=True, seed=0)
    batch = move_batch(next(iter(loader)), device)
    model = build_model(cfg.model, cfg.data.size, seed=0)
    trainer = LocalTrainer(model, cfg, device, loader.dataset.label_matrix())

    def loss_of(b: dict) -> torch.Tensor:
        return trainer.loss_fn(model(b["image"], b["available"], b.get("spacing")), b, model.task_weighting).total

    plain_opt = build_optimizer(model, cfg, cfg.train.lr)
    private_opt = DPOptimizer(build_optimizer(model, cfg, cfg.train.lr), noise_multiplier=1.0,
                              max_grad_norm=args.dpsgd_norm, expected_batch_size=2)

    def plain() -> None:
        plain_opt.zero_grad(set_to_none=True)
        loss_of(batch).backward()
        plain_opt.step()

    def private() -> None:
        per_sample_gradients(private_opt.params, batch, loss_of, copies=case_copies(device))
        private_opt.step()
        private_opt.zero_grad(set_to_none=True)

    times: dict[str, list[float]] = {"plain": [], "dp_sgd": []}
    plain(), private()  # warm-up: allocator, lazy initialisation
    for _ in range(args.step_repeats):
        for kind, step in (("plain", plain), ("dp_sgd", private)):
            started = time.perf_counter()
            step()
            times[kind].append(time.perf_counter() - started)
    plain_s, private_s = statistics.median(times["plain"]), statistics.median(times["dp_sgd"])
    return {"preset": preset, "size": cfg.data.size, "batch": int(batch["image"].shape[0]),
            "params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "plain_s": plain_s, "dp_sgd_s": private_s, "ratio": private_s / plain_s, "repeats": args.step_repeats}


def render(results: list[dict[str, Any]], args: argparse.Namespace, command: str, seconds: float,
           steps: list[dict[str, Any]] | None = None) -> str:
    client = bool({"client", "adaptive"} & set(args.rows))
    dpsgd = "dpsgd" in args.rows
    secure = "secaggplus" in args.rows
    title = "Privacy of the updates: " + ", ".join(
        [part for part, on in (("client-level DP", client), ("site-level DP-SGD", dpsgd), ("SecAgg+", secure)) if on]
        or ["no protection"]) + " against no protection, same budget"
    settings = []
    if client:
        settings.append(f"Client-level rows: `federation.dp_clipping_norm={args.clipping_norm:g}` (adaptive: the "
                        "initial norm), `dp_delta=1e-5`, RDP accountant, no sampling amplification.")
    if dpsgd:
        settings.append(f"DP-SGD rows: `train.dp_sgd=true train.dp_sgd_max_grad_norm={args.dpsgd_norm:g}` and the "
                        "row's `train.dp_sgd_noise_multiplier`, `dp_sgd_delta=1e-5`, Poisson batches (q = batch 2 / "
                        "a site's training cases), Opacus RDP accountant; every row without the survival head "
                        "(`model.survival_head=false`), which DP-SGD cannot train, and with the per-case Dice "
                        "(`train.seg_dice_batch=false`).")
    if secure:
        settings.append(f"SecAgg+ row: `federation.secure_aggregation=secaggplus`, 3 shares, reconstruction threshold "
                        f"{args.secagg_threshold}, Flower's clipping range 8 and max weight 1000, 2^26 quantization "
                        "levels, `federation.update_bound=off`.")
    columns: list[tuple[str, Any]] = [("held-out WT Dice", lambda r: fmt(r["dice_wt"])),
                                      ("mean AUC", lambda r: fmt(r["mean_auc"]))]
    if client:
        columns += [("epsilon after the last round", lambda r: fmt(r["epsilon"])),
                    ("noise std per weight", lambda r: fmt(r["noise_std"])),
                    ("noise / update per weight", lambda r: fmt(r["noise_to_update"])),
                    ("updates clipped", lambda r: f"{r['clipped']} of {r['updates']}")]
    if dpsgd:
        columns += [("DP-SGD epsilon per case (largest site)", lambda r: fmt(r.get("dp_sgd_epsilon"))),
                    ("DP-SGD noise / gradient per weight", lambda r: fmt(r.get("dp_sgd_noise_to_gradient")))]
    if secure:
        columns.append(("SecAgg+ step per weight", lambda r: fmt(r.get("secagg_step"))))
    columns += [("s per round", lambda r: f"{r['round_seconds']:.1f}"),
                ("MB per round", lambda r: f"{r['round_bytes'] / 1e6:.1f}")]
    lines = [
        f"# {title}",
        "",
        f"Command: `{command}` ({platform.node()}, {platform.processor() or platform.machine()}; "
        f"{seconds / 60:.1f} min for all rows). The real ServerApp and ClientApps in one process "
        f"(`deploy/simulation.py`), synthetic `tiny` cohort: {args.sites} training sites x {args.cases} cases at "
        f"32^3, held-out center {args.heldout} cases; `tiny` model; {args.rounds} rounds x {args.epochs} local "
        f"epochs for every row; one seed. " + " ".join(settings),
        "",
        "| run | " + " | ".join(h for h, _ in columns) + " |",
        "| --- |" + " ---: |" * len(columns),
    ]
    lines += ["| " + " | ".join([r["name"], *(cell(r) for _, cell in columns)]) + " |" for r in results]
    lines.append("")
    notes = []
    if client:
        notes.append(
            f"Client-level columns: epsilon at delta 1e-5 after all {args.rounds} rounds; the noise's standard "
            f"deviation on each of the model's {results[0]['weights']} floating-point weights (z*C/N, N = the sites "
            "averaged); the same divided by C/sqrt(weights), the share of one weight in an update of norm C spread "
            "evenly, i.e. how many times a round's clipped signal the noise is; the sites' updates clipped over all "
            "rounds (the report names their norms).")
    if dpsgd:
        notes.append(
            f"DP-SGD column: each site's epsilon at delta 1e-5 for one of its training cases after all {args.rounds} "
            "rounds (its accountant in the site's state folder; the sites differ by their number of cases), the "
            "largest of the sites'; the noise's standard deviation on one weight per step (z*C / the expected "
            "batch of 2) divided by C/sqrt(weights), the share of one weight in a mean clipped gradient of norm C "
            "spread evenly, i.e. how many times a step's signal the noise is. The training-loss metrics are not "
            "sent under DP-SGD.")
    if secure:
        notes.append(
            "SecAgg+ column: the bound of the quantization error per weight of the mean update in the last round "
            "(metrics.json adds the weights' rounding); its bytes count the protocol's four messages per round, "
            "and the masked vectors are int64, twice float32's bytes.")
    notes.append(
        "The server's wall time of a training phase and the bytes to and from all sites per round. A warm-up run "
        f"fills the sites' caches first, so no row pays for them. {args.heldout} held-out cases give an AUC "
        f"standard error near 0.15: the AUC column is not evidence either way. Raw values: "
        f"`{args.report.with_suffix('.json').name}` next to this file.")
    lines += [" ".join(notes), ""]
    if steps:
        lines += [
            "## Cost of one training step: DP-SGD against plain",
            "",
            "The same batch of 2 cases from the cohort's first site, one thread, median of "
            f"{steps[0]['repeats']} interleaved steps each (`step_cost` in `tests/benchmarks/bench_privacy.py`). "
            "Plain: one forward/backward of the batch and the optimizer step. DP-SGD: one forward/backward per "
            "case (the whole loss of that case alone, as a batch of the case twice: `client.dp_sgd.case_copies`), "
            "then Opacus' DPOptimizer clips each case's gradient, sums, adds the noise and steps.",
            "",
            "| preset | input | params | plain s/step | DP-SGD s/step | ratio |",
            "| --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        lines += [f"| {c['preset']} | {c['batch']}x4x{c['size']}^3 | {c['params']} | {c['plain_s']:.3f} | "
                  f"{c['dp_sgd_s']:.3f} | {c['ratio']:.2f} |" for c in steps]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    started = time.perf_counter()
    data = cohort(args)
    norm = f"federation.dp_clipping_norm={args.clipping_norm}"
    plans: list[tuple[str, list[str]]] = []
    if "none" in args.rows:
        plans.append(("no DP", []))
    if "client" in args.rows:
        plans += [(f"fixed, z={z:g}", ["federation.dp=fixed", f"federation.dp_noise_multiplier={z}", norm])
                  for z in args.multipliers]
    if "adaptive" in args.rows and args.adaptive > 0:
        plans.append((f"adaptive, z={args.adaptive:g}",
                      ["federation.dp=adaptive", f"federation.dp_noise_multiplier={args.adaptive}", norm]))
    if "dpsgd" in args.rows:
        plans += [(f"DP-SGD, z={z:g}", ["train.dp_sgd=true", f"train.dp_sgd_noise_multiplier={z}",
                                        f"train.dp_sgd_max_grad_norm={args.dpsgd_norm}",
                                        "train.seg_dice_batch=false"])
                  for z in args.dpsgd_multipliers]
    if "secaggplus" in args.rows:
        plans.append((f"SecAgg+, threshold {args.secagg_threshold}",
                      ["federation.secure_aggregation=secaggplus", "federation.update_bound=off",
                       "federation.secagg_num_shares=3", f"federation.secagg_reconstruction_threshold={args.secagg_threshold}"]))
    run("warm-up", data, args, [], rounds=1)  # the sites' validation and preprocessing caches
    steps = [step_cost(data, preset, args) for preset in args.step_presets] if "dpsgd" in args.rows else []
    for cost in steps:
        print(json.dumps(cost), flush=True)
    results = []
    for name, dp in plans:
        results.append(run(name.replace(", ", "-").replace("=", "").replace(" ", "-"), data, args, dp))
        results[-1]["name"] = name
        print(json.dumps(results[-1]), flush=True)
    command = "make bench-privacy" + (f" ARGS={shlex.quote(' '.join(argv))}" if argv else "")
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(render(results, args, command, time.perf_counter() - started, steps))
    raw: Any = {"rows": results, "step_cost": steps} if steps else results
    args.report.with_suffix(".json").write_text(json.dumps(raw, indent=1))
    print(args.report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
