"""The multi-task glioma network: per-sequence stems, fusion, CNN-Transformer encoder, heads.

Data flow for a batch of B cases, S sequences, cubic volumes of side N (``img_size``)::

    image (B, S, N, N, N) --stems--> (B, S, Cs, N, N, N)   one shallow encoder per sequence,
                                                             zeroed where a sequence is missing
      [imputer]            -> missing sequences' features generated (GMENet CGGM), optional
      fusion               -> (B, Cs, N, N, N)               GMMAS eq. 1 or GMENet DWEFM
      encoder              -> F1..F4 at 1, 1/2, 1/4, 1/8 with b, 2b, 4b, 8b channels (residual
                              conv stages, stride-2 convs), then F5 = transformer over the
                              (N/8)^3 tokens of a 3x3x3 projection of F4 to d_model (MTTU-Net)
      decoder              -> seg logits (B, K, N, N, N)     MTTU-Net up path, skips F3, F2, F1
      classifier           -> {task: (B, 2)}                 F3 and F5 pooled inside the predicted
                                                             tumor regions + descriptors of the
                                                             predicted segmentation (or GAP+GMP),
                                                             MLP, one head per task; nn.Dropout
                                                             for MC-dropout; [risk (B,): log hazard
                                                             ratio of the survival head]
      task_weighting       -> learned log-variances (used by client.losses.MultiTaskLoss)

Normalisation is instance norm with affine parameters throughout: batch statistics would be
unreliable with the batch sizes of 3D MRI (1-2), and running-stat buffers average poorly across
sites in federated learning.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution
from monai.networks.blocks.segresnet_block import ResBlock
from torch import nn

from common.config import CLASSIFIER_POOLINGS, FUSIONS, HEAD_INITS, ModelConfig, choice_error
from common.contract import PARAM_GROUPS, SEG_TERM, SEQUENCES, SURVIVAL_TERM, TASKS
from common.model.classifier import CLASSIFIERS, scale_gradient
from common.model.fusion import build_fusion
from common.model.imputation import CrossSequenceImputer
from common.model.task_weighting import UncertaintyWeighting
from common.model import tumor_crop

SPATIAL_DIMS = 3
#: Instance norm with learnable affine (see module docstring) and MTTU-Net's Leaky ReLU.
NORM: tuple = ("instance", {"affine": True})
ACT: tuple = ("leakyrelu", {"negative_slope": 0.01, "inplace": True})
#: The encoder downsamples three times: the transformer works at 1/8 resolution.
DOWNSAMPLING = 8


@dataclass
class GliomaOutput:
    """What the network returns.

    Attributes:
        seg_logits: (B, K, D, H, W) segmentation logits (K = 4: background, NCR, ED, ET).
        cls_logits: {task: (B, 2)} classification logits, class order of ``TASK_CLASSES``.
        aux: extra tensors, e.g. ``imputation_gate`` when the imputer is on.
        risk: (B,) log hazard ratio of the survival head (higher = shorter survival); None without one.
    """

    seg_logits: torch.Tensor
    cls_logits: dict[str, torch.Tensor]
    aux: dict[str, torch.Tensor] = field(default_factory=dict)
    risk: torch.Tensor | None = None


@dataclass
class EncoderFeatures:
    """``levels``: F1..F4, (B, b * 2^i, N / 2^i, ...) for i = 0..3. ``bottleneck``: F5, the
    transformer output (B, d_model, N/8, N/8, N/8)."""

    levels: list[torch.Tensor]
    bottleneck: torch.Tensor


def _conv(in_channels: int, out_channels: int, kernel_size: int = 3, strides: int = 1) -> Convolution:
    """Conv -> instance norm -> Leaky ReLU."""
    return Convolution(
        SPATIAL_DIMS, in_channels, out_channels, strides=strides, kernel_size=kernel_size, act=ACT, norm=NORM
    )


def _stage(in_channels: int, out_channels: int, strides: int) -> nn.Sequential:
    """One encoder level: (strided) 3x3x3 conv then a pre-activation residual block (MTTU-Net)."""
    return nn.Sequential(
        _conv(in_channels, out_channels, strides=strides),
        ResBlock(SPATIAL_DIMS, out_channels, norm=NORM, act=ACT),
    )


class CNNTransformerEncoder(nn.Module):
    """MTTU-Net hybrid encoder: residual conv stages, then transformer layers at 1/8 resolution.

    Args:
        in_channels: channels of the fused input map.
        base_channels: channels of level 1 (doubled per level: b, 2b, 4b, 8b).
        d_model: transformer width (a 3x3x3 conv projects 8b -> d_model).
        transformer_layers: number of pre-norm GELU transformer encoder layers.
        heads: attention heads.
        img_size: input side N; the learnable position embedding covers (N/8)^3 tokens.
        feature_dropout: channel dropout on the transformer output (feature perturbation).
    """

    def __init__(
        self,
        in_channels: int,
        base_channels: int,
        d_model: int,
        transformer_layers: int,
        heads: int,
        img_size: int,
        feature_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        widths = [base_channels * 2**i for i in range(4)]
        self.widths = tuple(widths)
        self.levels = nn.ModuleList(
            [_stage(in_channels, widths[0], strides=1)]
            + [_stage(widths[i - 1], widths[i], strides=2) for i in range(1, 4)]
        )
        self.grid = img_size // DOWNSAMPLING
        self.projection = nn.Conv3d(widths[-1], d_model, kernel_size=3, padding=1)
        self.position = nn.Parameter(torch.zeros(1, self.grid**3, d_model))
        nn.init.trunc_normal_(self.position, std=0.02)
        layer = nn.TransformerEncoderLayer(
            d_model,
            heads,
            dim_feedforward=4 * d_model,
            dropout=0.0,  # dropout lives in the classifier (MC-dropout); see ModelConfig.dropout
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        # Pre-norm layers need a final LayerNorm; nested tensors do not apply to norm_first.
        self.transformer = nn.TransformerEncoder(
            layer, transformer_layers, norm=nn.LayerNorm(d_model), enable_nested_tensor=False
        )
        self.feature_dropout = nn.Dropout3d(feature_dropout) if feature_dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> EncoderFeatures:
        """``x`` (B, C_in, N, N, N) -> :class:`EncoderFeatures`."""
        levels = []
        for stage in self.levels:
            x = stage(x)
            levels.append(x)
        tokens = self.projection(x)  # (B, d, g, g, g)
        b, d, g1, g2, g3 = tokens.shape
        tokens = tokens.flatten(2).transpose(1, 2) + self.position  # (B, g^3, d)
        tokens = self.transformer(tokens)
        bottleneck = tokens.transpose(1, 2).reshape(b, d, g1, g2, g3)
        return EncoderFeatures(levels=levels, bottleneck=self.feature_dropout(bottleneck))


class UpBlock(nn.Module):
    """MTTU-Net decoder step: 1x1x1 conv (in -> out), transposed conv stride 2, concatenation with
    the skip, 1x1x1 conv (out + skip -> out), 3x3x3 residual block."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int) -> None:
        super().__init__()
        self.reduce = _conv(in_channels, out_channels, kernel_size=1)
        # Kernel 2, stride 2 (as UNETR's up blocks): exact 2x, no overlapping taps.
        self.upsample = Convolution(
            SPATIAL_DIMS,
            out_channels,
            out_channels,
            strides=2,
            kernel_size=2,
            act=ACT,
            norm=NORM,
            is_transposed=True,
            padding=0,
            output_padding=0,
        )
        self.merge = _conv(out_channels + skip_channels, out_channels, kernel_size=1)
        self.refine = ResBlock(SPATIAL_DIMS, out_channels, norm=NORM, act=ACT)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        """``x`` (B, C_in, n, n, n), ``skip`` (B, C_skip, 2n, 2n, 2n) -> (B, C_out, 2n, 2n, 2n)."""
        x = self.upsample(self.reduce(x))
        return self.refine(self.merge(torch.cat([x, skip], dim=1)))


