"""``fedglioma synth OUT``: write a synthetic multi-center glioma cohort (see docs/synthetic-cohort.md)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from synth.cohort import PRESETS, CohortError, format_summary, generate_cohort


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", type=Path, metavar="OUT",
                        help="output folder (one subfolder per site, heldout/, cohort.json)")
    sizes = "; ".join(f"{k}: {p.sites} sites x {p.cases_per_site} cases, {p.heldout_cases} held-out, {p.shape}^3"
                      for k, p in PRESETS.items())
    parser.add_argument("--preset", choices=tuple(PRESETS), default="tiny", help=f"cohort size ({sizes}); default tiny")
    parser.add_argument("--sites", type=int, help="number of training sites (overrides the preset)")
    parser.add_argument("--cases-per-site", type=int, help="cases per training site (overrides the preset)")
    parser.add_argument("--heldout-cases", type=int, help="cases of the held-out center (overrides the preset)")
    parser.add_argument("--shape", type=int,
                        help="cubic volume size in voxels; voxel size is 240 mm / shape (overrides the preset)")
    parser.add_argument("--seed", type=int, default=0,
                        help="random seed; the same arguments give the same cohort (default 0)")
    parser.add_argument("--workers", type=int, default=2, help="processes generating cases in parallel (default 2)")
    parser.add_argument("--force", action="store_true",
                        help="write into a non-empty folder that is not a previous cohort (nothing there is deleted)")


def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    try:
        cohort = generate_cohort(
            args.out, args.preset, sites=args.sites, cases_per_site=args.cases_per_site,
            heldout_cases=args.heldout_cases, shape=args.shape, seed=args.seed, force=args.force,
            workers=args.workers,
        )
    except CohortError as exc:
        print(f"fedglioma synth: error: {exc}", file=sys.stderr)
        return 2
    print(format_summary(cohort))
    print(f"wrote {args.out} in {time.perf_counter() - start:.0f} s "
          f"(true molecular status of every case: {args.out / cohort['ground_truth']}; benchmarks only)")
    return 0
