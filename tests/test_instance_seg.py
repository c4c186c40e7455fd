"""Instance segmentation: targets and grouping (sdeseg.panoptic), mask AP / PQ, the instance model and
depth feature fusion."""

from __future__ import annotations

import math

import pytest
import torch

from sdeseg.config import ModelConfig
from sdeseg.metrics import MaskAP, PanopticQuality
from sdeseg.models import (
    DepthFusion,
    FeatureFusion,
    InstanceModel,
    ResNetEncoder,
    build_depth_model,
    build_instance_model,
    transfer_from_sde,
)
from sdeseg.panoptic import (
    center_sigma,
    find_centers,
    group_instances,
    instance_targets,
    instances_from_outputs,
    semantic_of,
)

ROAD, PERSON, CAR, TRUCK = 0, 11, 13, 14  # train ids
ROAD_ID, SKY_ID, PERSON_ID, CAR_ID = 7, 23, 24, 26  # label ids

# -------------------------------------------------------------------------- a hand-built scene
#   rows 2..8: car A (cols 2..9) touching car B (cols 10..17); rows 14..21: a person (cols 4..8)
H, W = 24, 24
BOXES = {  # instance id -> (rows, cols)
    CAR_ID * 1000: (slice(2, 9), slice(2, 10)),
    CAR_ID * 1000 + 1: (slice(2, 9), slice(10, 18)),
    PERSON_ID * 1000: (slice(14, 22), slice(4, 9)),
}


def scene_ids() -> torch.Tensor:
    ids = torch.full((H, W), ROAD_ID, dtype=torch.int64)
    ids[:1] = SKY_ID
    for value, (r, c) in BOXES.items():
        ids[r, c] = value
    return ids


def test_group_instances_from_hand_built_maps():
    ids = scene_ids()
    semantic = semantic_of(ids)
    semantic[3, 3] = TRUCK  # a stray vote: the car's majority keeps the whole instance a car
    centers = {CAR_ID * 1000: (5, 5, 0.9), CAR_ID * 1000 + 1: (5, 13, 0.95), PERSON_ID * 1000: (17, 6, 0.7)}
    heat = torch.zeros(1, H, W)
    offset = torch.zeros(2, H, W)
    gen = torch.Generator().manual_seed(0)
    for value, (cy, cx, score) in centers.items():
        heat[0, cy, cx] = score
        r, c = BOXES[value]
        ys, xs = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
        # offsets point at the centre up to +-0.4 px of noise: the nearest centre is still right
        noise = (torch.rand(2, H, W, generator=gen) - 0.5) * 0.8
        offset[0, r, c] = (cy - ys + noise[0])[r, c].float()
        offset[1, r, c] = (cx - xs + noise[1])[r, c].float()
    heat[0, 20, 20] = 0.05  # below the threshold: not a centre
    out, scores = group_instances(semantic, heat, offset, threshold=0.1, nms_kernel=3)
    expected = ids.clone()
    # numbered per class by descending score: car B (0.95) comes first
    expected[BOXES[CAR_ID * 1000]] = CAR_ID * 1000 + 1
    expected[BOXES[CAR_ID * 1000 + 1]] = CAR_ID * 1000
    assert torch.equal(out, expected)
    assert scores == pytest.approx({26000: 0.95, 26001: 0.9, 24000: 0.7})

    # the score with class probabilities: centre value x mean probability of the class
    probs = torch.full((19, H, W), 0.5)
    _, scored = group_instances(semantic, heat, offset, probs=probs, threshold=0.1, nms_kernel=3)
    assert scored == pytest.approx({26000: 0.475, 26001: 0.45, 24000: 0.35})

    # top_k=1 keeps car B's centre only: every thing pixel joins it, the majority (car) wins
    out1, scores1 = group_instances(semantic, heat, offset, threshold=0.1, nms_kernel=3, top_k=1)
    thing = ids >= 1000
    assert set(out1[thing].unique().tolist()) == {26000} and list(scores1) == [26000]
    # no centre at all: thing pixels keep their plain label id
    out0, scores0 = group_instances(semantic, heat, offset, threshold=0.99)
    assert scores0 == {} and set(out0[thing].unique().tolist()) == {PERSON_ID, CAR_ID, 27}