class SegmentationDecoder(nn.Module):
    """Up path from F5 (1/8) to full resolution with skips F3, F2, F1, then 1x1x1 conv to K logits."""

    def __init__(self, widths: Sequence[int], d_model: int, num_classes: int) -> None:
        super().__init__()
        b1, b2, b4, _ = widths
        self.ups = nn.ModuleList([UpBlock(d_model, b4, b4), UpBlock(b4, b2, b2), UpBlock(b2, b1, b1)])
        self.head = Convolution(SPATIAL_DIMS, b1, num_classes, kernel_size=1, conv_only=True)

    def forward(self, features: EncoderFeatures) -> torch.Tensor:
        """-> (B, K, N, N, N) logits."""
        x = features.bottleneck
        for up, skip in zip(self.ups, reversed(features.levels[:3])):
            x = up(x, skip)
        return self.head(x)


def _check_args(
    img_size: int,
    in_sequences: int,
    channels: dict[str, int],
    d_model: int,
    heads: int,
    dropouts: dict[str, float],
    fusion: str,
    tasks: Sequence[str],
    classifier_pooling: str = "tumor",
    cls_encoder_grad: float = 1.0,
    classifier_head_init: str = "zero",
) -> None:
    """Fail fast, naming the argument, its value and the fix."""
    if img_size < 2 * DOWNSAMPLING or img_size % DOWNSAMPLING:
        raise ValueError(
            f"img_size={img_size} must be a multiple of {DOWNSAMPLING} and at least {2 * DOWNSAMPLING} "
            "(three stride-2 stages, and instance norm needs more than one voxel at 1/8): "
            "set data.size to e.g. 32, 64 or 128"
        )
    if in_sequences < 1:
        raise ValueError(f"in_sequences={in_sequences} must be >= 1")
    for name, value in channels.items():
        if value < 1:
            raise ValueError(f"{name}={value} must be a positive number of channels")
    if heads < 1 or d_model % heads:
        raise ValueError(
            f"d_model={d_model} must be divisible by heads={heads}: choose e.g. heads={_divisor_hint(d_model, heads)}"
        )
    for name, value in dropouts.items():
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{name}={value} must be in [0, 1)")
    if fusion not in FUSIONS:
        raise choice_error("fusion (model.fusion)", fusion, FUSIONS)
    if classifier_pooling not in CLASSIFIER_POOLINGS:
        raise choice_error("classifier pooling (model.classifier_pooling)", classifier_pooling, CLASSIFIER_POOLINGS)
    if classifier_head_init not in HEAD_INITS:
        raise choice_error("classifier head init (model.classifier_head_init)", classifier_head_init, HEAD_INITS)
    if not 0.0 <= cls_encoder_grad <= 1.0:
        raise ValueError(f"cls_encoder_grad={cls_encoder_grad} must be in [0, 1] (model.cls_encoder_grad)")
    if not tasks or len(set(tasks)) != len(tasks):
        raise ValueError(f"tasks must be a non-empty list of distinct names, got {tuple(tasks)}")
    for task in tasks:
        if task not in TASKS:
            raise choice_error("task", task, TASKS)


