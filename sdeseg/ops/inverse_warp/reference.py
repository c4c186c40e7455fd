"""Inverse warping in plain PyTorch (Monodepth2 geometry, OpenCV pixel-centre convention)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

Z_MIN = 1e-7  # projected depth is clamped here, as Monodepth2 does with its eps


def check_warp_args(src: torch.Tensor, depth: torch.Tensor, T: torch.Tensor, K: torch.Tensor) -> None:
    if src.dim() != 4:
        raise ValueError(f"inverse_warp: src must be (B,C,H,W), got {tuple(src.shape)}")
    b, _, h, w = src.shape
    if depth.shape != (b, 1, h, w):
        raise ValueError(f"inverse_warp: depth must be ({b},1,{h},{w}), got {tuple(depth.shape)}")
    if T.shape != (b, 4, 4):
        raise ValueError(f"inverse_warp: T must be ({b},4,4), got {tuple(T.shape)}")
    if K.shape != (b, 3, 3):
        raise ValueError(f"inverse_warp: K must be ({b},3,3), got {tuple(K.shape)}")


def project_coords(depth: torch.Tensor, T: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
    """Source-image pixel coordinates of every target pixel.

    Args:
        depth: (B,1,H,W) depth of the target frame.
        T: (B,4,4) target->source camera transform.
        K: (B,3,3) pixel intrinsics (integer coordinates are pixel centres).

    Returns:
        (B,2,H,W) source coordinates (u, v) = (column, row).
    """
    b, _, h, w = depth.shape
    # geometry in float32 at least: K^-1 and the projection lose whole pixels in bf16/fp16
    dt = torch.promote_types(depth.dtype, torch.float32)
    depth = depth.to(dt)
    v, u = torch.meshgrid(
        torch.arange(h, device=depth.device, dtype=dt), torch.arange(w, device=depth.device, dtype=dt), indexing="ij"
    )
    pix = torch.stack([u, v, torch.ones_like(u)], 0).reshape(1, 3, h * w)
    rays = torch.linalg.inv(K.to(dt)) @ pix  # (B,3,HW)
    cam = rays * depth.reshape(b, 1, h * w)
    moved = T[:, :3, :3].to(dt) @ cam + T[:, :3, 3:].to(dt)
    z = moved[:, 2:3].clamp(min=Z_MIN)
    proj = K.to(dt) @ (moved / z)  # (B,3,HW); third row is 1 for a pinhole K
    return proj[:, :2].reshape(b, 2, h, w)


def inverse_warp_reference(
    src: torch.Tensor, depth: torch.Tensor, T: torch.Tensor, K: torch.Tensor, padding_mode: str = "border"
) -> torch.Tensor:
    """Warp ``src`` into the target frame given the target's depth and the relative pose.

    Args:
        src: (B,C,H,W) source image.
        depth: (B,1,H,W) target-frame depth.
        T: (B,4,4) transform from the target camera to the source camera.
        K: (B,3,3) pixel intrinsics.
        padding_mode: ``grid_sample`` padding ("border", "zeros" or "reflection").

    Returns:
        (B,C,H,W) ``src`` sampled bilinearly at the projections of the target pixels.
    """
    check_warp_args(src, depth, T, K)
    _, _, h, w = src.shape
    coords = project_coords(depth, T, K)
    gx = coords[:, 0] * (2.0 / max(w - 1, 1)) - 1.0
    gy = coords[:, 1] * (2.0 / max(h - 1, 1)) - 1.0
    # sampled in float32 at least (as the fused kernel does), returned in src's dtype
    work = torch.promote_types(src.dtype, torch.float32)
    grid = torch.stack([gx, gy], dim=-1).to(work)
    out = F.grid_sample(src.to(work), grid, mode="bilinear", padding_mode=padding_mode, align_corners=True)
    return out.to(src.dtype)
