"""Reading the checkpoints a run folder writes (``server.run_folder.RunFolder``).

A checkpoint is a dict ``{"round", "state_dict", "model", "size", "calibration", ...}`` saved with
``torch.save``. It loads with ``weights_only=True``: only tensors and plain values are unpickled,
never code. A file that is truncated, damaged, holds other objects or weights of another network
raises :class:`CheckpointError` naming the file and what to do instead.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from common.config import ModelConfig
from common.model.network import build_model

#: What to do about an unusable checkpoint when the caller knows nothing better.
DEFAULT_FIX = "Use another checkpoint of the run (round-NNN.pt in the same folder) or restore this file from a backup."

#: The entries every checkpoint has, and their types.
CHECKPOINT_ENTRIES: dict[str, type] = {"round": int, "state_dict": dict, "model": dict, "size": int}


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used; the message names the file and what to do."""


def load_checkpoint(path: Path | str, *, fix: str = DEFAULT_FIX) -> dict[str, Any]:
    """Load a checkpoint written by :class:`RunFolder` (weights_only: no code is unpickled).

    Raises FileNotFoundError when ``path`` does not exist, and :class:`CheckpointError` (message:
    the file, why, then ``fix``; ``fix=""`` leaves the advice to the caller) when it cannot be
    read or is not a fedglioma checkpoint.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist (look in runs/<name>/checkpoints/)")
    try:
        payload = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as exc:  # noqa: BLE001 - whatever torch.load raises, the file is unusable
        raise CheckpointError(_with_fix(f"{path} cannot be read as a checkpoint: {load_failure(exc)}.", fix)) from None
    problem = _structure_problem(payload)
    if problem:
        raise CheckpointError(_with_fix(f"{path} is not a fedglioma checkpoint: {problem}.", fix))
    return payload


def load_weights(
    model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], path: Path | str, *, fix: str = DEFAULT_FIX
) -> None:
    """``model.load_state_dict(state_dict)``, or a :class:`CheckpointError` naming ``path`` (where
    ``state_dict`` comes from) and the keys that do not fit when it holds another network."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [
        f"{k} is {tuple(state_dict[k].shape)}, the network's is {tuple(v.shape)}"
        for k, v in expected.items() if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)
    ]
    problems = [
        f"{len(keys)} {what} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})"
        for what, keys in (("weights missing", missing), ("unexpected weights", unexpected), ("shapes differ", shapes))
        if keys
    ]
    if problems:
        raise CheckpointError(_with_fix(f"{path} holds the weights of another network: {'; '.join(problems)}.", fix))
    model.load_state_dict(state_dict)


def load_model(path: Path | str) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The network saved in a checkpoint, rebuilt from the model config stored with it
    (eval mode, CPU), and the checkpoint payload (round, score, size...)."""
    payload = load_checkpoint(path)
    try:
        model = build_model(ModelConfig(**payload["model"]), payload["size"])
    except (TypeError, ValueError) as exc:  # a key this version does not know, or a value it rejects
        raise CheckpointError(
            f"{path} records a model config this version of fedglioma cannot build ({exc}). "
            "Use the fedglioma version that trained it."
        ) from None
    load_weights(model, payload["state_dict"], path,
                 fix="The file does not match the model config stored with it. " + DEFAULT_FIX)
    return model.eval(), payload


def _with_fix(message: str, fix: str) -> str:
    return f"{message} {fix}" if fix else message


def load_failure(exc: Exception) -> str:
    """Why ``torch.load(..., weights_only=True)`` raised ``exc``, in words for a user: never torch's
    advice to retry with ``weights_only`` off, which would let the file run code."""
    if isinstance(exc, EOFError):
        return "the file is empty or ends early (truncated)"
    if isinstance(exc, pickle.UnpicklingError):
        return ("it holds something other than tensors and plain values: damaged bytes, or Python "
                "objects, which are never loaded since loading them can run code")
    if isinstance(exc, OSError):
        return str(exc)
    first = str(exc).split(". ")[0].strip()
    if isinstance(exc, RuntimeError) and first and "weights_only" not in first:
        return f"the file is truncated or damaged ({first})"
    return f"the file is truncated or damaged ({type(exc).__name__})"


def _structure_problem(payload: Any) -> str | None:
    """What a loaded object lacks to be a checkpoint, or None."""
    if not isinstance(payload, dict):
        return f"it holds a {type(payload).__name__}, not a dict with {sorted(CHECKPOINT_ENTRIES)}"
    missing = [k for k in CHECKPOINT_ENTRIES if k not in payload]
    if missing:
        return f"no {missing} entries (it has {sorted(map(str, payload))[:8]})"
    for key, kind in CHECKPOINT_ENTRIES.items():
        value = payload[key]
        if not isinstance(value, kind) or isinstance(value, bool):
            return f"its {key!r} entry is a {type(value).__name__}, not a {kind.__name__}"
    for key, value in payload["state_dict"].items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            return f"its state_dict entry {key!r} is a {type(value).__name__}, not a tensor"
    return None