def _divisor_hint(d_model: int, heads: int) -> int:
    """The divisor of ``d_model`` closest to ``heads`` (for the error message)."""
    divisors = [h for h in range(1, d_model + 1) if d_model % h == 0]
    return min(divisors, key=lambda h: (abs(h - heads), h))


class MultiTaskGliomaNet(nn.Module):
    """Segmentation + molecular-marker classification from any non-empty subset of sequences.

    Top-level attributes are the parameter groups of ``common.contract.PARAM_GROUPS`` (strategies
    and freezing select parameters by these name prefixes): ``stems``, ``imputer`` (only when
    ``imputation=True``), ``fusion``, ``encoder``, ``decoder``, ``classifier``, ``task_weighting``.

    Args:
        img_size: side N of the cubic input (multiple of 8, >= 16).
        in_sequences: number of input sequences S (``SEQUENCES`` order).
        stem_channels: channels of each per-sequence stem.
        base_channels: channels of encoder level 1 (b, 2b, 4b, 8b at 1, 1/2, 1/4, 1/8).
        d_model: transformer width.
        transformer_layers: number of transformer encoder layers.
        heads: attention heads (must divide ``d_model``).
        dropout: classifier dropout (also the MC-dropout rate).
        feature_dropout: channel dropout on the transformer output.
        fusion: "weighted" (GMMAS eq. 1) or "experts" (GMENet DWEFM).
        imputation: add the generative imputer (GMENet CGGM) for missing sequences.
        classifier_hidden: width of the classifier's shared trunk.
        classifier_pooling: "tumor" (pooled inside the predicted tumor regions, plus descriptors of
            the predicted segmentation) or "global" (whole-volume GAP+GMP, MTTU-Net).
        cls_encoder_grad: factor on the classification gradient that reaches the shared encoder
            (1 = unchanged, 0 = the encoder learns from segmentation only).
        classifier_head_init: "zero" (the classifier's output layers start at zero: every case at
            logit 0) or "random" (PyTorch's default init).
        num_seg_classes: segmentation classes K (background, NCR, ED, ET).
        tasks: classification tasks, one head each.
        survival: add a survival head (Cox log hazard ratio, ``classifier.survival``) and its
            uncertainty weight.
        tumor_crop_size: 0, or the side G < ``img_size`` of the grid the network works on: the
            whole brain at G^3, then a crop around its tumor at up to ``img_size``/G times the
            resolution (GMMAS's tumor-protect crop, :mod:`common.model.tumor_crop`).
        tumor_crop_margin: the crop's margin around the tumor box, a fraction of its extent per side.
    """

    def __init__(
        self,
        img_size: int,
        in_sequences: int = len(SEQUENCES),
        stem_channels: int = 8,
        base_channels: int = 16,
        d_model: int = 64,
        transformer_layers: int = 2,
        heads: int = 4,
        dropout: float = 0.2,
        feature_dropout: float = 0.0,
        fusion: str = "weighted",
        imputation: bool = False,
        classifier_hidden: int = 64,
        classifier_pooling: str = "tumor",
        cls_encoder_grad: float = 1.0,
        classifier_head_init: str = "zero",
        num_seg_classes: int = 4,
        tasks: Sequence[str] = TASKS,
        survival: bool = False,
        tumor_crop_size: int = 0,
        tumor_crop_margin: float = 0.25,
    ) -> None:
        super().__init__()
        tasks = tuple(tasks)
        tumor_crop.check_crop(tumor_crop_size, img_size, tumor_crop_margin)
        grid = tumor_crop_size or img_size
        _check_args(
            grid,
            in_sequences,
            {
                "stem_channels": stem_channels,
                "base_channels": base_channels,
                "d_model": d_model,
                "transformer_layers": transformer_layers,
                "classifier_hidden": classifier_hidden,
                "num_seg_classes": num_seg_classes,
            },
            d_model,
            heads,
            {"dropout": dropout, "feature_dropout": feature_dropout},
            fusion,
            tasks,
            classifier_pooling,
            cls_encoder_grad,
            classifier_head_init,
        )
        self.img_size = img_size  # the input's side (data.size)
        self.grid_size = grid  # the side the stems, encoder and decoder work on
        self.tumor_crop_size = tumor_crop_size
        self.tumor_crop_margin = tumor_crop_margin
        self.in_sequences = in_sequences
        self.stem_channels = stem_channels
        self.tasks = tasks
        self.imputation = imputation
        self.cls_encoder_grad = cls_encoder_grad

        self.stems = nn.ModuleList([_conv(1, stem_channels) for _ in range(in_sequences)])
        if imputation:
            self.imputer = CrossSequenceImputer(channels=stem_channels, num_sequences=in_sequences)
        self.fusion = build_fusion(fusion, channels=stem_channels, num_sequences=in_sequences)
        self.encoder = CNNTransformerEncoder(
            stem_channels, base_channels, d_model, transformer_layers, heads, grid, feature_dropout
        )
        widths = self.encoder.widths
        self.decoder = SegmentationDecoder(widths, d_model, num_seg_classes)
        # MTTU-Net pools levels 4 and 5; here the 1/4 level (F3) and the transformer output (F5),
        # so that the two pooled scales really differ (F4 and F5 share the 1/8 grid).
        self.classifier = CLASSIFIERS[classifier_pooling](
            [widths[2], d_model], classifier_hidden, tasks, dropout, survival=survival
        )
        if classifier_head_init == "zero":
            self.classifier.zero_outputs()
        self.survival = survival
        self.task_weighting = UncertaintyWeighting((SEG_TERM, *tasks, *((SURVIVAL_TERM,) if survival else ())))

    # ---------------------------------------------------------------- checks
    def _check_inputs(self, image: torch.Tensor, available: torch.Tensor, size: int | None = None) -> None:
        n, s = size or self.img_size, self.in_sequences
        if image.ndim != 5 or tuple(image.shape[1:]) != (s, n, n, n):
            what = "the network's grid (model.tumor_crop_size)" if n != self.img_size else "this model"
            raise ValueError(
                f"image must be (B, {s}, {n}, {n}, {n}) for {what} (img_size={self.img_size}), got "
                f"{tuple(image.shape)}: resize/crop cases to data.size={self.img_size} or build the model for this size"
            )
        if available.shape != (image.shape[0], s):
            raise ValueError(f"available must be (B, {s}) bool, got {tuple(available.shape)}")

    # --------------------------------------------------------------- forward
    def encode_sequences(self, image: torch.Tensor, available: torch.Tensor) -> torch.Tensor:
        """Per-sequence stem features, before imputation.

        Args:
            image: (B, S, N, N, N) intensities; missing sequences may hold anything (zeros).
            available: (B, S) bool.

        Returns:
            (B, S, C_stem, N, N, N); exactly zero for missing sequences. N is the network's grid
            (``img_size``, or ``tumor_crop_size`` with the crop: :meth:`forward` resizes to it).
        """
        self._check_inputs(image, available, self.grid_size)
        available = available.bool()
        b = image.shape[0]
        features: torch.Tensor | None = None
        for s, stem in enumerate(self.stems):
            cases = torch.nonzero(available[:, s]).flatten()
            if cases.numel() == 0:
                continue  # nobody in the batch has this sequence: its slot stays zero
            # Only the cases that have the sequence go through its stem (instance norm is per case,
            # so this equals running all and zeroing, for less work).
            out = stem(image[cases, s : s + 1])
            if features is None:
                features = out.new_zeros((b, self.in_sequences, *out.shape[1:]))
            features[cases, s] = out
        if features is None:
            raise ValueError("no case in the batch has any available sequence")
        return features

    def forward_from_sequence_features(
        self,
        features: torch.Tensor,
        available: torch.Tensor,
        *,
        brain: torch.Tensor | None = None,
        spacing: torch.Tensor | None = None,
        reference: tuple[torch.Tensor, torch.Tensor] | None = None,
        frame: torch.Tensor | None = None,
    ) -> GliomaOutput:
        """Everything after the stems: [imputation], fusion, encoder and heads.

        Args:
            features: (B, S, C_stem, N, N, N) stem features, zero where missing
                (as from :meth:`encode_sequences`).
            available: (B, S) bool.
            brain: (B, N, N, N) bool brain mask for the tumor location descriptors (None: the grid).
            spacing: (B, 3) voxel size in mm for the tumor volumes in mL (None: 1 mm).
            reference: (seg (B, 1 or none, N, N, N) label map, has_seg (B,) bool) or None: the
                classifier reads the tumor regions of the reference segmentation for the cases
                that have one, the predicted ones for the others (see :func:`classifier_regions`).
            frame: (B, 2, 3) where a tumor crop lies in the brain (:func:`tumor_crop.brain_frame`), or None.
        """
        available = available.bool()
        aux: dict[str, torch.Tensor] = {}
        if self.imputation:
            imputed = self.imputer(features, available)
            features = imputed.features
            aux["imputation_gate"] = imputed.gate
            # After imputation every sequence has features, so all of them take part in fusion.
            available = torch.ones_like(available)
        fused = self.fusion(features, available)
        encoded = self.encoder(fused)
        seg_logits = self.decoder(encoded)
        maps = [scale_gradient(m, self.cls_encoder_grad) for m in (encoded.levels[2], encoded.bottleneck)]
        regions = seg_logits if reference is None else classifier_regions(seg_logits, *reference)
        cls_logits, risk = self.classifier.predict(maps, regions, brain, spacing, frame)
        return GliomaOutput(seg_logits=seg_logits, cls_logits=cls_logits, aux=aux, risk=risk)

    def classifier_inputs(
        self, image: torch.Tensor, available: torch.Tensor, spacing: torch.Tensor | None = None
    ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """What :meth:`forward` hands the classifier: (feature maps, segmentation logits, brain
        mask, spacing, crop frame); ``self.classifier.predict(*inputs)`` then gives its output.
        MC-dropout runs only that last part again when the layers before it have no dropout
        (:func:`common.evaluation.uncertainty.mc_dropout_predict`)."""
        frame = None
        if self.tumor_crop_size:
            self._check_inputs(image, available)
            _, (image, spacing, frame, _, _) = self._crop_views(image, available, spacing, None, None)
        features = self.encode_sequences(image, available)
        brain = (image != 0).any(dim=1) if frame is None else None
        available = available.bool()
        if self.imputation:
            features = self.imputer(features, available).features
            available = torch.ones_like(available)
        encoded = self.encoder(self.fusion(features, available))
        seg_logits = self.decoder(encoded)
        return [encoded.levels[2], encoded.bottleneck], seg_logits, brain, spacing, frame

    def forward(
        self, image: torch.Tensor, available: torch.Tensor, spacing: torch.Tensor | None = None,
        reference: tuple[torch.Tensor, torch.Tensor] | None = None,
        crop_reference: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> GliomaOutput:
        """``image`` (B, S, N, N, N) float, ``available`` (B, S) bool, ``spacing`` (B, 3) mm of the
        grid (None: 1 mm; only the tumor volumes in mL use it) -> :class:`GliomaOutput`.
        ``reference`` (training only, ``train.cls_reference_regions``): (seg, has_seg) whose tumor
        regions the classifier reads instead of the predicted ones. ``crop_reference`` (training
        only, with ``tumor_crop_size``): (seg, has_seg) whose tumor the crop protects where a case
        has one (else the predicted tumor)."""
        if self.tumor_crop_size:
            return self._forward_cropped(image, available, spacing, reference, crop_reference)
        return self._forward_grid(image, available, spacing, reference)

    def _forward_grid(
        self, image: torch.Tensor, available: torch.Tensor, spacing: torch.Tensor | None,
        reference: tuple[torch.Tensor, torch.Tensor] | None = None, frame: torch.Tensor | None = None,
    ) -> GliomaOutput:
        """One pass over an image on the network's own grid."""
        features = self.encode_sequences(image, available)
        brain = (image != 0).any(dim=1) if frame is None else None
        return self.forward_from_sequence_features(features, available, brain=brain, spacing=spacing,
                                                   reference=reference, frame=frame)

    def _crop_views(
        self, image: torch.Tensor, available: torch.Tensor, spacing: torch.Tensor | None,
        reference: tuple[torch.Tensor, torch.Tensor] | None, crop_reference: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> tuple[GliomaOutput, tuple]:
        """Pass 1 on the whole brain and the tumor crop for pass 2 (:mod:`common.model.tumor_crop`):
        (pass-1 output, (crop image, crop spacing, frame, (start, side), crop reference or None))."""
        n, g = self.img_size, self.grid_size
        spacing = spacing if spacing is not None else image.new_ones((image.shape[0], 3))
        factor = n / g
        whole = F.interpolate(image, size=(g,) * 3, mode="area")
        whole_ref = None
        if reference is not None:
            seg, has_seg = reference
            whole_ref = (F.interpolate(seg.reshape(-1, 1, n, n, n).float(), size=(g,) * 3, mode=tumor_crop.LABEL_MODE),
                         has_seg)
        first = self._forward_grid(whole, available, spacing * factor, whole_ref)
        with torch.no_grad():
            lo, hi, _ = tumor_crop.bounding_boxes(first.seg_logits.argmax(dim=1) > 0)
            lo, hi = tumor_crop.scale_boxes(lo, hi, factor, n)
            if crop_reference is not None:
                seg, has_seg = crop_reference
                ref_lo, ref_hi, found = tumor_crop.bounding_boxes(seg.reshape(-1, n, n, n) > 0)
                use = (found & has_seg.bool())[:, None]
                lo, hi = torch.where(use, ref_lo, lo), torch.where(use, ref_hi, hi)
            start, side = tumor_crop.crop_cubes(lo, hi, n, g, self.tumor_crop_margin,
                                                jitter=self.training and crop_reference is not None)
            frame = tumor_crop.brain_frame((image != 0).any(dim=1), start, side, g)
        crop = tumor_crop.cut(image, start, side, g)
        crop_spacing = spacing * (side.to(spacing.dtype)[:, None] / g)
        crop_ref = None
        if reference is not None:
            seg, has_seg = reference
            crop_ref = (tumor_crop.cut(seg.reshape(-1, 1, n, n, n).float(), start, side, g, tumor_crop.LABEL_MODE),
                        has_seg)
        return first, (crop, crop_spacing, frame, (start, side), crop_ref)

    def _forward_cropped(
        self, image: torch.Tensor, available: torch.Tensor, spacing: torch.Tensor | None,
        reference: tuple[torch.Tensor, torch.Tensor] | None, crop_reference: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> GliomaOutput:
        """Whole brain, then the tumor crop (module docstring of :mod:`common.model.tumor_crop`)."""
        self._check_inputs(image, available)
        first, (crop, crop_spacing, frame, (start, side), crop_ref) = self._crop_views(
            image, available, spacing, reference, crop_reference)
        second = self._forward_grid(crop, available, crop_spacing, crop_ref, frame)
        n = self.img_size
        seg_logits = tumor_crop.paste_mean(
            F.interpolate(first.seg_logits, size=(n,) * 3, mode="trilinear", align_corners=False),
            second.seg_logits, start, side)
        aux = dict(first.aux)
        if "imputation_gate" in second.aux:
            aux["imputation_gate"] = (first.aux["imputation_gate"] + second.aux["imputation_gate"]) / 2
        return GliomaOutput(seg_logits=seg_logits, cls_logits=second.cls_logits, aux=aux, risk=second.risk)

    # ------------------------------------------------------------ parameters
    def param_groups(self) -> dict[str, list[str]]:
        """{group: parameter names} for each group of ``PARAM_GROUPS`` that this model has."""
        groups: dict[str, list[str]] = {}
        for name, _ in self.named_parameters():
            group = name.split(".", 1)[0]
            if group in PARAM_GROUPS:
                groups.setdefault(group, []).append(name)
        return {g: groups[g] for g in PARAM_GROUPS if g in groups}


#: Logit of the reference class in :func:`classifier_regions` (softmax puts ~1 - 3e-13 on it).
REFERENCE_LOGIT = 30.0


def classifier_regions(seg_logits: torch.Tensor, seg: torch.Tensor, has_seg: torch.Tensor) -> torch.Tensor:
    """Segmentation logits (B, 4, N, N, N) for the classifier: the reference label map ``seg``
    (B, [1,] N, N, N) as near-one-hot logits where ``has_seg`` (B,) is true, ``seg_logits`` elsewhere.

    Why: early in training the predicted segmentation is poor and changes from round to round, and
    heads fitted to the descriptors of such a segmentation can settle on a relation that turns
    round when the segmentation improves (measured in docs/benchmarks/classification.md: grade
    learned inverted at every site's validation split). Trained on the reference regions, the heads
    learn the relation of the tumor's true extent, which the predicted regions approach; at
    validation and inference only the predicted ones exist.
    """
    seg = seg.reshape(seg.shape[0], *seg_logits.shape[2:]).long().clamp(0, seg_logits.shape[1] - 1)
    one_hot = F.one_hot(seg, seg_logits.shape[1]).movedim(-1, 1).to(seg_logits.dtype) * REFERENCE_LOGIT
    use = has_seg.bool().reshape(-1, *([1] * (seg_logits.dim() - 1)))
    return torch.where(use, one_hot, seg_logits)


def build_model(cfg: ModelConfig, img_size: int, *, seed: int | None = None) -> MultiTaskGliomaNet:
    """The network for the ``model`` config section and input side ``img_size`` (``data.size``).

    With ``seed`` the initial weights depend only on it (torch's global generator is left as it
    was): the same config and seed give the same initial global model on every run.
    """
    if seed is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return build_model(cfg, img_size)
    return MultiTaskGliomaNet(
        img_size=img_size,
        stem_channels=cfg.stem_channels,
        base_channels=cfg.base_channels,
        d_model=cfg.d_model,
        transformer_layers=cfg.transformer_layers,
        heads=cfg.heads,
        dropout=cfg.dropout,
        feature_dropout=cfg.feature_dropout,
        fusion=cfg.fusion,
        imputation=cfg.imputation,
        classifier_hidden=cfg.classifier_hidden,
        classifier_pooling=cfg.classifier_pooling,
        cls_encoder_grad=cfg.cls_encoder_grad,
        classifier_head_init=cfg.classifier_head_init,
        survival=cfg.survival_head,
        tumor_crop_size=cfg.tumor_crop_size,
        tumor_crop_margin=cfg.tumor_crop_margin,
    )
