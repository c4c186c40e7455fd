"""DepthMix / ClassMix on whole batches, ground truth in the pool, strong augmentation."""

from __future__ import annotations

import math

import pytest
import torch

from sdeseg.data.augment import Jitter, color_jitter, rgb_to_hsv
from sdeseg.losses import pseudo_label_loss
from sdeseg.mixing import (
    classmix_batch,
    depth_mix_batch,
    labels_to_probs,
    mix_partners,
    rebalance_weights,
    strong_augment,
)

H, W, C = 8, 12, 5


def tagged_batch(b: int, g: torch.Generator):
    """Images whose every pixel value names its image and position; labels and depth random."""
    idx = torch.arange(b * 3 * H * W, dtype=torch.float32).reshape(b, 3, H, W)
    label = torch.randint(0, C, (b, H, W), generator=g)
    label[:, 0, 0] = 255
    depth = torch.rand(b, 1, H, W, generator=g) * 50 + 1
    return idx, label, depth


@pytest.mark.parametrize("b", [3, 4])
@pytest.mark.parametrize("random_partners", [False, True])
def test_depth_mix_keeps_the_closer_image(b, random_partners):
    g = torch.Generator().manual_seed(b)
    images, label, depth = tagged_batch(b, g)
    probs = labels_to_probs(label, C)
    mix = depth_mix_batch(images, depth, probs=probs, label=label, generator=g if random_partners else None)

    perm = mix.perm
    assert sorted(perm.tolist()) == list(range(b)) and (perm != torch.arange(b)).all()
    if not random_partners:
        assert perm.tolist() == [(i + 1) % b for i in range(b)]
    for i in range(b):
        j = int(perm[i])
        closer_is_i = depth[i, 0] < depth[j, 0]  # (H,W)
        assert torch.equal(mix.mask[i, 0], closer_is_i)
        assert torch.equal(mix.label[i], torch.where(closer_is_i, label[i], label[j]))
        assert torch.equal(mix.image[i], torch.where(closer_is_i, images[i], images[j]))
        assert torch.equal(mix.probs[i], torch.where(closer_is_i, probs[i], probs[j]))
        # both images contribute somewhere (random depths)
        assert 0 < closer_is_i.sum() < H * W


def test_depth_mix_eps_and_single_image():
    g = torch.Generator().manual_seed(0)
    images, label, depth = tagged_batch(2, g)
    mix = depth_mix_batch(images, depth, eps=100.0)  # everything of image i is "close enough"
    assert mix.mask.all() and torch.equal(mix.image, images) and mix.probs is None and mix.label is None
    one = depth_mix_batch(images[:1], depth[:1], label=label[:1], generator=g)
    assert torch.equal(one.image, images[:1]) and torch.equal(one.label, label[:1])
    assert mix_partners(1, g).tolist() == [0]


@pytest.mark.parametrize("b", [2, 3])
def test_classmix_mask_covers_exactly_the_chosen_classes(b):
    g = torch.Generator().manual_seed(1)
    images, label, _ = tagged_batch(b, g)
    probs = torch.softmax(torch.randn(b, C, H, W, generator=g) * 3, 1)
    mix = classmix_batch(images, probs, label=label, generator=g)
    argmax = probs.argmax(1)
    for i in range(b):
        m = mix.mask[i, 0]
        inside, outside = set(argmax[i][m].tolist()), set(argmax[i][~m].tolist())
        present = set(argmax[i].flatten().tolist())
        assert inside.isdisjoint(outside)  # a chosen class is pasted whole
        assert len(inside) == len(present) // 2
        j = int(mix.perm[i])
        assert torch.equal(mix.image[i], torch.where(m, images[i], images[j]))
        assert torch.equal(mix.probs[i], torch.where(m, probs[i], probs[j]))
        assert torch.equal(mix.label[i], torch.where(m, label[i], label[j]))


