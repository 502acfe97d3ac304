"""Dice of `fedglioma predict`'s masks on each case's own grid against the reference segmentation,
for comparison with the evaluation path's held-out Dice (which scores on the network grid).

    fedglioma predict DATA/heldout --model runs/<name>/checkpoints/best.pt --out PRED
    .venv/bin/python tests/benchmarks/check_predict.py DATA/heldout PRED

Also asserts that every mask has its input's shape and affine.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nibabel as nib
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from common.contract import LABEL_CONVENTIONS  # noqa: E402
from common.data.site import load_site  # noqa: E402


def regions(labels: np.ndarray) -> dict[str, np.ndarray]:
    """Internal labels (1 NCR, 2 ED, 3 ET) -> WT, TC, ET masks."""
    return {"wt": labels > 0, "tc": (labels == 1) | (labels == 3), "et": labels == 3}


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2 * (a & b).sum() / total)  # BraTS: both empty score 1


def main(heldout: Path, predictions: Path) -> dict[str, float]:
    scores: dict[str, list[float]] = {"wt": [], "tc": [], "et": []}
    cases = load_site(heldout).cases
    for case in cases:
        predicted, reference = nib.load(predictions / case.case_id / "segmentation.nii.gz"), nib.load(case.seg)
        assert predicted.shape == reference.shape and np.allclose(predicted.affine, reference.affine), case.case_id
        table = LABEL_CONVENTIONS[case.label_convention]
        lookup = np.vectorize(lambda v: table.get(int(v), 0))
        p = regions(lookup(np.asarray(predicted.dataobj).astype(int)))
        r = regions(lookup(np.asarray(reference.dataobj).astype(int)))
        for key in scores:
            scores[key].append(dice(p[key], r[key]))
    means = {key: round(float(np.mean(values)), 4) for key, values in scores.items()}
    print(f"{len(cases)} cases, shapes and affines match; Dice on the cases' own grid: {means}")
    return means


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
