"""The run folder every training mode writes (DESIGN.md section 7).

```
runs/<name>/config.yaml        resolved experiment config
runs/<name>/metrics.json       {"rounds": [...], "final": {...}}
runs/<name>/checkpoints/       round-NNN.pt, last.pt, best.pt  (torch.load(weights_only=True))
runs/<name>/report.html, plots/*.png
```

Every file is written atomically (temp file + rename) and readable by its owner only (0o600,
folders 0o700), through :func:`common.io.atomic_write`: a crash never leaves a half-written file,
and the per-site metrics of the hospitals stay private on a shared machine.

metrics.json is the record of the run, selection scores included. best.pt is the checkpoint of
its best round (:func:`best_round`, the rule ``final.best_round`` follows too); best.pt is only
written, never read back to compare scores, so a damaged best.pt cannot stop a run. When a
resume or :meth:`RunFolder.finalize` finds best.pt damaged or holding another round, it is
rewritten from that round's checkpoint, with a warning.

Resuming continues after ``last.pt`` (or ``federation.resume_from``) and drops the rounds
metrics.json recorded after it. A folder with history but no usable last.pt is never restarted
from round 0: the error names the file and the latest intact ``round-NNN.pt`` to resume from.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from common.config import ExperimentConfig, suggest, to_mapping
from common.io import atomic_write, json_safe, private_dir
from common.model.checkpoint import CheckpointError, load_checkpoint

logger = logging.getLogger(__name__)


class RunFolderError(RuntimeError):
    """The run folder cannot be used as asked; the message says why and what to do."""


#: How best.pt is chosen (metrics.json "final.selection").
SELECTION = (
    "best.pt maximises the sites' validation score: the validation-case-weighted mean over sites of "
    "mean(dice_wt, mean AUC over tasks); the held-out center is only reported"
)
#: The name of a round's checkpoint; group 1 is the round.
ROUND_FILE = re.compile(r"round-(\d+)\.pt")
#: The way out of a damaged metrics.json or config.yaml.
RESTORE_OR_NEW_RUN = "Restore it from a backup, or start a new run (federation.run_name=...)."


@dataclass
class ResumeState:
    next_round: int  # first round still to run
    state_dict: dict[str, torch.Tensor]
    source: Path  # the checkpoint it was read from (named by errors when the weights do not fit)


class RunFolder:
    """One run's outputs. ``resume=True`` continues an existing folder; ``resume=False`` refuses
    to touch a folder that already has results (nothing is ever overwritten silently)."""

    def __init__(self, root: Path | str, cfg: ExperimentConfig, *, resume: bool = True) -> None:
        self.root = Path(root).expanduser().resolve()
        self.cfg = cfg
        self.checkpoints = self.root / "checkpoints"
        self.metrics_path = self.root / "metrics.json"
        self.config_path = self.root / "config.yaml"
        self.last_path = self.checkpoints / "last.pt"
        self.best_path = self.checkpoints / "best.pt"
        has_results = self.metrics_path.exists() or any(self.checkpoints.glob("*.pt"))
        if has_results and not resume:
            raise RunFolderError(
                f"{self.root} already holds a run. Choose another name (federation.run_name=...) "
                "or resume it (federation.resume=true)."
            )
        if cfg.federation.resume_from and not resume:
            raise RunFolderError(
                f"federation.resume_from={cfg.federation.resume_from!r} needs federation.resume=true"
            )
        if has_results and self.config_path.exists():
            self._check_compatible()
        private_dir(self.root)
        self.history: dict[str, Any] = read_metrics(self.metrics_path) if self.metrics_path.exists() else {"rounds": [], "final": {}}
        self.write_config()

    # ---------------------------------------------------------------- config
    def write_config(self) -> None:
        atomic_write(self.config_path, lambda p: p.write_text(yaml.safe_dump(to_mapping(self.cfg), sort_keys=False)))

    def _check_compatible(self) -> None:
        try:
            saved = yaml.safe_load(self.config_path.read_text()) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise RunFolderError(f"{self.config_path} is damaged ({exc}). {RESTORE_OR_NEW_RUN}") from None
        if not isinstance(saved, dict) or not all(isinstance(saved.get(s, {}), dict) for s in ("model", "data")):
            raise RunFolderError(f"{self.config_path} is damaged (not a config with sections). {RESTORE_OR_NEW_RUN}")
        now = to_mapping(self.cfg)
        for section in ("model", "data"):
            if saved.get(section, {}) != now[section]:
                raise RunFolderError(
                    f"cannot resume {self.root}: its {section} config differs in "
                    f"{_differing(saved.get(section, {}), now[section])}. "
                    "Use the same settings, or start a new run (federation.run_name=...)."
                )

    # ---------------------------------------------------------------- history
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
        """Fill ``final``: the last round's held-out metrics, the best round and its score; make
        sure best.pt holds that best round (see :meth:`_restore_best`)."""
        rounds = self.history["rounds"]
        if not rounds:
            raise RunFolderError(f"{self.root}: no round was recorded, nothing to finalize")
        best = best_round(rounds)
        scored = math.isfinite(_float(best.get("selection_score")))
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
        self._restore_best()
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
        """Write last.pt and round-NNN.pt, and best.pt when this round is the best so far.

        ``score`` is the round's selection score (:func:`common.evaluation.metrics.selection_score`
        of the sites' validation metrics; NaN = nothing to select on). It is recorded as the
        round's ``selection_score`` in metrics.json, which :meth:`record_round` must have been
        given the round first; best.pt follows :func:`best_round` of the recorded rounds (the last
        round until a round has a score), so it is never read back. The held-out center never
        enters the score. ``calibration`` (:meth:`common.evaluation.calibration.Calibration.to_dict`,
        fit on the same validation) is stored with the weights, so that whoever applies the model
        uses the same probabilities. last.pt is written first: a round-NNN.pt or best.pt without a
        last.pt next to it means files were lost, never that a run died while saving.
        """
        rounds = self.history["rounds"]
        entry = next((r for r in rounds if r["round"] == round_), None)
        if entry is None:
            raise RunFolderError(f"{self.metrics_path} has no round {round_}: record_round({round_}) comes before its checkpoint")
        entry["selection_score"] = float(score)
        self._write_history()
        payload = {
            "round": int(round_),
            "state_dict": {k: v.detach().cpu() for k, v in state_dict.items()},
            "model": dict(to_mapping(self.cfg)["model"]),
            "size": int(self.cfg.data.size),
            "calibration": {k: dict(v) for k, v in (calibration or {}).items()},
            "selection_score": float(score),
        }
        atomic_write(self.last_path, lambda p: torch.save(payload, p))
        _copy(self.last_path, self.checkpoints / f"round-{round_:03d}.pt")
        if best_round([r for r in rounds if r["round"] <= round_])["round"] == round_:
            _copy(self.last_path, self.best_path)

    def resume_state(self) -> ResumeState | None:
        """The state to continue from, or None for a fresh run.

        The checkpoint is ``federation.resume_from`` when set (a file name in checkpoints/ or an
        absolute path), else last.pt. Its round must be one metrics.json records; the rounds
        recorded after it are dropped (the run died between recording a round and saving its
        checkpoint, or ``resume_from`` rewinds the run), last.pt becomes the checkpoint resumed
        from and best.pt the best round kept: no round is lost or counted twice.

        Without last.pt, a folder that has history (a checkpoint, or a round after round 0) is
        refused with a :class:`RunFolderError` naming the latest intact round-NNN.pt; a folder
        whose only record is round 0 and no checkpoint (the run died before saving round 0)
        starts afresh. A damaged checkpoint or one of another model raises a
        :class:`CheckpointError` naming the file and the alternatives.
        """
        resume_from = self.cfg.federation.resume_from
        rounds = self.history["rounds"]
        if resume_from:
            source = self._resolve(resume_from)
        elif self.last_path.exists():
            source = self.last_path
        elif self._has_history():
            kept = [f"{len(rounds)} rounds in metrics.json"] if rounds else []
            kept += [f"{len(list(self.checkpoints.glob('*.pt')))} checkpoints in {self.checkpoints}"]
            raise RunFolderError(
                f"cannot resume {self.root}: {self.last_path} is missing, though the run has history "
                f"({', '.join(kept)}); resuming without it would restart at round 0 and overwrite that "
                f"history. {self._alternatives(self.last_path)}"
            )
        else:
            if rounds:
                logger.info("%s: round 0 was recorded but never saved; starting afresh", self.root)
                self.history = {"rounds": [], "final": {}}
                self._write_history()
            return None
        payload = self._read_checkpoint(source)
        done = payload["round"]
        recorded = [r["round"] for r in rounds]
        if done not in recorded:
            has = f"records rounds {recorded[0]} to {recorded[-1]}" if recorded else "records no round"
            raise RunFolderError(
                f"cannot resume from {source}: it holds round {done}, but {self.metrics_path} {has}, so the "
                "history would miss rounds. Restore metrics.json from a backup, resume from a round it "
                "records (federation.resume_from=round-NNN.pt), or start a new run (federation.run_name=...)."
            )
        dropped = [r for r in recorded if r > done]
        if dropped:
            logger.warning("%s: resuming from %s (round %d) drops the later rounds %s from %s",
                           self.root, source.name, done, dropped, self.metrics_path.name)
            self.history["rounds"] = [r for r in rounds if r["round"] <= done]
            self.history["final"] = {}
            self._write_history()
        if source.resolve() != self.last_path.resolve():
            _copy(source, self.last_path)  # a crash before the next round resumes from here again
        self._restore_best()
        return ResumeState(next_round=done + 1, state_dict=payload["state_dict"], source=source)

    def _resolve(self, resume_from: str) -> Path:
        """The checkpoint ``federation.resume_from`` names: a file in checkpoints/ or an absolute path."""
        path = Path(resume_from).expanduser()
        path = path if path.is_absolute() else self.checkpoints / path
        if not path.is_file():
            present = sorted(p.name for p in self.checkpoints.glob("*.pt"))
            hint = suggest(path.name, present) if present else f" ({self.checkpoints} holds no checkpoint)"
            raise RunFolderError(
                f"federation.resume_from={resume_from!r}: {path} does not exist{hint}. Give a file name in "
                f"{self.checkpoints} (round-NNN.pt) or an absolute path."
            )
        return path

    def _read_checkpoint(self, path: Path) -> dict[str, Any]:
        """The checkpoint to resume from, checked against this run's model config; a
        CheckpointError names the file and the intact checkpoints to use instead."""
        try:
            payload = load_checkpoint(path, fix="")
        except CheckpointError as exc:
            raise CheckpointError(f"{exc} {self._alternatives(path)}") from None
        mismatch = self._model_mismatch(payload)
        if mismatch:
            raise CheckpointError(
                f"{path} holds another model than this run's config ({mismatch} differ). "
                f"{self._alternatives(path)}"
            )
        return payload

    def _model_mismatch(self, payload: Mapping[str, Any]) -> str | None:
        """The model settings (and data.size) in which ``payload`` differs from this run, or None."""
        now = to_mapping(self.cfg)["model"]
        keys = [f"model.{k}" for k in _differing(payload["model"], now)]
        if payload["size"] != self.cfg.data.size:
            keys.append("data.size")
        return ", ".join(keys) or None

    def _has_history(self) -> bool:
        return any(self.checkpoints.glob("*.pt")) or any(r["round"] > 0 for r in self.history["rounds"])

    def _alternatives(self, bad: Path) -> str:
        """What to do instead of using ``bad``: the latest intact round-NNN.pt metrics.json records."""
        found = self._latest_intact_round(skip=bad)
        if found is None:
            return (f"No intact round-NNN.pt of a recorded round is left in {self.checkpoints}: restore "
                    f"{bad.name} from a backup, or start a new run (federation.run_name=...).")
        path, round_ = found
        return (f"The latest intact checkpoint is {path.name} (round {round_}): resume from it with "
                f"federation.resume_from={path.name} (metrics.json rounds after {round_} are dropped), "
                f"restore {bad.name} from a backup, or start a new run (federation.run_name=...).")

    def _latest_intact_round(self, skip: Path) -> tuple[Path, int] | None:
        recorded = {r["round"] for r in self.history["rounds"]}
        numbered = [(int(m.group(1)), p) for p in self.checkpoints.glob("round-*.pt") if (m := ROUND_FILE.fullmatch(p.name))]
        for round_, path in sorted(numbered, reverse=True):
            if round_ not in recorded or path == skip:
                continue
            try:
                payload = load_checkpoint(path)
            except CheckpointError:
                continue
            if payload["round"] == round_ and self._model_mismatch(payload) is None:
                return path, round_
        return None

    def _restore_best(self) -> None:
        """Make best.pt hold the best round metrics.json records again when it is damaged,
        missing or holds another round (a resume dropped rounds): copied from that round's
        round-NNN.pt or last.pt, with a warning. When neither holds the round, best.pt stays as it
        is, with a warning, until a better round replaces it."""
        rounds = self.history["rounds"]
        if not rounds or not any(self.checkpoints.glob("*.pt")):
            return
        want = best_round(rounds)["round"]
        try:
            held = load_checkpoint(self.best_path, fix="")["round"]
            if held == want:
                return
            problem = f"{self.best_path} holds round {held}, not round {want}, the best round {self.metrics_path.name} records"
        except (FileNotFoundError, CheckpointError) as exc:
            problem = str(exc)
        for source in (self.checkpoints / f"round-{want:03d}.pt", self.last_path):
            try:
                if load_checkpoint(source)["round"] != want:
                    continue
            except (FileNotFoundError, CheckpointError):
                continue
            _copy(source, self.best_path)
            logger.warning("%s -> rewritten from %s (round %d, the best round recorded)", problem, source.name, want)
            return
        logger.warning("%s -> no intact checkpoint of round %d is left to rewrite it from; best.pt stays as it is "
                       "until a better round replaces it", problem, want)


def read_metrics(path: Path) -> dict[str, Any]:
    """A run's metrics.json, ``{"rounds": [...], "final": {...}}``; a damaged file (not JSON, or
    not of that structure) raises :class:`RunFolderError` naming the file, what is wrong and the fix."""
    try:
        history = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RunFolderError(f"{path} is damaged: not valid JSON ({exc}). {RESTORE_OR_NEW_RUN}") from None
    problem = _history_problem(history)
    if problem:
        raise RunFolderError(f"{path} is damaged: {problem}. {RESTORE_OR_NEW_RUN}")
    history.setdefault("rounds", [])
    history.setdefault("final", {})
    return history


def best_round(rounds: Sequence[Mapping[str, Any]]) -> Mapping[str, Any]:
    """The round best.pt holds: the highest finite ``selection_score`` (the earliest of equals),
    or the last round when no round has one. ``rounds`` is sorted by round and not empty."""
    scored = [r for r in rounds if math.isfinite(_float(r.get("selection_score")))]
    return max(scored, key=lambda r: _float(r["selection_score"])) if scored else rounds[-1]


def _history_problem(history: Any) -> str | None:
    """What makes ``history`` not a metrics.json, or None."""
    if not isinstance(history, dict):
        return f"it holds a JSON {type(history).__name__}, not an object with 'rounds' and 'final'"
    if not isinstance(history.get("rounds", []), list) or not isinstance(history.get("final", {}), dict):
        return "'rounds' must be a list and 'final' an object"
    seen: set[int] = set()
    for i, entry in enumerate(history.get("rounds", [])):
        if not isinstance(entry, dict):
            return f"rounds[{i}] is not an object"
        round_ = entry.get("round")
        if not isinstance(round_, int) or isinstance(round_, bool) or round_ < 0 or round_ in seen:
            return f"rounds[{i}] has no round number of its own (round={round_!r})"
        seen.add(round_)
        if not isinstance(entry.get("heldout"), dict):
            return f"round {round_} has no 'heldout' metrics object"
        for key in ("sites", "train"):
            per_site = entry.get(key, {})
            if not isinstance(per_site, dict) or not all(isinstance(m, dict) for m in per_site.values()):
                return f"round {round_}: '{key}' is not an object of per-site objects"
        score = entry.get("selection_score")
        if score is not None and (not isinstance(score, (int, float)) or isinstance(score, bool)):
            return f"round {round_}: selection_score={score!r} is not a number"
    return None


def _differing(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def _copy(source: Path, target: Path) -> None:
    atomic_write(target, lambda p: shutil.copyfile(source, p))


def _float(value: Any) -> float:
    return math.nan if value is None else float(value)