def test_find_centers_nms_threshold_topk():
    heat = torch.zeros(10, 10)
    heat[2, 2], heat[2, 4], heat[8, 8], heat[5, 5] = 0.9, 0.8, 0.7, 0.05
    yx, s = find_centers(heat, threshold=0.1, nms_kernel=5)
    assert yx.tolist() == [[2, 2], [8, 8]] and s.tolist() == pytest.approx([0.9, 0.7])  # (2,4) suppressed
    yx, _ = find_centers(heat, threshold=0.1, nms_kernel=1)
    assert yx.tolist() == [[2, 2], [2, 4], [8, 8]]
    yx, _ = find_centers(heat, threshold=0.01, nms_kernel=1, top_k=2)
    assert yx.tolist() == [[2, 2], [2, 4]]


def test_targets_and_round_trip():
    ids = scene_ids()
    ids[23, :] = 0  # void ("unlabeled")
    ids[10:12, 14:20] = CAR_ID  # a car region without an instance (a Cityscapes group)
    t = instance_targets(ids, sigma=2.0)
    assert t["center"].shape == (1, 1, H, W) and t["offset"].shape == (1, 2, H, W)
    # centres of mass, rounded half to even: car A (5, 5.5) -> (5, 6), car B (5, 13.5) -> (5, 14),
    # the person (17.5, 6) -> (18, 6)
    peaks = torch.nonzero(t["center"][0, 0] == 1.0).tolist()
    assert peaks == [[5, 6], [5, 14], [18, 6]]
    assert t["center"][0, 0, 5, 8] == pytest.approx(math.exp(-4 / 8))
    assert t["offset"][0, :, 2, 2].tolist() == [3.0, 4.0] and t["offset"][0, :, 0, 0].tolist() == [0.0, 0.0]
    assert torch.equal(t["offset_weight"][0, 0], (ids >= 1000).float())
    assert t["center_weight"][0, 0, 23].sum() == 0 and t["center_weight"][0, 0, 10:12, 14:20].sum() == 0
    assert t["center_weight"].sum() == H * W - W - 12
    assert t["semantic"][0, 3, 3] == CAR and t["semantic"][0, 23, 0] == 255
    assert center_sigma(1024) == 8.0 and center_sigma(256) == 2.0

    # targets -> grouping gives the instances back (the group region has no centre of its own)
    ids = scene_ids()
    t = instance_targets(ids[None], center_sigma(H, reference_height=96))
    out, scores = group_instances(t["semantic"][0], t["center"][0], t["offset"][0])
    # equal peaks come in raster order, which is how the scene numbers them
    assert torch.equal(out, ids)
    assert scores == {26000: 1.0, 26001: 1.0, 24000: 1.0}


def test_instances_from_model_outputs():
    model = build_instance_model(ModelConfig(width=8, decoder_channels=(8, 8, 16, 16, 32))).eval()
    with torch.no_grad():
        out = model(torch.rand(2, 3, 32, 64))
    assert out[("seg", 0)].shape == (2, 19, 32, 64)
    assert out[("center", 0)].shape == (2, 1, 32, 64) and out[("offset", 0)].shape == (2, 2, 32, 64)
    results = instances_from_outputs(out)
    assert len(results) == 2 and all(r[0].shape == (32, 64) for r in results)
    for ids, scores in results:
        assert set(scores) == {v for v in ids.unique().tolist() if v >= 1000}


# -------------------------------------------------------------------------- metrics


