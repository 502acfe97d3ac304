"""Molecular-marker classifiers: tumor-aware (default) or whole-volume pooling.

MTTU-Net's argument is that genotype features should come from the tumor region. The
:class:`TumorAwareClassifier` therefore pools the encoder's feature maps with weights from the
*predicted* tumor regions (soft WT/TC/ET probabilities of the segmentation head) at two scales, and
adds descriptors of the predicted segmentation a neuro-radiologist would read: region volumes in
mL, sub-region fractions, the tumor's centroid in brain-normalized coordinates and its extent.
Pooling the whole field of view instead (:class:`GlobalPoolClassifier`, MTTU-Net's GAP+GMP) lets
scanner differences (gamma, noise, slice thickness) reach the heads as much as the tumor does; it
stays selectable (``model.classifier_pooling=global``) for the ablation.

Both return ``{task: (B, 2)}`` logits and keep their dropout in ``nn.Dropout`` layers, so
MC-dropout (:mod:`common.evaluation.uncertainty`) switches them on. With ``survival=True`` they also
hold a :class:`SurvivalHead` (``classifier.survival``, its own wire group, averaged over the sites
by their cases with a known survival like a task head) whose log hazard ratio :meth:`_Heads.predict` returns beside the logits.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from common.contract import ET, NCR

#: Width of each task head's hidden layer (MTTU-Net's classifier is FC 512-32-2).
HEAD_HIDDEN = 32
#: Tumor regions the pooling weights come from, as in the BraTS evaluation: WT, TC, ET.
POOL_REGIONS = ("wt", "tc", "et")
#: Descriptors of the predicted segmentation, in this order (see :func:`tumor_descriptors`).
DESCRIPTORS = (
    "log_ml_wt", "log_ml_tc", "log_ml_et",  # log(1 + volume in mL)
    "frac_et_tc", "frac_ncr_tc", "frac_tc_wt",  # sub-region fractions
    "centroid_x", "centroid_y", "centroid_z",  # WT centroid, brain box mapped to [-1, 1] (RAS axes)
    "extent",  # spatial std of WT around its centroid, in units of the brain box's half-size
)
EPS = 1e-6
#: Fixed (centre, scale) per descriptor, so that every descriptor enters the heads at unit scale
#: (volumes of 10-300 mL give log(1 + mL) of 2.4-5.7). Fixed, not learned running statistics:
#: batches of 1-2 cases and averaging across sites make batch statistics unreliable.
DESCRIPTOR_SCALE = {
    "log_ml_wt": (4.0, 1.0), "log_ml_tc": (2.5, 1.5), "log_ml_et": (2.0, 1.5),
    "frac_et_tc": (0.5, 0.3), "frac_ncr_tc": (0.3, 0.3), "frac_tc_wt": (0.3, 0.3),
    "centroid_x": (0.0, 0.5), "centroid_y": (0.0, 0.5), "centroid_z": (0.0, 0.5), "extent": (0.2, 0.1),
}


def region_probabilities(seg_logits: torch.Tensor) -> torch.Tensor:
    """Soft WT, TC, ET maps (B, 3, N, N, N) from segmentation logits (B, 4, N, N, N)
    (background, NCR, ED, ET): WT = p(NCR)+p(ED)+p(ET), TC = p(NCR)+p(ET), ET = p(ET)."""
    p = torch.softmax(seg_logits.float(), dim=1)
    wt = 1.0 - p[:, 0]
    tc = p[:, NCR] + p[:, ET]
    return torch.stack([wt, tc, p[:, ET]], dim=1)


def tumor_descriptors(
    regions: torch.Tensor, brain: torch.Tensor | None, spacing: torch.Tensor | None, frame: torch.Tensor | None = None
) -> torch.Tensor:
    """Descriptors of the predicted segmentation (B, len(DESCRIPTORS)), see :data:`DESCRIPTORS`.

    Args:
        regions: (B, 3, N, N, N) soft WT/TC/ET maps (:func:`region_probabilities`); NCR = TC - ET.
        brain: (B, N, N, N) bool brain mask (where any input channel is non-zero: the data layer
            z-scores brain voxels only and zero-pads the rest), or None for the whole grid.
        spacing: (B, 3) voxel size in mm of the network grid, or None for 1 mm.
        frame: (B, 2, 3) where the grid lies in the brain's normalized coordinates (first and last
            voxel centre per axis, the brain box mapped to [-1, 1]) when the grid is a crop of the
            brain (``model.tumor_crop_size``, :mod:`common.model.tumor_crop`); ``brain`` is then unused.
    """
    b = regions.shape[0]
    grid = regions.shape[2:]
    voxel_ml = (
        spacing.float().prod(dim=1) / 1000.0 if spacing is not None else regions.new_full((b,), 1e-3)
    )
    volumes = regions.flatten(2).sum(-1)  # (B, 3) expected voxel counts of WT, TC, ET
    ml = volumes * voxel_ml[:, None]
    wt, tc, et = volumes.unbind(1)
    ncr = (tc - et).clamp_min(0.0)
    fractions = torch.stack([et / (tc + EPS), ncr / (tc + EPS), tc / (wt + EPS)], dim=1).clamp(0.0, 1.0)

    if frame is not None:
        return torch.cat([torch.log1p(ml), fractions, *_framed_location(regions[:, 0], frame)], dim=1)
    # Brain box in voxel coordinates -> [-1, 1] per axis, so location is comparable across cases.
    axes = [torch.linspace(-1.0, 1.0, n, device=regions.device) for n in grid]
    coords = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=0).flatten(1)  # (3, V)
    brain = (brain.flatten(1) if brain is not None else regions.new_ones((b, coords.shape[1]))).float()  # (B, V)
    lo = torch.where(brain[:, None] > 0, coords[None], coords.new_tensor(2.0)).amin(-1)  # (B, 3)
    hi = torch.where(brain[:, None] > 0, coords[None], coords.new_tensor(-2.0)).amax(-1)
    empty = brain.sum(-1) == 0
    lo = torch.where(empty[:, None], torch.full_like(lo, -1.0), lo)
    hi = torch.where(empty[:, None], torch.full_like(hi, 1.0), hi)
    centre, half = (lo + hi) / 2, ((hi - lo) / 2).clamp_min(EPS)
    w = regions[:, 0].flatten(1)  # WT weights (B, V)
    mass = w.sum(-1, keepdim=True) + EPS
    centroid = (w[:, None] * coords[None]).sum(-1) / mass  # (B, 3)
    spread = (w[:, None] * (coords[None] - centroid[..., None]) ** 2).sum(-1) / mass  # (B, 3)
    extent = (spread.sqrt() / half).mean(dim=1, keepdim=True)
    centroid = ((centroid - centre) / half).clamp(-1.5, 1.5)
    return torch.cat([torch.log1p(ml), fractions, centroid, extent], dim=1)


def _framed_location(wt: torch.Tensor, frame: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(centroid (B, 3), extent (B, 1)) of the WT map ``wt`` (B, N, N, N) on a grid whose voxel
    centres run from ``frame[:, 0]`` to ``frame[:, 1]`` in brain-normalized coordinates: the same
    quantities as for a whole-brain grid, where the brain box's half-size is the unit."""
    steps = torch.linspace(0.0, 1.0, wt.shape[1], device=wt.device)
    lo, hi = frame[:, 0].float(), frame[:, 1].float()  # (B, 3)
    axes = lo[:, :, None] + (hi - lo)[:, :, None] * steps  # (B, 3, N): coordinate of each index per axis
    w = wt.float()
    mass = w.flatten(1).sum(-1) + EPS
    centroid, spread = [], []
    for axis in range(3):
        marginal = w.sum(dim=[d for d in (1, 2, 3) if d != axis + 1])  # (B, N) WT mass per slice
        c = (marginal * axes[:, axis]).sum(-1) / mass
        centroid.append(c)
        spread.append((marginal * (axes[:, axis] - c[:, None]) ** 2).sum(-1) / mass)
    extent = torch.stack(spread, dim=1).sqrt().mean(dim=1, keepdim=True)
    return torch.stack(centroid, dim=1).clamp(-1.5, 1.5), extent


