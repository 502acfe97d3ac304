"""Reading the checkpoints a run folder writes (``server.run_folder.RunFolder``).

A checkpoint is a dict ``{"round", "state_dict", "model", "size", ...}`` saved with
``torch.save``; it loads with ``weights_only=True`` (no code is unpickled).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from common.config import ModelConfig
from common.model.network import build_model


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used; the message names the file and what to do."""


def load_checkpoint(path: Path | str) -> dict[str, Any]:
    """Load a checkpoint written by :class:`RunFolder` (weights_only: no code is unpickled)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist (look in runs/<name>/checkpoints/)")
    payload = torch.load(path, weights_only=True, map_location="cpu")
    if not isinstance(payload, dict) or "state_dict" not in payload:
        raise CheckpointError(f"{path} is not a fedglioma checkpoint (no 'state_dict' entry)")
    return payload


def load_model(path: Path | str) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The network saved in a checkpoint, rebuilt from the model config stored with it
    (eval mode, CPU), and the checkpoint payload (round, score, size...)."""
    payload = load_checkpoint(path)
    model = build_model(ModelConfig(**payload["model"]), int(payload["size"]))
    model.load_state_dict(payload["state_dict"])
    return model.eval(), payload
