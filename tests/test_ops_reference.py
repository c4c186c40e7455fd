"""Reference ops against hand-computed cases and numerical gradients."""

import torch

from sdeseg.ops import depth_mix, inverse_warp, photometric_error
from sdeseg.ops.photometric_error.reference import SSIM_C1


def _k(b, fx=20.0, cx=3.3, cy=2.1, dtype=torch.float64):
    K = torch.tensor([[fx, 0, cx], [0, fx, cy], [0, 0, 1]], dtype=dtype)
    return K.repeat(b, 1, 1)


def test_depth_mix_batch_of_3_and_4_pairs_with_next_image():
    for b in (3, 4):
        torch.manual_seed(b)
        depth = torch.rand(b, 1, 5, 6) * 10 + 0.1
        img = torch.rand(b, 3, 5, 6)
        lab = torch.randint(0, 19, (b, 5, 6))
        mask, (mimg, mlab) = depth_mix(depth, img, lab)
        for i in range(b):
            j = (i + 1) % b
            closer_i = depth[i, 0] < depth[j, 0]
            assert torch.equal(mask[i, 0], closer_i)
            assert torch.equal(mlab[i], torch.where(closer_i, lab[i], lab[j]))
            assert torch.equal(mimg[i], torch.where(closer_i, img[i], img[j]))
        assert mlab.dtype == lab.dtype and mimg.shape == img.shape


def test_depth_mix_perm_and_eps():
    depth = torch.tensor([1.0, 2.0]).view(2, 1, 1, 1)
    x = torch.tensor([10.0, 20.0]).view(2, 1, 1, 1)
    mask, (mx,) = depth_mix(depth, x, perm=torch.tensor([1, 0]), eps=0.0)
    assert mask.view(-1).tolist() == [True, False] and mx.view(-1).tolist() == [10.0, 10.0]
    mask, (mx,) = depth_mix(depth, x, perm=torch.tensor([1, 0]), eps=1.5)
    assert mask.view(-1).tolist() == [True, True] and mx.view(-1).tolist() == [10.0, 20.0]


def test_inverse_warp_identity_returns_input():
    b, h, w = 2, 6, 9
    src = torch.rand(b, 3, h, w, dtype=torch.float64)
    depth = torch.full((b, 1, h, w), 7.0, dtype=torch.float64)
    T = torch.eye(4, dtype=torch.float64).repeat(b, 1, 1)
    out = inverse_warp(src, depth, T, _k(b))
    assert torch.allclose(out, src, atol=1e-12)


def test_inverse_warp_pure_translation_shifts_by_known_pixels():
    # X_src = X_tgt + t; t_x = 0.5 m at depth 10 m with fx = 20 -> u_src = u + 1 exactly
    b, h, w = 1, 5, 8
    src = torch.rand(b, 2, h, w, dtype=torch.float64)
    depth = torch.full((b, 1, h, w), 10.0, dtype=torch.float64)
    T = torch.eye(4, dtype=torch.float64)[None].clone()
    T[0, 0, 3] = 0.5
    out = inverse_warp(src, depth, T, _k(b))
    assert torch.allclose(out[..., :-1], src[..., 1:], atol=1e-10)
    assert torch.allclose(out[..., -1], src[..., -1], atol=1e-10)  # border padding
    T[0, 0, 3] = 0.0
    T[0, 1, 3] = -1.0  # v_src = v - 2
    out = inverse_warp(src, depth, T, _k(b))
    assert torch.allclose(out[:, :, 2:], src[:, :, :-2], atol=1e-10)


def test_inverse_warp_gradcheck_float64():
    torch.manual_seed(0)
    b, h, w = 2, 5, 7
    src = torch.rand(b, 3, h, w, dtype=torch.float64, requires_grad=True)
    depth = (torch.rand(b, 1, h, w, dtype=torch.float64) + 1).requires_grad_()
    T = torch.eye(4, dtype=torch.float64).repeat(b, 1, 1)
    T[:, :3, 3] = torch.tensor([0.05, 0.03, 0.7], dtype=torch.float64)
    T.requires_grad_()
    K = _k(b, fx=5.0)  # non-integer principal point: no projection lands on a bilinear kink
    assert torch.autograd.gradcheck(lambda s, d, t: inverse_warp(s, d, t, K), (src, depth, T))


def test_photometric_error_hand_values_and_gradcheck():
    a, c = 0.3, 0.7
    pred = torch.full((1, 3, 4, 5), a, dtype=torch.float64)
    target = torch.full((1, 3, 4, 5), c, dtype=torch.float64)
    ssim = (2 * a * c + SSIM_C1) / (a * a + c * c + SSIM_C1)  # variances are 0 for constant images
    expected = 0.85 * (1 - ssim) / 2 + 0.15 * abs(a - c)
    out = photometric_error(pred, target)
    assert out.shape == (1, 1, 4, 5)
    assert torch.allclose(out, torch.full_like(out, expected), atol=1e-12)
    x = torch.rand(2, 3, 6, 5, dtype=torch.float64)
    assert torch.allclose(photometric_error(x, x), torch.zeros(2, 1, 6, 5, dtype=torch.float64), atol=1e-12)
    y = torch.rand(2, 3, 6, 5, dtype=torch.float64)
    assert torch.allclose(photometric_error(x, y, alpha=0.0), (x - y).abs().mean(1, keepdim=True))
    x.requires_grad_()
    assert torch.autograd.gradcheck(lambda p: photometric_error(p, y), (x,))
