"""Post-processing ablation (issue #16 item 2): does each step help on a held-out center?

A tiny network is trained on the pooled training sites of a synthetic cohort (or ``--model CKPT``
is used), then every held-out case goes through ``fedglioma predict``'s path
(:class:`fedglioma.predict.Predictor`: preprocessing, network, back to the case's own grid) and is
scored on that grid against its reference segmentation, without post-processing, with each step
of :mod:`common.evaluation.postprocess` alone, and with all of them:

* Dice and HD95 (mm) per region (WT/TC/ET; :func:`common.evaluation.metrics.segmentation_scores`);
* the BraTS 2023+ lesion-wise Dice and HD95 (:func:`common.evaluation.metrics.lesion_wise_scores`),
  which is what false-positive blobs and missed satellites move;
* the mean over the held-out cases with a 95 % bootstrap CI (resampled cases), the paired
  difference to "none" with its CI, and how many cases each variant changed.

    make bench-post                                    # defaults below, about 5 minutes on 2 CPUs
    python tests/benchmarks/bench_postprocess.py --model runs/demo/checkpoints/best.pt --data data/demo-cohort
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from common.contract import REGIONS  # noqa: E402

VARIANTS: dict[str, tuple[str, ...]] = {
    "none": (),
    "density": ("density",),
    "small-components": ("small-components",),
    "holes": ("holes",),
    "all": ("all",),
}
METRICS: tuple[str, ...] = tuple(f"{m}_{r}" for m in ("dice", "hd95", "lesion_dice", "lesion_hd95") for r in REGIONS)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=ROOT / "data/bench-post-cohort", help="cohort (generated when missing)")
    p.add_argument("--preset", default="tiny", help="synthetic preset used when generating the cohort")
    p.add_argument("--cases-per-site", type=int, default=12, help="training cases per site when generating")
    p.add_argument("--heldout-cases", type=int, default=40, help="held-out cases when generating")
    p.add_argument("--model", type=Path, help="checkpoint to score instead of training one")
    p.add_argument("--epochs", type=int, default=12, help="training epochs over the pooled training sites")
    p.add_argument("--lr", type=float, default=0.003)
    p.add_argument("--out", type=Path, default=ROOT / "runs/bench-post", help="where the trained checkpoint goes")
    p.add_argument("--min-component-ml", type=float, default=None,
                   help="threshold of small-components (default: common.evaluation.postprocess.MIN_COMPONENT_ML)")
    p.add_argument("--bootstrap", type=int, default=1000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--report", type=Path, default=ROOT / "docs/benchmarks/postprocessing.md")
    return p.parse_args(argv)


def ensure_cohort(args: argparse.Namespace) -> Path:
    from synth import generate_cohort

    data = args.data.resolve()
    if not (data / "cohort.json").exists():
        print(f"generating the '{args.preset}' cohort in {data} ...", flush=True)
        generate_cohort(data, preset=args.preset, cases_per_site=args.cases_per_site,
                        heldout_cases=args.heldout_cases, workers=1)
    return data


def train(args: argparse.Namespace, data: Path) -> tuple[Path, float]:
    """A tiny network trained on the pooled training sites (every case; no selection on the
    held-out center); returns the checkpoint (RunFolder's payload, identity calibration) and seconds."""
    import torch

    from client.training import LocalTrainer
    from common.config import compose, replace, to_mapping
    from common.data.dataset import make_loader
    from common.data.site import load_site
    from common.model import build_model
    from common.runtime import configure_runtime

    cfg = compose(["+experiment=tiny"])
    cfg = replace(cfg, train={"lr": args.lr, "threads": args.threads, "seed": args.seed, "progress": False})
    configure_runtime(cfg, torch.device("cpu"))
    sites = sorted(p for p in data.iterdir() if (p / "labels.csv").exists() and p.name != "heldout")
    cases = [case for site in sites for case in load_site(site).cases]
    loader = make_loader(cases, cfg.data, train=True, seed=args.seed)
    model = build_model(cfg.model, cfg.data.size, seed=args.seed)
    trainer = LocalTrainer(model, cfg, torch.device("cpu"), loader.dataset.label_matrix())
    start = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        result = trainer.run(loader, epochs=1, desc=f"epoch {epoch}")
        print(f"  epoch {epoch}: loss {result.metrics.get('loss', float('nan')):.3f}", flush=True)
    seconds = time.perf_counter() - start
    path = args.out.resolve() / "model.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"round": args.epochs, "state_dict": model.state_dict(), "model": dict(to_mapping(cfg)["model"]),
                "size": cfg.data.size, "calibration": {}}, path)
    return path, seconds