def test_ground_truth_in_the_pool():
    label = torch.tensor([[[0, 2], [255, 1]]])
    probs = labels_to_probs(label, 3)
    assert probs.shape == (1, 3, 2, 2)
    assert torch.equal(probs[0, :, 1, 0], torch.zeros(3))  # ignore: no class, no confidence
    assert torch.equal(probs.argmax(1)[0, 0], torch.tensor([0, 2]))
    # after mixing, such pixels stay ignored by the pseudo-label loss
    logits = torch.randn(1, 3, 2, 2, requires_grad=True)
    loss, q = pseudo_label_loss(logits, probs, threshold=0.968)
    assert q.item() == 0.75
    loss.backward()
    assert logits.grad[0, :, 1, 0].abs().sum() == 0
    with pytest.raises(ValueError):
        labels_to_probs(torch.tensor([[[3]]]), 3)

    # ClassMix never treats ignore pixels as a class of their own
    g = torch.Generator().manual_seed(0)
    pool = labels_to_probs(torch.tensor([[[255, 0], [1, 1]], [[2, 2], [2, 0]]]), 3)
    mix = classmix_batch(torch.rand(2, 3, 2, 2), pool, generator=g)
    assert not mix.mask[0, 0, 0, 0]


def test_rebalance_weights_restore_the_pool_class_shares():
    # pool of 2 images, 4 pixels each: image 0 all class 0 (near), image 1 = class 1 (far) x3
    # and one ignore pixel; DepthMix keeps image 0 everywhere in both mixes.
    pool = torch.tensor([[0, 0, 0, 0], [1, 1, 1, 255]]).reshape(2, 2, 2)
    depth = torch.tensor([[1.0] * 4, [9.0] * 4]).reshape(2, 1, 2, 2)
    probs = labels_to_probs(pool, 2)
    mix = depth_mix_batch(probs.clone(), depth, probs=probs, perm=torch.tensor([1, 0]))
    assert (mix.probs.argmax(1) == 0).all()  # class 1 vanished from the targets
    w = rebalance_weights(probs, mix.probs)
    # class 0: pool share 4/7, mixed share 8/8 -> weight 4/7 at every (class-0) pixel
    assert torch.allclose(w, torch.full((2, 2, 2), 4 / 7))

    # a mix that keeps half of class 0 and all of class 1 (pool 4:3 -> mixed 2:3 + 3 more of
    # class 1 from the other image): shares 4/7, 3/7 before; counted by hand after
    mixed = torch.stack([labels_to_probs(torch.tensor([[[0, 0], [1, 1]]]), 2)[0],
                         labels_to_probs(torch.tensor([[[1, 1], [1, 255]]]), 2)[0]])
    w = rebalance_weights(probs, mixed)
    lab = mixed.max(1)
    m0, m1 = 2 / 7, 5 / 7  # mixed shares over the 7 labelled pixels
    expected = torch.where(lab.indices == 0, (4 / 7) / m0, (3 / 7) / m1)
    expected = torch.where(lab.values > 0, expected, torch.ones_like(expected))  # ignore pixel: 1
    assert torch.allclose(w, expected)
    labelled = lab.values > 0
    assert torch.isclose(w[labelled].mean(), torch.tensor(1.0))  # unclamped: the loss scale is kept
    assert torch.allclose(rebalance_weights(probs, mixed, clamp=(0.9, 1.1)), expected.clamp(0.9, 1.1))

    # the loss takes the weights per pixel; q does not depend on them
    logits = torch.randn(2, 2, 2, 2)
    plain, q = pseudo_label_loss(logits, mixed, threshold=0.968)
    weighted, q_w = pseudo_label_loss(logits, mixed, threshold=0.968, pixel_weight=w)
    ce = torch.nn.functional.cross_entropy(logits, mixed.argmax(1).masked_fill(~labelled, 255),
                                           ignore_index=255, reduction="none")
    assert q == q_w and torch.allclose(weighted, q * (ce * w).mean())
    assert not torch.allclose(weighted, plain)


def test_strong_augment():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 16, 24, generator=g)
    assert torch.equal(strong_augment(x, g, jitter=0.0, blur=False), x)
    a = strong_augment(x, torch.Generator().manual_seed(5), jitter=0.2, jitter_prob=1.0, blur_prob=1.0)
    b = strong_augment(x, torch.Generator().manual_seed(5), jitter=0.2, jitter_prob=1.0, blur_prob=1.0)
    assert torch.equal(a, b) and a.shape == x.shape
    assert a.min() >= 0 and a.max() <= 1 and not torch.allclose(a, x)
    # blur alone keeps a constant image and smooths noise
    flat = torch.full((1, 3, 16, 24), 0.3)
    assert torch.allclose(strong_augment(flat, g, jitter=0.0, blur_prob=1.0), flat, atol=1e-6)
    blurred = strong_augment(x, g, jitter=0.0, blur_prob=1.0)
    assert blurred.std() < x.std()


