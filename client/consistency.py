"""Weak-to-strong consistency regularisation with an EMA teacher (GMMAS stage 2, UniMatch V2).

Per training step, on the same batch the supervised loss sees (B cases, S = 4 sequences, K = 4
segmentation classes, side N)::

    teacher (EMA of the student, eval mode, no grad):  weak(image)   -> p_t  seg (B, K, N, N, N),
                                                                         cls {task: (B, 2)}
    student (training mode):  CutMix(strong(image)) -> two streams with complementary channel
                              dropout on the encoder bottleneck       -> p_s  (same shapes)
    loss = consistency_weight * mean over streams of [MSE(p_s seg, CutMix(p_t seg))
                                                      + mean_task MSE(p_s cls, CutMix(p_t cls))]

* weak augmentation: light Gaussian noise (the loader has already flipped and scaled intensities);
* strong augmentation: brightness (intensity scale), contrast (gamma), Gaussian blur and noise
  (MONAI transforms), then CutMix across the batch; the teacher's targets are mixed with the
  same boxes: voxel-wise for segmentation, by the exact pasted volume fraction for classes;
* complementary feature dropout (UniMatch V2): one Bernoulli(0.5) channel mask per case splits the
  bottleneck features into two complementary halves (each scaled by 2), one per student stream.
  It is applied through a forward hook on ``model.encoder.feature_dropout`` (the module every
  :class:`common.model.MultiTaskGliomaNet` applies to its bottleneck), so the model is unchanged;
* ``ssl.consistency_view=shared`` (the demo's CPU budget): no second student pass, no strong view,
  no CutMix: the supervised pass on the loader's view is the student (Mean Teacher's set-up), the
  teacher's targets come from the weak view of the same batch;
* after every optimizer step the teacher follows the student: ``theta_t <- d theta_t + (1-d) theta_s``.

The teacher stays at the site: :func:`save_teacher` / :func:`load_teacher` keep it on local disk
between rounds. Plugs into :class:`client.training.LocalTrainer` as ``extra_loss`` /
``after_step`` (see :class:`ConsistencyRegularizer`).
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import ContextManager, Iterator, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from monai.transforms import (
    Compose,
    RandAdjustContrast,
    RandGaussianNoise,
    RandGaussianSmooth,
    RandScaleIntensity,
)
from monai.utils import convert_to_tensor
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from client.state import RoundTag, read_state_file
from common.config import ConfigError, SSLConfig, check_consistency_view
from common.io import atomic_write
from common.model import GliomaOutput

#: Written into every saved teacher so that a file of another kind is recognised.
TEACHER_FORMAT = "fedglioma-ema-teacher/1"
#: File name of a site's teacher inside its state folder.
TEACHER_FILE = "ema_teacher.pt"


def check_consistency_config(ssl: SSLConfig) -> None:
    """Reject stage-2 settings that are of the right type but make no sense."""
    if not 0.0 <= ssl.ema_decay < 1.0:
        raise ConfigError(f"ssl.ema_decay={ssl.ema_decay} must be in [0, 1) (0.99 is typical)")
    if ssl.consistency_weight < 0.0:
        raise ConfigError(f"ssl.consistency_weight={ssl.consistency_weight} must be >= 0")
    if ssl.cutmix_alpha < 0.0:
        raise ConfigError(f"ssl.cutmix_alpha={ssl.cutmix_alpha} must be >= 0 (0 switches CutMix off)")
    check_consistency_view(ssl)


def _plain(x: torch.Tensor) -> torch.Tensor:
    """A plain tensor: MONAI's MetaTensor would carry (and index) per-case metadata we do not use."""
    return convert_to_tensor(x, track_meta=False)


def _zero_missing(image: torch.Tensor, available: torch.Tensor) -> torch.Tensor:
    """Keep the data contract "missing sequence = all zeros" after an intensity transform.

    image (B, S, D, H, W), available (B, S) bool.
    """
    return image * available.to(image.dtype)[:, :, None, None, None]


