"""Segmentation and depth metrics (plain PyTorch)."""

from __future__ import annotations

import math

import torch


class SegmentationMetric:
    """Confusion matrix accumulated over all updates.

    ``iou[c] = TP / (TP + FP + FN)``, NaN where class c is absent from both
    prediction and ground truth; ``miou = nanmean(iou)`` (the Cityscapes convention);
    ``acc`` is pixel accuracy over non-ignored pixels.
    """

    def __init__(self, num_classes: int = 19, ignore_index: int = 255):
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)  # [gt, pred]

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """pred, target: integer class maps of equal shape (e.g. (B,H,W)); target may hold ignore_index."""
        if pred.shape != target.shape:
            raise ValueError(f"SegmentationMetric: pred {tuple(pred.shape)} != target {tuple(target.shape)}")
        pred = pred.detach().reshape(-1).to("cpu", torch.int64)
        target = target.detach().reshape(-1).to("cpu", torch.int64)
        keep = target != self.ignore_index
        pred, target = pred[keep], target[keep]
        if target.numel() and (target.min() < 0 or target.max() >= self.num_classes):
            raise ValueError(
                f"SegmentationMetric: target holds class {int(target.max())} outside [0, {self.num_classes})"
            )
        if pred.numel() and (pred.min() < 0 or pred.max() >= self.num_classes):
            raise ValueError(f"SegmentationMetric: prediction outside [0, {self.num_classes})")
        idx = target * self.num_classes + pred
        self.confusion += torch.bincount(idx, minlength=self.num_classes**2).reshape(self.num_classes, -1)

    def merge(self, confusion: torch.Tensor) -> None:
        """Add a confusion matrix accumulated elsewhere (e.g. all-reduced across ranks)."""
        self.confusion += confusion.to("cpu", torch.int64)

    def reset(self) -> None:
        self.confusion.zero_()

    def compute(self) -> dict:
        cm = self.confusion.double()
        tp = cm.diag()
        fp = cm.sum(0) - tp
        fn = cm.sum(1) - tp
        denom = tp + fp + fn
        iou = torch.where(denom > 0, tp / denom.clamp(min=1), torch.full_like(tp, float("nan")))
        valid = ~torch.isnan(iou)
        miou = float(iou[valid].mean()) if valid.any() else float("nan")
        total = cm.sum()
        acc = float(tp.sum() / total) if total > 0 else float("nan")
        return {"miou": miou, "iou": [float(v) for v in iou], "acc": acc}


DEPTH_KEYS = ("abs_rel", "sq_rel", "rmse", "rmse_log", "a1", "a2", "a3")


def depth_errors(
    pred: torch.Tensor,
    gt: torch.Tensor,
    min_depth: float = 1e-3,
    max_depth: float = 80.0,
    median_scaling: bool = True,
) -> dict:
    """Monodepth2 depth errors, computed per image and averaged over images.

    Args:
        pred, gt: (N,H,W) depth in metres; gt <= min_depth or >= max_depth is ignored.
        median_scaling: scale each prediction by median(gt) / median(pred) over valid pixels.

    Returns:
        {"abs_rel", "sq_rel", "rmse", "rmse_log", "a1", "a2", "a3"}; images without valid
        pixels are skipped (all NaN when none has any).
    """
    if pred.shape != gt.shape or pred.dim() != 3:
        raise ValueError(f"depth_errors: pred and gt must be equal (N,H,W), got {tuple(pred.shape)}, {tuple(gt.shape)}")
    sums = dict.fromkeys(DEPTH_KEYS, 0.0)
    count = 0
    for p, g in zip(pred.detach().double().cpu(), gt.detach().double().cpu()):
        valid = (g > min_depth) & (g < max_depth)
        if not valid.any():
            continue
        p, g = p[valid], g[valid]
        if median_scaling:
            p = p * (g.median() / p.median().clamp(min=1e-12))
        p = p.clamp(min_depth, max_depth)
        thresh = torch.maximum(g / p, p / g)
        sums["a1"] += float((thresh < 1.25).double().mean())
        sums["a2"] += float((thresh < 1.25**2).double().mean())
        sums["a3"] += float((thresh < 1.25**3).double().mean())
        sums["rmse"] += float(((g - p) ** 2).mean().sqrt())
        sums["rmse_log"] += float(((g.log() - p.log()) ** 2).mean().sqrt())
        sums["abs_rel"] += float(((g - p).abs() / g).mean())
        sums["sq_rel"] += float((((g - p) ** 2) / g).mean())
        count += 1
    if count == 0:
        return dict.fromkeys(DEPTH_KEYS, math.nan)
    return {k: v / count for k, v in sums.items()}


class DepthMetric:
    """Accumulates :func:`depth_errors` over batches (and ranks) as per-image sums.

    ``state()`` is a flat float64 tensor (sums then the image count) that can be
    all-reduced; ``merge`` adds such a tensor; ``compute`` returns the averages.
    """

    def __init__(self, min_depth: float = 1e-3, max_depth: float = 80.0, median_scaling: bool = True):
        self.kw = {"min_depth": min_depth, "max_depth": max_depth, "median_scaling": median_scaling}
        self.sums = torch.zeros(len(DEPTH_KEYS) + 1, dtype=torch.float64)

    def update(self, pred: torch.Tensor, gt: torch.Tensor) -> None:
        """pred, gt: (N,H,W) or (N,1,H,W) depth in metres."""
        if pred.dim() == 4:
            pred, gt = pred[:, 0], gt[:, 0]
        for p, g in zip(pred, gt):
            errs = depth_errors(p[None], g[None], **self.kw)
            if math.isnan(errs["abs_rel"]):
                continue
            self.sums[:-1] += torch.tensor([errs[k] for k in DEPTH_KEYS], dtype=torch.float64)
            self.sums[-1] += 1

    def state(self) -> torch.Tensor:
        return self.sums.clone()

    def merge(self, state: torch.Tensor) -> None:
        self.sums += state.to("cpu", torch.float64)

    def compute(self) -> dict:
        n = float(self.sums[-1])
        if n == 0:
            return dict.fromkeys(DEPTH_KEYS, math.nan)
        return {k: float(v) / n for k, v in zip(DEPTH_KEYS, self.sums[:-1])}
