"""Segmentation losses: supervised cross-entropy and the mean-teacher pseudo-label loss.

Every returned term is already multiplied by its config weight, so a stage sums the
values of the dicts it gets.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from sdeseg.config import SemisegConfig
from sdeseg.losses.common import LossOutput


def _match_size(logits: torch.Tensor, size: torch.Size | tuple[int, int]) -> torch.Tensor:
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)


def pixel_cross_entropy(logits: torch.Tensor, label: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
    """Per-pixel cross-entropy (B,H,W) in float32; 0 at ignored pixels.

    logits (B,C,h,w) (any float dtype) are resized bilinearly to the label's (H,W) when they differ.
    """
    return F.cross_entropy(
        _match_size(logits.float(), label.shape[-2:]), label.long(), ignore_index=ignore_index, reduction="none"
    )


def cross_entropy(logits: torch.Tensor, label: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
    """Mean cross-entropy over non-ignored pixels; logits (B,C,h,w), label (B,H,W) int.

    A batch with no valid pixel gives 0 (with a graph), not NaN, so a stage can always
    backpropagate it.
    """
    ce = pixel_cross_entropy(logits, label, ignore_index)
    valid = (label != ignore_index).sum()
    return ce.sum() / valid.clamp(min=1)


def supervised_seg_loss(
    outputs: dict[tuple, torch.Tensor], label: torch.Tensor, cfg: SemisegConfig
) -> LossOutput:
    """Cross-entropy on ground truth.

    Args:
        outputs: ``("seg", 0)`` logits (B,C,H,W); ``("seg_aux", 0)`` too for the multi-task model.
        label: (B,H,W) int train ids, ``cfg.ignore_index`` = ignore.

    Returns:
        :class:`LossOutput` with terms ``seg/sup`` and, when the model has an auxiliary head,
        ``seg/aux`` (× cfg.aux_weight); no stats.
    """
    out = {"seg/sup": cross_entropy(outputs[("seg", 0)], label, cfg.ignore_index)}
    if ("seg_aux", 0) in outputs:
        out["seg/aux"] = cfg.aux_weight * cross_entropy(outputs[("seg_aux", 0)], label, cfg.ignore_index)
    return LossOutput(out, {})


def pseudo_label_loss(
    logits: torch.Tensor,
    teacher_probs: torch.Tensor,
    threshold: float,
    ignore_index: int = 255,
    weighting: str = "fraction",
    pixel_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy to the teacher's argmax, weighted by the teacher's confidence.

    The pseudo-label is ``argmax`` of the (mixed) teacher probabilities. With
    ``weighting="fraction"`` (the paper's code, after ClassMix) the per-pixel CE is
    averaged over *all* pixels and the whole term is weighted by the fraction ``q`` of
    pixels whose maximum probability is >= ``threshold``. With ``"pixel"`` only the
    confident pixels contribute (their CE summed, divided by the number of all pixels,
    as in FixMatch), so the teacher's unconfident guesses teach nothing. (On the
    synthetic demo data it did not beat the paper's weighting; see BENCHMARKS.md.)
    Pixels whose probability vector is all zero (ignore pixels of ground truth mixed
    in, see ``mixing.labels_to_probs``) get the ignore label and count as unconfident.

    Args:
        logits: (B,C,H,W) student logits on the mixed image.
        teacher_probs: (B,C,H,W) mixed teacher probabilities (no gradient flows into them).
        threshold: confidence threshold (``semiseg.pseudo_threshold``).
        weighting: ``"fraction"`` or ``"pixel"`` (``semiseg.pseudo_weighting``).
        pixel_weight: (B,H,W) optional per-pixel factor on the cross-entropy (e.g.
            :func:`sdeseg.mixing.rebalance_weights`); ``q`` does not depend on it.

    Returns:
        (loss scalar, q scalar in [0, 1]).
    """
    if weighting not in ("fraction", "pixel"):
        raise ValueError(f"weighting must be 'fraction' or 'pixel', got {weighting!r}")
    probs = teacher_probs.detach().float()
    max_probs, pseudo = probs.max(1)
    pseudo = pseudo.masked_fill(max_probs == 0, ignore_index)
    confident = max_probs >= threshold
    q = confident.float().mean()
    ce = pixel_cross_entropy(logits, pseudo, ignore_index)
    if pixel_weight is not None:
        ce = ce * pixel_weight.detach()
    if weighting == "pixel":
        return (ce * confident).mean(), q
    return q * ce.mean(), q


def unsup_rampup(step: int, rampup_steps: int) -> float:
    """Weight of the pseudo-label loss at optimizer step ``step`` (0-based).

    The mean-teacher sigmoid ramp ``exp(-5 (1 - t)^2)`` with ``t = step / rampup_steps``,
    1 from ``rampup_steps`` on; ``rampup_steps <= 0`` means no ramp (always 1, the paper).
    While the student still learns fast its EMA teacher lags behind it, and the ramp
    lowers that teacher's early influence. (On the synthetic demo data it did not close
    DepthMix's gap to the supervised baseline; see BENCHMARKS.md.)
    """
    if rampup_steps <= 0 or step >= rampup_steps:
        return 1.0
    return math.exp(-5.0 * (1.0 - max(step, 0) / rampup_steps) ** 2)


def pseudo_label_seg_loss(
    outputs: dict[tuple, torch.Tensor],
    teacher_probs: torch.Tensor,
    cfg: SemisegConfig,
    step: int | None = None,
    pixel_weight: torch.Tensor | None = None,
) -> LossOutput:
    """Term ``seg/unsup`` = cfg.unsup_weight × :func:`unsup_rampup` × :func:`pseudo_label_loss` on
    ``outputs[("seg", 0)]`` (no ramp when ``step`` is None; ``pixel_weight`` as there); stat
    ``seg/confident``: the confident-pixel fraction q.
    """
    loss, q = pseudo_label_loss(
        outputs[("seg", 0)], teacher_probs, cfg.pseudo_threshold, cfg.ignore_index, cfg.pseudo_weighting,
        pixel_weight,
    )
    ramp = 1.0 if step is None else unsup_rampup(step, cfg.unsup_rampup_steps)
    return LossOutput({"seg/unsup": cfg.unsup_weight * ramp * loss}, {"seg/confident": q.detach()})