# --------------------------------------------------------------------------- the EMA teacher
class EMATeacher:
    """Exponential moving average of a student network (Tarvainen & Valpola 2017).

    The teacher is a frozen copy of the student (same device), kept in eval mode: its dropout is
    off, so its targets are deterministic.

    Args:
        model: the student to copy.
        decay: ``d`` in ``theta_t <- d * theta_t + (1 - d) * theta_s``, in [0, 1).
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay} (ssl.ema_decay)")
        self.decay = float(decay)
        # torch's AveragedModel holds the copy and applies the EMA (foreach lerp). It counts the copy
        # as one average already, so the first update blends with it instead of overwriting it.
        self.averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(self.decay), use_buffers=False)
        self.averaged.n_averaged.fill_(1)
        self.model = self.averaged.module.eval()
        self.model.requires_grad_(False)

    @torch.no_grad()
    def update(self, student: nn.Module) -> None:
        """Parameters: ``theta_t <- d theta_t + (1 - d) theta_s``; buffers copied from the student
        (running statistics are not averaged, as in the mean teacher)."""
        if dict(student.named_parameters()).keys() != dict(self.model.named_parameters()).keys():
            raise ValueError(
                "EMATeacher.update: the student's parameters differ from the teacher's; build the "
                "teacher from this model (EMATeacher(model, decay))"
            )
        self.averaged.update_parameters(student)
        student_buffers = dict(student.named_buffers())
        for name, t_buffer in self.model.named_buffers():
            t_buffer.copy_(student_buffers[name])

    @torch.no_grad()
    def predict(self, image: torch.Tensor, available: torch.Tensor) -> "GliomaOutput":
        """Teacher output for image (B, S, N, N, N), available (B, S) bool (no graph)."""
        return self.model(image, available)


def save_teacher(teacher: EMATeacher, path: Path, tag: "RoundTag") -> None:
    """Write the teacher's weights and the round that produced them to ``path``, atomically."""

    payload = {"format": TEACHER_FORMAT, **tag.as_dict(), "state_dict": teacher.model.state_dict()}
    atomic_write(Path(path), lambda tmp: torch.save(payload, tmp))


def load_teacher(model: nn.Module, path: Path, decay: float, tag: "RoundTag") -> tuple[EMATeacher, bool]:
    """The site's teacher from ``path``, or a new one initialised from ``model`` (the global model).

    The saved teacher is restored only when an earlier round of the same run wrote it
    (``tag``) and every tensor matches ``model``'s names and shapes; otherwise (no file, another
    run, a changed model config) a fresh copy of ``model`` is returned.

    Returns:
        ``(teacher, restored)``.

    Raises:
        ValueError: the file exists but cannot be read as a teacher (says which file and the fix).
    """
    teacher = EMATeacher(model, decay)
    path = Path(path)
    if not path.exists():
        return teacher, False

    def parse(payload: dict) -> tuple[RoundTag, dict]:
        if payload.get("format") != TEACHER_FORMAT:
            raise ValueError(f"format {payload.get('format')!r} is not {TEACHER_FORMAT!r}")
        return RoundTag.from_dict(payload), payload["state_dict"]

    saved_tag, state = read_state_file(path, "the EMA teacher", "a new teacher from the global model", parse)
    current = teacher.model.state_dict()
    same_shape = state.keys() == current.keys() and all(state[k].shape == current[k].shape for k in current)
    if not (same_shape and saved_tag.precedes(tag)):
        return teacher, False
    teacher.model.load_state_dict(state)
    return teacher, True


