"""Pseudo-mask statistics (three-stage self-training): per-class confidence histograms, the
per-class thresholds and weights they set, and which pixels of a pseudo-mask count.

Pure torch. A pseudo-mask is a class map with a confidence (the argmax probability) per
pixel; the statistics are gathered once over the whole set of pseudo-masks
(``sdeseg.stages.selftrain.pseudo_statistics``) and then fixed for a training run.
"""

from __future__ import annotations

import torch


def confidence_histogram(label: torch.Tensor, confidence: torch.Tensor, num_classes: int, bins: int,
                         ignore_index: int = 255) -> torch.Tensor:
    """Counts of pixels per (class, confidence bin): (num_classes, bins) int64.

    ``label`` (...) integer class map, ``confidence`` (...) in [0, 1], same shape. Bin ``b``
    holds confidences in ``[b/bins, (b+1)/bins)``; 1.0 falls in the last bin. Pixels at
    ``ignore_index`` are not counted.
    """
    if label.shape != confidence.shape:
        raise ValueError(f"label {tuple(label.shape)} and confidence {tuple(confidence.shape)} differ in shape")
    keep = label != ignore_index
    cls = label[keep].long()
    if cls.numel() and (cls.min() < 0 or cls.max() >= num_classes):
        raise ValueError(f"pseudo-mask holds class {int(cls.max())} outside [0, {num_classes})")
    b = (confidence[keep].float() * bins).long().clamp_(0, bins - 1)
    return torch.bincount(cls * bins + b, minlength=num_classes * bins).reshape(num_classes, bins)


def class_thresholds(hist: torch.Tensor, quantile: float, max_threshold: float) -> torch.Tensor:
    """Per-class confidence thresholds (C,) float32 from a :func:`confidence_histogram`.

    Class k's threshold is the lower edge of the bin holding the ``quantile`` of its
    confidences (the first bin with more than ``quantile`` of them at or below it), at most
    ``max_threshold``: at least ``1 - quantile`` of every class's pixels pass (so a rare class
    the model is unsure of keeps its best pixels), and every pixel above ``max_threshold``
    passes. A class absent from the histogram gets ``max_threshold``.
    """
    bins = hist.shape[1]
    total = hist.sum(1, keepdim=True)
    cum = hist.cumsum(1)  # cum[:, j] = pixels in bins 0..j
    reached = cum.double() > quantile * total.double()
    first = torch.where(reached.any(1), reached.double().argmax(1), torch.full_like(total[:, 0], bins))
    tau = first.float() / bins
    tau = torch.where(total[:, 0] > 0, tau, torch.full_like(tau, max_threshold))
    return tau.clamp(max=max_threshold)


def class_weights(hist: torch.Tensor, power: float, max_weight: float) -> torch.Tensor:
    """Per-class loss weights (C,) float32: ``share_k ** -power`` normalised so that the mean
    weight over all pixels of the histogram is 1, then capped at ``max_weight``. ``share_k``
    is class k's fraction of the pixels; absent classes get 1."""
    count = hist.sum(1).double()
    share = count / count.sum().clamp(min=1)
    present = share > 0
    w = torch.ones_like(share)
    w[present] = share[present].pow(-power)
    w = w / (share * w).sum().clamp(min=1e-12) if present.any() else w
    w[~present] = 1.0
    return w.clamp(max=max_weight).float()


def kept_pixels(target: torch.Tensor, confidence: torch.Tensor, thresholds: torch.Tensor,
                ignore_index: int = 255) -> torch.Tensor:
    """Bool mask (same shape as ``target``) of pseudo-mask pixels whose confidence reaches
    their class's threshold; ``ignore_index`` pixels never count."""
    valid = target != ignore_index
    cls = torch.where(valid, target, torch.zeros_like(target)).long()
    return valid & (confidence.float() >= thresholds.to(confidence.device)[cls])
