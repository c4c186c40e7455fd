"""Losses: pure functions returning namespaced dicts of scalar terms (``depth/photo``,
``depth/smooth``, ``seg/sup``, ``seg/unsup``, ...), each already weighted."""

from sdeseg.losses.depth import edge_aware_smoothness, feature_distance, sde_loss
from sdeseg.losses.seg import (
    cross_entropy,
    pixel_cross_entropy,
    pseudo_label_loss,
    pseudo_label_seg_loss,
    supervised_seg_loss,
    unsup_rampup,
)

__all__ = [
    "cross_entropy",
    "edge_aware_smoothness",
    "feature_distance",
    "pixel_cross_entropy",
    "pseudo_label_loss",
    "pseudo_label_seg_loss",
    "sde_loss",
    "supervised_seg_loss",
    "unsup_rampup",
]
