"""``fedglioma check-site DIR [DIR ...] [--json] [--shallow] [--allow-external-links]
[--label-convention NAME]``: what a site folder holds, what is usable, what is missing, what is
broken and how to fix it, and how its segmentations are read (the label convention; resection
cavity volumes under ``brats2024-post``).

The report is for the site's own eyes: it names case IDs and paths. Only the counts per rejection
category (``rejection_counts``) are fit to share with the coordinator.

Exit status: 0 every site has at least one usable case; 1 a site has no usable case, or its
labels.csv or site.json is broken; 2 a folder does not exist.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

from common.contract import LABEL_CONVENTION_TEXT, LABEL_CONVENTIONS, RESECTION_CAVITY, SITE_JSON

EXIT_OK, EXIT_UNUSABLE, EXIT_NOT_FOUND = 0, 1, 2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dirs", nargs="+", type=Path, metavar="DIR",
                        help="site folder(s): one subfolder per case and a labels.csv")
    parser.add_argument("--json", action="store_true", help="print the report as JSON (no prose)")
    parser.add_argument("--shallow", action="store_true",
                        help="check names, labels.csv and headers only; skip reading voxels (faster, "
                             "misses truncated files, NaN/inf voxels and bad segmentation values)")
    parser.add_argument("--allow-external-links", action="store_true",
                        help="accept case folders and files that are symbolic links leading out of the site "
                             "folder (rejected by default: they can pull in another center's cases)")
    parser.add_argument("--label-convention", choices=sorted(LABEL_CONVENTIONS), default=None,
                        help=f"how the segmentations are labelled (as the SuperNode's node config "
                             f"label-convention or the site's {SITE_JSON} declares it): "
                             + "; ".join(f"{k}: {v}" for k, v in LABEL_CONVENTION_TEXT.items())
                             + ". Default: the site's site.json, else each case's file naming when its values agree")
    parser.add_argument("--warm", action="store_true",
                        help="also fill the site's cache (validation results and preprocessed cases, in its "
                             "state folder) so that the first federated round does not have to")
    parser.add_argument("--experiment", default="demo",
                        help="with --warm: the experiment preset whose preprocessing (data.size) to cache (default: demo)")
    parser.add_argument("--state-path", type=Path, default=None,
                        help="with --warm: the site's state folder, as the SuperNode's node config state-path "
                             "(default: the per-user default for the site name; one DIR only)")


def check_site(
    root: Path, *, deep: bool = True, allow_external_links: bool = False, label_convention: str | None = None,
    validation_cache: Any = None, indexes: list[Any] | None = None,
) -> tuple[int, dict[str, Any]]:
    """(exit status, JSON-able report) for one site folder; ``report["error"]`` explains a
    non-zero status. ``validation_cache``: a :class:`common.data.cache.ValidationCache` to fill;
    ``indexes``: the scanned :class:`common.data.site.SiteIndex` is appended to it."""
    # Heavy (torch, flwr): imported when the command runs, so that `fedglioma --help` stays fast.
    from common.data.site import LabelsCsvError, SiteDeclarationError, SiteNotFoundError, scan_site

    base = {"site": root.name, "root": str(root), "deep": deep, "allow_external_links": allow_external_links}
    try:
        index = scan_site(root, deep=deep, allow_external_links=allow_external_links,
                          label_convention=label_convention, validation_cache=validation_cache)
    except SiteNotFoundError as exc:
        return EXIT_NOT_FOUND, base | {"usable": 0, "error": str(exc)}
    except (LabelsCsvError, SiteDeclarationError) as exc:
        return EXIT_UNUSABLE, base | {"usable": 0, "error": str(exc)}
    report = base | index.summary()
    if indexes is not None:
        indexes.append(index)
    if not index.cases:
        report["error"] = (
            f"site {index.name} has no usable case ({index.rejection_summary()}): "
            "fix the problems listed above, or check that DIR is the site folder"
        )
        return EXIT_UNUSABLE, report
    return EXIT_OK, report


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], indent: str = "  ") -> list[str]:
    """Left-aligned text columns (first column) and right-aligned numbers (others)."""
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = []
    for n, row in enumerate(cells):
        parts = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]
        lines.append(indent + "  ".join(parts).rstrip())
        if n == 0:
            lines.append(indent + "  ".join("-" * w for w in widths))
    return lines


def format_report(report: dict[str, Any]) -> str:
    """Human-readable text of one site's report (see :func:`check_site`)."""
    lines = [f"Site {report['site']}  ({report['root']})"]
    if "warm" in report:
        warm = report["warm"]
        lines.append(f"  cache: {warm['cases_cached']} cases validated and preprocessed for "
                     f"+experiment={warm['experiment']} in {warm['cache']}")
    if "sequences" not in report:  # the site could not be scanned at all
        lines.append(f"  ERROR: {report['error']}")
        return "\n".join(lines)
    usable, rejected = report["usable"], report["rejected_count"]
    lines.append(f"  usable cases: {usable} of {usable + rejected}   rejected: {rejected}   "
                 f"complete (all 4 sequences): {report['complete']}")
    if report["naming"]:
        lines.append("  file naming: " + ", ".join(f"{k} {v}" for k, v in sorted(report["naming"].items())))
    if usable:
        lines.append("")
        lines += _table(["sequence", "cases", "missing"],
                        [[s, n, usable - n] for s, n in report["sequences"].items()])
        lines.append("")
        lines += _table(["sequences available (pattern)", "cases"], list(report["patterns"].items()))
        lines.append("")
        rows = []
        for task, counts in report["labels"].items():
            classes = [k for k in counts if k != "unknown"]
            rows.append([task, *(f"{k} {counts[k]}" for k in classes), f"unknown {counts['unknown']}"])
        lines += _table(["task", "class 0", "class 1", "no label"], rows)
        survival = report["survival"]
        lines.append(f"  survival: {survival['known']} known ({survival['events']} deaths, "
                     f"{survival['known'] - survival['events']} censored), {survival['unknown']} unknown")
        lines.append("")
        lines.append(f"  segmentations: {report['segmentations']} of {usable} usable cases")
        lines += _convention_lines(report)
    if report["rejected"]:
        lines.append("")
        kinds = ", ".join(f"{n} {category}" for category, n in report["rejection_counts"].items())
        lines.append(f"  Rejected cases ({rejected}): {kinds}")
        for r in report["rejected"]:
            lines.append(f"    {r['case_id']}  [{r['category']}]  ({r['path']})")
            lines.append(f"      reason: {r['reason']}")
            lines.append(f"      fix:    {r['fix']}")
    if report["ignored_files"]:
        lines.append("")
        lines.append(f"  NIfTI files matching no expected name (not used): {len(report['ignored_files'])}")
        lines += [f"    {p}" for p in report["ignored_files"]]
        lines.append("    fix: name them <case>_t1/_t1ce/_t2/_flair/_seg.nii.gz or <case>-t1n/-t1c/-t2w/-t2f/-seg.nii.gz"
                     " if they are sequences of the case, otherwise ignore this note")
    if not report["deep"]:
        lines.append("")
        lines.append("  (--shallow: voxels were not read; run without --shallow to check every file's content)")
    if "error" in report:
        lines.append("")
        lines.append(f"  ERROR: {report['error']}")
    return "\n".join(lines)