def region_pool(features: torch.Tensor, regions: torch.Tensor) -> torch.Tensor:
    """Average of ``features`` (B, C, n, n, n) under each soft region map and over the whole map:
    (B, C * (len(regions) + 1)). ``regions`` (B, R, N, N, N) is area-resized to the feature grid."""
    weights = F.adaptive_avg_pool3d(regions, features.shape[2:])  # (B, R, n, n, n)
    flat = features.flatten(2)  # (B, C, V)
    w = weights.flatten(2)  # (B, R, V)
    pooled = torch.einsum("bcv,brv->brc", flat, w) / (w.sum(-1, keepdim=True) + EPS)  # (B, R, C)
    return torch.cat([pooled.flatten(1), flat.mean(-1)], dim=1)


class SurvivalHead(nn.Module):
    """Log hazard ratio (B,) from the classifier's shared trunk (B, hidden), plus a linear path from
    the segmentation descriptors (B, direct) when ``direct`` > 0.

    Trained with the Cox partial likelihood (:class:`client.losses.MultiTaskLoss`), which a
    constant shift of every risk leaves unchanged: the direct path has no bias.
    """

    def __init__(self, hidden: int, direct: int = 0) -> None:
        super().__init__()
        self.head = nn.Sequential(nn.Linear(hidden, HEAD_HIDDEN), nn.LeakyReLU(0.01), nn.Linear(HEAD_HIDDEN, 1))
        self.direct = nn.Linear(direct, 1, bias=False) if direct else None

    def forward(self, shared: torch.Tensor, direct: torch.Tensor | None = None) -> torch.Tensor:
        risk = self.head(shared)
        if self.direct is not None and direct is not None:
            risk = risk + self.direct(direct)
        return risk.squeeze(1)


