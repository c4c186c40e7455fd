"""Losses: pure functions returning a :class:`LossOutput` — ``terms``, a namespaced dict of
weighted scalar terms (``depth/photo``, ``depth/smooth``, ``seg/sup``, ``seg/unsup``, ...), and
``stats``, detached statistics that are not part of the loss (confident fraction, warped
frames, auto-masks). Losses are computed in float32 whatever precision the network ran in."""

from sdeseg.losses.common import LossOutput
from sdeseg.losses.depth import edge_aware_smoothness, feature_distance, sde_loss
from sdeseg.losses.seg import (
    class_floors,
    cross_entropy,
    pixel_cross_entropy,
    pseudo_label_loss,
    pseudo_label_seg_loss,
    pseudo_label_weight,
    supervised_seg_loss,
    unsup_rampup,
)

__all__ = [
    "LossOutput",
    "class_floors",
    "cross_entropy",
    "edge_aware_smoothness",
    "feature_distance",
    "pixel_cross_entropy",
    "pseudo_label_loss",
    "pseudo_label_seg_loss",
    "pseudo_label_weight",
    "sde_loss",
    "supervised_seg_loss",
    "unsup_rampup",
]
