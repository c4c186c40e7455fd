"""Crop / flip keep K, T and depth consistent with the warp; colour jitter is per sample."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sdeseg.config import AugmentConfig
from sdeseg.data.augment import (
    Geometric,
    Jitter,
    adjust_hue,
    apply_geometric,
    augment_sample,
    color_jitter,
    crop_window,
    draw_jitter,
    flip_K,
    hsv_to_rgb,
    rgb_to_hsv,
)
from sdeseg.ops import inverse_warp
from sdeseg.ops.inverse_warp.reference import project_coords

H, W = 24, 40


def rodrigues(axis_angle: np.ndarray) -> np.ndarray:
    theta = np.linalg.norm(axis_angle)
    k = axis_angle / theta
    Kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + np.sin(theta) * Kx + (1 - np.cos(theta)) * Kx @ Kx


def smooth(rng: np.random.Generator, channels: int, lo: float, hi: float) -> np.ndarray:
    """(H,W,C) float64: bilinear upsampling of a coarse random grid, in [lo, hi]."""
    coarse = torch.from_numpy(rng.uniform(lo, hi, (1, channels, 4, 6)))
    return F.interpolate(coarse, size=(H, W), mode="bilinear", align_corners=True)[0].permute(1, 2, 0).numpy()


def scene(seed: int) -> dict:
    """A GT-consistent sample: smooth frames and depth, a small rigid motion, an off-centre K."""
    rng = np.random.default_rng(seed)
    T = np.eye(4)
    T[:3, :3] = rodrigues(rng.normal(size=3) * 0.03)
    T[:3, 3] = rng.normal(size=3) * 0.2
    K = np.array([[30.0, 0.0, 17.3], [0.0, 28.0, 10.6], [0.0, 0.0, 1.0]])
    return {
        "key": "syn/train/x",
        "meta": {"K": K.tolist(), "T_prev": T.tolist(), "T_next": np.linalg.inv(T).tolist()},
        "frames": {f: smooth(rng, 3, 0.0, 1.0) for f in (-1, 0, 1)},
        "label": rng.integers(0, 19, (H, W)).astype(np.uint8),
        "depth": smooth(rng, 1, 2.0, 6.0)[..., 0],
    }


def warp(s: dict, fid: int = -1) -> torch.Tensor:
    """Warp frame ``fid`` into frame 0 with the sample's own depth, T and K: (1,3,h,w) float64."""
    src = torch.from_numpy(np.ascontiguousarray(s["frames"][fid])).permute(2, 0, 1)[None]
    depth = torch.from_numpy(np.ascontiguousarray(s["depth"]))[None, None]
    T = torch.from_numpy(np.asarray(s["T"][fid]))[None]
    K = torch.from_numpy(np.asarray(s["K"]))[None]
    return inverse_warp(src, depth, T, K)


def as_geo(sample: dict) -> dict:
    """The identity geometric augmentation (puts K/T where ``warp`` expects them)."""
    return apply_geometric(sample, Geometric(0, 0, H, W, False))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("fid", [-1, 1])
def test_flip_commutes_with_the_warp(seed, fid):
    sample = scene(seed)
    flipped = apply_geometric(sample, Geometric(0, 0, H, W, True))
    expected = torch.flip(warp(as_geo(sample), fid), dims=[-1])
    assert torch.allclose(warp(flipped, fid), expected, atol=1e-6)
    # and the label / depth / frames are mirrored
    assert np.array_equal(flipped["label"], sample["label"][:, ::-1])
    assert np.array_equal(flipped["depth"], sample["depth"][:, ::-1])


def test_flip_K_pixel_centre_convention():
    K = np.array([[30.0, 0.5, 17.3], [0.0, 28.0, 10.6], [0.0, 0.0, 1.0]])
    Kf = flip_K(K, W)
    assert Kf[0, 2] == pytest.approx((W - 1) - 17.3)
    assert Kf[0, 1] == pytest.approx(-0.5) and Kf[0, 0] == 30.0 and Kf[1, 1] == 28.0
    assert np.allclose(flip_K(Kf, W), K)


