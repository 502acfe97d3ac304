"""``report.html`` and ``plots/*.png`` from a run folder's ``metrics.json``.

The report is rebuilt from metrics.json alone (after every round), so it can be regenerated at
any time: ``python -m server.report runs/<name>``. Images are embedded so the HTML file can be
mailed or opened offline. Like every file of the run folder, report.html and the plots are written
atomically and readable by their owner only (:func:`common.io.atomic_write`).
"""

from __future__ import annotations

import base64
import html
import math
import sys
from pathlib import Path
from typing import Any

from common.contract import LESION_METRIC_KEYS, SEQUENCES, SURVIVAL_METRIC_KEYS, TASKS
from common.io import atomic_write
from server.run_folder import RunFolderError, read_metrics

HELDOUT_PLOTS: dict[str, tuple[str, ...]] = {
    "heldout_dice": ("dice_wt", "dice_tc", "dice_et"),
    "heldout_auc": tuple(f"auc_{t}" for t in TASKS),
    "heldout_hd95": ("hd95_wt", "hd95_tc", "hd95_et"),
    "heldout_lesion_dice": ("lesion_dice_wt", "lesion_dice_tc", "lesion_dice_et"),
}
#: Plotted when a round has it: the survival head's C-index on the held-out center.
SURVIVAL_PLOT = ("heldout_cindex", ("cindex",))
FINAL_TABLE_KEYS: tuple[str, ...] = (
    "dice_wt", "dice_tc", "dice_et", "hd95_wt",
    *(f"auc_{t}" for t in TASKS), *(f"bacc_{t}" for t in TASKS), "n_cases",
)


def _num(value: Any) -> float:
    try:
        f = float(value)
    except (TypeError, ValueError):
        return math.nan
    return f


def _fmt(value: Any) -> str:
    f = _num(value)
    if math.isnan(f):
        return "–"
    return f"{f:.0f}" if f.is_integer() and abs(f) >= 1 else f"{f:.3f}"


def _sig(value: Any) -> str:
    """Three significant digits (a delta of 1e-05 stays readable), "–" for none."""
    f = _num(value)
    return "–" if math.isnan(f) else f"{f:.3g}"


def _figure() -> tuple[Any, Any]:
    """A figure and its axes on matplotlib's Agg canvas, with fixed margins.

    The object API (``matplotlib.figure.Figure``), not pyplot: no figure manager, no backend to
    choose, nothing to close. Fixed margins instead of ``tight_layout``, which draws every figure
    once more to measure it (a third of a report's time, rewritten after every round)."""
    # Imported on the first plot: matplotlib is only needed where reports are written.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 3.6), dpi=100)
    fig.subplots_adjust(left=0.1, right=0.98, bottom=0.13, top=0.91)
    return fig, fig.add_subplot()


def _plot_series(path: Path, title: str, xs: list[int], series: dict[str, list[float]], ylabel: str) -> None:
    fig, ax = _figure()
    for label, ys in series.items():
        if any(not math.isnan(y) for y in ys):
            ax.plot(xs, ys, marker="o", label=label)
    ax.set_title(title)
    ax.set_xlabel("round")
    from matplotlib.ticker import MaxNLocator  # with the figure: only where reports are written

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds are whole numbers
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=8, ncol=2)
    atomic_write(path, lambda p: fig.savefig(p, format="png"))


def _plot_km(path: Path, round_: int, curves: dict[str, Any]) -> None:
    """Kaplan-Meier step curves of the predicted low- and high-risk halves (metrics.json's
    ``km_risk_groups``: per group ``time``, ``survival``, ``n``, ``events``)."""
    fig, ax = _figure()
    for group in ("low", "high"):
        curve = curves.get(group) or {}
        if curve.get("time"):
            label = f"{group} predicted risk (n={curve.get('n')}, deaths={curve.get('events')})"
            ax.step(curve["time"], curve["survival"], where="post", label=label)
    ax.set_title(f"held-out center, round {round_}: Kaplan-Meier by predicted risk (median split)", fontsize=10)
    ax.set_xlabel("days")
    ax.set_ylabel("survival probability")
    ax.set_ylim(0.0, 1.02)
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=8)
    atomic_write(path, lambda p: fig.savefig(p, format="png"))


