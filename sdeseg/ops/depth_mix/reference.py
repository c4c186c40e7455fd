"""DepthMix in plain PyTorch: the ground truth the fused kernel is checked against."""

from __future__ import annotations

import torch


def default_perm(batch: int, device: torch.device | None = None) -> torch.Tensor:
    """Partner of image i is image (i + 1) % B."""
    return (torch.arange(batch, device=device) + 1) % batch


def check_depth_mix_args(depth: torch.Tensor, tensors: tuple[torch.Tensor, ...], perm: torch.Tensor | None):
    """Validate shapes; return the permutation as a long tensor on depth's device."""
    if depth.dim() != 4 or depth.shape[1] != 1:
        raise ValueError(f"depth_mix: depth must be (B,1,H,W), got {tuple(depth.shape)}")
    b, _, h, w = depth.shape
    for k, t in enumerate(tensors):
        ok = (t.dim() == 4 and t.shape[0] == b and t.shape[2:] == (h, w)) or (
            t.dim() == 3 and t.shape == (b, h, w)
        )
        if not ok:
            raise ValueError(
                f"depth_mix: tensor {k} must be (B,C,H,W) or (B,H,W) with B,H,W = {b},{h},{w}, "
                f"got {tuple(t.shape)}"
            )
        if t.device != depth.device:
            raise ValueError(f"depth_mix: tensor {k} is on {t.device}, depth on {depth.device}")
    if perm is None:
        return default_perm(b, depth.device)
    perm = torch.as_tensor(perm, device=depth.device).long()
    if perm.shape != (b,) or (perm < 0).any() or (perm >= b).any():
        raise ValueError(f"depth_mix: perm must hold {b} indices in [0, {b}), got {perm.tolist()}")
    return perm


def depth_mix_reference(
    depth: torch.Tensor, *tensors: torch.Tensor, perm: torch.Tensor | None = None, eps: float = 0.0
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """Mix each image with its partner ``j = perm[i]``, keeping per pixel the closer one.

    Args:
        depth: (B,1,H,W) depth, smaller = closer.
        tensors: each (B,C,H,W) (any dtype) or (B,H,W) (e.g. integer labels).
        perm: (B,) partner indices; default ``(i + 1) % B``.
        eps: tolerance; ``mask = depth[i] < depth[j] + eps``.

    Returns:
        mask (B,1,H,W) bool and a tuple with one mixed tensor per input, same shape and dtype:
        ``mixed[k][i] = where(mask[i], tensors[k][i], tensors[k][j])``.
    """
    perm = check_depth_mix_args(depth, tensors, perm)
    mask = depth < depth[perm] + eps
    mixed = []
    for t in tensors:
        m = mask if t.dim() == 4 else mask[:, 0]
        mixed.append(torch.where(m, t, t[perm]))
    return mask, tuple(mixed)
