"""Coherent depth regions: depth discontinuities stay apart, ids are contiguous, runs repeat."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage.segmentation import slic

from sdeseg.regions import _lab, _merge, _superpixels, colour_regions, default_segments, depth_regions

H, W = 48, 64
NEAR, FAR = 5.0, 40.0


def two_planes(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left half a fronto-parallel plane at 5 m, right half at 40 m; nearly the same colour
    (1-2 Lab units apart, plus a little noise), so colour alone cannot tell them apart."""
    g = torch.Generator().manual_seed(seed)
    image = torch.empty(3, H, W)
    image[:, :, : W // 2] = torch.tensor([0.50, 0.45, 0.40]).view(3, 1, 1)
    image[:, :, W // 2:] = torch.tensor([0.52, 0.46, 0.41]).view(3, 1, 1)
    image = (image + 0.01 * torch.randn(3, H, W, generator=g)).clamp(0, 1)
    depth = torch.full((H, W), FAR)
    depth[:, : W // 2] = NEAR
    K = torch.tensor([[60.0, 0.0, (W - 1) / 2], [0.0, 60.0, (H - 1) / 2], [0.0, 0.0, 1.0]])
    return image, depth, K


def spanning(regions: torch.Tensor) -> list[int]:
    """Ids of regions with pixels on both planes."""
    left, right = set(regions[:, : W // 2].unique().tolist()), set(regions[:, W // 2:].unique().tolist())
    return sorted(left & right)


def check_ids(regions: torch.Tensor) -> int:
    """Every pixel has an id, ids are 0..R-1 in raster order of first occurrence; returns R."""
    assert regions.shape == (H, W) and regions.dtype == torch.int64
    flat = regions.flatten().tolist()
    first = list(dict.fromkeys(flat))  # ids in order of first occurrence
    assert first == list(range(len(first)))
    return len(first)


@pytest.mark.parametrize("seed", [0, 1])
def test_depth_regions_keep_the_two_planes_apart(seed):
    image, depth, K = two_planes(seed)
    regions = depth_regions(image, depth, K)
    r = check_ids(regions)
    assert spanning(regions) == []
    # the superpixels (hundreds) really were merged: each plane is a handful of regions
    assert r <= 8 < default_segments(H, W)
    assert regions[:, : W // 2].unique().numel() <= 4 and regions[:, W // 2:].unique().numel() <= 4


def test_depth_regions_are_deterministic_and_scale_invariant():
    image, depth, K = two_planes()
    first = depth_regions(image, depth, K)
    assert torch.equal(first, depth_regions(image, depth, K))
    # self-supervised depth has an unknown scale: the weights are ratios of distances
    assert torch.equal(first, depth_regions(image, depth * 3.7, K))


def test_colour_regions_merge_what_depth_keeps_apart():
    image, depth, K = two_planes()
    colour = colour_regions(image)
    check_ids(colour)
    assert spanning(colour) != []  # similar colour: some colour region crosses the depth edge
    assert spanning(depth_regions(image, depth, K)) == []
    # the paper's colour-only SLIC straddles the edge too; the log-depth channel is what splits it
    assert spanning(depth_regions(image, depth, K, slic_depth_weight=0.0)) != []
    # and a clear colour edge does separate colour regions
    image[:, :, W // 2:] = torch.tensor([0.1, 0.3, 0.8]).view(3, 1, 1)
    assert spanning(colour_regions(image)) == []


def test_superpixels_without_depth_are_the_papers_slic():
    rng = np.random.default_rng(0)
    img = np.clip(rng.random((H, W, 3)) * 0.4 + np.linspace(0.1, 0.5, W)[None, :, None], 0, 1)
    ours = _superpixels(_lab(img), None, 120, 10.0, 1.0)
    theirs = slic(img, n_segments=120, compactness=10.0, sigma=1.0, start_label=0)
    assert np.array_equal(ours, np.unique(theirs, return_inverse=True)[1].reshape(theirs.shape))


def test_merge_uses_average_boundary_linkage():
    # a chain 0 - 1 - 2 with 3 hanging off 2: the strong pairs merge first, then the mean decides
    pairs = np.array([[0, 1], [1, 2], [2, 3], [0, 3]])
    weights = np.array([0.05, 0.1, 0.15, 0.5])
    # 0+1 (0.05), then {0,1}-2 (0.1), then {0,1,2}-3: mean of (0.15, 0.5) = 0.325 >= 0.2 -> apart
    # (single linkage, i.e. union-find over edges below the threshold, would take 3 in via 0.15)
    groups = _merge(4, pairs, weights, threshold=0.2)
    assert groups[0] == groups[1] == groups[2] != groups[3]
    assert len(set(_merge(4, pairs, weights, threshold=0.4).tolist())) == 1  # 0.325 < 0.4
    assert len(set(_merge(4, pairs, weights, threshold=0.05).tolist())) == 4  # nothing strictly below


def test_depth_regions_reject_bad_input():
    image, depth, K = two_planes()
    with pytest.raises(ValueError, match="> 0"):
        depth_regions(image, depth.clone().fill_(0.0), K)
    with pytest.raises(ValueError, match="depth must be"):
        depth_regions(image, depth[:-1], K)
