"""A site's local state between rounds: where it lives, and which round wrote it.

The state folder holds the site's pseudo-labels (``pseudo_labels.json``, keyed by case ID), its
EMA teacher (``ema_teacher.pt``) and, with ``federation.site_validation=after_reply``, the scalar
validation metrics of the last received global model until its next reply carries them
(``pending_validation.json``); nothing else in it is sent to the server.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from common.io import atomic_write

T = TypeVar("T")
#: File name of a site's local optimizer state inside its state folder (train.keep_optimizer_state).
OPTIMIZER_FILE = "optimizer.pt"
#: The validation of a received global model waiting for the site's next reply (site_validation=after_reply).
PENDING_VALIDATION_FILE = "pending_validation.json"


class SiteConfigError(ValueError):
    """The SuperNode's node config does not say where the site's data or state is."""


@dataclass(frozen=True)
class RoundTag:
    """Which run and global round wrote a piece of site-local state (pseudo-labels, EMA teacher).

    A site keeps such state on its own disk between rounds; it is reused only by a *later* round
    of the *same* run. A new run under the same name restarts at global round 1, so state left by
    the old run (written at a round >= the current one) is not reused either.
    """

    run_name: str
    global_round: int

    def precedes(self, current: RoundTag) -> bool:
        """True when this state was written earlier in the run ``current`` belongs to."""
        return self.run_name == current.run_name and self.global_round < current.global_round

    def as_dict(self) -> dict[str, str | int]:
        return {"run_name": self.run_name, "global_round": self.global_round}

    @classmethod
    def from_dict(cls, values: Mapping[str, object]) -> RoundTag:
        """Inverse of :meth:`as_dict`; raises KeyError/TypeError/ValueError on a malformed mapping."""
        run_name, global_round = values["run_name"], values["global_round"]
        if not isinstance(run_name, str) or isinstance(global_round, bool) or not isinstance(global_round, int):
            raise ValueError(f"run_name must be a string and global_round an integer, got {run_name!r}, {global_round!r}")
        return cls(run_name, global_round)


def default_state_path(site_name: str) -> Path:
    """``$XDG_CACHE_HOME/fedglioma/sites/<site-name>`` (``~/.cache`` when XDG_CACHE_HOME is unset)."""
    if not site_name or Path(site_name).name != site_name or site_name in {".", ".."}:
        raise SiteConfigError(
            f"site name {site_name!r} cannot name a state folder: set site-name to a plain name "
            "(e.g. site-name=\"site-a\") or give state-path=\"/abs/path\" in --node-config"
        )
    cache = os.environ.get("XDG_CACHE_HOME", "").strip() or str(Path.home() / ".cache")
    return Path(cache).expanduser() / "fedglioma" / "sites" / site_name


def site_state_path(node_config: Mapping[str, Any], site_name: str) -> Path:
    """Where this site keeps its local state between rounds (created on first write).

    It holds the site's pseudo-labels (``pseudo_labels.json``, keyed by case ID) and its EMA
    teacher (``ema_teacher.pt``); nothing in it is sent to the server. Node config
    ``state-path`` when given, else :func:`default_state_path` of the site name. Each SuperNode
    needs its own folder.
    """
    path = str(node_config.get("state-path", "")).strip()
    return Path(path).expanduser() if path else default_state_path(site_name)


def save_optimizer_state(state: Mapping[str, Any], folder: Path, tag: RoundTag) -> None:
    """Keep the site's optimizer state (moments, step counts) for the next round of the same run."""
    payload = {**tag.as_dict(), "optimizer": dict(state)}
    import torch  # here, not at the top: the ClientApp's empty rounds must not pay for it

    atomic_write(Path(folder) / OPTIMIZER_FILE, lambda tmp: torch.save(payload, tmp))


def load_optimizer_state(folder: Path, tag: RoundTag) -> dict[str, Any] | None:
    """The optimizer state an earlier round of the same run saved, else None (first round, another
    run). A damaged file is an error naming it and the fix, never silently a fresh optimizer."""
    path = Path(folder) / OPTIMIZER_FILE
    if not path.exists():
        return None
    saved, state = read_state_file(path, "the optimizer state", "a fresh optimizer",
                                   lambda payload: (RoundTag.from_dict(payload), dict(payload["optimizer"])))
    return state if saved.precedes(tag) else None