@pytest.mark.parametrize("flip", [False, True])
def test_crop_moves_the_projection_with_the_window(flip):
    sample = scene(3)
    y0, x0, h, w = 5, 9, 12, 20
    full = as_geo(sample)
    cut = apply_geometric(sample, Geometric(y0, x0, h, w, flip))
    # geometry: the projections of the cropped frame are those of the full frame, shifted
    if not flip:
        pc = project_coords(torch.from_numpy(np.ascontiguousarray(cut["depth"]))[None, None],
                            torch.from_numpy(cut["T"][-1])[None], torch.from_numpy(cut["K"])[None])
        pf = project_coords(torch.from_numpy(full["depth"])[None, None],
                            torch.from_numpy(full["T"][-1])[None], torch.from_numpy(full["K"])[None])
        shift = torch.tensor([x0, y0], dtype=pf.dtype).view(1, 2, 1, 1)
        assert torch.allclose(pc, pf[..., y0:y0 + h, x0:x0 + w] - shift, atol=1e-9)
    # warp: equal wherever the sampling point stays inside the window (elsewhere the
    # crop's border padding differs from the full image's pixels, as it should)
    ref = warp(full)[..., y0:y0 + h, x0:x0 + w]
    pf = project_coords(torch.from_numpy(full["depth"])[None, None],
                        torch.from_numpy(full["T"][-1])[None], torch.from_numpy(full["K"])[None])
    pf = pf[..., y0:y0 + h, x0:x0 + w]
    u, v = pf[:, 0], pf[:, 1]
    inside = ((u >= x0) & (u <= x0 + w - 1) & (v >= y0) & (v <= y0 + h - 1))[:, None]
    got = warp(cut)
    if flip:
        got = torch.flip(got, dims=[-1])
    assert inside.float().mean() > 0.5
    assert torch.allclose(torch.where(inside, got, 0), torch.where(inside, ref, 0), atol=1e-6)


def test_crop_window_sizes():
    rng = np.random.default_rng(0)
    assert crop_window(8, 16, (8, 16), rng) == (0, 0)  # already the crop size: no crop
    assert crop_window(10, 20, (8, 16), None) == (1, 2)  # centred
    for _ in range(20):
        y0, x0 = crop_window(10, 20, (8, 16), rng)
        assert 0 <= y0 <= 2 and 0 <= x0 <= 4
    with pytest.raises(ValueError, match="smaller than the crop"):
        crop_window(6, 20, (8, 16), rng)


def test_augment_sample_uses_one_jitter_for_all_frames():
    sample = scene(4)
    sample["frames"] = {f: (np.full((H, W, 3), 0.5) * 255).astype(np.uint8) for f in (-1, 0, 1)}
    out = augment_sample(sample, (16, 32), AugmentConfig(), np.random.default_rng(1), (-1, 0, 1))
    assert out["images"][0].shape == (3, 16, 32)
    # identical frames + the same jitter -> identical jittered frames, different from the input
    assert torch.equal(out["images_aug"][-1], out["images_aug"][0])
    assert torch.equal(out["images_aug"][1], out["images_aug"][0])
    assert not torch.equal(out["images_aug"][0], out["images"][0])
    off = AugmentConfig(brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0)
    assert augment_sample(sample, (16, 32), off, np.random.default_rng(1), (0,))["images_aug"] is None


def test_augment_sample_geometry_matches_apply_geometric():
    sample = scene(5)
    sample["frames"] = {f: (img * 255).astype(np.uint8) for f, img in sample["frames"].items()}
    flips = 0
    for seed in range(8):
        out = augment_sample(sample, (16, 32), AugmentConfig(), np.random.default_rng(seed), (-1, 0, 1))
        K = out["K"].double().numpy()
        # cx = 17.3 - x0 unflipped, (32 - 1) - (17.3 - x0) flipped: the fraction tells them apart
        flipped = abs(K[0, 2] % 1.0 - 0.7) < 1e-4
        flips += flipped
        T = out["T"][-1].double().numpy()
        T0 = np.asarray(sample["meta"]["T_prev"])
        mirror = np.diag([-1.0, 1.0, 1.0, 1.0])
        assert np.allclose(T, mirror @ T0 @ mirror if flipped else T0, atol=1e-6)
    assert 0 < flips < 8


def test_color_jitter_identity_and_hsv_roundtrip():
    img = torch.rand(2, 3, 5, 7)
    assert torch.allclose(hsv_to_rgb(rgb_to_hsv(img)), img, atol=1e-5)
    assert color_jitter(img, draw_jitter(None, np.random.default_rng(0))) is img
    jit = draw_jitter(AugmentConfig(), np.random.default_rng(0))
    out = color_jitter(img, jit)
    assert out.shape == img.shape and 0 <= float(out.min()) and float(out.max()) <= 1


def hue_reference(img: torch.Tensor, shift: float) -> torch.Tensor:
    """torchvision's adjust_hue: the HSV round trip."""
    h, s, v = rgb_to_hsv(img).unbind(-3)
    return hsv_to_rgb(torch.stack([(h + shift) % 1.0, s, v], -3))