class _Heads(nn.Module):
    """Dropout, a shared MLP trunk, then one small head per task (``heads.<task>`` -> (B, 2)).

    Each head is its own parameter group on the wire (``classifier.heads.<task>``), so the server
    can average it over the sites that have labels for that task. With ``direct`` extra inputs
    (the segmentation descriptors) each head also gets a linear path from them to its logits
    (``direct.<task>``), so the network can do at least what a logistic regression on the
    descriptors does. ``survival`` adds a :class:`SurvivalHead` on the same trunk (and descriptors).
    """

    def __init__(
        self, in_features: int, hidden: int, tasks: Sequence[str], dropout: float, direct: int = 0,
        survival: bool = False,
    ) -> None:
        super().__init__()
        self.direct = nn.ModuleDict({task: nn.Linear(direct, 2) for task in tasks}) if direct else None
        self.trunk = nn.Sequential(
            nn.Dropout(dropout),
            nn.Linear(in_features, hidden),
            nn.LeakyReLU(0.01),
            nn.Dropout(dropout),
        )
        self.heads = nn.ModuleDict(
            {
                task: nn.Sequential(nn.Linear(hidden, HEAD_HIDDEN), nn.LeakyReLU(0.01), nn.Linear(HEAD_HIDDEN, 2))
                for task in tasks
            }
        )
        self.survival = SurvivalHead(hidden, direct) if survival else None

    def output_layers(self) -> list[nn.Linear]:
        """The layers that write the logits and the log hazard ratio: each head's last layer, the
        descriptor paths and the survival head's last layer and direct path."""
        layers = [head[-1] for head in self.heads.values()]
        if self.direct is not None:
            layers += list(self.direct.values())
        if self.survival is not None:
            layers.append(self.survival.head[-1])
            if self.survival.direct is not None:
                layers.append(self.survival.direct)
        return layers

    def zero_outputs(self) -> None:
        """Start every output layer at zero (``model.classifier_head_init=zero``): every case starts
        at logit 0 and risk 0, so the cases' ranking is what training learns, not the random start.
        The hidden layers stay random (they break the symmetry; their gradient starts flowing once
        the output layers have moved, after the first step)."""
        with torch.no_grad():
            for layer in self.output_layers():
                layer.weight.zero_()
                if layer.bias is not None:
                    layer.bias.zero_()

    def heads_forward(
        self, features: torch.Tensor, direct: torch.Tensor | None = None
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        """``{task: (B, 2)}`` logits and the (B,) log hazard ratio (None without a survival head)."""
        shared = self.trunk(features)
        logits = {task: head(shared) for task, head in self.heads.items()}
        if self.direct is not None and direct is not None:
            logits = {task: z + self.direct[task](direct) for task, z in logits.items()}
        return logits, (self.survival(shared, direct) if self.survival is not None else None)

    def predict(
        self, maps: Sequence[torch.Tensor], seg_logits: torch.Tensor, brain: torch.Tensor | None = None,
        spacing: torch.Tensor | None = None, frame: torch.Tensor | None = None,
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        """Logits per task and log hazard ratio (or None) from the feature maps (see ``forward``)."""
        return self.heads_forward(*self.inputs(maps, seg_logits, brain, spacing, frame))

    def inputs(
        self, maps: Sequence[torch.Tensor], seg_logits: torch.Tensor, brain: torch.Tensor | None,
        spacing: torch.Tensor | None, frame: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(trunk input (B, F), direct input (B, D) or None) of a subclass's pooling."""
        raise NotImplementedError

    def forward(self, maps: Sequence[torch.Tensor], seg_logits: torch.Tensor, brain: torch.Tensor | None = None,
                spacing: torch.Tensor | None = None, frame: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """``maps`` (B, C_i, n_i^3); ``seg_logits`` (B, 4, N^3); ``brain`` (B, N^3) bool or None;
        ``spacing`` (B, 3) mm or None; ``frame`` (B, 2, 3) or None (a crop's place in the brain,
        :func:`tumor_descriptors`) -> ``{task: (B, 2)}``."""
        return self.predict(maps, seg_logits, brain, spacing, frame)[0]


class GlobalPoolClassifier(_Heads):
    """MTTU-Net's multi-scale classifier: ``concat(GAP(F), GMP(F))`` of each feature map.

    ``in_channels``: channels of each pooled feature map; ``hidden``, ``tasks``, ``dropout``,
    ``survival``: the trunk's width, the tasks (one head each), the dropout probability and the
    survival head (:class:`_Heads`).
    """

    def __init__(
        self, in_channels: Sequence[int], hidden: int, tasks: Sequence[str], dropout: float, survival: bool = False
    ) -> None:
        super().__init__(2 * sum(in_channels), hidden, tasks, dropout, survival=survival)

    def inputs(self, maps: Sequence[torch.Tensor], seg_logits: torch.Tensor, brain: torch.Tensor | None,
               spacing: torch.Tensor | None, frame: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``maps``: feature maps (B, C_i, ...); the other arguments are unused here."""
        pooled = []
        for m in maps:
            pooled.append(F.adaptive_avg_pool3d(m, 1).flatten(1))
            pooled.append(F.adaptive_max_pool3d(m, 1).flatten(1))
        return torch.cat(pooled, dim=1), None


class TumorAwareClassifier(_Heads):
    """Tumor-region pooling at several scales plus segmentation descriptors (module docstring).

    The region maps and descriptors are computed from the segmentation head's output with the
    gradient stopped: classification reads the segmentation, it does not reshape it. Arguments as
    for :class:`GlobalPoolClassifier`.
    """

    def __init__(
        self, in_channels: Sequence[int], hidden: int, tasks: Sequence[str], dropout: float, survival: bool = False
    ) -> None:
        pooled = sum(in_channels) * (len(POOL_REGIONS) + 1)
        super().__init__(pooled + len(DESCRIPTORS), hidden, tasks, dropout, direct=len(DESCRIPTORS), survival=survival)
        centre, scale = zip(*(DESCRIPTOR_SCALE[d] for d in DESCRIPTORS))
        self.register_buffer("descriptor_centre", torch.tensor(centre), persistent=False)
        self.register_buffer("descriptor_scale", torch.tensor(scale), persistent=False)

    def inputs(self, maps: Sequence[torch.Tensor], seg_logits: torch.Tensor, brain: torch.Tensor | None,
               spacing: torch.Tensor | None, frame: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Region-pooled maps and the scaled descriptors, and the descriptors again (direct path)."""
        seg_logits = seg_logits.detach()
        regions = region_probabilities(seg_logits)
        pooled = [region_pool(m.float(), regions) for m in maps]
        descriptors = (tumor_descriptors(regions, brain, spacing, frame) - self.descriptor_centre) / self.descriptor_scale
        return torch.cat([*pooled, descriptors], dim=1), descriptors


CLASSIFIERS = {"tumor": TumorAwareClassifier, "global": GlobalPoolClassifier}


def scale_gradient(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Identity forward; the gradient flowing back through ``x`` is multiplied by ``factor``
    (used to balance the classification gradient into the shared encoder against segmentation's)."""
    if factor == 1.0:
        return x
    return x * factor + x.detach() * (1.0 - factor)
