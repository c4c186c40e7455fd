"""``sdeseg.camera.scale_intrinsics``: one function for numpy (data prep) and torch (losses)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import sdeseg.camera as camera
from sdeseg.camera import scale_intrinsics

SIZES = [((32, 64), (16, 32)), ((96, 192), (24, 48)), ((64, 128), (48, 80)), ((30, 40), (75, 100))]


def random_K(rng: np.random.Generator, hw: tuple[int, int]) -> np.ndarray:
    h, w = hw
    f = rng.uniform(0.5, 1.5) * w
    return np.array([[f, rng.uniform(-1, 1), rng.uniform(0.4, 0.6) * w],
                     [0.0, f * rng.uniform(0.9, 1.1), rng.uniform(0.4, 0.6) * h],
                     [0.0, 0.0, 1.0]])


def test_centred_principal_point_stays_centred():
    K = np.array([[100.0, 0, 31.5], [0, 90.0, 15.5], [0, 0, 1]])  # principal point at the image centre
    K2 = scale_intrinsics(K, (32, 64), (16, 32))
    np.testing.assert_allclose(K2, [[50, 0, 15.5], [0, 45, 7.5], [0, 0, 1]])  # still the centre


@pytest.mark.parametrize("src, dst", SIZES)
def test_numpy_and_torch_agree(src, dst):
    K = random_K(np.random.default_rng(0), src)
    out_np = scale_intrinsics(K, src, dst)
    out_t = scale_intrinsics(torch.from_numpy(K), src, dst)
    assert isinstance(out_np, np.ndarray) and out_np.dtype == np.float64
    assert isinstance(out_t, torch.Tensor) and out_t.dtype == torch.float64
    np.testing.assert_array_equal(out_t.numpy(), out_np)  # same formula: bit-identical in float64
    np.testing.assert_array_equal(scale_intrinsics(K.tolist(), src, dst), out_np)  # array-likes work


def test_batched_torch_input():
    rng = np.random.default_rng(1)
    src, dst = (96, 192), (48, 96)
    Ks = np.stack([np.stack([random_K(rng, src) for _ in range(3)]) for _ in range(2)])  # (2,3,3,3)
    before = torch.from_numpy(Ks).float()
    K = before.clone().requires_grad_(True)
    out = scale_intrinsics(K, src, dst)
    assert out.shape == (2, 3, 3, 3) and out.dtype == torch.float32
    for i in range(2):
        for j in range(3):
            np.testing.assert_allclose(out[i, j].detach().numpy(), scale_intrinsics(Ks[i, j], src, dst), rtol=1e-6)
    assert torch.equal(K.detach(), before)  # the input is not modified
    out.sum().backward()  # differentiable (the losses scale predicted-pose inputs' K in the graph)
    assert torch.allclose(K.grad[..., 0, :], torch.tensor(0.5)) and torch.equal(K.grad[..., 2, :], torch.ones(2, 3, 3))
    # one K broadcast over a batch (expand() gives a stride-0 view)
    many = scale_intrinsics(before[0, 0].expand(4, 3, 3), src, dst)
    assert many.shape == (4, 3, 3) and torch.equal(many[3], scale_intrinsics(before[0, 0], src, dst))


def blob(hw: tuple[int, int], uv: np.ndarray, sigma: float) -> np.ndarray:
    """(H,W) float32 Gaussian centred at pixel coordinates ``uv`` (integer = pixel centre)."""
    v, u = np.mgrid[: hw[0], : hw[1]].astype(np.float64)
    return np.exp(-((u - uv[0]) ** 2 + (v - uv[1]) ** 2) / (2 * sigma**2)).astype(np.float32)


def centroid(img: np.ndarray) -> np.ndarray:
    v, u = np.mgrid[: img.shape[0], : img.shape[1]]
    return np.array([(u * img).sum(), (v * img).sum()]) / img.sum()


def project(K: np.ndarray, X: np.ndarray) -> np.ndarray:
    x = K @ X
    return x[:2] / x[2]


@pytest.mark.parametrize("src, dst", SIZES)
def test_projected_point_lands_where_the_resize_puts_it(src, dst):
    """A blob drawn around the projection of a 3-D point, resized like the data (PIL area /
    bilinear) or the losses (``F.interpolate``), is centred on the projection through the
    scaled intrinsics."""
    rng = np.random.default_rng(2)
    K = random_K(rng, src)
    X = np.array([rng.uniform(-1, 1), rng.uniform(-0.5, 0.5), rng.uniform(4, 8)])
    uv = project(K, X)
    assert 0.3 * src[1] < uv[0] < 0.7 * src[1] and 0.3 * src[0] < uv[1] < 0.7 * src[0]
    img = blob(src, uv, sigma=0.06 * src[0])
    expected = project(scale_intrinsics(K, src, dst), X)
    shrink = dst[0] <= src[0]
    pil = Image.fromarray(img).resize((dst[1], dst[0]), Image.Resampling.BOX if shrink else Image.Resampling.BILINEAR)
    np.testing.assert_allclose(centroid(np.asarray(pil)), expected, atol=0.02)
    batch = torch.from_numpy(img)[None, None].expand(2, 1, *src)
    small = F.interpolate(batch, size=dst, mode="bilinear", align_corners=False, antialias=True)
    K_t = scale_intrinsics(torch.from_numpy(K).expand(2, 3, 3), src, dst)
    for b in range(2):
        np.testing.assert_allclose(centroid(small[b, 0].numpy()), project(K_t[b].numpy(), X), atol=0.02)


def test_module_is_pure():
    """numpy (and torch, only for type checking) plus the standard library: the losses and the
    data-prep workers both import it, and the workers must not pay torch's import time."""
    tree = ast.parse(open(camera.__file__).read())
    modules = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    modules |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert {m.split(".")[0] for m in modules} <= {"__future__", "sys", "typing", "numpy", "torch"}
    assert not any(m.startswith("sdeseg") for m in modules)
    code = "import sys, data_prep.cityscapes, data_prep.gta, sdeseg.camera; print('torch' in sys.modules)"
    root = os.path.dirname(os.path.dirname(camera.__file__))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root)
    assert out.stdout.strip() == "False"
