"""Multi-task loss (client.losses): masking, class weights, loss variants, uncertainty weighting."""

from __future__ import annotations

import math
from typing import Iterator

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from client.losses import MultiTaskLoss, UncertaintyWeighting, class_weights_from_labels
from common.config import compose
from common.contract import TASKS, UNKNOWN_LABEL
from common.model import GliomaOutput, MultiTaskGliomaNet, build_model

SIZE = 16
U = UNKNOWN_LABEL


@pytest.fixture(scope="module", autouse=True)
def single_thread() -> Iterator[None]:
    """Tiny volumes: intra-op threading only adds overhead (and stalls badly on a busy machine)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def model() -> MultiTaskGliomaNet:
    torch.manual_seed(0)
    # random output layers: with the default zero start no classification gradient reaches the
    # encoder before the first step, and these tests follow gradients through an untrained network
    return build_model(compose(["model=tiny", "model.classifier_head_init=random"]).model, SIZE).train()


def _batch(labels: list[list[int]], has_seg: list[bool], seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    b = len(labels)
    available = torch.ones(b, 4, dtype=torch.bool)
    available[0, 0] = False  # one case misses T1, as at real sites
    return {
        "image": torch.randn(b, 4, SIZE, SIZE, SIZE, generator=g) * available[:, :, None, None, None],
        "available": available,
        "seg": torch.randint(0, 4, (b, 1, SIZE, SIZE, SIZE), generator=g),
        "has_seg": torch.tensor(has_seg),
        "labels": torch.tensor(labels, dtype=torch.int64),
        "spacing": torch.ones(b, 3),
        "index": torch.arange(b),
    }


def _logits_output(cls: dict[str, torch.Tensor], b: int = 2) -> GliomaOutput:
    """An output with fixed, known logits (segmentation irrelevant: has_seg all False)."""
    return GliomaOutput(seg_logits=torch.zeros(b, 4, 2, 2, 2, requires_grad=True), cls_logits=cls, aux={})


def _grads(model: MultiTaskGliomaNet, prefix: str) -> list[torch.Tensor | None]:
    return [p.grad for n, p in model.named_parameters() if n.startswith(prefix)]


def _nonzero(grads: list[torch.Tensor | None]) -> bool:
    return any(g is not None and bool(g.abs().sum() > 0) for g in grads)


def test_no_label_for_a_task_is_finite_and_other_terms_still_train(model: MultiTaskGliomaNet) -> None:
    batch = _batch([[0, U, 1, 0], [1, U, 0, U]], [True, True])
    loss_fn = MultiTaskLoss()

    result = loss_fn(model(batch["image"], batch["available"]), batch, model.task_weighting)
    result.total.backward()

    assert torch.isfinite(result.total)
    assert set(result.terms) == {"seg", "cls_idh", "cls_1p19q", "cls_grade", "cls_mgmt", "survival"}
    assert result.terms["survival"] == 0.0  # the batch has no survival: the term is left out
    assert result.terms["cls_1p19q"] == 0.0 and result.terms["seg"] > 0 and result.terms["cls_idh"] > 0
    assert _nonzero(_grads(model, "decoder.")) and _nonzero(_grads(model, "classifier.heads.idh."))
    assert not _nonzero(_grads(model, "classifier.heads.1p19q."))
    log_var_grad = model.task_weighting.log_vars.grad
    assert log_var_grad[TASKS.index("1p19q") + 1] == 0  # no regulariser pull on an absent term
    assert log_var_grad[0] != 0 and log_var_grad[1] != 0


def test_batch_without_segmentation_trains_the_classifier_only(model: MultiTaskGliomaNet) -> None:
    batch = _batch([[0, 1, 1, 0], [1, 0, 0, 1]], [False, False])

    result = MultiTaskLoss()(model(batch["image"], batch["available"]), batch, model.task_weighting)
    result.total.backward()

    assert torch.isfinite(result.total) and result.terms["seg"] == 0.0
    assert _nonzero(_grads(model, "classifier.")) and _nonzero(_grads(model, "encoder."))
    assert not _nonzero(_grads(model, "decoder."))
    assert model.task_weighting.log_vars.grad[0] == 0


def test_batch_with_nothing_to_learn_gives_zero_that_backpropagates(model: MultiTaskGliomaNet) -> None:
    batch = _batch([[U, U, U, U], [U, U, U, U]], [False, False])

    result = MultiTaskLoss()(model(batch["image"], batch["available"]), batch, model.task_weighting)
    result.total.backward()

    assert result.total.item() == 0.0
    assert all(v == 0.0 for v in result.terms.values())
    assert all(g is None or torch.count_nonzero(g) == 0 for g in _grads(model, ""))


def test_masked_samples_do_not_affect_the_loss(model: MultiTaskGliomaNet) -> None:
    batch = _batch([[0, U, 1, 0], [1, 1, 0, U]], [True, False])
    with torch.no_grad():
        output = model.eval()(batch["image"], batch["available"])
    loss_fn = MultiTaskLoss()
    reference = loss_fn(output, batch, model.task_weighting).total

    # A zero label weight hides a label; a case without has_seg hides its segmentation.
    changed = dict(batch)
    changed["label_weight"] = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 1.0, 1.0, 1.0]])
    changed["labels"] = batch["labels"].clone()
    changed["labels"][1, 0] = 0  # was 1: now a different (but masked) label
    changed["seg"] = batch["seg"].clone()
    changed["seg"][1] = 3 - changed["seg"][1]
    masked_reference = loss_fn(output, {**batch, "label_weight": changed["label_weight"]}, model.task_weighting).total

    assert not torch.isclose(masked_reference, reference)  # the weight really masks something
    torch.testing.assert_close(loss_fn(output, changed, model.task_weighting).total, masked_reference)


def test_label_weight_scales_pseudo_labels() -> None:
    logits = torch.tensor([[2.0, -1.0], [0.5, 0.3]])
    cls = {t: logits for t in TASKS}
    batch = {
        "seg": torch.zeros(2, 1, 2, 2, 2, dtype=torch.int64),
        "has_seg": torch.tensor([False, False]),
        "labels": torch.tensor([[1, U, U, U], [0, U, U, U]]),
    }
    loss_fn = MultiTaskLoss()
    full = loss_fn(_logits_output(cls), batch, UncertaintyWeighting(("seg", *TASKS))).terms["cls_idh"]
    half = loss_fn(
        _logits_output(cls), {**batch, "label_weight": torch.full((2, 4), 0.5)}, UncertaintyWeighting(("seg", *TASKS))
    ).terms["cls_idh"]

    expected = F.cross_entropy(logits, torch.tensor([1, 0]))
    torch.testing.assert_close(full, expected)
    torch.testing.assert_close(half, 0.5 * expected)


def test_class_weights_from_labels() -> None:
    labels = np.array([[0, U, 1, 0], [0, U, 1, 1], [0, U, 1, U], [1, U, 1, U]])

    weights = class_weights_from_labels(labels)

    # add-one smoothed "balanced" weights (N + 2) / (2 (n_c + 1))
    # idh: 3 x class 0, 1 x class 1 -> 6/8, 6/4.
    torch.testing.assert_close(weights[0], torch.tensor([0.75, 1.5]))
    torch.testing.assert_close(weights[1], torch.ones(2))  # no labels at all: nothing to rebalance
    # a single class seen: the unseen class weighs most, the task does not fall back to ones
    torch.testing.assert_close(weights[2], torch.tensor([3.0, 6 / 10]))
    torch.testing.assert_close(weights[3], torch.ones(2))  # balanced
    torch.testing.assert_close(class_weights_from_labels(torch.from_numpy(labels)), weights)
    with pytest.raises(ValueError, match="values \\[2\\]"):
        class_weights_from_labels(np.array([[0], [2]]))


def test_weighted_ce_matches_hand_computed_value() -> None:
    logits = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]])
    labels = torch.tensor([[0, U, U, U], [1, U, U, U], [U, U, U, U]])
    weights = torch.ones(4, 2)
    weights[0] = torch.tensor([0.5, 2.0])
    loss_fn = MultiTaskLoss(class_weights=weights)
    batch = {"seg": torch.zeros(3, 1, 2, 2, 2, dtype=torch.int64), "has_seg": torch.zeros(3, dtype=torch.bool), "labels": labels}

    terms = loss_fn(_logits_output({t: logits for t in TASKS}, b=3), batch, UncertaintyWeighting(("seg", *TASKS))).terms

    ce0 = -math.log(math.exp(1) / (math.exp(1) + 1))
    ce1 = -math.log(math.exp(2) / (math.exp(2) + 1))
    assert terms["cls_idh"].item() == pytest.approx((0.5 * ce0 + 2.0 * ce1) / 2, rel=1e-5)


def test_balanced_softmax_and_focal_are_finite_and_correct() -> None:
    logits = torch.tensor([[1.0, -0.5], [0.2, 0.4]], requires_grad=True)
    labels = torch.tensor([[1, 0, 1, 0], [0, 0, 1, 1]])
    counts = torch.tensor([[30.0, 10.0], [5.0, 0.0], [0.0, 0.0], [1.0, 1.0]])  # incl. unseen classes
    batch = {"seg": torch.zeros(2, 1, 2, 2, 2, dtype=torch.int64), "has_seg": torch.zeros(2, dtype=torch.bool), "labels": labels}
    cls = {t: logits for t in TASKS}
    weighting = UncertaintyWeighting(("seg", *TASKS))

    balanced = MultiTaskLoss(cls_loss="balanced_softmax", class_counts=counts)(_logits_output(cls), batch, weighting)
    focal = MultiTaskLoss(cls_loss="focal", focal_gamma=2.0)(_logits_output(cls), batch, weighting)
    focal0 = MultiTaskLoss(cls_loss="focal", focal_gamma=0.0)(_logits_output(cls), batch, weighting)
    plain = MultiTaskLoss()(_logits_output(cls), batch, weighting)
    (balanced.total + focal.total).backward()

    assert torch.isfinite(balanced.total) and torch.isfinite(focal.total)
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
    prior = torch.log(torch.tensor([31.0, 11.0]) / 42.0)
    expected = F.cross_entropy(logits.detach() + prior, labels[:, 0])
    torch.testing.assert_close(balanced.terms["cls_idh"], expected)
    for name in plain.terms:  # gamma = 0 reduces the focal loss to cross-entropy
        torch.testing.assert_close(focal0.terms[name], plain.terms[name])
    assert all(focal.terms[n] < plain.terms[n] for n in plain.terms if n != "seg")


def test_uncertainty_weighting_matches_hand_computed_example() -> None:
    weighting = UncertaintyWeighting(("seg", "idh", "mgmt"))
    with torch.no_grad():
        weighting.log_vars.copy_(torch.tensor([0.5, -0.2, 1.0]))
    losses = {"seg": torch.tensor(2.0), "idh": torch.tensor(3.0)}  # mgmt absent in this batch

    total = weighting(losses)
    total.backward()

    expected = math.exp(-0.5) * 2.0 + 0.5 + math.exp(0.2) * 3.0 - 0.2
    assert total.item() == pytest.approx(expected, rel=1e-6)
    # d/ds (exp(-s) L + s) = 1 - exp(-s) L; an absent term's s gets no gradient at all.
    expected_grad = torch.tensor([1 - math.exp(-0.5) * 2.0, 1 - math.exp(0.2) * 3.0, 0.0])
    torch.testing.assert_close(weighting.log_vars.grad, expected_grad)
    assert weighting(losses, mode="equal").item() == pytest.approx(5.0)


def test_invalid_loss_configuration_raises() -> None:
    with pytest.raises(ValueError, match="did you mean 'focal'"):
        MultiTaskLoss(cls_loss="focall")
    with pytest.raises(ValueError, match="needs class_counts"):
        MultiTaskLoss(cls_loss="balanced_softmax")
    with pytest.raises(ValueError, match="did you mean 'equal'"):
        MultiTaskLoss(task_weighting="equals")
    with pytest.raises(ValueError, match="shape \\(4, 2\\)"):
        MultiTaskLoss(class_weights=torch.ones(3, 2))
    with pytest.raises(KeyError, match="survival"):
        UncertaintyWeighting(("seg", "idh"))({"survival": torch.tensor(1.0)})


def test_classification_only_leaves_the_segmentation_term_out() -> None:
    cfg = compose()
    model = build_model(cfg.model, SIZE, seed=0)
    batch = _batch([[0, 1, 0, 1], [1, 0, 1, 0]], [True, True])
    full = MultiTaskLoss()(model(batch["image"], batch["available"]), batch, model.task_weighting)
    only = MultiTaskLoss(segmentation=False)(model(batch["image"], batch["available"]), batch, model.task_weighting)
    assert full.terms["seg"] > 0 and only.terms["seg"] == 0 and "seg" not in only.weighted


# ----------------------------------------------------------------------------- survival (Cox)
def _risk_output(risk: torch.Tensor) -> GliomaOutput:
    b = risk.shape[0]
    cls = {t: torch.zeros(b, 2) for t in TASKS}
    return GliomaOutput(seg_logits=torch.zeros(b, 4, 2, 2, 2), cls_logits=cls, risk=risk)


def _survival_batch(survival: list[tuple[float, int]]) -> dict[str, torch.Tensor]:
    b = len(survival)
    return {"seg": torch.zeros(b, 1, 2, 2, 2, dtype=torch.int64), "has_seg": torch.zeros(b, dtype=torch.bool),
            "labels": torch.full((b, len(TASKS)), U), "survival": torch.tensor(survival, dtype=torch.float32)}


def test_cox_term_is_masked_where_survival_is_unknown() -> None:
    weighting = UncertaintyWeighting(("seg", *TASKS, "survival"))
    loss_fn = MultiTaskLoss()
    risk = torch.tensor([0.3, -0.2, 5.0], requires_grad=True)
    batch = _survival_batch([(100.0, 1), (400.0, 0), (50.0, U)])

    result = loss_fn(_risk_output(risk), batch, weighting)
    result.total.backward()

    assert result.terms["survival"] > 0 and risk.grad[2] == 0  # the unknown case takes no part
    assert risk.grad[0] < 0 < risk.grad[1]  # the earlier death should rank riskier
    none = loss_fn(_risk_output(risk), _survival_batch([(100.0, 0), (400.0, 0), (50.0, U)]), weighting)
    assert none.terms["survival"] == 0.0  # no death among the known cases: nothing to rank


def test_cox_loss_decreases_and_learns_the_ranking_on_a_learnable_case() -> None:
    """A linear risk of one feature that drives survival: the partial likelihood falls and the
    C-index of the learned risk approaches that of the true risk."""
    from common.evaluation.survival import concordance_index

    g = torch.Generator().manual_seed(0)
    n = 64
    x = torch.randn(n, 1, generator=g)
    days = torch.distributions.Exponential(torch.exp(1.5 * x[:, 0])).sample() * 365.0
    event = (torch.rand(n, generator=g) < 0.8).float()
    survival = torch.stack([days, event], dim=1)
    head = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.constant_(head.weight, -0.5)  # starts with the ranking reversed
    weighting = UncertaintyWeighting(("seg", *TASKS, "survival"))
    loss_fn = MultiTaskLoss(task_weighting="equal")
    optimizer = torch.optim.SGD(head.parameters(), lr=0.1)
    losses = []
    for _ in range(60):
        optimizer.zero_grad()
        result = loss_fn(_risk_output(head(x)[:, 0]), _survival_batch(survival.tolist()), weighting)
        result.total.backward()
        optimizer.step()
        losses.append(float(result.terms["survival"]))

    assert losses[-1] < losses[0] - 0.2
    learned = concordance_index(head(x)[:, 0].detach().numpy(), survival.numpy())
    assert learned > 0.7 and learned == pytest.approx(concordance_index(x[:, 0].numpy(), survival.numpy()))


def test_batch_dice_does_not_charge_a_whole_term_for_a_few_et_voxels_in_a_case_without_et() -> None:
    """train.seg_dice_batch: per case, four false enhancing-tumor voxels in a case whose reference has
    no ET cost that case's whole ET Dice term; over the batch they cost a few voxels' worth."""
    seg = torch.zeros(2, 1, SIZE, SIZE, SIZE, dtype=torch.int64)
    seg[:, :, 4:12, 4:12, 4:12] = 2  # edema in both cases
    seg[0, :, 6:10, 6:10, 6:10] = 3  # enhancing tumor in case 0 only
    predicted = seg.clone()
    predicted[1, :, 7:9, 7:9, 7] = 3  # four false ET voxels in case 1
    has_seg = torch.tensor([True, True])
    by_case, by_batch = MultiTaskLoss(dice_batch=False), MultiTaskLoss(dice_batch=True)

    def confident(labels: torch.Tensor) -> torch.Tensor:  # logits of a certain prediction of labels
        return F.one_hot(labels[:, 0], 4).permute(0, 4, 1, 2, 3).float() * 60.0

    per_case = by_case.segmentation(confident(predicted), seg, has_seg)
    batch = by_batch.segmentation(confident(predicted), seg, has_seg)
    assert by_case.segmentation(confident(seg), seg, has_seg) < 1e-3
    assert by_batch.segmentation(confident(seg), seg, has_seg) < 1e-3
    # the cross-entropy term is the same in both; the Dice terms differ by the empty case's ET term:
    # per case its Dice is 0 (loss 1 over 2 cases x 4 classes = 0.125), over the batch the ET Dice is
    # 2*64/(64+68) (loss 0.030 over 4 classes = 0.008)
    assert float(per_case - batch) == pytest.approx(0.125 - 0.0076, abs=0.003)
