"""``fedglioma predict CASE_OR_SITE_DIR --model CKPT --out DIR``: apply a trained model to new patients.

Input: one case folder (``<case>/<case>_t1ce.nii.gz ...`` or ``<case>/<case>-t1c.nii.gz ...``, any
non-empty subset of the four sequences) or a site folder holding case folders (batch mode; no
labels.csv needed). Every case is checked as ``fedglioma check-site`` checks it
(:func:`common.data.site.find_case_files`, :func:`common.data.site.validate_case_files`): a file that
cannot be used is named with the reason and the fix, never a traceback.

Per case, under ``DIR/<case>/``:

* ``segmentation.nii.gz`` - the label map on the case's own grid and affine (the preprocessing's
  orientation, crop, resize and pad undone, nearest neighbour), in the label values of the case's
  convention: BraTS 2021 names -> enhancing tumor 4, BraTS 2023 names -> 3 (``--label-convention``
  overrides, any of :data:`common.contract.LABEL_CONVENTIONS`); 1 necrotic core, 2 edema in all;
* ``prediction.json`` - region volumes in mL (WT/TC/ET, from the voxel size), per marker the
  calibrated probability (the checkpoint's calibration), the MC-dropout uncertainty and the
  low-confidence flag (:func:`low_confidence`), the sequences present / imputed / zero-filled;
* ``report.html`` - the same, with axial, coronal and sagittal slices through the tumor centroid
  (region contours on T1ce and FLAIR), PNG images embedded as base64.

Batch mode adds ``DIR/summary.csv`` and ``DIR/index.html`` (one row per case, failures included).

Exit status: 0 every case predicted; 1 the model or a case could not be used (the others are still
predicted); 2 the input folder does not exist.

Heavy libraries (torch, MONAI, nibabel, matplotlib) are imported inside the functions that use
them, as in every ``fedglioma`` subcommand, so that ``fedglioma --help`` stays fast.
"""

from __future__ import annotations

import argparse
import base64
import csv
import gzip
import html
import io
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from common.contract import (
    ED,
    ET,
    LABEL_CONVENTIONS,
    NAMING_CONVENTION,
    NCR,
    NIFTI_EXTENSIONS,
    REGIONS,
    SEQUENCES,
    TASK_CLASSES,
    TASKS,
)
from common.io import atomic_write

if TYPE_CHECKING:
    # for annotations only
    import numpy as np
    import torch

EXIT_OK, EXIT_FAILED, EXIT_NOT_FOUND = 0, 1, 2
DEFAULT_MC_PASSES = 10
#: Low-confidence rule: a marker is flagged when its calibrated probability lies within this
#: margin of the decision threshold (threshold 0.5: 0.35 < p < 0.65) ...
CONFIDENCE_MARGIN = 0.15
#: ... or when the standard deviation of its MC-dropout probability exceeds this.
MAX_UNCERTAINTY = 0.10
LOW_CONFIDENCE_RULE = (
    f"flagged when the calibrated probability is within {CONFIDENCE_MARGIN:g} of the decision threshold "
    f"(0.5 when uncalibrated: p between {0.5 - CONFIDENCE_MARGIN:g} and {0.5 + CONFIDENCE_MARGIN:g}) or the MC-dropout "
    f"standard deviation exceeds {MAX_UNCERTAINTY:g}"
)

SEGMENTATION_FILE = "segmentation.nii.gz"
PREDICTION_JSON = "prediction.json"
REPORT_HTML = "report.html"
SUMMARY_CSV = "summary.csv"
INDEX_HTML = "index.html"

#: The value written for each internal tumor label, per label convention: the inverse of how a
#: site's segmentation is read (:data:`common.contract.LABEL_CONVENTIONS`; the first file value of
#: each label, so brats2024-post writes no resection cavity: the network predicts none).
WRITTEN_LABELS: Mapping[str, Mapping[int, int]] = {
    name: {label: min(v for v, internal in table.items() if internal == label) for label in (NCR, ED, ET)}
    for name, table in LABEL_CONVENTIONS.items()
}
REGION_COLORS: Mapping[str, str] = {"wt": "#2ca02c", "tc": "#ffbf00", "et": "#d62728"}
#: Backgrounds of the slice images, in order of preference.
FIGURE_SEQUENCES: tuple[str, ...] = ("t1ce", "flair")
#: The spatial operations of the preprocessing that :func:`to_case_grid` undoes, in applied order.
INVERTED_OPERATIONS: tuple[str, ...] = ("Orientation", "CropForeground", "Resize", "ResizeWithPadOrCrop")