# --------------------------------------------------------------------------- augmentation
class WeakAugment:
    """Light Gaussian noise for the teacher's view (geometry stays aligned with the student's).

    Args:
        std: noise standard deviation in z-score units.
        seed: seed of the noise stream.
    """

    def __init__(self, std: float = 0.05, seed: int = 0) -> None:
        self.noise = RandGaussianNoise(prob=1.0, std=std)
        self.noise.set_random_state(seed)

    def __call__(self, image: torch.Tensor, available: torch.Tensor) -> torch.Tensor:
        """image (B, S, D, H, W), available (B, S) bool -> noisy image, missing channels 0."""
        noisy = torch.stack([_plain(self.noise(case)) for case in image])
        return _zero_missing(noisy, available)


class StrongAugment:
    """Intensity-only strong augmentation for the student (GMMAS: brightness/contrast jitter and
    blur; hue/saturation do not exist in MRI). No geometric transform, so the teacher's voxel-wise
    segmentation targets stay aligned.

    Args:
        seed: seed of all random draws.
    """

    def __init__(self, seed: int = 0) -> None:
        self.transform = Compose(
            [
                RandScaleIntensity(factors=0.25, prob=0.8, channel_wise=True),  # brightness
                RandAdjustContrast(prob=0.8, gamma=(0.6, 1.6), retain_stats=True),  # contrast
                RandGaussianSmooth(sigma_x=(0.5, 1.25), sigma_y=(0.5, 1.25), sigma_z=(0.5, 1.25), prob=0.5),
                RandGaussianNoise(prob=0.5, std=0.1),
            ]
        )
        self.transform.set_random_state(seed)

    def __call__(self, image: torch.Tensor, available: torch.Tensor) -> torch.Tensor:
        """image (B, S, D, H, W), available (B, S) bool -> augmented image, missing channels 0."""
        # MONAI's array transforms take one channel-first case (S, D, H, W): loop over the batch.
        augmented = torch.stack([_plain(self.transform(case)) for case in image])
        return _zero_missing(augmented, available)


@dataclass
class CutMixBoxes:
    """One CutMix draw for a batch: case ``b`` pastes the box ``mask[b]`` from case ``perm[b]``.

    Attributes:
        perm: (B,) int64 source case of each case's box.
        mask: (B, 1, D, H, W) float, 1 inside the pasted box.
    """

    perm: torch.Tensor
    mask: torch.Tensor

    @property
    def fraction(self) -> torch.Tensor:
        """(B,) pasted volume fraction of each case."""
        return self.mask.flatten(1).mean(1)

    def mix(self, x: torch.Tensor) -> torch.Tensor:
        """Voxel-wise mix of (B, C, D, H, W) maps (images, segmentation probabilities)."""
        mask = self.mask.to(x.dtype)
        return x * (1.0 - mask) + x[self.perm] * mask

    def mix_vectors(self, v: torch.Tensor) -> torch.Tensor:
        """Per-case (B, C) targets mixed by the pasted volume fraction (CutMix label mixing)."""
        f = self.fraction.to(v.dtype)[:, None]
        return v * (1.0 - f) + v[self.perm] * f

    def mix_available(self, available: torch.Tensor) -> torch.Tensor:
        """(B, S) bool: a sequence is real in a mixed case only where both parts have it (a case
        with no box keeps its own); otherwise that channel would be half zeros."""
        pasted = self.fraction > 0
        return available & (available[self.perm] | ~pasted[:, None])


