"""Losses: self-supervised depth on a scene with known geometry, smoothness, segmentation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sdeseg.config import ConfigError, DepthLossConfig, SemisegConfig
from sdeseg.losses import (
    class_floors,
    cross_entropy,
    edge_aware_smoothness,
    pseudo_label_loss,
    pseudo_label_seg_loss,
    pseudo_label_weight,
    sde_loss,
    supervised_seg_loss,
    unsup_rampup,
)
from sdeseg.models import DepthRange, ResNetEncoder, transformation_from_parameters

H, W = 32, 64
FX, Z, BASELINE = 32.0, 4.0, 0.25
SHIFT = int(FX * BASELINE / Z)  # image motion of the plane per frame: 2 pixels


def plane_scene(batch: int = 2, static: bool = False):
    """A textured fronto-parallel plane at depth Z seen by a camera moving +BASELINE along
    x per frame (frame f's camera at x = f*BASELINE), so I_f(u) = I_0(u + f*SHIFT).

    Returns images (frame -1, 0, 1), K and the true transforms frame 0 -> frame f.
    With ``static`` all three frames are identical (a camera that does not move).
    """
    g = torch.Generator().manual_seed(0)
    texture = torch.rand(batch, 3, H, W + 2 * SHIFT, generator=g)
    texture = F.avg_pool2d(texture, 3, 1, 1, count_include_pad=False)  # natural-image-like gradients
    images = {
        f: texture[..., SHIFT + (0 if static else f * SHIFT) :][..., :W].contiguous() for f in (-1, 0, 1)
    }
    K = torch.tensor([[FX, 0, (W - 1) / 2], [0, FX, (H - 1) / 2], [0, 0, 1]]).expand(batch, 3, 3)
    # one step forward in time moves points by -BASELINE in camera x; frame -1 inverts it
    step = torch.tensor([-BASELINE, 0.0, 0.0]).expand(batch, 3)
    T = {f: transformation_from_parameters(torch.zeros(batch, 3), step, invert=f < 0) for f in (-1, 1)}
    return images, K, T


def plane_outputs(T, depth: float, cfg: DepthLossConfig, batch: int = 2, requires_grad: bool = False):
    out = {("T", f): t for f, t in T.items()}
    for s in range(cfg.num_scales):
        disp = torch.full(
            (batch, 1, H >> s, W >> s),
            float(DepthRange.from_config(cfg).sigmoid(torch.tensor(depth))),
        )
        out[("disp", s)] = disp.requires_grad_(requires_grad)
    return out


@pytest.mark.parametrize("automask", [True, False])
@pytest.mark.parametrize("scale_mode", ["full", "pyramid"])
@pytest.mark.parametrize("disp_mapping", ["inverse", "log"])
def test_sde_loss_vanishes_for_true_depth_and_pose(automask, scale_mode, disp_mapping):
    # pyramid: 2 scales, since at 8x16 and 4x8 pixels the image border dominates any error
    num_scales = 2 if scale_mode == "pyramid" else 4
    cfg = DepthLossConfig(automask=automask, scale_mode=scale_mode, disp_mapping=disp_mapping, num_scales=num_scales)
    images, K, T = plane_scene()
    losses = sde_loss(images, plane_outputs(T, Z, cfg), K, None, cfg).terms
    assert set(losses) == {"depth/photo", "depth/smooth", "depth/total"}
    assert all(v.dim() == 0 and torch.isfinite(v) for v in losses.values())
    assert losses["depth/photo"].abs() < 1e-3
    assert losses["depth/smooth"].abs() < 1e-9  # constant disparity
    # twice the depth halves the predicted motion: a clearly worse fit
    wrong = sde_loss(images, plane_outputs(T, 2 * Z, cfg), K, None, cfg).terms
    assert wrong["depth/photo"] > 0.02


def test_sde_loss_is_differentiable():
    cfg = DepthLossConfig()
    images, K, T = plane_scene()
    rot = torch.zeros(2, 3, requires_grad=True)
    trans = torch.tensor([[-0.2, 0.0, 0.0]] * 2, requires_grad=True)
    T = {f: transformation_from_parameters(rot, trans, invert=f < 0) for f in (-1, 1)}
    outputs = plane_outputs(T, 3.0, cfg, requires_grad=True)
    losses, stats = sde_loss(images, outputs, K, torch.linalg.inv(K), cfg, generator=torch.Generator())
    losses["depth/total"].backward()
    for g in [rot.grad, trans.grad] + [outputs[("disp", s)].grad for s in range(4)]:
        assert g is not None and torch.isfinite(g).all()
    assert trans.grad.abs().sum() > 0 and outputs[("disp", 0)].grad.abs().sum() > 0
    assert stats[("warped", 1, 0)].shape == (2, 3, H, W) and not stats[("warped", 1, 0)].requires_grad
    assert stats[("automask", 3)].shape == (2, 1, H, W)


@pytest.mark.parametrize("scale_mode", ["full", "pyramid"])
def test_automask_masks_static_pixels(scale_mode):
    cfg = DepthLossConfig(scale_mode=scale_mode)
    images, K, T = plane_scene(static=True)  # frames identical, yet the "pose" says motion
    losses, stats = sde_loss(images, plane_outputs(T, Z, cfg), K, None, cfg)
    for s in range(cfg.num_scales):
        assert stats[("automask", s)].sum() == 0  # identity wins everywhere: all masked
    assert losses["depth/photo"].abs() < 1e-4  # only the tie-breaking noise remains
    unmasked = sde_loss(
        images, plane_outputs(T, Z, cfg), K, None, DepthLossConfig(automask=False, scale_mode=scale_mode)
    ).terms
    assert unmasked["depth/photo"] > 0.02


def test_edge_aware_smoothness_by_hand():
    disp = torch.tensor([[[[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]]]])  # mean 2 -> [.5, 1, 1.5] per row
    image = torch.zeros(1, 3, 2, 3)
    image[..., 2] = 1.0  # an edge between columns 1 and 2
    # x: steps of 0.5, the second one across the edge (weight e^-1), 2 rows; y: no change
    expected = (0.5 + 0.5 * math.exp(-1)) / 2
    assert torch.allclose(edge_aware_smoothness(disp, image), torch.tensor(expected))
    # scaling disparity does not change the normalised smoothness
    assert torch.allclose(edge_aware_smoothness(10 * disp, image), torch.tensor(expected))


def test_smoothness_weight_per_scale():
    cfg = DepthLossConfig(num_scales=2, smoothness=0.1)
    images, K, T = plane_scene(batch=1)
    images = {f: torch.zeros_like(v) for f, v in images.items()}  # no image edges
    outputs = plane_outputs(T, Z, cfg, batch=1)
    for s in range(2):
        ramp = torch.arange(W >> s, dtype=torch.float32) + 1
        outputs[("disp", s)] = (ramp / ramp.mean()).expand(1, 1, H >> s, W >> s) * 0.1
    # normalised step in x is 1/mean = 2/(w+1); the y term is 0
    per_scale = [2 / ((W >> s) + 1) for s in range(2)]
    expected = (0.1 * per_scale[0] + 0.1 / 2 * per_scale[1]) / 2
    got = sde_loss(images, outputs, K, None, cfg).terms["depth/smooth"]
    assert torch.allclose(got, torch.tensor(expected), rtol=1e-4)


def test_feature_distance_needs_encoder():
    cfg = DepthLossConfig(feature_distance=0.5)
    images, K, T = plane_scene()
    outputs = plane_outputs(T, Z, cfg)
    with pytest.raises(ValueError, match="frozen ImageNet encoder"):
        sde_loss(images, outputs, K, None, cfg)
    enc = ResNetEncoder(18, width=8).eval()
    outputs[("enc", 4)] = enc(images[0])[-1] + 1.0  # off by one everywhere
    losses = sde_loss(images, outputs, K, None, cfg, imagenet_encoder=enc).terms
    n = outputs[("enc", 4)].numel()
    assert torch.allclose(losses["depth/feat"], torch.tensor(0.5 * math.sqrt(n)), rtol=1e-4)
    total = losses["depth/photo"] + losses["depth/smooth"] + losses["depth/feat"]
    assert torch.allclose(losses["depth/total"], total)


# ----------------------------------------------------------------------------- segmentation


def test_pseudo_label_weighting_by_hand():
    # 4 pixels: confident class 0, confident class 1 (exactly at the threshold),
    # unconfident class 0, and an all-zero vector (ground-truth ignore mixed in)
    probs = torch.tensor([[0.99, 0.032, 0.6, 0.0], [0.01, 0.968, 0.4, 0.0]]).reshape(1, 2, 2, 2)
    logits = torch.randn(1, 2, 2, 2, requires_grad=True)
    loss, q = pseudo_label_loss(logits, probs, threshold=0.968)
    assert q.item() == 0.5
    logp = torch.log_softmax(logits, 1).reshape(2, 4)
    ce = [-logp[0, 0], -logp[1, 1], -logp[0, 2], torch.tensor(0.0)]  # ignore pixel contributes 0
    expected = 0.5 * sum(ce) / 4  # averaged over all pixels, as in the paper's code
    assert torch.allclose(loss, expected)
    loss.backward()
    assert logits.grad[..., 1, 1].abs().sum() == 0  # nothing flows from the ignore pixel

    cfg = SemisegConfig(unsup_weight=2.0)
    terms, stats = pseudo_label_seg_loss({("seg", 0): logits}, probs, cfg)
    assert torch.allclose(terms["seg/unsup"], 2 * expected) and stats["seg/confident"] == 0.5

    # per-pixel weighting: only the two confident pixels count, divided by all 4 pixels
    logits.grad = None
    loss, q = pseudo_label_loss(logits, probs, threshold=0.968, weighting="pixel")
    assert q.item() == 0.5 and torch.allclose(loss, (ce[0] + ce[1]) / 4)
    loss.backward()
    assert logits.grad[..., 1, 0].abs().sum() == 0  # the unconfident pixel teaches nothing
    assert logits.grad[..., 0, 0].abs().sum() > 0
    cfg = SemisegConfig(pseudo_weighting="pixel")
    assert torch.allclose(pseudo_label_seg_loss({("seg", 0): logits}, probs, cfg).terms["seg/unsup"], loss)
    with pytest.raises(ValueError, match="weighting"):
        pseudo_label_loss(logits, probs, threshold=0.968, weighting="median")


def test_class_balanced_pseudo_label_weight_by_hand():
    # 2 classes over 8 pixels (one image, 2 x 4). Class 0 (5 pixels): maxima 0.99, 0.98, 0.97, 0.7,
    # 0.6 -> its 3rd largest (ceil(0.5 * 5)) is 0.97 >= the threshold 0.968, so the floor stays
    # 0.968 and the three above it count. Class 1 (2 pixels): maxima 0.8, 0.55 -> its 1st largest
    # is 0.8, below the threshold: the floor drops to 0.8 and that pixel counts too. The last pixel
    # is an all-zero vector (ground-truth ignore): never counts.
    p0 = torch.tensor([0.99, 0.98, 0.97, 0.7, 0.6, 0.2, 0.45, 0.0])
    p1 = torch.tensor([0.01, 0.02, 0.03, 0.3, 0.4, 0.8, 0.55, 0.0])
    probs = torch.stack([p0, p1]).reshape(1, 2, 2, 4)
    weight, q = pseudo_label_weight(probs, threshold=0.968, weighting="class", class_share=0.5)
    assert q.item() == 3 / 8  # the global confident fraction, whatever the weighting
    assert weight.flatten().tolist() == [1, 1, 1, 0, 0, 1, 0, 0]
    # share 1: every pixel with a pseudo-label counts (each class's floor is its smallest maximum)
    weight, _ = pseudo_label_weight(probs, threshold=0.968, weighting="class", class_share=1.0)
    assert weight.flatten().tolist() == [1, 1, 1, 1, 1, 1, 1, 0]
    # the floors are the batch's: a second image of class 1 at 0.9 raises class 1's floor to 0.9
    # (5th largest of its 10 maxima), and the first image's 0.8 no longer counts
    sure = torch.stack([torch.full((8,), 0.1), torch.full((8,), 0.9)]).reshape(1, 2, 2, 4)
    weight, _ = pseudo_label_weight(torch.cat([probs, sure]), threshold=0.968, weighting="class")
    assert weight[0].flatten().tolist() == [1, 1, 1, 0, 0, 0, 0, 0]
    assert weight[1].flatten().tolist() == [1] * 8
    # "pixel" and "fraction" for comparison, and the loss takes the class weights
    assert pseudo_label_weight(probs, 0.968, "pixel")[0].flatten().tolist() == [1, 1, 1, 0, 0, 0, 0, 0]
    assert torch.equal(pseudo_label_weight(probs, 0.968, "fraction")[0], torch.full((1, 2, 4), 3 / 8))
    logits = torch.randn(1, 2, 2, 4)
    ce = -torch.log_softmax(logits, 1).gather(1, probs.argmax(1, keepdim=True))[:, 0]
    loss, _ = pseudo_label_loss(logits, probs, threshold=0.968, weighting="class")
    expected = ce.flatten()[[0, 1, 2, 5]].sum() / 8
    assert torch.allclose(loss, expected)
    cfg = SemisegConfig(pseudo_weighting="class", pseudo_class_share=1.0)
    loss = pseudo_label_seg_loss({("seg", 0): logits}, probs, cfg).terms["seg/unsup"]
    assert torch.allclose(loss, ce.flatten()[:7].sum() / 8)
    with pytest.raises(ValueError, match="class_share"):
        pseudo_label_weight(probs, 0.968, "class", class_share=0.0)
    with pytest.raises(ConfigError, match="semiseg.pseudo_class_share"):
        SemisegConfig(pseudo_class_share=1.5)


@pytest.mark.parametrize("share", [0.2, 0.5, 1.0])
def test_class_floors_match_a_per_class_sort(share):
    g = torch.Generator().manual_seed(3)
    probs = torch.softmax(torch.randn(3, 7, 9, 11, generator=g) * 3, dim=1)
    probs[0, :, :2] = 0.0  # ground-truth ignore mixed in: never counted
    max_probs, pseudo = probs.max(1)
    floors = class_floors(max_probs, pseudo, 9, 0.968, share)  # classes 7, 8 have no pixel
    for c in range(9):
        conf = max_probs[(pseudo == c) & (max_probs > 0)]
        if conf.numel() == 0:
            assert floors[c] == 0.968
            continue
        kth = conf.sort(descending=True).values[math.ceil(share * conf.numel()) - 1]
        assert floors[c] == min(0.968, kth.item())
        assert (conf >= floors[c]).sum() >= math.ceil(share * conf.numel())  # each class keeps its share
    empty = class_floors(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.long), 4, 0.9, 0.5)
    assert empty.tolist() == pytest.approx([0.9] * 4)


def test_unsup_rampup_by_hand():
    assert unsup_rampup(0, 0) == 1.0 and unsup_rampup(5, 0) == 1.0  # no ramp: the paper
    assert unsup_rampup(0, 100) == pytest.approx(math.exp(-5))
    assert unsup_rampup(50, 100) == pytest.approx(math.exp(-5 * 0.25))
    assert unsup_rampup(100, 100) == 1.0 and unsup_rampup(1000, 100) == 1.0
    ramp = [unsup_rampup(s, 100) for s in range(101)]
    assert all(a < b for a, b in zip(ramp[:100], ramp[1:]))  # strictly rising to 1
    # the stage passes its step: the pseudo-label term is scaled by the ramp
    probs = torch.softmax(torch.randn(1, 3, 4, 4) * 5, 1)
    logits = torch.randn(1, 3, 4, 4)
    cfg = SemisegConfig(unsup_rampup_steps=100, pseudo_threshold=0.5)
    full = pseudo_label_seg_loss({("seg", 0): logits}, probs, cfg).terms["seg/unsup"]
    half = pseudo_label_seg_loss({("seg", 0): logits}, probs, cfg, step=50).terms["seg/unsup"]
    assert full > 0 and torch.allclose(half, full * math.exp(-1.25))
    with pytest.raises(ConfigError, match="semiseg.unsup_rampup_steps"):
        SemisegConfig(unsup_rampup_steps=-1)


def test_supervised_losses():
    cfg = SemisegConfig(aux_weight=0.5)
    logits = torch.randn(2, 4, H, W)
    label = torch.randint(0, 4, (2, H, W))
    label[0, :5] = 255
    ref = F.cross_entropy(logits, label, ignore_index=255)
    out = supervised_seg_loss({("seg", 0): logits, ("seg_aux", 0): logits}, label, cfg).terms
    assert torch.allclose(out["seg/sup"], ref) and torch.allclose(out["seg/aux"], 0.5 * ref)
    assert set(supervised_seg_loss({("seg", 0): logits}, label, cfg).terms) == {"seg/sup"}
    # low-resolution logits are upsampled to the label
    assert torch.isfinite(cross_entropy(logits[..., ::2, ::2], label))
    # nothing labelled: 0 with a graph, not NaN
    empty = torch.full_like(label, 255)
    z = cross_entropy(logits.requires_grad_(), empty)
    assert z.item() == 0.0 and z.requires_grad