def test_mask_ap_perfect_empty_and_half():
    gt = scene_ids()
    perfect = MaskAP()
    perfect.update(gt, {26000: 0.9, 26001: 0.8, 24000: 0.7}, gt)
    res = perfect.compute()
    assert res["ap"] == 1.0 and res["ap50"] == 1.0
    assert res["ap_class"]["car"] == 1.0 and math.isnan(res["ap_class"]["bus"])  # no bus in the ground truth

    empty = MaskAP()
    empty.update(torch.full_like(gt, ROAD_ID), {}, gt)
    res = empty.compute()
    assert res["ap"] == 0.0 and res["ap50"] == 0.0

    # one of two cars found, no person: car AP = 51/101 (COCO's 101 recall points up to recall 0.5), person 0
    half = MaskAP()
    pred = gt.clone()
    pred[gt == 26001] = ROAD_ID
    pred[gt == 24000] = ROAD_ID
    half.update(pred, {26000: 0.9}, gt)
    res = half.compute()
    assert res["ap_class"]["car"] == pytest.approx(51 / 101) and res["ap_class"]["person"] == 0.0
    assert res["ap"] == pytest.approx(51 / 101 / 2) and res["ap50"] == pytest.approx(51 / 101 / 2)

    with pytest.raises(ValueError, match="no score"):
        MaskAP().update(gt, {}, gt)
    assert math.isnan(MaskAP().compute()["ap"])


def test_mask_ap_prints_nothing_where_print_is_patched(monkeypatch, capsys):
    """Ray Train's workers replace ``builtins.print`` with one that also logs every line, so
    redirecting stdout does not silence pycocotools there; the metric must not print at all."""
    import builtins

    lines = []
    monkeypatch.setattr(builtins, "print", lambda *args, **kwargs: lines.append(args))
    gt = scene_ids()
    ap = MaskAP()
    ap.update(gt, {26000: 0.9, 26001: 0.8, 24000: 0.7}, gt)
    assert ap.compute()["ap"] == 1.0
    assert lines == [] and capsys.readouterr().out == ""


def test_mask_ap_crowd_region_is_not_a_false_positive():
    gt = scene_ids()
    gt[gt == 26001] = CAR_ID  # car B is a group region (crowd) in the ground truth
    pred = scene_ids()  # predicted as an instance: matched to the crowd, ignored
    m = MaskAP()
    m.update(pred, {26000: 0.5, 26001: 0.9, 24000: 0.7}, gt)
    assert m.compute()["ap"] == pytest.approx(1.0)


def test_panoptic_quality_perfect_and_hand_computed():
    gt = scene_ids()
    m = PanopticQuality()
    m.update(gt, gt)
    res = m.compute()
    assert res["pq"] == 1.0 and res["sq"] == 1.0 and res["rq"] == 1.0 and res["pq_th"] == 1.0

    # 10x10, all road but car A (rows 0..3, cols 0..4: 20 px) and car B (rows 6..7, cols 0..4: 10 px)
    gt = torch.full((10, 10), ROAD_ID)
    gt[0:4, 0:5] = 26000
    gt[6:8, 0:5] = 26001
    pred = torch.full((10, 10), ROAD_ID)
    pred[0:4, 0:4] = 26000  # 16 px inside car A: IoU 16/20 = 0.8 -> TP
    pred[8:10, 6:10] = 26001  # 8 px on road: FP; car B is predicted road: FN
    m = PanopticQuality()
    m.update(pred[None], gt[None])
    res = m.compute()
    # road: gt 70 px, pred 76 px, overlap 62 -> IoU 62/84 = 31/42, TP
    pq_road, pq_car = 31 / 42, 0.8 / (1 + 0.5 + 0.5)
    assert res["pq_class"][ROAD] == pytest.approx(pq_road) and res["pq_class"][CAR] == pytest.approx(pq_car)
    assert res["pq"] == pytest.approx((pq_road + pq_car) / 2)
    assert res["pq_th"] == pytest.approx(pq_car) and res["pq_st"] == pytest.approx(pq_road)
    assert res["sq"] == pytest.approx((31 / 42 + 0.8) / 2) and res["rq"] == pytest.approx((1 + 0.5) / 2)
    assert math.isnan(res["pq_class"][PERSON])

    # state merges like a sum over images
    other = PanopticQuality()
    other.merge(m.state())
    other.merge(m.state())
    assert other.compute()["pq"] == pytest.approx(res["pq"])


