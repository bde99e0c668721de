"""ConfusionMatrix against an independent implementation (torchmetrics)."""
import math

import pytest
import torch
from torchmetrics.functional.classification import multiclass_accuracy, multiclass_jaccard_index

from harness.metrics import ConfusionMatrix


def _random_case(seed: int, n_cls: int = 12):
    g = torch.Generator().manual_seed(seed)
    label = torch.randint(0, n_cls, (4, 37, 53), generator=g)
    pred = torch.where(torch.rand(label.shape, generator=g) < 0.6, label,
                       torch.randint(0, n_cls, label.shape, generator=g))
    label[torch.rand(label.shape, generator=g) < 0.15] = 255
    label[label == 3] = 255  # class 3 absent from the labels (may still be predicted)
    pred[pred == 5] = 6      # class 5 never predicted (still labelled)
    label[label == 8] = 9    # class 8 absent from both
    pred[pred == 8] = 9
    return pred, label


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_torchmetrics(seed):
    n = 12
    pred, label = _random_case(seed, n)
    cm = ConfusionMatrix(n)
    for p, l in zip(pred, label):  # streamed image by image
        cm.update(p, l)
    out = cm.compute()
    iou = multiclass_jaccard_index(pred, label, n, average="none", ignore_index=255)
    acc = multiclass_accuracy(pred, label, n, average="none", ignore_index=255)
    assert math.isnan(out["IoU"][8]) and math.isnan(out["Acc"][8]) and math.isnan(out["Acc"][3])
    assert out["IoU"][5] == 0.0
    present = [c for c in range(n) if c != 8]
    assert torch.allclose(torch.tensor([out["IoU"][c] for c in present], dtype=torch.float64),
                          iou[present].double() * 100, atol=1e-4)
    labelled = [c for c in range(n) if c not in (3, 8)]
    assert torch.allclose(torch.tensor([out["Acc"][c] for c in labelled], dtype=torch.float64),
                          acc[labelled].double() * 100, atol=1e-4)
    assert out["mIoU"] == pytest.approx(iou[present].double().mean().item() * 100, abs=1e-4)
    assert out["mAcc"] == pytest.approx(acc[labelled].double().mean().item() * 100, abs=1e-4)
    micro = multiclass_accuracy(pred, label, n, average="micro", ignore_index=255)
    assert out["aAcc"] == pytest.approx(micro.item() * 100, abs=1e-4)


def test_merge_equals_one_pass_and_perfect_is_100():
    pred, label = _random_case(4)
    whole, a, b = ConfusionMatrix(12), ConfusionMatrix(12), ConfusionMatrix(12)
    whole.update(pred, label)
    a.update(pred[:2], label[:2])
    b.update(pred[2:], label[2:])
    assert torch.equal(a.merge(b).mat, whole.mat)
    perfect = ConfusionMatrix(12)
    perfect.update(label.clamp(max=11), label)
    assert perfect.compute()["mIoU"] == 100.0


def test_bad_values_are_rejected():
    cm = ConfusionMatrix(4)
    with pytest.raises(ValueError, match="label values"):
        cm.update(torch.zeros(3, dtype=torch.long), torch.tensor([0, 7, 255]))
    with pytest.raises(ValueError, match="shape"):
        cm.update(torch.zeros(3), torch.zeros(4))


def test_bookkeeping_rules_on_a_hand_computed_case():
    # labels 0 0 1 1 (255 ignored), predictions 0 1 1 2 (0 under the ignored pixel): class 2 is
    # predicted but never labelled, class 3 is absent from both.
    cm = ConfusionMatrix(4)
    cm.update(torch.tensor([0, 1, 1, 2, 0]), torch.tensor([0, 0, 1, 1, 255]))
    # I = [1, 1, 0, 0], labelled = [2, 2, 0, 0], predicted = [1, 2, 1, 0], union = [2, 3, 1, 0]
    mm = cm.compute("mmseg")
    assert mm["IoU"][:3] == pytest.approx([50.0, 100 / 3, 0.0]) and math.isnan(mm["IoU"][3])
    assert mm["mIoU"] == pytest.approx((50 + 100 / 3 + 0) / 3)  # class 3 left out of the mean
    assert mm["Acc"][:2] == pytest.approx([50.0, 50.0]) and math.isnan(mm["Acc"][2]) and math.isnan(mm["Acc"][3])
    assert mm["mAcc"] == pytest.approx(50.0) and mm["aAcc"] == pytest.approx(50.0)
    pv = cm.compute("paddlevit")
    assert pv["IoU"] == pytest.approx([50.0, 100 / 3, 0.0, 0.0])
    assert pv["mIoU"] == pytest.approx((50 + 100 / 3 + 0 + 0) / 4)  # class 3 counted as IoU 0
    assert pv["Acc"] == pytest.approx([100.0, 50.0, 0.0, 0.0])  # I / predicted, 0 where none predicted
    assert pv["mAcc"] == pytest.approx(37.5) and pv["aAcc"] == pytest.approx(50.0)
    with pytest.raises(ValueError, match="bookkeeping"):
        cm.compute("torchmetrics")
