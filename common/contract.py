"""The data contract in one place: sequences, file names, label maps, regions and tasks.

Everything that names an MRI sequence, a segmentation label, a tumor region or a molecular task
imports it from here. Values are validated against these tables at the boundary (file loading,
labels.csv parsing); inside the package they are trusted.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Mapping

#: The four structural MRI sequences, in the channel order used everywhere (image tensors,
#: availability masks, per-sequence stems).
SEQUENCES: tuple[str, ...] = ("t1", "t1ce", "t2", "flair")

#: File-name suffix of each sequence (and the segmentation) in the two BraTS conventions.
#: BraTS 2020/2021: ``<case>/<case>_t1ce.nii.gz``; BraTS 2023+: ``<case>/<case>-t1c.nii.gz``.
NAMING: Mapping[str, Mapping[str, str]] = MappingProxyType(
    {
        "brats2021": MappingProxyType(
            {"t1": "_t1", "t1ce": "_t1ce", "t2": "_t2", "flair": "_flair", "seg": "_seg"}
        ),
        "brats2023": MappingProxyType(
            {"t1": "-t1n", "t1ce": "-t1c", "t2": "-t2w", "flair": "-t2f", "seg": "-seg"}
        ),
    }
)
NIFTI_EXTENSIONS: tuple[str, ...] = (".nii.gz", ".nii")

#: Internal segmentation labels.
BACKGROUND, NCR, ED, ET = 0, 1, 2, 3
SEG_CLASSES: tuple[str, ...] = ("background", "ncr", "ed", "et")
#: BraTS <= 2021 files store enhancing tumor as 4 (3 is unused).
LEGACY_ET = 4
#: BraTS 2024 post-treatment files store the resection cavity as 4.
RESECTION_CAVITY = 4

#: Segmentation label conventions: the value in a site's ``*seg`` file -> internal label. A value
#: missing from a convention's table is not part of it (the case is rejected). The resection cavity
#: of ``brats2024-post`` lies outside WT/TC/ET, as in that challenge's official evaluation: it is
#: background for every region here.
LABEL_CONVENTIONS: Mapping[str, Mapping[int, int]] = MappingProxyType(
    {
        "brats2021": MappingProxyType({0: BACKGROUND, 1: NCR, 2: ED, LEGACY_ET: ET}),
        "brats2023": MappingProxyType({0: BACKGROUND, 1: NCR, 2: ED, 3: ET}),
        "brats2024-post": MappingProxyType({0: BACKGROUND, 1: NCR, 2: ED, 3: ET, RESECTION_CAVITY: BACKGROUND}),
    }
)
#: What a reader of ``fedglioma check-site`` needs to know about each convention.
LABEL_CONVENTION_TEXT: Mapping[str, str] = MappingProxyType(
    {
        "brats2021": "BraTS 2020/2021: 1 necrotic core, 2 edema, 4 enhancing tumor",
        "brats2023": "BraTS 2023: 1 necrotic/non-enhancing core, 2 edema, 3 enhancing tumor",
        "brats2024-post": "BraTS 2024 post-treatment: 1 non-enhancing core, 2 edema, 3 enhancing tumor, "
        "4 resection cavity (outside WT/TC/ET: background)",
    }
)
#: The convention a file naming implies when a site declares none. Naming only chooses between
#: these two; it never makes a 4 enhancing tumor in BraTS 2023+ names (there it may be a cavity).
NAMING_CONVENTION: Mapping[str, str] = MappingProxyType({"brats2021": "brats2021", "brats2023": "brats2023"})
ALLOWED_SEG_VALUES: frozenset[int] = frozenset(v for table in LABEL_CONVENTIONS.values() for v in table)
#: Optional file in a site folder declaring its conventions, e.g. ``{"label_convention": "brats2024-post"}``.
SITE_JSON = "site.json"

#: BraTS evaluation regions as sets of internal labels (nnU-Net style: regions are data).
REGIONS: Mapping[str, tuple[int, ...]] = MappingProxyType(
    {"wt": (NCR, ED, ET), "tc": (NCR, ET), "et": (ET,)}
)

#: Molecular / grading tasks: the labels.csv column, the metric key suffix, and the class names
#: in index order (index 1 is the "positive" class for AUC, sensitivity and specificity).
TASKS: tuple[str, ...] = ("idh", "1p19q", "grade", "mgmt")
TASK_COLUMNS: Mapping[str, str] = MappingProxyType(
    {"idh": "idh", "1p19q": "codeletion_1p19q", "grade": "grade", "mgmt": "mgmt"}
)
TASK_CLASSES: Mapping[str, tuple[str, str]] = MappingProxyType(
    {
        "idh": ("wildtype", "mutant"),
        "1p19q": ("intact", "codeleted"),
        "grade": ("LGG", "HGG"),
        "mgmt": ("unmethylated", "methylated"),
    }
)
#: Integer used for "no label for this task" in label tensors (masked out of the loss).
UNKNOWN_LABEL = -1

LABELS_CSV = "labels.csv"
LABELS_CSV_COLUMNS: tuple[str, ...] = ("case_id",) + tuple(TASK_COLUMNS[t] for t in TASKS)
#: Optional labels.csv columns: overall survival in days from diagnosis and whether death was
#: observed (1) or the case was censored at that time (0); both empty = unknown.
SURVIVAL_DAYS, SURVIVAL_EVENT = "survival_days", "event"
LABELS_CSV_OPTIONAL: tuple[str, ...] = (SURVIVAL_DAYS, SURVIVAL_EVENT)

#: Metric keys (DESIGN.md section 7). Segmentation: per region, Dice and HD95 over the whole
#: region, then the BraTS 2023+ lesion-wise Dice and HD95 (:mod:`common.evaluation.lesions`).
LESION_METRIC_KEYS: tuple[str, ...] = tuple(f"lesion_{m}_{r}" for m in ("dice", "hd95") for r in REGIONS)
SEG_METRIC_KEYS: tuple[str, ...] = tuple(
    f"{m}_{r}" for m in ("dice", "hd95") for r in REGIONS
) + LESION_METRIC_KEYS
#: ``bacc``: balanced accuracy; ``logit_mean``/``logit_std``: mean and spread of the logit difference
#: z = logit_1 - logit_0 over the labeled cases (a collapsed head has a small spread).
CLS_METRIC_NAMES: tuple[str, ...] = ("auc", "acc", "bacc", "sen", "spe", "f1", "ece", "logit_mean", "logit_std", "n")
CLS_METRIC_KEYS: tuple[str, ...] = tuple(f"{m}_{t}" for t in TASKS for m in CLS_METRIC_NAMES)
#: ``cindex``: Harrell's concordance of the survival head's risk with the observed survival over
#: ``n_survival`` cases with known survival (NaN without a survival head or without events).
SURVIVAL_METRIC_KEYS: tuple[str, ...] = ("cindex", "n_survival")
METRIC_KEYS: tuple[str, ...] = SEG_METRIC_KEYS + CLS_METRIC_KEYS + SURVIVAL_METRIC_KEYS + ("n_cases",)

#: Parameter-name groups of the network, so strategies and freezing can select them by prefix.
PARAM_GROUPS: tuple[str, ...] = ("stems", "imputer", "fusion", "encoder", "decoder", "classifier", "task_weighting")

#: Name of the segmentation term among the loss terms (beside one term per task), and of the
#: survival (Cox) term when the model has a survival head.
SEG_TERM = "seg"
SURVIVAL_TERM = "survival"

#: prefix of the metrics in a reply that validate a *received* global model at the site
#: (federation.site_validation=in_train/after_reply), as opposed to the local training
VALIDATION_PREFIX = "val/"
#: In a site validation: the global round of the model it validated (tags it across replies)
VALIDATED_ROUND = "global-round"
#: In a site validation: 1 when the site could not validate that model (after its reply; the
#: cause is in its worker.log)
VALIDATION_FAILED = "validation_failed"