def score_heldout(args: argparse.Namespace, data: Path, checkpoint: Path) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, int]]:
    """Per variant, per metric, the (N,) scores of the held-out cases; and the cases each variant changed."""
    import nibabel as nib
    import torch

    from common.contract import LABEL_CONVENTIONS
    from common.data.site import load_site
    from common.evaluation.metrics import lesion_wise_scores, segmentation_scores
    from common.evaluation.postprocess import MIN_COMPONENT_ML, postprocess
    from fedglioma.predict import Predictor, read_case, voxel_size_mm

    predictor = Predictor(checkpoint, mc_passes=0)
    min_ml = MIN_COMPONENT_ML if args.min_component_ml is None else args.min_component_ml
    scores: dict[str, dict[str, list[float]]] = {v: {m: [] for m in METRICS} for v in VARIANTS}
    changed = {v: 0 for v in VARIANTS}
    for case in load_site(data / "heldout").cases:
        inference = predictor.infer(read_case(case.folder))
        table = LABEL_CONVENTIONS[case.label_convention]
        raw = np.asarray(nib.load(case.seg).dataobj).astype(np.int64)
        reference = torch.as_tensor(np.vectorize(table.__getitem__, otypes=[np.int64])(raw))[None, None]
        spacing = torch.tensor([voxel_size_mm(inference.affine)], dtype=torch.float64)
        for variant, steps in VARIANTS.items():
            labels = postprocess(inference.case_labels, spacing[0].tolist(), steps, min_volume_ml=min_ml)
            changed[variant] += int(not np.array_equal(labels, inference.case_labels))
            pred = torch.as_tensor(labels.astype(np.int64))[None, None]
            values = segmentation_scores(pred, reference, spacing) | lesion_wise_scores(pred, reference, spacing)
            for metric in METRICS:
                scores[variant][metric].append(float(values[metric][0]))
    return {v: {m: np.asarray(x) for m, x in per.items()} for v, per in scores.items()}, changed


def evaluate_dice(data: Path, checkpoint: Path) -> dict[str, float]:
    """Dice of the same model on the same cases through the evaluation loop (``fedglioma evaluate``:
    the network grid, against the reference taken there)."""
    from common.config import DataConfig
    from common.data.dataset import make_loader
    from common.data.site import load_site
    from common.evaluation.loop import evaluate
    from common.model.checkpoint import load_model

    model, payload = load_model(checkpoint)
    loader = make_loader(load_site(data / "heldout").cases, DataConfig(size=int(payload["size"]), cache=False), train=False)
    metrics = evaluate(model, loader)
    return {r: float(metrics[f"dice_{r}"]) for r in REGIONS}