def make_plots(run_dir: Path, history: dict[str, Any]) -> list[Path]:
    rounds = history.get("rounds", [])
    xs = [r["round"] for r in rounds]
    plots = run_dir / "plots"
    written: list[Path] = []
    for name, keys in HELDOUT_PLOTS.items():
        series = {k: [_num(r["heldout"].get(k)) for r in rounds] for k in keys}
        unit = "mm" if "hd95" in name else "score"
        _plot_series(plots / f"{name}.png", f"held-out center: {name.split('_', 1)[1]}", xs, series, unit)
        written.append(plots / f"{name}.png")
    name, keys = SURVIVAL_PLOT
    if any(not math.isnan(_num(r["heldout"].get(k))) for r in rounds for k in keys):
        series = {k: [_num(r["heldout"].get(k)) for r in rounds] for k in keys}
        _plot_series(plots / f"{name}.png", "held-out center: C-index of the survival head", xs, series, "C-index")
        written.append(plots / f"{name}.png")
    curves = rounds[-1]["heldout"].get("km_risk_groups") if rounds else None
    if isinstance(curves, dict):
        _plot_km(plots / "heldout_km.png", rounds[-1]["round"], curves)
        written.append(plots / "heldout_km.png")
    sites = sorted({s for r in rounds for s in r.get("sites", {})})
    if sites:
        series = {s: [_num(r.get("sites", {}).get(s, {}).get("dice_wt")) for r in rounds] for s in sites}
        _plot_series(plots / "sites_dice_wt.png", "per-site validation WT Dice", xs, series, "Dice")
        written.append(plots / "sites_dice_wt.png")
    train_sites = sorted({s for r in rounds for s in r.get("train", {})})
    if train_sites:
        series = {s: [_num(r.get("train", {}).get(s, {}).get("loss")) for r in rounds] for s in train_sites}
        _plot_series(plots / "sites_train_loss.png", "per-site local training loss", xs, series, "loss")
        written.append(plots / "sites_train_loss.png")
    return written


def _site_round_table(rounds: list[dict[str, Any]], title: str, keys: list[str]) -> list[str]:
    """A heading and a table of ``keys`` from the training metrics, one row per round and site
    that sent ``keys[0]``; nothing when no site did."""
    rows = [[str(r["round"]), site, *(_fmt(m.get(k)) for k in keys)]
            for r in rounds for site, m in sorted((r.get("train") or {}).items()) if keys[0] in m]
    return [f"<h2>{html.escape(title)}</h2>", _table(["round", "site", *keys], rows)] if rows else []


