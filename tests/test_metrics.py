import math

import pytest
import torch

from sdeseg.metrics import DepthMetric, SegmentationMetric, depth_errors


def test_segmentation_metric_hand_computed():
    m = SegmentationMetric(num_classes=3, ignore_index=255)
    target = torch.tensor([[0, 0, 1, 1], [2, 255, 1, 0]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 0, 0]])
    m.update(pred[:1], target[:1])
    m.update(pred[1:], target[1:])  # accumulates over updates
    out = m.compute()
    # class 0: TP 2 (0,0),(1,3); FP 1 (1,2); FN 1 (0,1) -> 2/4
    # class 1: TP 2; FP 1 (0,1); FN 1 (1,2) -> 2/4 ; class 2: TP 1 -> 1
    assert out["iou"] == pytest.approx([0.5, 0.5, 1.0])
    assert out["miou"] == pytest.approx(2 / 3)
    assert out["acc"] == pytest.approx(5 / 7)


def test_confusions_say_where_each_class_goes():
    m = SegmentationMetric(num_classes=4, ignore_index=255)
    # class 0: 4 pixels, 1 right, 2 as class 2, 1 as class 1; class 1: all right; class 2: 1 of 2 as class 3;
    # class 3: no ground truth (left out)
    m.update(torch.tensor([0, 2, 2, 1, 1, 1, 2, 3, 0]), torch.tensor([0, 0, 0, 0, 1, 1, 2, 2, 255]))
    got = m.confusions()
    assert [c for c, *_ in got] == [0, 1, 2]
    assert got[0] == (0, 0.25, [(2, 0.5), (1, 0.25)])
    assert got[1] == (1, 1.0, [])  # nothing mistaken: no pairs with share 0
    assert got[2] == (2, 0.5, [(3, 0.5)])
    assert m.confusions(top=1)[0][2] == [(2, 0.5)]
    # equal shares: the smaller class id first
    m = SegmentationMetric(num_classes=3)
    m.update(torch.tensor([2, 1]), torch.tensor([0, 0]))
    assert m.confusions()[0] == (0, 0.0, [(1, 0.5), (2, 0.5)])


def test_segmentation_metric_absent_class_is_nan_and_excluded():
    m = SegmentationMetric(num_classes=3)
    m.update(torch.tensor([0, 0, 1]), torch.tensor([0, 0, 1]))
    out = m.compute()
    assert math.isnan(out["iou"][2]) and out["miou"] == pytest.approx(1.0)


def test_segmentation_metric_rejects_bad_target():
    m = SegmentationMetric(num_classes=3)
    with pytest.raises(ValueError, match="outside"):
        m.update(torch.tensor([0]), torch.tensor([7]))


def test_depth_errors_hand_computed():
    gt = torch.tensor([[[2.0, 4.0], [0.0, 100.0]]])  # 0 and 100 are outside (1e-3, 80)
    pred = torch.tensor([[[1.0, 4.0], [5.0, 5.0]]])
    e = depth_errors(pred, gt, median_scaling=False)
    assert e["abs_rel"] == pytest.approx((0.5 + 0.0) / 2)
    assert e["sq_rel"] == pytest.approx((1.0 / 2 + 0) / 2)
    assert e["rmse"] == pytest.approx(math.sqrt(0.5))
    assert e["a1"] == pytest.approx(0.5) and e["a2"] == pytest.approx(0.5) and e["a3"] == pytest.approx(0.5)
    # median scaling: pred x3 of gt everywhere -> perfect
    e = depth_errors(gt[:, :1] * 3, gt[:, :1])
    assert e["abs_rel"] == pytest.approx(0.0, abs=1e-12) and e["a1"] == 1.0


def test_depth_errors_average_per_image_and_accumulator():
    gt = torch.tensor([[[1.0, 1.0]], [[2.0, 2.0]]])
    pred = torch.tensor([[[2.0, 2.0]], [[2.0, 2.0]]])
    e = depth_errors(pred, gt, median_scaling=False)
    assert e["abs_rel"] == pytest.approx((1.0 + 0.0) / 2)
    acc = DepthMetric(median_scaling=False)
    acc.update(pred[:1], gt[:1])
    acc.update(pred[1:], gt[1:])
    assert acc.compute()["abs_rel"] == pytest.approx(e["abs_rel"])