def bootstrap_ci(values: np.ndarray, rng: np.random.Generator, n_boot: int) -> list[float]:
    """[mean, 2.5 %, 97.5 %] of the mean over cases (percentile bootstrap over the cases)."""
    idx = rng.integers(0, len(values), size=(n_boot, len(values)))
    means = values[idx].mean(axis=1)
    return [float(values.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]


def summarise(scores: dict[str, dict[str, np.ndarray]], args: argparse.Namespace) -> dict[str, dict[str, dict[str, list[float]]]]:
    """Per variant and metric: ``{"mean": [m, lo, hi], "delta": [d, lo, hi]}`` (delta: paired, vs none)."""
    out: dict[str, dict[str, dict[str, list[float]]]] = {}
    for v, per in scores.items():
        out[v] = {}
        for m, values in per.items():
            rng = np.random.default_rng(args.seed)
            out[v][m] = {"mean": bootstrap_ci(values, rng, args.bootstrap),
                         "delta": bootstrap_ci(values - scores["none"][m], np.random.default_rng(args.seed), args.bootstrap)}
    return out


def _cell(entry: dict[str, list[float]], digits: int, delta: bool) -> str:
    m, lo, hi = entry["mean"]
    text = f"{m:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"
    if delta:
        d, dlo, dhi = entry["delta"]
        text += f"<br>Δ {d:+.{digits}f} [{dlo:+.{digits}f}, {dhi:+.{digits}f}]"
    return text


def _reading(summary: dict, changed: dict[str, int]) -> list[str]:
    """One line per variant: the changes whose paired 95 % CI excludes 0 (better or worse)."""
    lines = []
    for v in summary:
        if v == "none":
            continue
        found = []
        for m in METRICS:
            d, lo, hi = summary[v][m]["delta"]
            if lo > 0 or hi < 0:
                better = d > 0 if "dice" in m else d < 0
                found.append(f"{m.replace('_', ' ')} {d:+.3g} ({'better' if better else 'worse'})")
        text = "; ".join(found) if found else "no change whose 95 % CI excludes 0"
        lines.append(f"* `{v}` (changed {changed[v]} cases): {text}.")
    return lines


def write_report(path: Path, command: str, info: dict, summary: dict, changed: dict[str, int]) -> None:
    lines = [
        "# Post-processing ablation (issue #16 item 2)",
        "",
        f"Command: `{command}`",
        "",
        f"Cohort: `{info['cohort']}` ({info['cohort_summary']}). Model: {info['model']}. Held-out center: "
        f"{info['n_cases']} cases, scored on each case's own grid (what `fedglioma predict` writes) against its "
        f"reference; small-components threshold {info['min_component_ml']} mL. Mean over the cases with a 95 % "
        f"bootstrap CI ({info['bootstrap']} resamples of the cases); Δ: paired difference to `none`. Wall time "
        f"{info['seconds']:.0f} s.",
        "",
        "The same model through the evaluation loop (`fedglioma evaluate`: network grid): Dice "
        + ", ".join(f"{r.upper()} {v:.3f}" for r, v in info["evaluate_dice"].items())
        + "; predict's masks without post-processing on the cases' own grids: "
        + ", ".join(f"{r.upper()} {summary['none'][f'dice_{r}']['mean'][0]:.3f}" for r in REGIONS) + ".",
        "",
    ]
    groups = (("Dice (per region)", "dice", 3), ("HD95 in mm (per region)", "hd95", 1),
              ("Lesion-wise Dice (BraTS 2023+)", "lesion_dice", 3), ("Lesion-wise HD95 in mm", "lesion_hd95", 1))
    for title, prefix, digits in groups:
        lines += [f"## {title}", "", "| variant | cases changed | " + " | ".join(r.upper() for r in REGIONS) + " |",
                  "| --- | ---: | " + " | ".join("---:" for _ in REGIONS) + " |"]
        for v in summary:
            cells = [_cell(summary[v][f"{prefix}_{r}"], digits, v != "none") for r in REGIONS]
            lines.append(f"| {v} | {changed[v]} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## Reading", "", *_reading(summary, changed), ""]
    lines += [
        "Steps (`common/evaluation/postprocess.py`): `density` = GMMAS Algorithm 1 (runs only when the "
        "tumor fills < 10 % of its bounding box; keeps the densest 26-connected clusters until they hold 60 % of "
        "the tumor voxels); `small-components` = whole-tumor components below the threshold removed; `holes` = "
        "holes of WT and TC filled with the nearest label (MMRAN). `all` applies them in that order.",
        "",
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    path.with_suffix(".json").write_text(json.dumps({"command": command, **info, "cases_changed": changed,
                                                      "results": summary}, indent=1))


def main(argv: list[str] | None = None) -> int:
    import torch

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    command = " ".join(["python tests/benchmarks/bench_postprocess.py", *map(shlex.quote, argv or sys.argv[1:])])
    start = time.perf_counter()
    data = ensure_cohort(args)
    if args.model is not None:
        checkpoint, model_text = args.model, f"`{args.model}`"
    else:
        print(f"training a tiny network for {args.epochs} epochs on the pooled training sites ...", flush=True)
        checkpoint, seconds = train(args, data)
        model_text = (f"tiny network (`model=tiny`, 32^3) trained {args.epochs} epochs on the pooled training sites "
                      f"(every case, lr {args.lr}, seed {args.seed}; {seconds:.0f} s)")
    scores, changed = score_heldout(args, data, checkpoint)
    evaluated = evaluate_dice(data, checkpoint)
    summary = summarise(scores, args)
    from common.evaluation.postprocess import MIN_COMPONENT_ML

    cohort = json.loads((data / "cohort.json").read_text())
    sites = {k: v for k, v in cohort["sites"].items() if k != "heldout"}
    info = {
        "cohort": data.name, "model": model_text, "n_cases": int(len(scores["none"]["dice_wt"])),
        "cohort_summary": f"preset {cohort.get('preset')}, {len(sites)} training sites x "
                          f"{next(iter(sites.values()))['n_cases']} cases, {cohort['shape'][0]}^3 voxels of "
                          f"{cohort['voxel_mm']} mm",
        "min_component_ml": MIN_COMPONENT_ML if args.min_component_ml is None else args.min_component_ml,
        "bootstrap": args.bootstrap, "evaluate_dice": evaluated, "seconds": time.perf_counter() - start,
        "per_case": {v: {m: x.tolist() for m, x in per.items()} for v, per in scores.items()},
    }
    write_report(args.report, command, info, summary, changed)
    print(args.report.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