def _table(headers: list[str], rows: list[list[str]], highlight: int | None = None) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = []
    for i, row in enumerate(rows):
        cls = ' class="worst"' if i == highlight else ""
        body.append(f"<tr{cls}>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def worst_site(site_metrics: dict[str, dict[str, Any]]) -> str | None:
    """The site whose validation WT Dice is lowest (ties: name order); None without site metrics."""
    scored = [(_num(m.get("dice_wt")), s) for s, m in site_metrics.items()]
    scored = [(d, s) for d, s in scored if not math.isnan(d)]
    return min(scored)[1] if scored else None


def render_html(history: dict[str, Any], plots: list[Path], title: str) -> str:
    rounds = history.get("rounds", [])
    final = history.get("final", {})
    last = rounds[-1] if rounds else {"heldout": {}, "sites": {}, "train": {}}
    parts = [f"<h1>{html.escape(title)}</h1>"]
    if final:
        parts.append(
            f"<p>Final round {final.get('round')}; best round {final.get('best_round')} "
            f"(score {_fmt(final.get('best_score'))}: {html.escape(str(final.get('selection', '')))}).</p>"
        )
    parts.append("<h2>Held-out center, every round</h2>")
    headers = ["round", "stage", *FINAL_TABLE_KEYS]
    rows = [[str(r["round"]), str(r.get("stage", "")), *(_fmt(r["heldout"].get(k)) for k in FINAL_TABLE_KEYS)] for r in rounds]
    parts.append(_table(headers, rows))

    # BraTS 2023+ ranking metrics: a missed satellite lesion or a false blob costs a whole lesion
    if any(k in r["heldout"] for r in rounds for k in LESION_METRIC_KEYS):
        parts.append("<h2>Lesion-wise Dice and HD95 (BraTS 2023+) on the held-out center, every round</h2>")
        rows = [[str(r["round"]), *(_fmt(r["heldout"].get(k)) for k in LESION_METRIC_KEYS)] for r in rounds]
        parts.append(_table(["round", *LESION_METRIC_KEYS], rows))

    if any(k in r["heldout"] for r in rounds for k in SURVIVAL_METRIC_KEYS):
        parts.append("<h2>Survival head on the held-out center, every round (Harrell's C-index; 0.5 = chance)</h2>")
        rows = [[str(r["round"]), *(_fmt(r["heldout"].get(k)) for k in SURVIVAL_METRIC_KEYS)] for r in rounds]
        parts.append(_table(["round", *SURVIVAL_METRIC_KEYS], rows))

    # Diagnosis of the molecular heads per round: a head that predicts one class has a small logit
    # spread and a balanced accuracy of 0.5; calibration (temperature, threshold) comes from the
    # sites' validation splits; grad share = the task's share of the gradient into the encoder.
    diag_keys = [f"{m}_{t}" for t in TASKS for m in ("auc", "bacc", "logit_mean", "logit_std")]
    parts.append("<h2>Molecular heads on the held-out center, every round</h2>")
    rows = [[str(r["round"]), *(_fmt(r["heldout"].get(k)) for k in diag_keys)] for r in rounds]
    parts.append(_table(["round", *diag_keys], rows))
    cal_keys = [f"{m}_{t}" for t in TASKS for m in ("temperature", "threshold")]
    cal_rows = [[str(r["round"]), _fmt(r.get("selection_score")), *(_fmt((r.get("calibration") or {}).get(k)) for k in cal_keys)]
                for r in rounds if r.get("calibration")]
    if cal_rows:
        parts.append("<h2>Calibration and model selection (fit on the sites' validation splits)</h2>")
        parts.append(_table(["round", "selection score", *cal_keys], cal_rows))
    share_keys = [f"grad_share_{t}" for t in ("seg", *TASKS)]
    parts += _site_round_table(
        rounds, "Share of the gradient into the shared encoder, per task (first step of each local round)", share_keys)

    site_metrics = last.get("sites", {})
    if site_metrics:
        worst = worst_site(site_metrics)
        names = sorted(site_metrics)
        parts.append(f"<h2>Sites, final round (validation split; worst site: {html.escape(str(worst))})</h2>")
        rows = [[s, *(_fmt(site_metrics[s].get(k)) for k in FINAL_TABLE_KEYS)] for s in names]
        parts.append(_table(["site", *FINAL_TABLE_KEYS], rows, highlight=names.index(worst) if worst in names else None))
        rows = [[s, *(_fmt(site_metrics[s].get(k)) for k in diag_keys)] for s in names]
        parts.append(_table(["site", *diag_keys], rows))

    train = {}
    for r in rounds:  # the latest description each site sent
        train.update(r.get("train", {}))
    if train:
        parts.append("<h2>What each site had (training split)</h2>")
        keys = ["n_train", "n_val", "n_complete", *(f"has_{s}" for s in SEQUENCES), "has_seg", *(f"labeled_{t}" for t in TASKS)]
        rows = [[s, *(_fmt(train[s].get(k)) for k in keys)] for s in sorted(train)]
        parts.append(_table(["site", *keys], rows))
    # pseudo-labels per round and site: counts and mean confidences only (scalars the sites sent);
    # candidate_confidence shows how far a site's candidates are from tau_c when none is accepted;
    # majority_share near 1.0 says the accepted labels only repeat the site's majority class
    pseudo_keys = ["pseudo_accepted", *(f"pseudo_{t}_{m}" for t in TASKS
                                        for m in ("accepted", "confidence", "candidate_confidence", "majority_share"))]
    parts += _site_round_table(rounds, "Pseudo-labels accepted per round and site", pseudo_keys)
    # site-level DP-SGD (train.dp_sgd): each site's epsilon for its own training cases, so far in the run
    parts += _site_round_table(rounds, "Privacy of the training cases (site-level DP-SGD, epsilon per site)",
                               ["dp_sgd_epsilon", "dp_sgd_delta", "dp_sgd_steps"])

    problems = [(r["round"], kind, site, why) for r in rounds for kind in ("failures", "rejected", "bounded")
                for site, why in (r.get(kind) or {}).items()]
    if problems:
        parts.append("<h2>Failed, rejected or bounded site updates</h2>")
        parts.append(_table(["round", "kind", "site", "reason"], [[str(a), b, c, str(d)] for a, b, c, d in problems]))
    # rounds that missed their quorum were not applied (the global model stayed as it was)
    missed = [r for r in rounds if (r.get("quorum") or {}).get("applied") is False]
    if missed:
        parts.append("<h2>Rounds below quorum (not applied)</h2>")
        parts.append(_table(["round", "replied", "needed", "missing"], [
            [str(r["round"]), _fmt(r["quorum"].get("replied")), _fmt(r["quorum"].get("needed")),
             "; ".join(f"{site}: {why}" for site, why in (r["quorum"].get("missing") or {}).items())]
            for r in missed]))

    # client-level DP (federation.dp): the epsilon spent by the global models released so far
    private = [r for r in rounds if r.get("privacy")]
    if private:
        stopped = (final.get("privacy") or {}).get("stopped")
        parts.append("<h2>Privacy of the updates (client-level differential privacy of the global models)</h2>")
        if stopped:
            parts.append(f"<p><b>Stopped by the privacy budget:</b> {html.escape(str(stopped))}</p>")
        keys = ["epsilon", "delta", "releases", "noise_multiplier", "accounted_noise_multiplier", "clipping_norm",
                "noise_std", "epsilon_budget"]
        parts.append(_table(["round", "mode", *keys], [
            [str(r["round"]), str(r["privacy"].get("mode", "")), *(_sig(r["privacy"].get(k)) for k in keys)]
            for r in private]))

    # SecAgg+ (federation.secure_aggregation): which sites each masked sum held, who was lost
    secure = [r for r in rounds if r.get("secure_aggregation")]
    if secure:
        parts.append("<h2>Secure aggregation (SecAgg+: the server saw only the sum of the sites' updates)</h2>")
        parts.append("<p>Per-site update screening (bounds, clipping, weight caps) and per-head averaging did not "
                     "apply: the server never saw one site's update. step, weight error: the bound of the distance "
                     "to plain FedAvg per weight, step + weight error x the largest site update.</p>")
        parts.append(_table(["round", "applied", "summed", "lost (stage)", "step", "weight error"], [
            [str(r["round"]), str(r["secure_aggregation"].get("applied")), ", ".join(r["secure_aggregation"].get("summed", [])),
             "; ".join(f"{site}: {stage}" for site, stage in (r["secure_aggregation"].get("lost") or {}).items()),
             _sig(r["secure_aggregation"].get("step")), _sig(r["secure_aggregation"].get("weight_error"))]
            for r in secure]))

    parts.append("<h2>Plots</h2>")
    for path in plots:
        data = base64.b64encode(path.read_bytes()).decode()
        parts.append(f'<figure><img alt="{path.stem}" src="data:image/png;base64,{data}"><figcaption>{path.name}</figcaption></figure>')
    style = (
        "body{font-family:sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse;font-size:13px;margin:1em 0}"
        "td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}th{background:#eee}"
        "tr.worst td{background:#fdd;font-weight:bold}figure{display:inline-block;margin:0.5em}"
    )
    return f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{style}</style></head><body>{''.join(parts)}</body></html>"


def write_report(run_dir: Path | str) -> Path:
    """(Re)write ``report.html`` and ``plots/*.png`` of ``run_dir``; returns the HTML path.
    A damaged metrics.json raises :class:`server.run_folder.RunFolderError` naming it and the fix."""
    run_dir = Path(run_dir)
    history = read_metrics(run_dir / "metrics.json")
    plots = make_plots(run_dir, history)
    out = run_dir / "report.html"
    page = render_html(history, plots, f"fedglioma run: {run_dir.name}")
    atomic_write(out, lambda p: p.write_text(page))
    return out


if __name__ == "__main__":
    try:
        print(write_report(Path(sys.argv[1])))
    except (RunFolderError, FileNotFoundError) as exc:
        sys.exit(f"error: {exc}")