def awkward_images(seed: int) -> torch.Tensor:
    """(2,3,9,11) random colours plus greys, black, white and ties for the maximum channel."""
    img = torch.rand(2, 3, 9, 11, generator=torch.Generator().manual_seed(seed))
    img[:, :, 0] = 0.4  # grey
    img[:, :, 1, :2] = 0.0
    img[:, :, 1, 2:4] = 1.0
    img[:, 1, 2] = img[:, 0, 2]  # r == g
    img[:, 2, 3] = img[:, 1, 3]  # g == b
    img[:, 2, 4] = img[:, 0, 4]  # r == b
    return img


@pytest.mark.parametrize("shift", [0.0, 0.1, -0.23, 0.5, -0.5, 0.97])
def test_adjust_hue_equals_the_hsv_round_trip(shift):
    img = awkward_images(0)
    assert torch.allclose(adjust_hue(img, shift), hue_reference(img, shift), atol=1e-5)
    # one shift per image, as a tensor
    shifts = torch.tensor([shift, 0.3]).view(2, 1, 1)
    both = adjust_hue(img, shifts)
    assert torch.allclose(both[0], hue_reference(img[0], shift), atol=1e-5)
    assert torch.allclose(both[1], hue_reference(img[1], 0.3), atol=1e-5)


def test_hue_shift_of_pure_colours():
    red = torch.zeros(3, 2, 2)
    red[0] = 1.0
    green, blue = red.roll(1, 0), red.roll(2, 0)
    assert torch.allclose(color_jitter(red, Jitter(hue=1 / 3)), green, atol=1e-6)
    assert torch.allclose(color_jitter(red, Jitter(hue=-1 / 3)), blue, atol=1e-6)
    yellow = red + green
    assert torch.allclose(color_jitter(red, Jitter(hue=1 / 6)), yellow, atol=1e-6)
    grey = torch.full((3, 2, 2), 0.3)
    assert torch.allclose(color_jitter(grey, Jitter(hue=0.4)), grey)  # greys have no hue


def test_color_jitter_contrast_uses_each_images_own_mean_luma():
    img = awkward_images(1)
    jit = Jitter(contrast=0.5)
    luma = 0.299 * img[:, 0] + 0.587 * img[:, 1] + 0.114 * img[:, 2]
    for i in range(2):
        expected = 0.5 * img[i] + 0.5 * luma[i].mean()
        assert torch.allclose(color_jitter(img[i], jit), expected, atol=1e-6)  # one (3,H,W) image
    assert torch.allclose(color_jitter(img, jit)[1], color_jitter(img[1], jit), atol=1e-6)  # (F,3,H,W)
    assert luma[0].mean() != luma[1].mean()


def test_color_jitter_per_image_jitters_match_one_at_a_time():
    img = awkward_images(2)
    before = img.clone()
    jitters = [Jitter(1.2, 0.8, 1.3, 0.15), Jitter(0.9, 1.1, 0.7, -0.4)]
    out = color_jitter(img, jitters)
    assert torch.equal(img, before)  # the input is never modified
    for i, jit in enumerate(jitters):
        assert torch.allclose(out[i], color_jitter(img[i], jit), atol=1e-6)
    assert out.min() >= 0 and out.max() <= 1
    # identity is free; a batch of jitters must match the batch and share one order
    assert color_jitter(img, [Jitter(), Jitter()]) is img
    with pytest.raises(ValueError, match="one common order"):
        color_jitter(img, [Jitter(1.2), Jitter(1.2, order=(3, 2, 1, 0))])
    with pytest.raises(ValueError, match="one common order"):
        color_jitter(img, [Jitter(1.2)])


def test_color_jitter_follows_the_order():
    img = awkward_images(3)
    bright_then_contrast = color_jitter(img, Jitter(brightness=1.5, contrast=0.5, order=(0, 1, 2, 3)))
    contrast_then_bright = color_jitter(img, Jitter(brightness=1.5, contrast=0.5, order=(1, 0, 2, 3)))
    step = (img * 1.5).clamp(0, 1)
    mean_luma = (0.299 * step[:, 0] + 0.587 * step[:, 1] + 0.114 * step[:, 2]).mean(dim=(-2, -1))
    expected = (0.5 * step + 0.5 * mean_luma.view(2, 1, 1, 1)).clamp(0, 1)
    assert torch.allclose(bright_then_contrast, expected, atol=1e-6)
    assert not torch.allclose(bright_then_contrast, contrast_then_bright, atol=1e-3)
