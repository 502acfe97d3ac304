"""Torch datasets and loaders over a site's validated cases (no Flower imports here).

Every item, and every default-collated batch of B items, is a dict with exactly:

=============  ==========  ====================  ============================================
key            dtype       item shape            meaning
=============  ==========  ====================  ============================================
``image``      float32     (4, S, S, S)          sequences in SEQUENCES order, missing = 0
``available``  bool        (4,)                  which channels are real
``seg``        int64       (1, S, S, S)          0 bg, 1 NCR, 2 ED, 3 ET; zeros if no seg
``has_seg``    bool        ()                    the case has a segmentation
``labels``     int64       (len(TASKS),)         class index per task, UNKNOWN_LABEL unknown
``survival``   float32     (2,)                  (days, event 1/0), event UNKNOWN_LABEL unknown
``spacing``    float32     (3,)                  voxel size of the S^3 grid in mm
``index``      int64       ()                    position of the case in this dataset
=============  ==========  ====================  ============================================

Batches add a leading B. ``index`` lets a site attach pseudo-labels to ``dataset.cases[i]``
locally; case IDs never enter a batch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from monai.data import CacheDataset, DataLoader
from monai.data import Dataset as MonaiDataset
from torch.utils.data import Dataset

from common.config import DataConfig
from common.contract import UNKNOWN_LABEL
from common.data.cache import PersistentCases
from common.data.site import SEG_KEY, CaseRecord, SiteIndex, label_matrix, split_cases
from common.data.transforms import INDEX, LABEL_CONVENTION, LABELS, SURVIVAL, build_transforms


def case_item(case: CaseRecord, index: int) -> dict[str, Any]:
    """The path dict :func:`common.data.transforms.build_transforms` starts from."""
    item: dict[str, Any] = {seq: str(path) for seq, path in case.images.items()}
    if case.seg is not None:
        item[SEG_KEY] = str(case.seg)
        item[LABEL_CONVENTION] = case.label_convention
    item[LABELS] = np.asarray(case.labels, dtype=np.int64)
    item[SURVIVAL] = np.asarray(case.survival if case.survival is not None else (0.0, UNKNOWN_LABEL), dtype=np.float32)
    item[INDEX] = np.asarray(index, dtype=np.int64)  # 0-d array: EnsureTyped leaves numpy scalars alone
    return item


class SiteDataset(Dataset):
    """Preprocessed cases of one site (or a pooled list of cases), see the module docstring.

    Args:
        cases: validated cases (from :func:`common.data.site.load_site` / :func:`split_cases`).
        cfg: ``size`` (S), ``cache`` (keep the deterministic part of the pipeline in memory via
            MONAI's CacheDataset; random augmentation still runs every epoch) and ``num_workers``
            (threads used to fill the cache).
        train: apply the training augmentation.
        cache_dir: keep the deterministic part on disk there instead (a site's state folder,
            :class:`common.data.cache.PersistentCases`), reused by later messages.
    """

    def __init__(self, cases: Sequence[CaseRecord], cfg: DataConfig, *, train: bool, cache_dir: Path | None = None) -> None:
        self.cases: list[CaseRecord] = list(cases)
        self.train = train
        self.transform = build_transforms(cfg.size, train)
        items = [case_item(case, i) for i, case in enumerate(self.cases)]
        if cache_dir is not None:
            # on disk, across messages and rounds (common.data.cache)
            self.data = PersistentCases(items, self.transform, cache_dir, preprocessing={"size": cfg.size},
                                        content_hash=cfg.cache_content_hash, volatile=(LABELS, SURVIVAL, INDEX))
        elif cfg.cache:
            self.data: MonaiDataset = CacheDataset(
                items, self.transform, cache_rate=1.0, num_workers=max(cfg.num_workers, 1), progress=False
            )
        else:
            self.data = MonaiDataset(items, self.transform)

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.data[i]

    def label_matrix(self) -> np.ndarray:
        """Real labels (N, len(TASKS)) int64, UNKNOWN_LABEL where unknown; no image is loaded."""
        return label_matrix(self.cases)


def make_loader(
    cases: Sequence[CaseRecord], cfg: DataConfig, train: bool, *, seed: int = 0, cache_dir: Path | None = None
) -> DataLoader:
    """A loader over ``cases``: shuffled (seeded) with augmentation when ``train``, in order
    without it otherwise; the last partial batch is kept.

    MONAI's DataLoader seeds the pipeline's random transforms (per worker when
    ``cfg.num_workers > 0``) from ``generator``, so shuffling and augmentation repeat exactly for
    the same seed. An explicit generator is also passed for validation: without one MONAI would
    re-seed torch's global generator.
    """
    if train and not cases:
        raise ValueError("make_loader(train=True) got no cases: a site needs at least one usable training case "
                         "(run `fedglioma check-site` on its folder)")
    dataset = SiteDataset(cases, cfg, train=train, cache_dir=cache_dir)
    return DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        shuffle=train,
        drop_last=False,
        num_workers=cfg.num_workers,
        generator=torch.Generator().manual_seed(seed),
    )


def make_loaders(index: SiteIndex, cfg: DataConfig, *, seed: int = 0) -> tuple[DataLoader, DataLoader]:
    """(train, validation) loaders of a site, split by :func:`common.data.site.split_cases` with
    ``cfg.val_fraction`` and ``cfg.split_seed``; ``seed`` drives shuffling and augmentation."""
    train_cases, val_cases = split_cases(index.cases, cfg.val_fraction, cfg.split_seed)
    return make_loader(train_cases, cfg, train=True, seed=seed), make_loader(val_cases, cfg, train=False, seed=seed)
