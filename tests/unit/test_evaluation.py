"""common.evaluation.uncertainty (MC-dropout) and common.evaluation.loop (the evaluation loop) on fake models that
follow the GliomaOutput interface: ``model(image, available)`` -> ``.seg_logits``, ``.cls_logits``,
``.aux``."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from common.contract import ED, ET, METRIC_KEYS, NCR, TASKS, UNKNOWN_LABEL
from common.evaluation.loop import evaluate
from common.evaluation.survival import risk_group_curves
from common.evaluation.uncertainty import mc_dropout, mc_dropout_predict

S = 16


class FakeGliomaNet(nn.Module):
    """Tiny stand-in for common.model: conv + BatchNorm, a transformer layer and a dropout head.

    With ``oracle=True`` the segmentation logits are the one-hot of ``image[:, 0]`` (the test
    writes the reference labels there) and each task's logit is +-``cls_margin`` depending on the
    sign of ``image[:, 1]``'s mean, so predictions are known exactly.
    """

    def __init__(self, *, head_dropout: float = 0.5, attn_dropout: float = 0.0, oracle: bool = False) -> None:
        super().__init__()
        self.oracle = oracle
        self.stem = nn.Conv3d(4, 8, 3, padding=1)
        self.norm = nn.BatchNorm3d(8)
        self.transformer = nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=16,
                                                      dropout=attn_dropout, batch_first=True)
        self.dropout = nn.Dropout(head_dropout)
        self.seg_head = nn.Conv3d(8, 4, 1)
        self.heads = nn.ModuleDict({task: nn.Linear(8, 2) for task in TASKS})

    def forward(self, image: torch.Tensor, available: torch.Tensor, spacing: torch.Tensor | None = None) -> SimpleNamespace:
        features = torch.relu(self.norm(self.stem(image * available[:, :, None, None, None])))
        # 4^3 tokens keep attention cheap on CPU.
        tokens = self.transformer(nn.functional.adaptive_avg_pool3d(features, 4).flatten(2).transpose(1, 2))
        pooled = self.dropout(tokens.mean(1))
        cls_logits = {task: head(pooled) for task, head in self.heads.items()}
        seg_logits = self.seg_head(features)
        if self.oracle:
            seg_logits = 10.0 * nn.functional.one_hot(image[:, 0].long(), 4).permute(0, 4, 1, 2, 3).float()
            sign = torch.sign(image[:, 1].mean(dim=(1, 2, 3)))
            cls_logits = {task: torch.stack([-sign, sign], dim=1) * 3.0 for task in TASKS}
        return SimpleNamespace(seg_logits=seg_logits, cls_logits=cls_logits, aux={})


def make_batch(seg: torch.Tensor, positive: list[bool], labels: list[list[int]], has_seg: list[bool]) -> dict:
    """A loader batch whose image encodes the answer for the oracle model."""
    b = seg.shape[0]
    image = torch.zeros(b, 4, S, S, S)
    image[:, 0] = seg[:, 0].float()
    image[:, 1] = torch.tensor([1.0 if p else -1.0 for p in positive]).view(b, 1, 1, 1)
    return {
        "image": image,
        "available": torch.ones(b, 4, dtype=torch.bool),
        "seg": seg,
        "has_seg": torch.tensor(has_seg),
        "labels": torch.tensor(labels, dtype=torch.int64),
        "spacing": torch.ones(b, 3),
        "index": torch.arange(b),
    }


def tumor(batch: int, shift: int = 0) -> torch.Tensor:
    seg = torch.zeros(batch, 1, S, S, S, dtype=torch.int64)
    seg[:, 0, 3 + shift:11 + shift, 4:12, 4:12] = ED
    seg[:, 0, 5 + shift:9 + shift, 6:10, 6:10] = ET
    seg[:, 0, 6 + shift:8 + shift, 7:9, 7:9] = NCR
    return seg


def random_inputs(batch: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(batch, 4, 8, 8, 8, generator=generator), torch.ones(batch, 4, dtype=torch.bool)


# ---------------------------------------------------------------------------------- mc_dropout
def test_mc_dropout_switches_only_dropout_and_restores_modes() -> None:
    model = FakeGliomaNet(attn_dropout=0.1)
    model.train()
    model.heads.eval()  # a mixed state that must come back exactly
    before = {name: m.training for name, m in model.named_modules()}
    with mc_dropout(model):
        assert model.dropout.training and model.transformer.dropout1.training
        assert model.transformer.self_attn.training  # attention-weight dropout
        assert not model.norm.training and not model.transformer.norm1.training
        assert not model.stem.training
    assert {name: m.training for name, m in model.named_modules()} == before


def test_mc_dropout_restores_modes_after_an_exception() -> None:
    model = FakeGliomaNet().eval()
    with pytest.raises(RuntimeError, match="boom"), mc_dropout(model):
        raise RuntimeError("boom")
    assert not any(m.training for m in model.modules())


def test_mc_passes_differ_while_eval_is_deterministic_and_batchnorm_is_untouched() -> None:
    torch.manual_seed(0)
    model = FakeGliomaNet().eval()
    image, available = random_inputs()
    running_mean = model.norm.running_mean.clone()
    with torch.no_grad():
        a = model(image, available).cls_logits["idh"]
        b = model(image, available).cls_logits["idh"]
        assert torch.equal(a, b)
        with mc_dropout(model):
            c = model(image, available).cls_logits["idh"]
            d = model(image, available).cls_logits["idh"]
    assert not torch.allclose(c, d)
    assert torch.equal(model.norm.running_mean, running_mean)  # BatchNorm stayed in eval mode


def test_dropout_inside_transformer_layer_is_active_under_no_grad() -> None:
    # Only the transformer layer has dropout; in eval mode under no_grad PyTorch would take the
    # fused fast path that skips it, so passes would be identical without special handling.
    torch.manual_seed(0)
    model = FakeGliomaNet(head_dropout=0.0, attn_dropout=0.3).eval()
    image, available = random_inputs()
    with torch.no_grad(), mc_dropout(model):
        outputs = [model(image, available).cls_logits["grade"] for _ in range(3)]
    assert not torch.allclose(outputs[0], outputs[1])


def test_mc_dropout_predict_mean_and_std() -> None:
    torch.manual_seed(0)
    model = FakeGliomaNet(head_dropout=0.5).eval()
    image, available = random_inputs(batch=3)
    mean, std = mc_dropout_predict(model, image, available, passes=8)
    assert set(mean) == set(std) == set(TASKS)
    for task in TASKS:
        assert mean[task].shape == std[task].shape == (3, 2)
        assert torch.allclose(mean[task].sum(1), torch.ones(3))
        assert torch.all(std[task] > 0)
        assert torch.allclose(std[task][:, 0], std[task][:, 1], atol=1e-6)  # binary: same spread
    assert not model.dropout.training

    deterministic = FakeGliomaNet(head_dropout=0.0).eval()
    mean, std = mc_dropout_predict(deterministic, image, available, passes=4)
    with torch.no_grad():
        plain = torch.softmax(deterministic(image, available).cls_logits["mgmt"], dim=-1)
    assert torch.allclose(mean["mgmt"], plain, atol=1e-6)
    assert torch.all(std["mgmt"] < 1e-6)
    with pytest.raises(ValueError, match="passes >= 2"):
        mc_dropout_predict(deterministic, image, available, passes=1)


# ------------------------------------------------------------------------------------ evaluate
def oracle_loader() -> list[dict]:
    # 3 cases with segmentation, 1 without (its zeros must not count as an empty reference).
    return [
        make_batch(tumor(2), [True, False], [[1, 0, 1, UNKNOWN_LABEL], [0, 1, 0, UNKNOWN_LABEL]], [True, True]),
        make_batch(tumor(2, shift=2), [False, True], [[0, 1, 1, 0], [1, UNKNOWN_LABEL, 0, 1]], [True, False]),
    ]


def test_evaluate_oracle_model_scores_perfect_segmentation_and_known_classification() -> None:
    model = FakeGliomaNet(oracle=True)
    model.train()
    metrics = evaluate(model, oracle_loader(), "cpu", progress=True, desc="test")
    assert tuple(metrics) == METRIC_KEYS
    assert metrics["n_cases"] == 4
    for region in ("wt", "tc", "et"):
        assert metrics[f"dice_{region}"] == pytest.approx(1.0)
        assert metrics[f"hd95_{region}"] == pytest.approx(0.0)
    # idh: labels 1,0,0,1 and positive flags T,F,F,T -> all right.
    assert metrics["n_idh"] == 4 and metrics["auc_idh"] == 1.0 and metrics["acc_idh"] == 1.0
    # 1p19q: labels 0,1,1 (one unknown) vs flags T,F,F -> all wrong.
    assert metrics["n_1p19q"] == 3 and metrics["auc_1p19q"] == 0.0 and metrics["acc_1p19q"] == 0.0
    # grade: labels 1,0,1,0 vs T,F,F,T -> 2 of 4 right; mgmt: labels 0,1 (two unknown) vs F,T.
    assert metrics["acc_grade"] == 0.5 and metrics["sen_grade"] == 0.5 and metrics["spe_grade"] == 0.5
    assert metrics["n_mgmt"] == 2 and metrics["f1_mgmt"] == 1.0
    # Confidence softmax([-3, 3])[1] for every case; ECE on idh = |1 - conf|.
    conf = float(torch.softmax(torch.tensor([-3.0, 3.0]), 0)[1])
    assert metrics["ece_idh"] == pytest.approx(1 - conf, abs=1e-6)
    assert all(m.training for m in model.modules())  # modes restored


def test_evaluate_segmentation_reflects_a_wrong_prediction() -> None:
    class Shifted(FakeGliomaNet):
        def forward(self, image, available, spacing=None):  # predicts the tumor 2 voxels off
            return super().forward(torch.roll(image, shifts=2, dims=2), available)

    metrics = evaluate(Shifted(oracle=True), oracle_loader())
    assert 0.0 < metrics["dice_wt"] < 1.0
    assert metrics["hd95_wt"] == pytest.approx(2.0)


def test_evaluate_with_mc_dropout_adds_uncertainty() -> None:
    torch.manual_seed(0)
    model = FakeGliomaNet(head_dropout=0.5).eval()
    loader = oracle_loader()
    metrics = evaluate(model, loader, mc_passes=4)
    assert set(METRIC_KEYS) <= set(metrics)
    for task in TASKS:
        assert 0.0 < metrics[f"unc_{task}"] < 0.5
    assert not any(k.startswith("unc_") for k in evaluate(model, loader))
    assert not any(m.training for m in model.modules())
    with pytest.raises(ValueError, match="mc_passes"):
        evaluate(model, loader, mc_passes=1)


def test_evaluate_empty_loader_gives_nan_metrics() -> None:
    metrics = evaluate(FakeGliomaNet(), [])
    assert metrics["n_cases"] == 0
    assert math.isnan(metrics["dice_wt"]) and math.isnan(metrics["auc_idh"])


def test_drop_sequences_zero_fills_and_clears_availability():
    from common.evaluation.loop import drop_sequences

    batch = {"image": torch.ones(2, 4, 4, 4, 4), "available": torch.ones(2, 4, dtype=torch.bool), "x": torch.zeros(1)}
    (out,) = list(drop_sequences([batch], ["t1", "flair"]))
    assert out["available"].tolist() == [[False, True, True, False]] * 2
    assert out["image"][:, [0, 3]].abs().sum() == 0 and out["image"][:, [1, 2]].min() == 1
    assert batch["image"].min() == 1 and bool(batch["available"].all())  # the input is untouched
    with pytest.raises(ValueError, match="unknown sequence"):
        list(drop_sequences([batch], ["dwi"]))


def test_mc_passes_rerun_only_the_classifier_and_give_the_same_samples() -> None:
    """With dropout only in the classifier, the stems/encoder/decoder run once per batch; the
    dropout masks come in the same order, so the result equals T full passes exactly."""
    from common.config import compose
    from common.evaluation.uncertainty import mc_dropout_predict, only_head_drops
    from common.model import build_model

    # random output layers: zero ones (the default) give logit 0 under any dropout mask
    cfg = compose(["+experiment=tiny", "model.classifier_head_init=random"])
    model = build_model(cfg.model, 16, seed=0)
    assert only_head_drops(model)
    image = torch.randn(2, 4, 16, 16, 16)
    available = torch.ones(2, 4, dtype=torch.bool)
    calls = []
    hook = model.encoder.register_forward_hook(lambda *a: calls.append(1))
    torch.manual_seed(3)
    fast = mc_dropout_predict(model, image, available, passes=5)
    assert len(calls) == 1
    hook.remove()
    from unittest import mock

    with mock.patch("common.evaluation.uncertainty.only_head_drops", return_value=False):  # 5 whole passes
        torch.manual_seed(3)
        slow = mc_dropout_predict(model, image, available, passes=5)
    for task in fast[0]:
        assert torch.allclose(fast[0][task], slow[0][task], atol=1e-6)
        assert torch.allclose(fast[1][task], slow[1][task], atol=1e-6)
    assert any(float(s.max()) > 0 for s in fast[1].values())  # the passes do differ
    model.encoder.feature_dropout = nn.Dropout3d(0.1)  # dropout before the classifier: whole passes again
    assert not only_head_drops(model)


def test_evaluate_scores_the_survival_head_and_draws_risk_group_curves() -> None:
    """A risk that orders the deaths exactly: C-index 1; unknown survival is skipped; the
    high-risk half's curve falls first."""
    class WithRisk(FakeGliomaNet):
        def forward(self, image, available, spacing=None):
            out = super().forward(image, available)
            out.risk = image[:, 2].mean(dim=(1, 2, 3))
            return out

    loader = oracle_loader()
    for batch, risks, survival in zip(loader, ([3.0, 2.0], [1.0, 0.0]), ([[100, 1], [300, 1]], [[50, UNKNOWN_LABEL], [900, 0]])):
        batch["image"][:, 2] = torch.tensor(risks).view(2, 1, 1, 1)
        batch["survival"] = torch.tensor(survival, dtype=torch.float32)

    metrics = evaluate(WithRisk(oracle=True), loader, survival_curves=True)

    assert metrics["cindex"] == pytest.approx(1.0) and metrics["n_survival"] == 3
    curves = metrics["km_risk_groups"]
    assert curves["high"]["n"] == 1 and curves["low"]["n"] == 2  # split at the median risk (2.0)
    assert curves["high"]["time"] == [0.0, 100.0] and curves["high"]["survival"] == [1.0, 0.0]
    assert curves["low"]["survival"][-1] == pytest.approx(0.5)  # one death (300 d), one censored (900 d)
    plain = evaluate(FakeGliomaNet(oracle=True), oracle_loader())
    assert math.isnan(plain["cindex"]) and "km_risk_groups" not in plain


def test_risk_group_curves_of_a_group_without_deaths_stay_at_1() -> None:
    curves = risk_group_curves(np.array([0.0, 1.0, 2.0, 3.0]), np.array([[100, 0], [200, 0], [50, 1], [300, 0]]))
    assert curves["low"] == {"n": 2, "events": 0, "time": [0.0, 200.0], "survival": [1.0, 1.0]}
    assert curves["high"]["events"] == 1 and curves["high"]["survival"] == [1.0, 0.5, 0.5]