#: A reply metric value: a float or a list of floats (e.g. the cal_* calibration statistics).
MetricValue = float | list[float]


def _metric_value(value: Any) -> MetricValue:
    if isinstance(value, (list, tuple)):
        return [float(v) for v in value]
    return float(value)


def save_pending_validation(folder: Path, model: RoundTag, metrics: Mapping[str, Any]) -> None:
    """Keep the site's validation metrics of the global model of ``model`` (floats or lists of
    floats, NaN allowed: aggregate values only) for its next reply; replaces what an earlier
    round left."""
    payload = json.dumps({**model.as_dict(), "metrics": {str(k): _metric_value(v) for k, v in metrics.items()}})
    atomic_write(Path(folder) / PENDING_VALIDATION_FILE, lambda tmp: tmp.write_text(payload))


def take_pending_validation(folder: Path, model: RoundTag) -> dict[str, MetricValue] | None:
    """The kept validation metrics of the global model of ``model``, removed from the folder; None
    when none is kept, or when what is kept is of another model or run (then it is removed too:
    it can never be sent). A damaged file raises ValueError naming it."""
    path = Path(folder) / PENDING_VALIDATION_FILE
    if not path.exists():
        return None
    try:
        payload = json.loads(path.read_text())
        kept = RoundTag.from_dict(payload)
        metrics = {str(k): _metric_value(v) for k, v in dict(payload["metrics"]).items()}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"cannot read the kept validation metrics {path} ({type(exc).__name__}: {exc}). "
                         "Delete the file; the model it belonged to is then recorded without this site's "
                         "validation") from exc
    path.unlink()
    return metrics if kept == model else None


def read_state_file(path: Path, what: str, fresh: str, parse: Callable[[dict], T]) -> T:
    """``parse`` of a state file's payload (``torch.load`` with ``weights_only``). A damaged or
    foreign file raises ValueError naming it, ``what`` it should hold and the fix (delete it; the
    next round starts ``fresh``), never a raw traceback and never silently a fresh start."""
    # here, not at the top: the ClientApp's empty rounds import this module and must not pay for torch
    import torch

    from common.model.checkpoint import load_failure  # torch, too

    try:
        return parse(torch.load(path, map_location="cpu", weights_only=True))
    except Exception as exc:  # torch.load and parse raise many types for a damaged or foreign file
        raise ValueError(
            f"cannot read {what} {path} ({load_failure(exc)}). Delete the file; "
            f"the next round starts {fresh}"
        ) from exc


def node_flag(node_config: Mapping[str, Any], key: str, default: bool) -> bool:
    """A yes/no setting of a SuperNode's ``--node-config`` (``1/true/yes/on``, ``0/false/no/off``,
    any case); ``default`` when the key is absent or says neither."""
    value = str(node_config.get(key, "")).strip().lower()
    if value in {"1", "true", "yes", "on"}:
        return True
    if value in {"0", "false", "no", "off"}:
        return False
    return default


def site_location(node_config: Mapping[str, Any]) -> tuple[str, Path]:
    """(site name, data folder) from a SuperNode's ``--node-config``.

    Node config keys: ``data-path`` (required: the site folder), ``site-name`` (default: the
    folder's name), ``state-path`` (optional, see :func:`site_state_path`) and
    ``allow-external-links`` (default false: case folders or files that are symlinks resolving
    outside the site folder are rejected, so that no other center's data, e.g. the held-out
    center's, can enter training through a link).
    """
    path = str(node_config.get("data-path", "")).strip()
    if not path:
        raise SiteConfigError(
            "this SuperNode has no data path: start it with "
            "--node-config 'data-path=\"/abs/path/to/site\" site-name=\"site-x\"' "
            "(optionally state-path=\"/abs/path/to/site-state\")"
        )
    root = Path(path).expanduser()
    name = str(node_config.get("site-name", "")).strip() or root.name
    return name, root
