"""Losses of training on stored pseudo-masks (``sdeseg.stages.selftrain``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sdeseg.losses.seg import pixel_cross_entropy
from sdeseg.pseudo import kept_pixels


def pseudo_mask_loss(logits: torch.Tensor, target: torch.Tensor, confidence: torch.Tensor,
                     thresholds: torch.Tensor, weights: torch.Tensor, ignore_index: int = 255
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Class-weighted cross-entropy to a pseudo-mask on the pixels that pass their class's
    threshold (:func:`sdeseg.pseudo.kept_pixels`).

    logits (B,C,h,w) (resized to the mask's size when they differ); target (B,H,W) int class
    map; confidence (B,H,W) in [0,1]; thresholds, weights (C,). The weighted sum is divided by
    the number of kept pixels (0 with a graph when none is kept). Returns (loss, the kept
    fraction of the pixels, detached).
    """
    keep = kept_pixels(target, confidence, thresholds, ignore_index)
    label = torch.where(keep, target.long(), torch.full_like(target.long(), ignore_index))
    ce = pixel_cross_entropy(logits, label, ignore_index)
    w = weights.to(ce.device)[torch.where(keep, label, torch.zeros_like(label))] * keep
    return (ce * w).sum() / keep.sum().clamp(min=1), keep.float().mean().detach()


def softmax_consistency(logits_a: torch.Tensor, logits_b: torch.Tensor) -> torch.Tensor:
    """Mean squared difference of the class probabilities of two predictions (B,C,H,W) of the
    same pixels, in float32 (both sides get gradients)."""
    if logits_a.shape[-2:] != logits_b.shape[-2:]:
        logits_b = F.interpolate(logits_b.float(), size=logits_a.shape[-2:], mode="bilinear", align_corners=False)
    return (F.softmax(logits_a.float(), 1) - F.softmax(logits_b.float(), 1)).pow(2).sum(1).mean()
