"""Losses of the instance branch (Panoptic-DeepLab, Cheng et al., CVPR 2020) and the Depth
Controller's weighting (seed 002; our design, docs/architecture.md).

Panoptic-DeepLab trains its three outputs with a semantic cross-entropy (weight 1), a mean
squared error on the centre heatmap (weight 200) and an L1 loss on the offsets (weight 0.01),
each averaged over the pixels its target weight keeps. Its semantic loss bootstraps the
hardest pixels and up-weights small instances; ours is the plain cross-entropy the other
stages use. Every returned term is already multiplied by its config weight, so a stage sums
the values of the dicts it gets.
"""

from __future__ import annotations

import math

import torch

from sdeseg.config import InstanceConfig
from sdeseg.losses.common import LossOutput
from sdeseg.losses.seg import cross_entropy


def center_loss(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Weighted MSE of the centre heatmap: ``sum(w (pred - target)^2) / sum(w)``.

    pred, target, weight (B,1,H,W); 0 (with a graph) when no pixel has weight.
    """
    err = (pred.float() - target) ** 2 * weight
    return err.sum() / weight.sum().clamp(min=1.0)


def offset_loss(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Weighted L1 of the offsets: ``sum(w (|dy - dy*| + |dx - dx*|)) / sum(w)``.

    pred, target (B,2,H,W) in pixels; weight (B,1,H,W) (1 on thing-instance pixels); 0 (with a
    graph) when no pixel has weight.
    """
    err = (pred.float() - target).abs() * weight
    return err.sum() / weight.sum().clamp(min=1.0)


def panoptic_loss(
    outputs: dict[tuple, torch.Tensor],
    targets: dict[str, torch.Tensor],
    cfg: InstanceConfig,
    prefix: str,
    ignore_index: int = 255,
) -> LossOutput:
    """Panoptic-DeepLab's three terms for one pass of the instance model.

    Args:
        outputs: ``("seg", 0)`` logits (B,C,H,W), ``("center", 0)`` (B,1,H,W), ``("offset", 0)``
            (B,2,H,W) (:class:`sdeseg.models.InstanceModel`).
        targets: ``semantic`` (B,H,W) int64 (``ignore_index`` = ignore), ``center`` (B,1,H,W),
            ``offset`` (B,2,H,W), ``center_weight`` and ``offset_weight`` (B,1,H,W)
            (:func:`sdeseg.panoptic.instance_targets`, or the teacher's pseudo-targets).
        cfg: the weights (``semantic_weight``, ``center_weight``, ``offset_weight``).
        prefix: namespace of the terms, e.g. ``inst/sup``.

    Returns:
        :class:`LossOutput` with terms ``<prefix>/semantic``, ``<prefix>/center``,
        ``<prefix>/offset`` (weighted); no stats.
    """
    terms = {
        f"{prefix}/semantic": cfg.semantic_weight * cross_entropy(outputs[("seg", 0)], targets["semantic"],
                                                                  ignore_index),
        f"{prefix}/center": cfg.center_weight * center_loss(outputs[("center", 0)], targets["center"],
                                                            targets["center_weight"]),
        f"{prefix}/offset": cfg.offset_weight * offset_loss(outputs[("offset", 0)], targets["offset"],
                                                            targets["offset_weight"]),
    }
    return LossOutput(terms, {})


def depth_ramp(step: int, ramp_steps: int) -> float:
    """The Depth Controller's scale of the depth input at optimizer step ``step`` (0-based):
    ``min(1, step / ramp_steps)``, 1 throughout when ``ramp_steps <= 0``."""
    if ramp_steps <= 0:
        return 1.0
    return min(1.0, max(step, 0) / ramp_steps)


def balance_weight(loss_depth: float, loss_rgb: float, temperature: float) -> float:
    """The Depth Controller's weight of the depth-fused term (the RGB term gets ``1 - w``).

    ``w = sigmoid((loss_rgb - loss_depth) / (temperature * (loss_rgb + loss_depth) / 2))``: the
    branch whose pseudo-label loss (its disagreement with the teacher) is lower gets more weight,
    by the *relative* difference, so the temperature does not depend on the loss scale; equal
    losses (or no history yet: NaN) give 0.5 each.
    """
    if math.isnan(loss_depth) or math.isnan(loss_rgb):
        return 0.5
    mean = (loss_depth + loss_rgb) / 2
    if mean <= 0:
        return 0.5
    z = (loss_rgb - loss_depth) / (temperature * mean)
    return 1.0 / (1.0 + math.exp(-max(min(z, 60.0), -60.0)))


__all__ = ["balance_weight", "center_loss", "depth_ramp", "offset_loss", "panoptic_loss"]