def draw_cutmix(
    batch_size: int, spatial: tuple[int, int, int], alpha: float, rng: np.random.Generator, device: torch.device
) -> CutMixBoxes:
    """CutMix boxes for a 3-D batch (Yun et al. 2019), one per case.

    ``lambda ~ Beta(alpha, alpha)`` is the kept fraction; the box has side ``n * (1 - lambda)^(1/3)``
    per axis around a uniform centre and is clipped at the border, so its volume is exactly
    ``1 - lambda`` before clipping. Written here rather than using MONAI 1.6's ``CutMix`` because
    that one uses the 2-D side ``sqrt(1 - lambda)`` (boxes of volume (1-lambda)^1.5 in 3-D), draws
    the box *corner* uniformly (most boxes are cut off at the border), mixes labels by the drawn
    lambda instead of the pasted volume, and indexes with a list (deprecated in torch).
    """
    lam = rng.beta(alpha, alpha, size=batch_size)
    perm = torch.as_tensor(rng.permutation(batch_size), dtype=torch.long)
    mask = torch.zeros((batch_size, 1, *spatial))
    for b in range(batch_size):
        side = [n * (1.0 - lam[b]) ** (1.0 / 3.0) for n in spatial]
        centre = [rng.uniform(0, n) for n in spatial]
        box = tuple(
            slice(int(np.clip(round(c - s / 2), 0, n)), int(np.clip(round(c + s / 2), 0, n)))
            for c, s, n in zip(centre, side, spatial)
        )
        mask[(b, 0, *box)] = 1.0
    return CutMixBoxes(perm=perm.to(device), mask=mask.to(device))


# --------------------------------------------------------------------------- feature dropout
def bottleneck_module(model: nn.Module) -> nn.Module:
    """The module whose output is the encoder's bottleneck (B, d_model, N/8, N/8, N/8)."""
    module = getattr(getattr(model, "encoder", None), "feature_dropout", None)
    if not isinstance(module, nn.Module):
        raise ValueError(
            f"complementary feature dropout needs model.encoder.feature_dropout (see "
            f"common/model/network.py CNNTransformerEncoder); {type(model).__name__} has none: set "
            "ssl.complementary_dropout=false"
        )
    return module


class ComplementaryDropout:
    """UniMatch V2 complementary channel dropout on the bottleneck, via a forward hook.

    Stream 0 draws a Bernoulli(0.5) keep-mask per case and channel and keeps those channels;
    stream 1 keeps exactly the others. Kept channels are scaled by 2 (inverted dropout), so each
    stream sees features of the same expected magnitude.

    Args:
        model: a network with ``encoder.feature_dropout`` (see :func:`bottleneck_module`).
        generator: CPU generator of the masks.
    """

    def __init__(self, model: nn.Module, generator: torch.Generator) -> None:
        self.target = bottleneck_module(model)
        self.generator = generator
        self.keep: torch.Tensor | None = None  # (B, C, 1, 1, 1) of the last stream-0 pass

    def _scale(self, stream: int, features: torch.Tensor) -> torch.Tensor:
        if stream == 0:
            draw = torch.rand(features.shape[:2], generator=self.generator) < 0.5
            self.keep = draw.to(features.device, features.dtype)[:, :, None, None, None]
        if self.keep is None or self.keep.shape[:2] != features.shape[:2]:
            raise RuntimeError("ComplementaryDropout: run stream 0 on this batch before stream 1")
        keep = self.keep if stream == 0 else 1.0 - self.keep
        return features * keep * 2.0

    @contextmanager
    def stream(self, index: int) -> Iterator[None]:
        """Within this context the model's bottleneck passes through stream ``index`` (0 or 1)."""
        if index not in (0, 1):
            raise ValueError(f"ComplementaryDropout has streams 0 and 1, got {index}")
        handle = self.target.register_forward_hook(lambda _module, _args, out: self._scale(index, out))
        try:
            yield
        finally:
            handle.remove()