@pytest.mark.parametrize("jitter_prob", [1.0, 0.5])
def test_strong_augment_jitter_is_the_reader_jitter(jitter_prob):
    """Per image, the jitter is :func:`sdeseg.data.augment.color_jitter` with factors from the
    generator's uniforms u (drawn as (B,7), one row per image): applied when u0 < jitter_prob,
    brightness, contrast, saturation 1-s+2*s*u1..u3, hue (2*u4-1)*s, in the order b, c, s, h."""
    s, b = 0.3, 6
    x = torch.rand(b, 3, 16, 24, generator=torch.Generator().manual_seed(1))
    x_before = x.clone()
    out = strong_augment(x, torch.Generator().manual_seed(7), jitter=s, blur=False, jitter_prob=jitter_prob,
                         hue_space="hsv")
    assert torch.equal(x, x_before)  # the input is not modified
    u = torch.rand(b, 7, generator=torch.Generator().manual_seed(7))
    chosen = 0
    for i in range(b):
        if u[i, 0] < jitter_prob:
            chosen += 1
            f = (1 - s + 2 * s * u[i, 1:4]).tolist()
            jit = Jitter(*f, hue=(2 * u[i, 4].item() - 1) * s, order=(0, 1, 2, 3))
            assert torch.allclose(out[i], color_jitter(x[i], jit), atol=1e-6)
            assert not torch.allclose(out[i], x[i], atol=1e-3)
        else:
            assert torch.equal(out[i], x[i])
    assert 0 < chosen <= b and (chosen < b or jitter_prob == 1.0)


def test_strong_augment_shifts_hue_in_hsv():
    """A saturated colour keeps its saturation and value under the strong jitter's hue shift
    (HSV rotation, torchvision semantics); only brightness/contrast/saturation change them."""
    img = torch.zeros(2, 3, 4, 4)
    img[:, 0] = 1.0  # pure red
    out = strong_augment(img, torch.Generator().manual_seed(3), jitter=0.3, blur=False, jitter_prob=1.0,
                         hue_space="hsv")
    hsv_in, hsv_out = rgb_to_hsv(img), rgb_to_hsv(out)
    u = torch.rand(2, 7, generator=torch.Generator().manual_seed(3))
    for i in range(2):
        # the hue moved by the drawn shift (contrast/brightness/saturation of a flat red image
        # change s and v, never the hue)
        shift = ((2 * u[i, 4] - 1) * 0.3).item()
        assert torch.allclose(hsv_out[i, 0], torch.full((4, 4), shift % 1.0), atol=1e-5)
        assert not torch.allclose(hsv_out[i, 0], hsv_in[i, 0])


def test_strong_augment_yiq_hue_is_a_chroma_rotation_per_image():
    """The default hue step rotates YIQ's (I, Q) plane by 2*pi*shift, each image its own shift:
    written out here with an explicit matrix per image (before the final clamp, luma Y is kept)."""
    s, b = 0.3, 4
    x = torch.rand(b, 3, 8, 12, generator=torch.Generator().manual_seed(2)) * 0.5 + 0.25
    out = strong_augment(x, torch.Generator().manual_seed(9), jitter=s, blur=False, jitter_prob=1.0)
    u = torch.rand(b, 7, generator=torch.Generator().manual_seed(9))
    yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], dtype=torch.float64)
    for i in range(b):
        f = (1 - s + 2 * s * u[i, 1:4]).tolist()
        before_hue = color_jitter(x[i], Jitter(*f, hue=0.0, order=(0, 1, 2, 3)))
        theta = 2 * math.pi * (2 * u[i, 4].item() - 1) * s
        rot = torch.tensor([[1, 0, 0], [0, math.cos(theta), -math.sin(theta)], [0, math.sin(theta), math.cos(theta)]],
                           dtype=torch.float64)
        m = (torch.linalg.inv(yiq) @ rot @ yiq).float()
        rotated = torch.einsum("ij,jhw->ihw", m, before_hue)
        assert torch.allclose(out[i], rotated.clamp(0, 1), atol=1e-5)
        luma = torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)
        assert torch.allclose((rotated * luma).sum(0), (before_hue * luma).sum(0), atol=1e-4)
    with pytest.raises(ValueError, match="hue_space"):
        color_jitter(x[0], Jitter(hue=0.1, hue_space="lab"))
