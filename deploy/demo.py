"""``fedglioma demo``: a real federation on this machine, end to end.

1. generate the synthetic demo cohort (unless it is already there);
2. create the CA, the SuperLink certificate, the app publisher key and one key pair per site;
3. start a TLS SuperLink with SuperNode authentication and one SuperNode per training site, all
   on 127.0.0.1, the SuperNodes trusting only the federation's publisher key, and register the
   sites' public keys;
4. sign the app and launch it with ``flwr run @fedglioma/fedglioma==VERSION``, show progress per
   round, and check the run's final status (``flwr run`` itself exits 0 even when the run fails);
5. stop every process it started and print where the report is.

Hydra overrides change rounds, sites, sizes: ``fedglioma demo federation.rounds=2 model=tiny``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, default=Path("data/demo-cohort"),
                        help="cohort folder; generated when missing (default: data/demo-cohort)")
    parser.add_argument("--preset", default="demo", help="synthetic cohort preset when generating (tiny, demo, bench)")
    parser.add_argument("--workdir", type=Path, default=Path("runs/federation"),
                        help="certificates, SuperLink database and process logs (default: runs/federation)")
    parser.add_argument("--out", type=Path, default=Path("runs"), help="parent of run folders (default: runs)")
    parser.add_argument("--sites", nargs="*", help="training sites to start (default: every site of the cohort)")
    parser.add_argument("--timeout", type=float, default=3600.0, help="give up after this many seconds")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides (default experiment: +experiment=demo)")


def _overrides(user: list[str]) -> list[str]:
    if any(o.startswith(("+experiment=", "experiment=")) for o in user):
        return list(user)
    return ["+experiment=demo", *user]


def _progress_printer(metrics_path: Path, total_rounds: int):
    """A poll callback printing each new round's held-out and per-site figures once."""
    seen: set[int] = set()
    stop_shown: list[str] = []

    def poll(status: str) -> None:
        if not metrics_path.exists():
            return
        try:
            history = json.loads(metrics_path.read_text())
        except json.JSONDecodeError:
            return  # being replaced right now; read it at the next poll
        rounds = history.get("rounds", [])
        for entry in rounds:
            if entry["round"] in seen:
                continue
            seen.add(entry["round"])
            h = entry["heldout"]
            bar = "#" * entry["round"] + "." * max(total_rounds - entry["round"], 0)
            print(
                f"[{bar}] round {entry['round']}/{total_rounds} ({entry.get('stage', '?')}) held-out: "
                + " ".join(f"{k}={_f(h.get(k))}" for k in ("dice_wt", "dice_tc", "dice_et", "auc_idh", "auc_grade")),
                flush=True,
            )
            for site, m in sorted(entry.get("train", {}).items()):
                if not m.get("num-examples"):  # sat the round out (named below for imputer pre-training)
                    print(f"      {site}: no training this round", flush=True)
                    continue
                extra = ""
                if "imputation_gate" in m:  # how open the imputer's gate was on the sequences it generated
                    extra += f" imputed={m.get('imputed_sequences', 0):.0f} gate={_f(m['imputation_gate'])}"
                if "pseudo_accepted" in m:
                    extra += f" pseudo-labels accepted={m['pseudo_accepted']:.0f} used={m.get('pseudo_used', 0):.0f}"
                if "loss_consistency_seg" in m:  # the EMA teacher's consistency terms (GMMAS stage 2)
                    extra += f" consistency seg={_f(m['loss_consistency_seg'])} cls={_f(m.get('loss_consistency_cls'))}"
                if "dp_sgd_epsilon" in m:  # train.dp_sgd: the site's epsilon for its training cases so far
                    extra += f" dp-sgd epsilon={_f(m['dp_sgd_epsilon'])} at delta={m.get('dp_sgd_delta', 0):g}"
                loss = m.get("loss", m.get("loss_impute"))  # imputer pre-training reports its own loss
                seconds = _f(m.get("seconds"))
                print(f"      {site}: loss={_f(loss)} cases={m['num-examples']:.0f} "
                      f"time={seconds}{'' if seconds == 'n/a' else ' s'}{extra}", flush=True)
            if entry.get("stage") == "pretrain_imputer":
                idle = [site for site, m in sorted(entry.get("train", {}).items()) if not m.get("num-examples")]
                if idle:
                    print(f"      (no complete case to pre-train the imputer on: {', '.join(idle)})", flush=True)
            for kind in ("failures", "rejected", "bounded"):
                for site, why in (entry.get(kind) or {}).items():
                    print(f"      {site} {kind[:-1] if kind.endswith('s') else kind}: {why}", flush=True)
            if privacy := entry.get("privacy"):  # federation.dp: what the global models released so far cost
                budget = privacy.get("epsilon_budget") or 0
                print(f"      privacy: epsilon={_f(privacy.get('epsilon'))} at delta={privacy.get('delta'):g}"
                      + (f" of budget {budget:g}" if budget else "")
                      + f" (noise multiplier {privacy.get('noise_multiplier'):g}, clipping norm "
                      f"{_f(privacy.get('clipping_norm'))}, {privacy.get('releases', 0)} noised models)", flush=True)
        stopped = (history.get("final", {}).get("privacy") or {}).get("stopped")
        if stopped and not stop_shown:
            stop_shown.append(stopped)
            print(f"      privacy budget: {stopped}", flush=True)

    return poll


