"""Where and how a process computes: device choice, seeds and threads, moving batches."""

from __future__ import annotations

import os
from typing import Mapping

import torch
from monai.utils import set_determinism

from common.config import ExperimentConfig

Batch = dict[str, torch.Tensor]


def select_device(preference: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present, else CPU."""
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(preference)


def configure_runtime(cfg: ExperimentConfig, device: torch.device) -> None:
    """Seeds, threads and cuDNN settings for one training process."""
    set_determinism(seed=cfg.train.seed)
    if device.type == "cuda":
        # Fixed input sizes: let cuDNN pick the fastest kernels (determinism off on purpose).
        torch.backends.cudnn.benchmark = True
        torch.backends.cudnn.deterministic = False
    else:
        threads = cfg.train.threads or os.cpu_count() or 1
        torch.set_num_threads(threads)


def move_batch(batch: Mapping[str, torch.Tensor], device: torch.device) -> Batch:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