def test_panoptic_quality_void_and_crowd():
    gt = torch.full((10, 10), ROAD_ID)
    gt[:, 5:] = 0  # void
    gt[0:4, 0:3] = CAR_ID  # a car group region: crowd
    pred = torch.full((10, 10), ROAD_ID)
    pred[0:4, 0:3] = 26000  # on the crowd region: ignored
    pred[:5, 5:], pred[5:, 5:] = 26001, 26002  # on void: ignored
    m = PanopticQuality()
    m.update(pred, gt)
    res = m.compute()
    # road: gt 38 px, pred 38 (void excluded from the union) -> IoU 1; no car TP, FP or FN
    assert res["pq"] == 1.0 and math.isnan(res["pq_class"][CAR])


# -------------------------------------------------------------------------- depth feature fusion


def _cfg() -> ModelConfig:
    return ModelConfig(width=8, decoder_channels=(8, 8, 16, 16, 32))


@pytest.mark.parametrize("stages", [(0,), (2, 4), (0, 1, 2, 3, 4)])
def test_depth_fusion_starts_as_identity_and_learns(stages):
    torch.manual_seed(0)
    depth_encoder = ResNetEncoder(18, width=8).eval().requires_grad_(False)  # frozen, another width
    plain = build_instance_model(_cfg())
    fused = build_instance_model(_cfg(), depth_encoder.num_ch_enc, stages)
    missing = fused.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert missing and all(k.startswith("fusion.") for k in missing)
    x = torch.rand(2, 3, 32, 64)
    with torch.no_grad():
        depth_feats = depth_encoder(torch.rand(2, 3, 48, 96))  # another resolution: resized to the student's
    plain.eval()
    fused.eval()
    with torch.no_grad():
        a, b = plain(x), fused(x, depth_feats)
    for key in a:
        assert torch.equal(a[key], b[key]), key

    fused.train()
    out = fused(x, depth_feats)
    loss = out[("seg", 0)].logsumexp(1).mean() + out[("center", 0)].pow(2).mean() + out[("offset", 0)].abs().mean()
    loss.backward()
    with torch.no_grad():  # one plain SGD step (torch.optim's first use imports torch._dynamo: seconds)
        for p in fused.parameters():
            if p.grad is not None:
                p -= 0.1 * p.grad
    assert all(fused.fusion.fuse[str(k)].conv.weight.abs().sum() > 0 for k in stages)
    plain.load_state_dict(fused.state_dict(), strict=False)  # same weights, no fusion
    plain.eval()
    fused.eval()
    with torch.no_grad():
        a, b = plain(x), fused(x, depth_feats)
        c = fused(x, [f.flip(-1) for f in depth_feats])
    assert not torch.allclose(a[("seg", 0)], b[("seg", 0)])
    assert not torch.allclose(b[("seg", 0)], c[("seg", 0)])  # the output now reads the depth features


def test_fusion_and_instance_model_contracts():
    with pytest.raises(ValueError, match="subset"):
        DepthFusion([8] * 5, [8] * 5, (5,))
    with pytest.raises(ValueError, match="channels"):
        FeatureFusion(8, 4)(torch.zeros(1, 8, 2, 2), torch.zeros(1, 5, 2, 2))
    fused = build_instance_model(_cfg(), [8, 8, 16, 32, 64], (1,))
    with pytest.raises(ValueError, match="depth_features"):
        fused(torch.rand(1, 3, 32, 32))
    plain = build_instance_model(_cfg())
    assert isinstance(plain, InstanceModel)
    with pytest.raises(ValueError, match="depth_features"):
        plain(torch.rand(1, 3, 32, 32), [torch.zeros(1)] * 5)
    # the SDE model's encoder and decoder body transfer, as into the segmentation model
    report = transfer_from_sde(plain, build_depth_model(_cfg()).state_dict())
    assert report.loaded and all(k.startswith(("encoder.", "decoder.body.")) for k in report.loaded)
    assert {k.split(".")[0] for k in report.initialised} == {"decoder", "head"}
