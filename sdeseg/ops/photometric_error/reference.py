"""Photometric error (SSIM + L1) in plain PyTorch, as in Monodepth2."""

from __future__ import annotations

import torch
import torch.nn.functional as F

SSIM_C1 = 0.01**2
SSIM_C2 = 0.03**2


def box3(x: torch.Tensor) -> torch.Tensor:
    """3x3 mean of a padded (B,C,H+2,W+2) tensor -> (B,C,H,W), as separable sums of slices.

    Same values as ``F.avg_pool2d(x, 3, 1)`` but about 3x faster forward+backward on CPU,
    where the photometric loss is a quarter of an SDE training step.
    """
    r = x[..., :, :-2] + x[..., :, 1:-1] + x[..., :, 2:]
    return (r[..., :-2, :] + r[..., 1:-1, :] + r[..., 2:, :]) * (1.0 / 9.0)


def ssim_dissimilarity(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(1 - SSIM) / 2 per pixel and channel, clamped to [0, 1] like Monodepth2.

    Statistics are 3x3 means over reflection-padded inputs. x, y: (B,C,H,W) -> (B,C,H,W).
    """
    c = x.shape[1]
    x = F.pad(x, (1, 1, 1, 1), mode="reflect")
    y = F.pad(y, (1, 1, 1, 1), mode="reflect")
    stats = box3(torch.cat([x, y, x * x, y * y, x * y], 1))  # one pass for all five means
    mu_x, mu_y, xx, yy, xy = stats.split(c, 1)
    sigma_x = xx - mu_x**2
    sigma_y = yy - mu_y**2
    sigma_xy = xy - mu_x * mu_y
    num = (2 * mu_x * mu_y + SSIM_C1) * (2 * sigma_xy + SSIM_C2)
    den = (mu_x**2 + mu_y**2 + SSIM_C1) * (sigma_x + sigma_y + SSIM_C2)
    return torch.clamp((1 - num / den) / 2, 0, 1)


def photometric_error_reference(pred: torch.Tensor, target: torch.Tensor, alpha: float = 0.85) -> torch.Tensor:
    """``alpha * (1 - SSIM)/2 + (1 - alpha) * |pred - target|``, both averaged over channels.

    Args:
        pred, target: (B,C,H,W) images (H, W >= 2 for the reflection padding).
        alpha: SSIM weight.

    Returns:
        (B,1,H,W) per-pixel error.
    """
    if pred.shape != target.shape or pred.dim() != 4:
        raise ValueError(
            f"photometric_error: pred and target must be equal (B,C,H,W), got {tuple(pred.shape)} "
            f"and {tuple(target.shape)}"
        )
    l1 = (pred - target).abs().mean(1, keepdim=True)
    if alpha == 0:
        return l1
    ssim = ssim_dissimilarity(pred, target).mean(1, keepdim=True)
    return alpha * ssim + (1 - alpha) * l1