class PredictError(Exception):
    """A model or case cannot be used; the message names the file and the fix."""


class InputNotFoundError(PredictError):
    """The folder given on the command line does not exist."""


# ----------------------------------------------------------------------------------- inputs
@dataclass(frozen=True)
class CaseInput:
    """One case folder's usable files: ``images`` maps each present sequence (SEQUENCES order) to
    its file; ``naming`` is the convention of its file names ("brats2021" or "brats2023")."""

    case_id: str
    folder: Path
    naming: str
    images: Mapping[str, Path] = field(hash=False)

    @property
    def missing(self) -> tuple[str, ...]:
        return tuple(s for s in SEQUENCES if s not in self.images)


def _holds_nifti(folder: Path) -> bool:
    return any(p.name.lower().endswith(NIFTI_EXTENSIONS) for p in folder.iterdir())


def case_folders(path: Path, *, exclude: Path | None = None) -> list[Path]:
    """``[path]`` when ``path`` is a case folder (it holds NIfTI files), else its case subfolders
    (batch mode: every non-hidden subfolder except ``exclude``, e.g. the output folder)."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise InputNotFoundError(f"{path} does not exist or is not a folder. Fix: pass a case folder (holding "
                                 "<case>_t1ce.nii.gz ... or <case>-t1c.nii.gz ...) or a site folder of case folders")
    if _holds_nifti(path):
        return [path]
    skip = exclude.resolve() if exclude is not None else None
    folders = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".") and p.resolve() != skip)
    if not folders:
        raise PredictError(f"{path} holds neither NIfTI files nor case folders. Fix: pass a case folder "
                           "(<case>/<case>_t1ce.nii.gz ...) or a site folder holding such case folders")
    return folders


def read_case(folder: Path) -> CaseInput:
    """Find and check one case's sequence files as ``fedglioma check-site`` does (every voxel read).

    A segmentation in the folder (``*_seg``/``-seg``) is not read: predict needs none.

    Raises:
        PredictError: naming each unusable file, why and the fix.
    """
    # heavy: imported when used, so that `fedglioma --help` stays fast
    from common.data.site import find_case_files, validate_case_files

    found = find_case_files(folder)
    problems = list(found.problems)
    if not problems:
        problems, _ = validate_case_files(found.images, None, deep=True)
    if problems:
        lines = [f"case {folder.name} ({folder}) cannot be used:"]
        lines += [f"  {p.path}: {p.reason}. Fix: {p.fix.rstrip('.')}." for p in problems]
        raise PredictError("\n".join(lines))
    return CaseInput(folder.name, folder, found.naming, dict(found.images))


def output_convention(case: CaseInput, override: str | None) -> str:
    """The label convention of the written segmentation: ``override``, else the one the case's
    file naming implies (:data:`common.contract.NAMING_CONVENTION`)."""
    convention = override or NAMING_CONVENTION[case.naming]
    if convention not in WRITTEN_LABELS:
        raise PredictError(f"unknown label convention {convention!r}; choose one of {', '.join(WRITTEN_LABELS)}")
    return convention


# ------------------------------------------------------------------------- back to the case grid
def _undo_nearest_resize(labels: np.ndarray, orig_size: Sequence[int]) -> np.ndarray:
    """Invert the preprocessing's nearest-neighbour ``Resized`` of a label map.

    Per axis, the forward map f (network index j -> native index f(j)) is measured by resizing an
    index ramp with MONAI's Resize exactly as the pipeline does. Native voxel i then takes the
    network voxel j with f(j) = i closest to i's centre, (i + 0.5) n / N; when no j maps to i (the
    network grid is coarser), the j with f(j) nearest to i. This is the exact inverse wherever the
    network grid is finer, and maps back every voxel the network saw when it is coarser. Written
    here because MONAI's inverse resizes with nearest neighbour again, which is not the inverse of
    the forward sampling: it shifts labels by up to a voxel (reference segmentations of the
    32^3 tiny cohort taken to the network grid and back: tumor Dice 0.71 with it, 1.0 with this).
    """
    # heavy: imported when used, so that `fedglioma --help` stays fast
    import numpy as np
    import torch
    from monai.transforms import Resize
    from common.data.transforms import SEG_RESIZE_MODE  # (the forward mode, shared)

    index = []
    for n, size in zip(labels.shape, orig_size):
        ramp = torch.arange(size, dtype=torch.float32).reshape(1, size)
        forward = np.asarray(Resize(spatial_size=(n,), mode=SEG_RESIZE_MODE)(ramp)).reshape(n).round().astype(np.int64)
        native = np.arange(size)
        centre = (native + 0.5) * n / size
        cost = np.abs(forward[None, :] - native[:, None]) * (n + 1.0) + np.abs(np.arange(n)[None, :] - centre[:, None])
        index.append(cost.argmin(axis=1))
    return labels[np.ix_(*index)]


def _unpad(labels: np.ndarray, padded: Sequence[Sequence[int]]) -> np.ndarray:
    """Remove the padding MONAI recorded (``padded``: (before, after) per dimension, channel first)."""
    spatial = list(padded)[-labels.ndim:]
    return labels[tuple(slice(int(lo), labels.shape[a] - int(hi)) for a, (lo, hi) in enumerate(spatial))]


def _uncrop(labels: np.ndarray, cropped: Sequence[int]) -> np.ndarray:
    """Put back the voxels MONAI cropped (``cropped``: before, after per spatial axis) as background."""
    # heavy: imported when used, so that `fedglioma --help` stays fast
    import numpy as np

    pairs = [(int(cropped[2 * a]), int(cropped[2 * a + 1])) for a in range(labels.ndim)]
    return np.pad(labels, pairs, mode="constant", constant_values=0)


def to_case_grid(labels: np.ndarray, operations: Sequence[Mapping[str, Any]]) -> np.ndarray:
    """A label map on the network grid -> the same on the case's own voxel grid.

    Args:
        labels: (S, S, S) integer labels on the network grid.
        operations: the ``applied_operations`` of the preprocessed image (a MONAI MetaTensor):
            exactly :data:`INVERTED_OPERATIONS`, undone in reverse order: pad/crop to S^3 (exact),
            resize (:func:`_undo_nearest_resize`), foreground crop (padded back with background)
            and the orientation to RAS (nibabel's orientation transforms; the original affine is
            recorded by MONAI).

    Returns:
        (X, Y, Z) labels in the voxel order of the case's files.
    """
    # heavy: imported when used, so that `fedglioma --help` stays fast
    import nibabel as nib

    names = tuple(op["class"] for op in operations)
    if names != INVERTED_OPERATIONS:
        raise RuntimeError(f"the preprocessing applied {names}; to_case_grid undoes {INVERTED_OPERATIONS}: "
                           "update fedglioma.predict.to_case_grid with common.data.transforms")
    out = labels
    for op in reversed(operations):
        info = op["extra_info"]
        if op["class"] in ("ResizeWithPadOrCrop", "CropForeground"):  # forward: crop, then pad
            if "pad_info" in info:
                out = _unpad(out, info["pad_info"]["extra_info"]["padded"])
            cropped = info["crop_info"]["extra_info"]["cropped"] if "crop_info" in info else info.get("cropped")
            if cropped is not None:
                out = _uncrop(out, cropped)
        elif op["class"] == "Resize":
            out = _undo_nearest_resize(out, op["orig_size"])
        else:  # Orientation: RAS back to the file's axes
            original = nib.orientations.io_orientation(info["original_affine"])
            ras = nib.orientations.axcodes2ornt(("R", "A", "S"))
            out = nib.orientations.apply_orientation(out, nib.orientations.ornt_transform(ras, original))
    return out


# ------------------------------------------------------------------------------ inference
def inference_transform(size: int) -> Any:
    """The evaluation preprocessing (``build_transforms(size, train=False)``) without its final
    typing, so that ``image`` stays a MONAI MetaTensor whose ``applied_operations`` record what
    :func:`to_case_grid` undoes; the values the network sees are the same."""
    # heavy: imported when used, so that `fedglioma --help` stays fast
    from monai.transforms import Compose, EnsureTyped, SelectItemsd
    from common.data.transforms import build_transforms

    full = build_transforms(size, train=False)
    return Compose([t for t in full.transforms if not isinstance(t, (EnsureTyped, SelectItemsd))])


@dataclass(frozen=True)
class Marker:
    """One molecular/grading prediction of a case."""

    task: str
    probability: float  # calibrated probability of the positive class (TASK_CLASSES[task][1])
    threshold: float  # decision threshold on ``probability``
    uncertainty: float | None  # std of the positive-class probability over MC-dropout passes
    calibrated: bool  # the checkpoint holds a calibration fit for this task

    @property
    def predicted(self) -> str:
        return TASK_CLASSES[self.task][int(self.probability >= self.threshold)]

    @property
    def low_confidence(self) -> bool:
        return low_confidence(self.probability, self.threshold, self.uncertainty)

    def as_dict(self) -> dict[str, Any]:
        negative, positive = TASK_CLASSES[self.task]
        return {"positive_class": positive, "negative_class": negative, "probability": self.probability,
                "threshold": self.threshold, "predicted": self.predicted, "uncertainty": self.uncertainty,
                "low_confidence": self.low_confidence, "calibrated": self.calibrated}


def low_confidence(probability: float, threshold: float, uncertainty: float | None) -> bool:
    """:data:`LOW_CONFIDENCE_RULE`."""
    near = abs(probability - threshold) < CONFIDENCE_MARGIN
    return near or (uncertainty is not None and uncertainty > MAX_UNCERTAINTY)


@dataclass
class Inference:
    """What the network says about one case, before post-processing.

    ``grid_labels`` (S, S, S) and ``case_labels`` (X, Y, Z, the case's grid) are internal labels;
    ``affine`` and ``header`` are those of the case's first sequence file.
    """

    case: CaseInput
    grid_labels: np.ndarray
    case_labels: np.ndarray
    affine: np.ndarray
    header: Any
    markers: dict[str, Marker]


class Predictor:
    """A checkpoint ready to segment and classify cases.

    Args:
        checkpoint: a run folder's checkpoint (``runs/<name>/checkpoints/best.pt``).
        device: "auto" (CUDA when present), "cpu" or "cuda".
        mc_passes: MC-dropout passes for the uncertainty (0: none; otherwise >= 2).

    Raises:
        PredictError: the checkpoint is missing or unusable (the message names it and the fix).
    """

    def __init__(self, checkpoint: Path, *, device: str = "auto", mc_passes: int = DEFAULT_MC_PASSES) -> None:
        # heavy: imported when used, so that `fedglioma --help` stays fast
        from common.evaluation.calibration import Calibration
        from common.model.checkpoint import CheckpointError, load_model
        from common.runtime import select_device

        if mc_passes < 0 or mc_passes == 1:
            raise PredictError(f"--mc-passes must be 0 (no uncertainty) or at least 2, got {mc_passes}")
        try:
            model, payload = load_model(checkpoint)
        except (CheckpointError, FileNotFoundError) as exc:
            raise PredictError(str(exc)) from None
        self.checkpoint = Path(checkpoint)
        self.device = select_device(device)
        self.model = model.to(self.device).eval()
        self.size = int(payload["size"])
        self.round = payload.get("round")
        self.imputes = bool(payload["model"].get("imputation", False))
        self.calibration = Calibration.from_dict(payload.get("calibration"))
        self.mc_passes = mc_passes
        self.transform = inference_transform(self.size)

    def infer(self, case: CaseInput) -> Inference:
        """Segment (deterministic pass, as the evaluation loop) and classify one case."""
        # heavy: imported when used, so that `fedglioma --help` stays fast
        import nibabel as nib
        import numpy as np
        import torch
        from common.evaluation.uncertainty import mc_dropout_predict

        item = self.transform({seq: str(path) for seq, path in case.images.items()})
        image = item["image"].as_tensor().float()[None].to(self.device)
        available = torch.as_tensor(item["available"])[None].to(self.device)
        spacing = torch.as_tensor(item["spacing"])[None].to(self.device)
        with torch.no_grad():
            output = self.model(image, available, spacing)
        grid = output.seg_logits.argmax(dim=1)[0].cpu().numpy().astype(np.uint8)
        reference = nib.load(next(iter(case.images.values())))
        labels = to_case_grid(grid, item["image"].applied_operations)
        if labels.shape != tuple(reference.shape):
            raise RuntimeError(f"to_case_grid gave {labels.shape}, the case's grid is {reference.shape}")
        spread: dict[str, torch.Tensor] = {}
        if self.mc_passes:
            _, spread = mc_dropout_predict(self.model, image, available, self.mc_passes, spacing=spacing)
        markers = {}
        for task in TASKS:
            logits = output.cls_logits[task][0].float().cpu().numpy()
            markers[task] = Marker(
                task=task,
                probability=float(self.calibration.probability(task, np.asarray(logits[1] - logits[0]))),
                threshold=self.calibration.probability_threshold(task),
                uncertainty=float(spread[task][0, 1]) if task in spread else None,
                calibrated=self.calibration.cases.get(task, 0.0) > 0,
            )
        return Inference(case, grid, np.ascontiguousarray(labels), np.asarray(reference.affine), reference.header, markers)


# ------------------------------------------------------------------------------ one case
@dataclass
class CaseResult:
    """A finished case: its post-processed labels (internal, case grid) and what the report shows."""

    inference: Inference
    labels: np.ndarray
    convention: str
    postprocess: tuple[str, ...]
    imputes: bool
    volumes_ml: dict[str, float]
    voxel_mm: tuple[float, float, float]

    @property
    def case(self) -> CaseInput:
        return self.inference.case

    def sequences(self) -> dict[str, list[str]]:
        missing = list(self.case.missing)
        return {"present": list(self.case.images), "imputed": missing if self.imputes else [],
                "zero_filled": [] if self.imputes else missing}


def voxel_size_mm(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel size (mm) along the three voxel axes of ``affine``."""
    # heavy: imported when used, so that `fedglioma --help` stays fast
    import numpy as np

    return tuple(float(v) for v in np.sqrt((np.asarray(affine, dtype=np.float64)[:3, :3] ** 2).sum(axis=0)))  # type: ignore[return-value]


def region_volumes_ml(labels: np.ndarray, affine: np.ndarray) -> dict[str, float]:
    """WT/TC/ET volume in mL of internal ``labels`` (X, Y, Z) on the grid of ``affine``."""
    # heavy: imported when used, so that `fedglioma --help` stays fast
    import numpy as np

    voxel_ml = abs(float(np.linalg.det(np.asarray(affine, dtype=np.float64)[:3, :3]))) / 1000.0
    return {region: float(np.isin(labels, values).sum()) * voxel_ml for region, values in REGIONS.items()}


def finish_case(
    inference: Inference, predictor: Predictor, *, convention: str, steps: Sequence[str] = (),
    min_component_ml: float | None = None,
) -> CaseResult:
    """Post-process (``steps`` of :mod:`common.evaluation.postprocess`) and measure one case."""
    # heavy: imported when used, so that `fedglioma --help` stays fast
    from common.evaluation.postprocess import MIN_COMPONENT_ML, parse_steps, postprocess

    chosen = parse_steps(steps)
    spacing = voxel_size_mm(inference.affine)
    labels = postprocess(inference.case_labels, spacing, chosen,
                         min_volume_ml=MIN_COMPONENT_ML if min_component_ml is None else min_component_ml)
    return CaseResult(inference, labels, convention, chosen, predictor.imputes,
                      region_volumes_ml(labels, inference.affine), spacing)


def write_segmentation(result: CaseResult, path: Path) -> None:
    """The labels in the values of ``result.convention``, as uint8 NIfTI on the case's grid and
    affine (the first sequence file's header: qform/sform codes and units kept)."""
    # heavy: imported when used, so that `fedglioma --help` stays fast
    import nibabel as nib
    import numpy as np

    values = np.zeros(256, dtype=np.uint8)
    for internal, written in WRITTEN_LABELS[result.convention].items():
        values[internal] = written
    header = result.inference.header.copy()
    header.set_data_dtype(np.uint8)
    header["cal_min"], header["cal_max"] = 0.0, 0.0  # the MRI's display window means nothing here
    image = nib.Nifti1Image(values[result.labels], result.inference.affine, header)
    image.header.set_slope_inter(1.0, 0.0)
    data = gzip.compress(image.to_bytes())
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def prediction_record(result: CaseResult, predictor: Predictor) -> dict[str, Any]:
    """The content of ``prediction.json``."""
    inference = result.inference
    return {
        "case_id": result.case.case_id,
        "input": str(result.case.folder),
        "naming": result.case.naming,
        "segmentation": {
            "file": SEGMENTATION_FILE, "label_convention": result.convention,
            "values": {name: WRITTEN_LABELS[result.convention][label] for name, label in (("ncr", NCR), ("ed", ED), ("et", ET))},
            "shape": list(inference.case_labels.shape), "voxel_mm": list(result.voxel_mm),
            "affine": [list(map(float, row)) for row in inference.affine],
        },
        "volumes_ml": result.volumes_ml,
        "markers": {task: m.as_dict() for task, m in inference.markers.items()},
        "low_confidence_rule": LOW_CONFIDENCE_RULE,
        "sequences": result.sequences(),
        "postprocess": list(result.postprocess),
        "model": {"checkpoint": str(predictor.checkpoint), "round": predictor.round, "imputation": predictor.imputes,
                  "input_size": predictor.size, "mc_passes": predictor.mc_passes, "device": str(predictor.device)},
    }


# ------------------------------------------------------------------------------ the report
def _to_ras(volume: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, tuple[float, ...]]:
    """``volume`` reordered to RAS voxel axes (flips and permutations only) and its voxel size."""
    # heavy: imported when used, so that `fedglioma --help` stays fast
    import nibabel as nib
    import numpy as np

    image = nib.as_closest_canonical(nib.Nifti1Image(volume, affine))
    return np.asanyarray(image.dataobj), tuple(float(z) for z in image.header.get_zooms()[:3])


def slice_images(result: CaseResult) -> dict[str, str]:
    """``{sequence: base64 PNG}``: axial, coronal and sagittal slices through the tumor centroid
    (the brain's centre without tumor), region contours on T1ce and FLAIR (else on the first
    sequence present). Neurological convention: the patient's right on the right."""
    # heavy: imported when used, so that `fedglioma --help` stays fast
    import nibabel as nib
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from scipy import ndimage

    case = result.case
    backgrounds = [s for s in FIGURE_SEQUENCES if s in case.images] or [next(iter(case.images))]
    labels, zooms = _to_ras(np.asarray(result.labels, dtype=np.uint8), result.inference.affine)
    masks = {region: np.isin(labels, values) for region, values in REGIONS.items()}
    images: dict[str, str] = {}
    for sequence in backgrounds:
        volume, _ = _to_ras(np.asarray(nib.load(case.images[sequence]).dataobj, dtype=np.float32), result.inference.affine)
        target = masks["wt"] if masks["wt"].any() else volume != 0
        centre = [int(round(c)) for c in ndimage.center_of_mass(target)]
        brain = volume[volume != 0]
        vmin, vmax = np.percentile(brain, [1, 99]) if brain.size else (0.0, 1.0)
        figure = Figure(figsize=(10, 3.6), dpi=90)
        FigureCanvasAgg(figure)
        views = (("axial", 2, (0, 1)), ("coronal", 1, (0, 2)), ("sagittal", 0, (1, 2)))
        for n, (view, axis, (h, v)) in enumerate(views, start=1):
            ax = figure.add_subplot(1, 3, n)
            index = [slice(None)] * 3
            index[axis] = centre[axis]
            plane = volume[tuple(index)].T  # rows: the vertical axis
            ax.imshow(plane, cmap="gray", origin="lower", vmin=vmin, vmax=vmax, aspect=zooms[v] / zooms[h],
                      interpolation="nearest")
            for region, mask in masks.items():
                cut = mask[tuple(index)].T
                if cut.any():
                    ax.contour(cut.astype(np.float32), levels=[0.5], colors=[REGION_COLORS[region]], linewidths=1.2)
            ax.set_title(f"{view} (slice {centre[axis]})", fontsize=9)
            ax.set_axis_off()
        figure.legend(handles=[Line2D([], [], color=c, label=r.upper()) for r, c in REGION_COLORS.items()],
                      loc="lower center", ncol=3, fontsize=8, frameon=False)
        figure.suptitle(f"{case.case_id}: {sequence}", fontsize=10)
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png")
        images[sequence] = base64.b64encode(buffer.getvalue()).decode("ascii")
    return images


_STYLE = ("body{font-family:sans-serif;max-width:1000px;margin:2em auto;color:#222}"
          "table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:.3em .7em;text-align:left}"
          ".low{color:#b00;font-weight:bold}.note{color:#555;font-size:.9em}img{max-width:100%}")


def _table(table_id: str, header: Sequence[str], rows: Sequence[Sequence[str]], row_classes: Sequence[str] = ()) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = []
    for n, row in enumerate(rows):
        css = f' class="{row_classes[n]}"' if n < len(row_classes) and row_classes[n] else ""
        body.append(f"<tr{css}>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>")
    return f'<table id="{table_id}"><tr>{head}</tr>{"".join(body)}</table>'


def render_report(record: Mapping[str, Any], images: Mapping[str, str]) -> str:
    """``report.html`` of one case from its :func:`prediction_record` and :func:`slice_images`."""
    e = html.escape
    seg = record["segmentation"]
    volumes = _table("volumes", ["region", "volume (mL)"],
                     [[r.upper(), f"{v:.2f}"] for r, v in record["volumes_ml"].items()])
    rows, classes = [], []
    for task, m in record["markers"].items():
        unc = "n/a" if m["uncertainty"] is None else f"{m['uncertainty']:.3f}"
        rows.append([task, f"P({m['positive_class']}) = {m['probability']:.3f}", m["predicted"], f"{m['threshold']:.3f}",
                     unc, "LOW CONFIDENCE" if m["low_confidence"] else "ok", "yes" if m["calibrated"] else "no (identity)"])
        classes.append("low" if m["low_confidence"] else "")
    markers = _table("markers", ["marker", "calibrated probability", "predicted", "threshold",
                                 "MC-dropout std", "confidence", "calibration fit"], rows, classes)
    seqs = record["sequences"]
    sequence_rows = [[s, "present" if s in seqs["present"] else "imputed" if s in seqs["imputed"] else "zero-filled (missing)"]
                     for s in SEQUENCES]
    figures = "".join(f'<figure><img alt="{e(s)} slices through the tumor centroid" src="data:image/png;base64,{b}">'
                      f"<figcaption>{e(s)}: region contours WT (green), TC (amber), ET (red); the patient's right on the right</figcaption></figure>"
                      for s, b in images.items())
    model = record["model"]
    post = ", ".join(record["postprocess"]) or "none"
    return (
        f"<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>fedglioma prediction {e(record['case_id'])}</title>"
        f"<style>{_STYLE}</style></head><body>"
        f"<h1>Prediction for {e(record['case_id'])}</h1>"
        f"<p class=\"note\">Research software, not a medical device. Model {e(model['checkpoint'])} (round {e(str(model['round']))}); "
        f"input {e(record['input'])}.</p>"
        f"<h2>Tumor regions</h2>{volumes}"
        f"<p class=\"note\">Segmentation: {e(seg['file'])} on the input grid ({'x'.join(map(str, seg['shape']))} voxels of "
        f"{' x '.join(f'{v:.3g}' for v in seg['voxel_mm'])} mm), {e(seg['label_convention'])} labels "
        f"(NCR {seg['values']['ncr']}, ED {seg['values']['ed']}, ET {seg['values']['et']}); post-processing: {e(post)}.</p>"
        f"<h2>Markers</h2>{markers}"
        f"<p class=\"note\">Low confidence: {e(record['low_confidence_rule'])}. MC dropout: {model['mc_passes']} passes.</p>"
        f"<h2>Sequences</h2>{_table('sequences', ['sequence', 'status'], sequence_rows)}"
        f"<h2>Slices</h2><div id=\"images\">{figures}</div>"
        "</body></html>"
    )


def write_case(result: CaseResult, predictor: Predictor, folder: Path) -> dict[str, Any]:
    """Write segmentation.nii.gz, prediction.json and report.html into ``folder``; returns the record."""
    record = prediction_record(result, predictor)
    write_segmentation(result, folder / SEGMENTATION_FILE)
    text = json.dumps(record, indent=1)
    atomic_write(folder / PREDICTION_JSON, lambda tmp: tmp.write_text(text))
    page = render_report(record, slice_images(result))
    atomic_write(folder / REPORT_HTML, lambda tmp: tmp.write_text(page, encoding="utf-8"))
    return record


# ------------------------------------------------------------------------------ batch summary
def summary_row(case_id: str, record: Mapping[str, Any] | None, error: str | None) -> dict[str, Any]:
    row: dict[str, Any] = {"case_id": case_id, "status": "error" if error else "ok", "error": error or ""}
    for region in REGIONS:
        row[f"{region}_ml"] = f"{record['volumes_ml'][region]:.3f}" if record else ""
    for task in TASKS:
        m = record["markers"][task] if record else None
        row[f"{task}_probability"] = f"{m['probability']:.4f}" if m else ""
        row[f"{task}_predicted"] = m["predicted"] if m else ""
        row[f"{task}_uncertainty"] = "" if not m or m["uncertainty"] is None else f"{m['uncertainty']:.4f}"
        row[f"{task}_low_confidence"] = str(m["low_confidence"]).lower() if m else ""
    row["report"] = f"{case_id}/{REPORT_HTML}" if record else ""
    return row


def write_summary(out: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    """``summary.csv`` and ``index.html`` (one row per case, links to the reports)."""
    columns = list(rows[0])
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    text = buffer.getvalue()
    atomic_write(out / SUMMARY_CSV, lambda tmp: tmp.write_text(text))
    shown = ["case_id", "status", *(f"{r}_ml" for r in REGIONS), *(f"{t}_predicted" for t in TASKS)]
    body = []
    for row in rows:
        cells = []
        for key in shown:
            value = html.escape(str(row[key]))
            if key == "case_id" and row["report"]:
                value = f'<a href="{html.escape(row["report"])}">{value}</a>'
            elif key == "status" and row["error"]:
                value = f'<span class="low" title="{html.escape(row["error"])}">error</span>'
            flag = key.endswith("_predicted") and row[key.replace("_predicted", "_low_confidence")] == "true"
            cells.append(f"<td{' class=low' if flag else ''}>{value}{' (low confidence)' if flag else ''}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    page = (f"<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>fedglioma predictions</title><style>{_STYLE}</style>"
            f"</head><body><h1>Predictions ({len(rows)} cases)</h1><table id=\"summary\"><tr>"
            + "".join(f"<th>{html.escape(k)}</th>" for k in shown) + "</tr>" + "".join(body) + "</table>"
            f"<p class=\"note\">Low confidence: {html.escape(LOW_CONFIDENCE_RULE)}. Full table: {SUMMARY_CSV}.</p></body></html>")
    atomic_write(out / INDEX_HTML, lambda tmp: tmp.write_text(page, encoding="utf-8"))


# ------------------------------------------------------------------------------ command line
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", type=Path, metavar="CASE_OR_SITE_DIR",
                        help="a case folder (its sequence files), or a site folder of case folders (batch mode)")
    parser.add_argument("--model", type=Path, required=True, help="checkpoint (runs/<name>/checkpoints/best.pt)")
    parser.add_argument("--out", type=Path, required=True, help="output folder (one subfolder per case)")
    parser.add_argument("--mc-passes", type=int, default=DEFAULT_MC_PASSES,
                        help=f"MC-dropout passes for the marker uncertainty (default {DEFAULT_MC_PASSES}; 0 = none)")
    parser.add_argument("--postprocess", nargs="+", default=[], metavar="STEP",
                        help="post-processing steps: density (GMMAS tumor filter), small-components, holes; "
                             "'all' or 'none' (default: none)")
    parser.add_argument("--min-component-ml", type=float, default=None,
                        help="smallest tumor component kept by small-components, in mL (default 0.5)")
    parser.add_argument("--label-convention", choices=tuple(WRITTEN_LABELS), default=None,
                        help="label values of the written segmentation (default: the input's naming: "
                             "BraTS 2021 names -> ET 4, BraTS 2023 names -> ET 3; brats2024-post writes ET 3)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")


def run(args: argparse.Namespace) -> int:
    # heavy: imported when used, so that `fedglioma --help` stays fast
    from common.evaluation.postprocess import parse_steps

    out = args.out.expanduser()
    try:
        steps = parse_steps(args.postprocess)
        folders = case_folders(args.input, exclude=out)
        if any(out.resolve().is_relative_to(f.resolve()) for f in folders):
            raise PredictError(f"--out {out} lies inside a case folder; choose a folder outside the input")
        predictor = Predictor(args.model, device=args.device, mc_passes=args.mc_passes)
    except InputNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_NOT_FOUND
    except (PredictError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    batch = not (len(folders) == 1 and folders[0].resolve() == args.input.expanduser().resolve())
    rows, failed = [], 0
    for folder in folders:
        try:
            case = read_case(folder)
            result = finish_case(predictor.infer(case), predictor, convention=output_convention(case, args.label_convention),
                                 steps=steps, min_component_ml=args.min_component_ml)
            record = write_case(result, predictor, out / case.case_id)
        except PredictError as exc:
            failed += 1
            print(f"error: {exc}", file=sys.stderr)
            rows.append(summary_row(folder.name, None, str(exc).splitlines()[-1].strip()))
            continue
        rows.append(summary_row(case.case_id, record, None))
        volumes = ", ".join(f"{r.upper()} {v:.1f} mL" for r, v in record["volumes_ml"].items())
        print(f"{case.case_id}: {volumes} -> {out / case.case_id / REPORT_HTML}", flush=True)
    if batch:
        write_summary(out, rows)
        print(f"{len(rows) - failed} of {len(rows)} cases predicted; summary: {out / INDEX_HTML}")
    return EXIT_FAILED if failed else EXIT_OK
