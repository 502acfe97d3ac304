"""MC-dropout epistemic uncertainty (Gal & Ghahramani 2016; MTTU-Net, GMMAS eq. 6).

At inference the dropout layers are switched on while everything else (normalisation layers)
stays in eval mode; the spread of the softmax probabilities over T stochastic passes is the
epistemic uncertainty:  U(x) = sqrt(1/T sum_m (f_m(x) - mean f(x))^2).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

#: Modules that drop activations when ``training`` is True.
DROPOUT_TYPES: tuple[type[nn.Module], ...] = (
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)
#: Modules that read their *own* ``training`` flag to decide on dropout: MultiheadAttention
#: applies attention-weight dropout only when training, and Transformer{Encoder,Decoder}Layer in
#: eval mode under no_grad take a fused "fast path" that skips all their Dropout children. Their
#: flag is set alone (not recursively), so their LayerNorm children stay in eval mode.
DROPOUT_OWNERS: tuple[type[nn.Module], ...] = (
    nn.MultiheadAttention,
    nn.TransformerEncoderLayer,
    nn.TransformerDecoderLayer,
)


@contextmanager
def mc_dropout(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode for the whole model except its dropout (incl. inside transformer layers).

    Restores every module's previous ``training`` flag on exit, also after an exception.
    """
    previous = {module: module.training for module in model.modules()}
    try:
        model.eval()
        for module in model.modules():
            if isinstance(module, DROPOUT_TYPES + DROPOUT_OWNERS):
                module.training = True
        yield model
    finally:
        for module, mode in previous.items():
            module.training = mode


def drops(module: nn.Module) -> bool:
    """Whether ``module`` itself drops anything at its current settings (p > 0)."""
    if isinstance(module, DROPOUT_TYPES):
        return module.p > 0
    if isinstance(module, nn.MultiheadAttention):
        return module.dropout > 0
    return False


def only_head_drops(model: nn.Module) -> bool:
    """True when every active dropout of ``model`` sits in its ``classifier`` (and the model can
    hand the classifier its inputs, ``classifier_inputs``)."""
    classifier = getattr(model, "classifier", None)
    if classifier is None or not hasattr(model, "classifier_inputs"):
        return False
    inside = {id(m) for m in classifier.modules()}
    return not any(drops(m) for m in model.modules() if id(m) not in inside)


def mc_dropout_predict(
    model: nn.Module, image: torch.Tensor, available: torch.Tensor, passes: int = 10,
    *, spacing: torch.Tensor | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Mean and standard deviation over ``passes`` stochastic passes of the class probabilities.

    Args:
        model: ``model(image, available)`` returns an object with ``cls_logits: {task: (B, 2)}``.
        image: (B, 4, S, S, S) float. available: (B, 4) bool.
        passes: number of stochastic forward passes T (MTTU-Net uses 10).
        spacing: (B, 3) voxel size in mm (tumor volumes of the tumor-aware classifier), or None.

    Returns:
        ``(mean, std)``, each ``{task: (B, 2)}``: the mean softmax probabilities and their
        population standard deviation over the passes (GMMAS eq. 6, divisor T).
    """
    if passes < 2:
        raise ValueError(f"mc_dropout_predict needs passes >= 2 to estimate a spread, got {passes}")
    samples: dict[str, list[torch.Tensor]] = {}
    with torch.no_grad(), mc_dropout(model):
        if only_head_drops(model):
            # the passes differ only in the classifier's MLP: the stems, encoder, decoder and the
            # classifier's pooling run once
            pooled = model.classifier.inputs(*model.classifier_inputs(image, available, spacing))
            outputs = (model.classifier.heads_forward(*pooled)[0] for _ in range(passes))
        else:
            outputs = ((model(image, available, spacing) if spacing is not None else model(image, available)).cls_logits
                       for _ in range(passes))
        for cls_logits in outputs:
            for task, logits in cls_logits.items():
                samples.setdefault(task, []).append(torch.softmax(logits.float(), dim=-1))
    mean = {task: torch.stack(p).mean(0) for task, p in samples.items()}
    std = {task: torch.stack(p).std(0, correction=0) for task, p in samples.items()}
    return mean, std