def _f(value: Any) -> str:
    if value is None:
        return "n/a"
    value = float(value)
    return "n/a" if math.isnan(value) else f"{value:.3f}"


def run_demo(
    data: Path,
    *,
    preset: str = "demo",
    workdir: Path = Path("runs/federation"),
    out: Path = Path("runs"),
    sites: list[str] | None = None,
    overrides: list[str] | None = None,
    timeout: float = 3600.0,
) -> Path:
    """Run the local federation; returns the run folder. Raises on a failed run."""
    # Heavy (torch, flwr): imported when the command runs, so that `fedglioma --help` stays fast.
    from common.config import compose, replace, to_run_config
    from deploy.certs import ensure_credentials
    from deploy.federation import LocalFederation
    from synth import generate_cohort

    if not (PROJECT_ROOT / "pyproject.toml").exists():
        raise SystemExit(f"fedglioma demo runs the Flower app from its source tree; {PROJECT_ROOT} has no pyproject.toml")
    data = data.expanduser().resolve()
    if not (data / "cohort.json").exists():
        print(f"generating the '{preset}' synthetic cohort in {data} ...", flush=True)
        t0 = time.perf_counter()
        generate_cohort(data, preset=preset)
        print(f"  done in {time.perf_counter() - t0:.0f} s", flush=True)
    heldout = data / "heldout"
    site_dirs = sorted(p for p in data.iterdir() if (p / "labels.csv").exists() and p.name != "heldout")
    if sites:
        unknown = set(sites) - {p.name for p in site_dirs}
        if unknown:
            raise SystemExit(f"unknown site(s) {sorted(unknown)}; the cohort has {[p.name for p in site_dirs]}")
        site_dirs = [p for p in site_dirs if p.name in sites]

    out = out.expanduser().resolve()
    cfg = compose(_overrides(list(overrides or [])))
    cfg = replace(
        cfg,
        federation={"heldout": str(heldout), "out_dir": str(out), "min_nodes": len(site_dirs),
                    # the launcher's map of registered keys to site names: names known from round 1
                    "registered_sites": str(workdir.expanduser().resolve() / "superlink" / "nodes.json")},
        # several sites share this machine's cores: one thread each avoids oversubscription
        train={"threads": 1, "progress": False},
    )
    run_dir = out / cfg.federation.run_name
    workdir = workdir.expanduser().resolve()
    names = [p.name for p in site_dirs]
    credentials = ensure_credentials(workdir / "certs", names)
    print(f"sites: {', '.join(names)}; held-out center: {heldout}; {cfg.federation.rounds} rounds", flush=True)

    with LocalFederation(workdir, credentials) as federation:
        federation.start_superlink()
        for site_dir in site_dirs:
            federation.register_site(site_dir.name, credentials.site_public_key(site_dir.name))
        for site_dir in site_dirs:
            federation.start_supernode(
                site_dir.name,
                credentials.site_private_key(site_dir.name),
                {"data-path": str(site_dir), "site-name": site_dir.name},
            )
        federation.wait_for_nodes(timeout_s=120.0)
        print(f"SuperLink and {len(site_dirs)} SuperNodes up (TLS, node authentication, signed apps only); "
              f"logs in {workdir / 'logs'}", flush=True)
        run_id = federation.run(PROJECT_ROOT, to_run_config(cfg))
        print(f"run {run_id} started; the first round includes model set-up", flush=True)
        status = federation.wait(run_id, timeout, poll_s=2.0, on_poll=_progress_printer(run_dir / "metrics.json", cfg.federation.rounds))
        if status != "finished:completed":
            print(federation.logs(run_id)[-4000:], file=sys.stderr)
            raise SystemExit(f"the federated run ended as {status!r}; see the logs above and in {workdir / 'logs'}")
    final = json.loads((run_dir / "metrics.json").read_text())
    first, last = final["rounds"][0]["heldout"], final["final"]["heldout"]
    print("\nheld-out center, round 0 -> final:")
    for key in ("dice_wt", "dice_tc", "dice_et", "hd95_wt", "auc_idh", "auc_1p19q", "auc_grade", "auc_mgmt"):
        print(f"  {key:<10} {_f(first.get(key)):>7} -> {_f(last.get(key)):>7}")
    print(f"\nrun folder: {run_dir}\nreport:     {run_dir / 'report.html'}")
    return run_dir


def run(args: argparse.Namespace) -> int:
    run_demo(
        args.data, preset=args.preset, workdir=args.workdir, out=args.out, sites=args.sites,
        overrides=args.overrides, timeout=args.timeout,
    )
    return 0
