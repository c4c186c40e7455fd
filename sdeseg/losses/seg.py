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


WEIGHTINGS = ("fraction", "pixel", "class")


def pseudo_label_weight(
    teacher_probs: torch.Tensor,
    threshold: float,
    weighting: str = "fraction",
    class_share: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """How much each pixel's pseudo-label counts, and the confident fraction ``q``.

    ``q`` is the fraction of pixels whose maximum probability reaches ``threshold``.
    ``"fraction"`` (the paper's code, after ClassMix): every pixel counts ``q``. ``"pixel"``:
    1 on those confident pixels, 0 elsewhere (FixMatch). ``"class"`` (class-balanced, after
    CBST): a pixel whose argmax is class c counts 1 when its maximum reaches
    ``min(threshold, t_c)``, t_c the ``ceil(class_share * n_c)``-th largest maximum among the
    n_c pixels of the batch with argmax c — so a class the teacher is unsure of keeps its most
    confident share instead of almost nothing, while a class above ``threshold`` keeps
    everything above it. Pixels whose probability vector is all zero (ground-truth ignore
    mixed in) count 0 in ``"pixel"`` and ``"class"`` and are never confident.

    Args:
        teacher_probs: (B,C,H,W) teacher probabilities (no gradient is needed or kept).
        threshold: ``semiseg.pseudo_threshold``. weighting: one of ``WEIGHTINGS``.
        class_share: in (0, 1]; the share of each class's pixels ``"class"`` keeps at least.

    Returns:
        (weight (B,H,W) float32, q scalar in [0, 1]).
    """
    max_probs, pseudo = teacher_probs.detach().float().max(1)
    return _weight(max_probs, pseudo, teacher_probs.shape[1], threshold, weighting, class_share)


def _weight(max_probs: torch.Tensor, pseudo: torch.Tensor, num_classes: int, threshold: float, weighting: str,
            class_share: float) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`pseudo_label_weight` from the teacher's per-pixel maximum and argmax (B,H,W)."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    if not 0.0 < class_share <= 1.0:
        raise ValueError(f"class_share must be in (0, 1], got {class_share}")
    confident = max_probs >= threshold
    q = confident.float().mean()
    if weighting == "fraction":
        return q.expand_as(max_probs), q
    if weighting == "class":
        confident = max_probs >= class_floors(max_probs, pseudo, num_classes, threshold, class_share)[pseudo]
        confident &= max_probs > 0
    return confident.float(), q


def class_floors(max_probs: torch.Tensor, pseudo: torch.Tensor, num_classes: int, threshold: float,
                 class_share: float) -> torch.Tensor:
    """(num_classes,) confidence floors of :func:`pseudo_label_weight`'s ``"class"`` weighting:
    per class c, ``min(threshold, t_c)``, t_c the ``ceil(class_share * n_c)``-th largest of the n_c
    maxima ``max_probs`` (any shape) whose ``pseudo`` label is c (zeros, ground-truth ignore, left
    out); ``threshold`` for a class with no pixel. One sort, no host synchronisation."""
    valid = max_probs > 0
    conf, cls = max_probs[valid].double(), pseudo[valid]
    counts = torch.bincount(cls, minlength=num_classes)
    if conf.numel() == 0:
        return torch.full((num_classes,), threshold, device=max_probs.device)
    ranked = conf[torch.argsort(cls.double() * 2 - conf)]  # class ascending, confidence descending
    k = torch.ceil(counts.double() * class_share).long().clamp(min=1)
    at = (torch.cumsum(counts, 0) - counts + k - 1).clamp(max=conf.numel() - 1)
    floors = torch.where(counts > 0, ranked[at], torch.full_like(ranked[at], threshold))
    return floors.clamp(max=threshold).float()


def pseudo_label_loss(
    logits: torch.Tensor,
    teacher_probs: torch.Tensor,
    threshold: float,
    ignore_index: int = 255,
    weighting: str = "fraction",
    pixel_weight: torch.Tensor | None = None,
    class_share: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy to the teacher's argmax, weighted by the teacher's confidence.

    The pseudo-label is ``argmax`` of the (mixed) teacher probabilities; the per-pixel CE,
    times :func:`pseudo_label_weight`'s weight, is averaged over *all* pixels. So with
    ``weighting="fraction"`` (the paper's code) the term is ``q`` × the mean CE; with
    ``"pixel"`` only the confident pixels contribute (their CE summed, divided by the number
    of all pixels, as in FixMatch), so the teacher's unconfident guesses teach nothing (on the
    synthetic demo data it did not beat the paper's weighting; see BENCHMARKS.md); with
    ``"class"`` each class keeps at least its most confident ``class_share``. Pixels whose
    probability vector is all zero (ignore pixels of ground truth mixed in, see
    ``mixing.labels_to_probs``) get the ignore label and count as unconfident.

    Args:
        logits: (B,C,H,W) student logits on the mixed image.
        teacher_probs: (B,C,H,W) mixed teacher probabilities (no gradient flows into them).
        threshold: confidence threshold (``semiseg.pseudo_threshold``).
        weighting: ``"fraction"``, ``"pixel"`` or ``"class"`` (``semiseg.pseudo_weighting``).
        pixel_weight: (B,H,W) optional per-pixel factor on the cross-entropy (e.g.
            :func:`sdeseg.mixing.rebalance_weights`); ``q`` does not depend on it.
        class_share: ``semiseg.pseudo_class_share`` (``"class"`` only).

    Returns:
        (loss scalar, q scalar in [0, 1]).
    """
    max_probs, pseudo = teacher_probs.detach().float().max(1)
    weight, q = _weight(max_probs, pseudo, teacher_probs.shape[1], threshold, weighting, class_share)
    pseudo = pseudo.masked_fill(max_probs == 0, ignore_index)
    ce = pixel_cross_entropy(logits, pseudo, ignore_index)
    if pixel_weight is not None:
        ce = ce * pixel_weight.detach()
    if weighting == "fraction":
        return q * ce.mean(), q  # the same number as (ce * weight).mean(), in the paper's order
    return (ce * weight).mean(), q


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
        pixel_weight, cfg.pseudo_class_share,
    )
    ramp = 1.0 if step is None else unsup_rampup(step, cfg.unsup_rampup_steps)
    return LossOutput({"seg/unsup": cfg.unsup_weight * ramp * loss}, {"seg/confident": q.detach()})
