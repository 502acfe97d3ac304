"""The run folder every training mode writes (DESIGN.md section 7).

```
runs/<name>/config.yaml        resolved experiment config
runs/<name>/metrics.json       {"rounds": [...], "final": {...}}
runs/<name>/checkpoints/       round-NNN.pt, last.pt, best.pt  (torch.load(weights_only=True))
runs/<name>/report.html, plots/*.png
```

Writes are atomic (temp file + rename) so a crash never leaves a half-written metrics.json or
checkpoint. Resuming continues after ``last.pt`` and drops history rounds recorded after it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
import yaml

from common.config import ExperimentConfig, to_mapping
from common.io import atomic_write, json_safe


class RunFolderError(RuntimeError):
    """The run folder cannot be used as asked; the message says why and what to do."""


#: How best.pt is chosen (metrics.json "final.selection").
SELECTION = (
    "best.pt maximises the sites' validation score: the validation-case-weighted mean over sites of "
    "mean(dice_wt, mean AUC over tasks); the held-out center is only reported"
)


@dataclass
class ResumeState:
    next_round: int  # first round still to run
    state_dict: dict[str, torch.Tensor]


class RunFolder:
    """One run's outputs. ``resume=True`` continues an existing folder; ``resume=False`` refuses
    to touch a folder that already has results (nothing is ever overwritten silently)."""

    def __init__(self, root: Path | str, cfg: ExperimentConfig, *, resume: bool = True) -> None:
        self.root = Path(root).expanduser().resolve()
        self.cfg = cfg
        self.checkpoints = self.root / "checkpoints"
        self.metrics_path = self.root / "metrics.json"
        self.config_path = self.root / "config.yaml"
        has_results = self.metrics_path.exists() or (self.checkpoints / "last.pt").exists()
        if has_results and not resume:
            raise RunFolderError(
                f"{self.root} already holds a run. Choose another name (federation.run_name=...) "
                "or resume it (federation.resume=true)."
            )
        if has_results and self.config_path.exists():
            self._check_compatible()
        self.root.mkdir(parents=True, exist_ok=True)
        self.history: dict[str, Any] = self._load_history()
        self.write_config()

    # ---------------------------------------------------------------- config
    def write_config(self) -> None:
        atomic_write(self.config_path, lambda p: p.write_text(yaml.safe_dump(to_mapping(self.cfg), sort_keys=False)))

    def _check_compatible(self) -> None:
        saved = yaml.safe_load(self.config_path.read_text()) or {}
        now = to_mapping(self.cfg)
        for section in ("model", "data"):
            if saved.get(section, {}) != now[section]:
                diff = sorted(
                    k for k in set(saved.get(section, {})) | set(now[section])
                    if saved.get(section, {}).get(k) != now[section].get(k)
                )
                raise RunFolderError(
                    f"cannot resume {self.root}: its {section} config differs in {diff}. "
                    "Use the same settings, or start a new run (federation.run_name=...)."
                )

    # ---------------------------------------------------------------- history
    def _load_history(self) -> dict[str, Any]:
        if not self.metrics_path.exists():
            return {"rounds": [], "final": {}}
        try:
            history = json.loads(self.metrics_path.read_text())
        except json.JSONDecodeError as exc:
            raise RunFolderError(f"{self.metrics_path} is not valid JSON ({exc}); move it away to start afresh") from exc
        history.setdefault("rounds", [])
        history.setdefault("final", {})
        return history

    def record_round(
        self,
        round_: int,
        *,
        heldout: Mapping[str, Any],
        sites: Mapping[str, Mapping[str, Any]] | None = None,
        train: Mapping[str, Mapping[str, Any]] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        """Append (or replace) one round's entry and write metrics.json atomically."""
        entry: dict[str, Any] = {
            "round": int(round_),
            "heldout": dict(heldout),
            # the sites' calibration statistics (cal_*) served the fit recorded under "calibration"
            "sites": {k: {m: x for m, x in v.items() if not m.startswith("cal_")} for k, v in (sites or {}).items()},
            "train": {k: dict(v) for k, v in (train or {}).items()},
        }
        if extra:
            entry.update(extra)
        self.history["rounds"] = [r for r in self.history["rounds"] if r["round"] != round_] + [entry]
        self.history["rounds"].sort(key=lambda r: r["round"])
        self._write_history()

    def finalize(self, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Fill ``final``: the last round's held-out metrics, the best round and its score."""
        rounds = self.history["rounds"]
        if not rounds:
            raise RunFolderError(f"{self.root}: no round was recorded, nothing to finalize")
        scored = [r for r in rounds if math.isfinite(_float(r.get("selection_score")))]
        best = max(scored, key=lambda r: _float(r["selection_score"])) if scored else rounds[-1]
        final = {
            "heldout": rounds[-1]["heldout"],
            "round": rounds[-1]["round"],
            "best_round": best["round"],
            "best_score": _float(best.get("selection_score")),
            "best_heldout": best["heldout"],
            "selection": SELECTION if scored else "no validation metrics to select on: best.pt is the last round",
        }
        if extra:
            final.update(extra)
        self.history["final"] = final
        self._write_history()
        return final

    def _write_history(self) -> None:
        text = json.dumps(json_safe(self.history), indent=1, allow_nan=False)
        atomic_write(self.metrics_path, lambda p: p.write_text(text))

    # ------------------------------------------------------------ checkpoints
    def save_checkpoint(
        self,
        round_: int,
        state_dict: Mapping[str, torch.Tensor],
        score: float,
        calibration: Mapping[str, Mapping[str, float]] | None = None,
    ) -> None:
        """Write round-NNN.pt and last.pt, and best.pt when this round has the best selection
        ``score`` so far (:func:`common.evaluation.metrics.selection_score` of the sites'
        validation metrics; NaN = nothing to select on, best.pt follows the last round until a
        round has a score). The held-out center never enters the score. ``calibration``
        (:meth:`common.evaluation.calibration.Calibration.to_dict`, fit on the same validation) is
        stored with the weights, so that whoever applies the model uses the same probabilities."""
        payload = {
            "round": int(round_),
            "state_dict": {k: v.detach().cpu() for k, v in state_dict.items()},
            "model": dict(to_mapping(self.cfg)["model"]),
            "size": int(self.cfg.data.size),
            "calibration": {k: dict(v) for k, v in (calibration or {}).items()},
        }
        for name in (f"round-{round_:03d}.pt", "last.pt"):
            atomic_write(self.checkpoints / name, lambda p: torch.save(payload, p))
        best_path = self.checkpoints / "best.pt"
        previous = math.nan
        if best_path.exists():
            previous = float(torch.load(best_path, weights_only=True, map_location="cpu").get("selection_score", math.nan))
        payload["selection_score"] = float(score)
        better = math.isfinite(score) and (not math.isfinite(previous) or score > previous)
        if better or not best_path.exists() or not math.isfinite(previous):
            atomic_write(best_path, lambda p: torch.save(payload, p))

    def resume_state(self) -> ResumeState | None:
        """The state to continue from, or None for a fresh run. Drops history after last.pt."""
        last = self.checkpoints / "last.pt"
        if not last.exists():
            if self.history["rounds"]:
                # metrics without a checkpoint: the run died before round 0 finished saving
                self.history["rounds"] = []
                self._write_history()
            return None
        payload = torch.load(last, weights_only=True, map_location="cpu")
        done = int(payload["round"])
        kept = [r for r in self.history["rounds"] if r["round"] <= done]
        if len(kept) != len(self.history["rounds"]):
            self.history["rounds"] = kept
            self._write_history()
        return ResumeState(next_round=done + 1, state_dict=payload["state_dict"])


def _float(value: Any) -> float:
    return math.nan if value is None else float(value)