def _convention_lines(report: dict[str, Any]) -> list[str]:
    """How the segmentations are read: the declared convention or the one each naming implies, and
    the resection cavity volumes."""
    convention = report["label_convention"]
    counts = convention["cases"]
    if convention["declared"]:
        lines = [f"  label convention: {convention['declared']} (declared by {convention['source']}): "
                 f"{LABEL_CONVENTION_TEXT[convention['declared']]}"]
    else:
        lines = [f"  label convention: not declared ({SITE_JSON} or --label-convention); read per case from its "
                 "file naming, values checked:"]
        lines += [f"    {name}: {n} segmentation(s) ({LABEL_CONVENTION_TEXT[name]})" for name, n in counts.items()]
    cavities = report["resection_cavity_ml"]
    if cavities:
        lines.append(f"  resection cavity (label {RESECTION_CAVITY}, background for WT/TC/ET): {len(cavities)} case(s), "
                     f"{sum(cavities.values()):.3g} mL in all")
        lines += [f"    {case_id}: {ml:.3g} mL" for case_id, ml in cavities.items()]
    return lines


def warm_cache(index: Any, state_dir: Path, experiment: str) -> dict[str, Any]:
    """Preprocess every usable case of ``index`` into the site cache under ``state_dir``, the way
    a federated round with ``+experiment=<experiment>`` will read it."""
    # torch and MONAI: only with --warm
    from common.config import compose
    from common.data.cache import preprocessed_dir
    from common.data.dataset import make_loader
    from common.data.site import split_cases

    cfg = compose([f"+experiment={experiment}"])
    folder = preprocessed_dir(state_dir)
    train_cases, val_cases = split_cases(index.cases, cfg.data.val_fraction, cfg.data.split_seed)
    for cases, train in ((train_cases, True), (val_cases, False)):
        if cases:
            dataset = make_loader(cases, cfg.data, train=train, cache_dir=folder).dataset
            for i in range(len(dataset)):
                dataset[i]
    return {"cache": str(folder), "cases_cached": len(index.cases), "experiment": experiment}


def run(args: argparse.Namespace) -> int:
    # imported when the command runs (torch, MONAI), so that `fedglioma --help` stays fast
    from client.state import default_state_path
    from common.data.cache import ValidationCache, site_cache_dir

    if args.warm and args.state_path is not None and len(args.dirs) > 1:
        print("check-site: --state-path names one site's state folder; pass one DIR with it", file=sys.stderr)
        return EXIT_NOT_FOUND
    status, reports = EXIT_OK, []
    for root in args.dirs:
        root = Path(root).expanduser()
        state = (args.state_path or default_state_path(root.resolve().name)) if args.warm else None
        cache = ValidationCache(site_cache_dir(state)) if state is not None else None
        indexes: list[Any] = []
        code, report = check_site(root, deep=not args.shallow,
                                  allow_external_links=args.allow_external_links,
                                  label_convention=args.label_convention, validation_cache=cache, indexes=indexes)
        if args.warm and indexes and indexes[0].cases:
            report["warm"] = warm_cache(indexes[0], state, args.experiment)
        status = max(status, code)  # 2 (not found) > 1 (unusable) > 0
        reports.append(report)
        if not args.json:
            print(format_report(report), flush=True)
            print()
    if args.json:
        print(json.dumps({"ok": status == EXIT_OK, "sites": reports}, indent=1))
    elif status != EXIT_OK:
        failed = [r["site"] for r in reports if "error" in r]
        print(f"check-site: {len(failed)} of {len(reports)} site folder(s) unusable: {', '.join(failed)} "
              "(see ERROR above)", file=sys.stderr)
    return status
