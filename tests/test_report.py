"""The demo report's depth figure: one colour scale per row, invalid ground truth masked."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from matplotlib import colors
from matplotlib.image import imread
from torch import nn

from sdeseg.data.batch import Batch
from sdeseg.models import DepthRange
from sdeseg.report import (
    DEPTH_QUANTILE,
    NO_DEPTH_COLOUR,
    depth_display_range,
    depth_panels,
    fig_depth,
    fig_depthmix,
)

H, W = 12, 20


def street_depth(seed: int) -> torch.Tensor:
    """(H,W) metres: a sky band with no ground truth (0) over a ground plane getting nearer
    towards the bottom, plus noise."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.linspace(60.0, 3.0, H)[:, None].expand(H, W)
    depth = rows * (1 + 0.1 * torch.rand(H, W, generator=g))
    depth[:3] = 0.0
    return depth


class TinyDepth(nn.Module):
    """Any module returning a sigmoid disparity under ("disp", 0) will do."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 1, 3, padding=1)

    def forward(self, x):
        return {("disp", 0): torch.sigmoid(self.conv(x))}


class TinySeg(nn.Module):
    def __init__(self, classes: int = 4):
        super().__init__()
        self.conv = nn.Conv2d(3, classes, 1)

    def forward(self, x):
        return {("seg", 0): self.conv(x)}


def tiny_batch(n: int, with_depth: bool = True) -> Batch:
    g = torch.Generator().manual_seed(0)
    images = {f: torch.rand(n, 3, H, W, generator=g) for f in (-1, 0, 1)}
    K = torch.eye(3).expand(n, 3, 3).clone()
    depth = torch.stack([street_depth(i) for i in range(n)])[:, None] if with_depth else None
    return Batch(keys=[f"syn/val/{i}" for i in range(n)], images=images, images_aug=images, K=K, inv_K=K,
                 depth=depth)


def test_depth_panels_share_one_scale_and_mask_invalid_ground_truth():
    gt = street_depth(0)
    valid = gt > 0
    pred = torch.rand(H, W, generator=torch.Generator().manual_seed(1)) * 5 + 1
    (gt_im, _, gt_style), (pred_im, _, pred_style) = depth_panels(gt, pred)

    # one colour scale: the same colormap and limits in both panels of the row
    assert gt_style is pred_style
    vmin, vmax = depth_display_range(gt, pred)
    assert (gt_style["vmin"], gt_style["vmax"]) == (vmin, vmax)
    assert vmin == 0.0
    assert vmax == pytest.approx(float(np.quantile(gt[valid].numpy(), DEPTH_QUANTILE)), rel=1e-5)

    # invalid ground truth is masked and drawn in a neutral colour, not as "near" (the low end)
    assert isinstance(gt_im, np.ma.MaskedArray)
    assert np.array_equal(gt_im.mask, ~valid.numpy())
    assert np.array_equal(gt_im.data[valid.numpy()], gt[valid].numpy())
    cmap = gt_style["cmap"]
    assert cmap.get_bad() == pytest.approx(colors.to_rgba(NO_DEPTH_COLOUR))
    assert cmap.get_bad() != pytest.approx(cmap(0.0))

    # the prediction is median-scaled to the valid ground truth and shown everywhere
    assert not np.ma.isMaskedArray(pred_im)
    assert float(torch.from_numpy(pred_im)[valid].median()) == pytest.approx(float(gt[valid].median()), rel=1e-5)

    # the scale ignores what the invalid pixels hold: a far "sky" in the prediction changes nothing
    pred_sky = pred.clone()
    pred_sky[~valid] = 1e4
    assert depth_display_range(gt, pred_sky) == (vmin, vmax)


def test_depth_panels_without_ground_truth_use_the_prediction():
    gt = torch.zeros(H, W)
    pred = torch.linspace(1.0, 21.0, H * W).reshape(H, W)
    (gt_im, _, style), (pred_im, _, style2) = depth_panels(gt, pred)
    assert gt_im.mask.all() and style is style2
    assert np.array_equal(pred_im, pred.numpy())  # nothing to scale to
    assert (style["vmin"], style["vmax"]) == (0.0, pytest.approx(float(pred.quantile(DEPTH_QUANTILE))))


@pytest.mark.parametrize("with_depth", [True, False])
def test_fig_depth_writes_a_png(tmp_path, with_depth):
    batch = tiny_batch(3, with_depth)
    depth_range = DepthRange(0.1, 100.0, "inverse")
    path = tmp_path / "depth.png"
    fig_depth(batch, TinyDepth().eval(), depth_range, path)
    png = imread(path)
    assert png.ndim == 3 and png.shape[0] > 100 and png.shape[1] > png.shape[0]
    fig_depthmix(batch, TinyDepth().eval(), depth_range, TinySeg().eval(), tmp_path / "depthmix.png")
    assert imread(tmp_path / "depthmix.png").ndim == 3