# --------------------------------------------------------------------------- the loss
def consistency_terms(
    student: "GliomaOutput", seg_target: torch.Tensor, cls_target: Mapping[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """MSE between the student's softmax outputs and the teacher's (mixed) probabilities.

    Args:
        student: ``seg_logits`` (B, K, D, H, W), ``cls_logits`` {task: (B, 2)}.
        seg_target: (B, K, D, H, W) probabilities. cls_target: {task: (B, 2)} probabilities.

    Returns:
        ``(seg, cls)`` scalars; ``cls`` is the mean over tasks.
    """
    seg = F.mse_loss(torch.softmax(student.seg_logits.float(), dim=1), seg_target.float())
    cls = torch.stack(
        [F.mse_loss(torch.softmax(logits.float(), dim=-1), cls_target[task].float())
         for task, logits in student.cls_logits.items()]
    ).mean()
    return seg, cls


class ConsistencyRegularizer:
    """``extra_loss`` and ``after_step`` of :class:`client.training.LocalTrainer` for stage 2.

    Args:
        teacher: the site's EMA teacher.
        ssl: ``consistency_weight``, ``cutmix_alpha`` (0 = no CutMix), ``complementary_dropout``.
        seed: seed of the augmentation, CutMix and dropout-mask streams (vary it per round).
    """

    def __init__(self, teacher: EMATeacher, ssl: SSLConfig, seed: int = 0) -> None:
        check_consistency_config(ssl)
        self.teacher = teacher
        self.weight = ssl.consistency_weight
        self.cutmix_alpha = ssl.cutmix_alpha
        self.complementary = ssl.complementary_dropout
        self.shared = ssl.consistency_view == "shared"
        self.weak = WeakAugment(seed=seed)
        self.strong = StrongAugment(seed=seed + 1)
        self.rng = np.random.default_rng(seed + 2)
        self.generator = torch.Generator().manual_seed(seed + 3)

    def teacher_targets(
        self, image: torch.Tensor, available: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Teacher probabilities on the weak view: seg (B, K, D, H, W), {task: (B, 2)}."""
        output = self.teacher.predict(self.weak(image, available), available)
        seg = torch.softmax(output.seg_logits.float(), dim=1)
        return seg, {task: torch.softmax(logits.float(), dim=-1) for task, logits in output.cls_logits.items()}

    def __call__(
        self, model: nn.Module, batch: Mapping[str, torch.Tensor], output: "GliomaOutput"
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Weighted consistency loss of one batch and its detached terms
        (``consistency_seg``, ``consistency_cls``). ``output`` (the supervised pass on the
        loader's view) is the student with ``ssl.consistency_view=shared``; with ``strong`` the
        student is run again on the strong view."""
        image, available = _plain(batch["image"]).float(), batch["available"].bool()
        seg_target, cls_target = self.teacher_targets(image, available)
        if self.shared:
            # Mean Teacher (Tarvainen & Valpola 2017): the student's supervised pass on the loader's
            # augmented view is also its consistency pass; the teacher sees its own noisy view
            seg, cls = consistency_terms(output, seg_target, cls_target)
            return self.weight * (seg + cls), {"consistency_seg": seg.detach(), "consistency_cls": cls.detach()}
        strong = self.strong(image, available)
        if self.cutmix_alpha > 0 and image.shape[0] > 1:
            boxes = draw_cutmix(image.shape[0], tuple(image.shape[2:]), self.cutmix_alpha, self.rng, image.device)
            available = boxes.mix_available(available)
            strong = _zero_missing(boxes.mix(strong), available)
            seg_target = boxes.mix(seg_target)
            cls_target = {task: boxes.mix_vectors(p) for task, p in cls_target.items()}
        if self.complementary:
            dropout = ComplementaryDropout(model, self.generator)
            streams: list[ContextManager[None]] = [dropout.stream(0), dropout.stream(1)]
        else:
            streams = [nullcontext()]
        seg_terms, cls_terms = [], []
        for stream in streams:
            with stream:
                student = model(strong, available)
            seg, cls = consistency_terms(student, seg_target, cls_target)
            seg_terms.append(seg)
            cls_terms.append(cls)
        seg, cls = torch.stack(seg_terms).mean(), torch.stack(cls_terms).mean()
        total = self.weight * (seg + cls)
        return total, {"consistency_seg": seg.detach(), "consistency_cls": cls.detach()}

    def after_step(self, model: nn.Module) -> None:
        """EMA update of the teacher after each optimizer step."""
        self.teacher.update(model)
