"""Pinhole-camera helpers shared by data preparation and the losses (numpy and torch).

Pixel coordinates follow the ``sdeseg.ops.inverse_warp`` convention: integer
coordinates are pixel centres, so pixel (0, 0) covers [-0.5, 0.5] x [-0.5, 0.5].
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, TypeVar

import numpy as np

if TYPE_CHECKING:
    import torch

# torch is not imported here: data-prep workers use these helpers on numpy arrays only, and
# importing torch would add seconds to every worker's start-up. A tensor argument means
# torch is already in sys.modules.
Intrinsics = TypeVar("Intrinsics", np.ndarray, "torch.Tensor")


def scale_intrinsics(K: Intrinsics, src_hw: tuple[int, int], dst_hw: tuple[int, int]) -> Intrinsics:
    """Intrinsics of an image resized from ``src_hw`` to ``dst_hw`` (both (H, W)).

    A resize (PIL's, or ``F.interpolate`` with ``align_corners=False``) maps pixel centres
    as ``u' = (u + 0.5) * s - 0.5`` with ``s = dst / src`` per axis, so the first two rows
    of K (focal lengths, skew) scale by ``s`` and the principal point takes the same affine
    map; the last row is kept.

    Args:
        K: numpy (3,3) (any array-like; computed in float64) or torch (...,3,3) of any
            floating dtype and device (integer tensors become float32).
        src_hw, dst_hw: image sizes (height, width) before and after the resize.

    Returns:
        The new intrinsics, a new array / tensor of the input's type and batch shape.
    """
    sy, sx = dst_hw[0] / src_hw[0], dst_hw[1] / src_hw[1]
    torch_mod = sys.modules.get("torch")
    if torch_mod is not None and isinstance(K, torch_mod.Tensor):
        K = K if K.is_floating_point() else K.float()
        out = K.clone()
    else:
        K = np.asarray(K, dtype=np.float64)
        out = K.copy()
    if K.shape[-2:] != (3, 3):
        raise ValueError(f"scale_intrinsics: K must be (...,3,3), got {tuple(K.shape)}")
    out[..., 0, :2] = K[..., 0, :2] * sx
    out[..., 1, :2] = K[..., 1, :2] * sy
    out[..., 0, 2] = (K[..., 0, 2] + 0.5) * sx - 0.5
    out[..., 1, 2] = (K[..., 1, 2] + 0.5) * sy - 0.5
    return out


__all__ = ["scale_intrinsics"]
