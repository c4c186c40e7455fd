"""Segmentation, depth and instance metrics (plain PyTorch; mask AP through pycocotools)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping

import numpy as np
import torch

from sdeseg.data.classes import (
    IGNORE_INDEX,
    INSTANCE_DIVISOR,
    class_names,
    instance_ids_to_label_ids,
    label_ids_to_train_ids,
    thing_train_ids,
    train_ids_to_label_ids,
)


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

    def confusions(self, top: int = 2) -> list[tuple[int, float, list[tuple[int, float]]]]:
        """Where each class's pixels go: for every class with ground-truth pixels, (class, share
        predicted as itself, up to ``top`` (other class, share) pairs, largest first, each > 0),
        shares of that class's ground-truth pixels (rows of the confusion matrix)."""
        out = []
        for c, row in enumerate(self.confusion.double()):
            total = float(row.sum())
            if total == 0:
                continue
            share = row / total
            others = [(int(j), float(share[j])) for j in torch.argsort(share, descending=True, stable=True).tolist()
                      if j != c and share[j] > 0][:top]
            out.append((c, float(share[c]), others))
        return out


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


# ----------------------------------------------------------------------------- instances


def _as_numpy_ids(x: torch.Tensor | np.ndarray) -> np.ndarray:
    return (x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)).astype(np.int64)


def _segment_classes(ids: np.ndarray) -> np.ndarray:
    """Train id (255 = void) of each instanceIds value in ``ids`` (any shape)."""
    return label_ids_to_train_ids(instance_ids_to_label_ids(ids).clip(0, 255)).astype(np.int64)


@contextlib.contextmanager
def _silenced(*modules):
    """No ``print`` from the functions of ``modules`` inside the block. ``redirect_stdout`` is not
    enough: in Ray Train's workers ``print`` also sends every line to the run's log."""
    for m in modules:
        m.print = lambda *args, **kwargs: None  # a module global shadows the builtin
    try:
        yield
    finally:
        for m in modules:
            del m.print


class MaskAP:
    """COCO mask AP (IoU 0.50:0.95) and AP50 of the thing classes, by pycocotools' ``COCOeval``.

    Each update converts one image's instance maps (Cityscapes instanceIds) to COCO
    annotations with RLE masks: a ground-truth instance (id >= 1000 of a class with a train
    id) is an annotation, a thing region without an instance (a Cityscapes group, plain label
    id) a crowd annotation -- detections on it are neither true nor false positives, as in
    COCO; each predicted instance is a result with its confidence as ``score``. Categories are
    the Cityscapes label ids of the 8 thing train classes. ``compute`` runs the library's
    evaluation (all areas, ``max_dets`` detections per image); classes absent from the ground
    truth are left out of the mean, as COCO does.
    """

    def __init__(self, max_dets: int = 100):
        self.max_dets = max_dets
        self.images: list[dict] = []  # {"height", "width", "gt": [ann], "dt": [result]}

    def update(
        self,
        pred: torch.Tensor | np.ndarray,
        scores: Mapping[int, float],
        target: torch.Tensor | np.ndarray,
    ) -> None:
        """One image: ``pred``, ``target`` (H,W) instanceIds; ``scores`` predicted instance id ->
        confidence (every predicted thing instance needs one, e.g. from
        :func:`sdeseg.panoptic.group_instances`)."""
        from pycocotools import mask as mask_utils

        pred, target = _as_numpy_ids(pred), _as_numpy_ids(target)
        if pred.shape != target.shape or pred.ndim != 2:
            raise ValueError(f"MaskAP: pred and target must be equal (H,W), got {pred.shape}, {target.shape}")
        things = set(thing_train_ids())

        def rle(mask: np.ndarray) -> dict:
            return mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))

        gt, dt = [], []
        for value in np.unique(target).tolist():
            cls = int(_segment_classes(np.array(value)))
            if cls not in things:
                continue
            m = rle(target == value)
            cat = int(instance_ids_to_label_ids(np.array(value)))
            gt.append({"category_id": cat, "segmentation": m, "area": float(mask_utils.area(m)),
                       "bbox": mask_utils.toBbox(m).tolist(), "iscrowd": int(value < INSTANCE_DIVISOR)})
        for value in np.unique(pred).tolist():
            if value < INSTANCE_DIVISOR or int(_segment_classes(np.array(value))) not in things:
                continue
            if value not in scores:
                raise ValueError(f"MaskAP: predicted instance {value} has no score")
            # no "bbox" key: loadRes would take the results for boxes
            dt.append({"category_id": value // INSTANCE_DIVISOR, "segmentation": rle(pred == value),
                       "score": float(scores[value])})
        self.images.append({"height": int(pred.shape[0]), "width": int(pred.shape[1]), "gt": gt, "dt": dt})

    def state(self) -> list[dict]:
        """The per-image annotations so far (gather them across ranks, then :meth:`merge`)."""
        return list(self.images)

    def merge(self, images: list[dict]) -> None:
        self.images.extend(images)

    def reset(self) -> None:
        self.images = []

    def compute(self) -> dict:
        """``{"ap", "ap50", "ap_class": {class name: AP}}``; NaN where no ground truth exists."""
        import pycocotools.coco
        import pycocotools.cocoeval

        COCO, COCOeval = pycocotools.coco.COCO, pycocotools.cocoeval.COCOeval

        names = class_names()
        cats = [{"id": int(train_ids_to_label_ids(np.array(c))), "name": names[c]} for c in thing_train_ids()]
        images, gts, dts = [], [], []
        for i, im in enumerate(self.images, start=1):
            images.append({"id": i, "height": im["height"], "width": im["width"]})
            gts += [{**a, "image_id": i, "id": len(gts) + k + 1} for k, a in enumerate(im["gt"])]
            dts += [{**a, "image_id": i} for a in im["dt"]]
        nan = {"ap": math.nan, "ap50": math.nan, "ap_class": {c["name"]: math.nan for c in cats}}
        if not gts:
            return nan
        with _silenced(pycocotools.coco, pycocotools.cocoeval):  # the library prints its progress
            coco_gt = COCO()
            coco_gt.dataset = {"images": images, "categories": cats, "annotations": gts}
            coco_gt.createIndex()
            if dts:
                coco_dt = coco_gt.loadRes(dts)
            else:  # loadRes cannot take an empty list; an empty result set scores 0, not NaN
                coco_dt = COCO()
                coco_dt.dataset = {"images": images, "categories": cats, "annotations": []}
                coco_dt.createIndex()
            ev = COCOeval(coco_gt, coco_dt, iouType="segm")
            ev.params.maxDets = [1, 10, self.max_dets]
            ev.evaluate()
            ev.accumulate()
        # AP and AP50 as COCOeval.summarize computes them (area "all", the most detections)
        precision = ev.eval["precision"][:, :, :, 0, -1]  # (IoU, recall, category)

        def mean(p: np.ndarray) -> float:
            return float(p[p > -1].mean()) if (p > -1).any() else math.nan

        name_of = {c["id"]: c["name"] for c in cats}
        per_class = {name_of[c]: mean(precision[:, :, k]) for k, c in enumerate(ev.params.catIds)}
        ap, ap50 = mean(precision), mean(precision[0])  # iouThrs[0] is 0.50
        return {"ap": ap, "ap50": ap50, "ap_class": per_class}


class PanopticQuality:
    """Panoptic quality (Kirillov et al., CVPR 2019) over the train classes, from instanceIds maps.

    Segments: every instance (id >= 1000) and, per class, the pixels with that class's plain
    label id (a stuff region, or a thing region without an instance). Void: pixels whose
    class has no train id. As in the COCO panoptic evaluation (``panopticapi``): a prediction
    and a ground-truth segment of the same class match when their IoU exceeds 0.5, with the
    prediction's void pixels left out of the union; unmatched ground-truth segments are false
    negatives (thing regions without an instance are crowd: never counted); an unmatched
    prediction is a false positive unless more than half of it lies on void or on a crowd
    region of its class. Per class ``PQ = sum IoU(TP) / (TP + FP/2 + FN/2) = SQ * RQ``;
    ``pq`` averages the classes with any TP, FP or FN, ``pq_th`` / ``pq_st`` the things / stuff.

    Ours: pycocotools has no PQ and the reference ``panopticapi`` is not packaged, so this is
    our implementation of its rules; the state is a (num_classes, 4) float64 tensor (IoU sum,
    TP, FP, FN) that can be all-reduced.
    """

    def __init__(self, num_classes: int = 19):
        self.num_classes = num_classes
        self.stats = torch.zeros(num_classes, 4, dtype=torch.float64)

    def update(self, pred: torch.Tensor | np.ndarray, target: torch.Tensor | np.ndarray) -> None:
        """pred, target: (H,W) or (B,H,W) Cityscapes instanceIds of equal shape."""
        pred, target = _as_numpy_ids(pred), _as_numpy_ids(target)
        if pred.shape != target.shape or pred.ndim not in (2, 3):
            raise ValueError(f"PanopticQuality: pred and target must be equal (H,W) or (B,H,W), got "
                             f"{pred.shape}, {target.shape}")
        for p, t in zip(pred.reshape(-1, *pred.shape[-2:]), target.reshape(-1, *target.shape[-2:])):
            self._update_one(p.reshape(-1), t.reshape(-1))

    def _update_one(self, pred: np.ndarray, target: np.ndarray) -> None:
        things = set(thing_train_ids())
        gt_cls, pr_cls = _segment_classes(target), _segment_classes(pred)
        if (pr_cls[pr_cls != IGNORE_INDEX] >= self.num_classes).any():
            raise ValueError(f"PanopticQuality: prediction has classes outside [0, {self.num_classes})")
        gt_void, pr_void = gt_cls == IGNORE_INDEX, pr_cls == IGNORE_INDEX
        gt_ids, gt_area = np.unique(target[~gt_void], return_counts=True)
        pr_ids, pr_area = np.unique(pred[~pr_void], return_counts=True)
        gt_area, pr_area = dict(zip(gt_ids.tolist(), gt_area.tolist())), dict(zip(pr_ids.tolist(), pr_area.tolist()))
        cls_of = lambda v: int(_segment_classes(np.array(v)))  # noqa: E731
        crowd = {g for g in gt_area if g < INSTANCE_DIVISOR and cls_of(g) in things}
        # pixel counts of (gt segment, predicted segment); gt -1 = void
        gt_key = np.where(gt_void, -1, target)
        pairs, counts = np.unique(np.stack([gt_key[~pr_void], pred[~pr_void]]), axis=1, return_counts=True)
        inter = {(int(g), int(p)): int(n) for (g, p), n in zip(pairs.T, counts)}
        void_inter = {p: n for (g, p), n in inter.items() if g == -1}
        matched_gt, matched_pr = set(), set()
        for (g, p), n in inter.items():
            if g == -1 or g in crowd or cls_of(g) != cls_of(p):
                continue
            union = pr_area[p] + gt_area[g] - n - void_inter.get(p, 0)
            iou = n / union
            if iou > 0.5:
                c = cls_of(g)
                self.stats[c, 0] += iou
                self.stats[c, 1] += 1
                matched_gt.add(g)
                matched_pr.add(p)
        for g in gt_area:
            if g not in matched_gt and g not in crowd:
                self.stats[cls_of(g), 3] += 1
        crowd_of_class = {cls_of(g): g for g in crowd}
        for p, area in pr_area.items():
            if p in matched_pr:
                continue
            c = cls_of(p)
            ignored = void_inter.get(p, 0) + (inter.get((crowd_of_class[c], p), 0) if c in crowd_of_class else 0)
            if ignored > 0.5 * area:
                continue
            self.stats[c, 2] += 1

    def state(self) -> torch.Tensor:
        return self.stats.clone()

    def merge(self, state: torch.Tensor) -> None:
        self.stats += state.to("cpu", torch.float64)

    def reset(self) -> None:
        self.stats.zero_()

    def compute(self) -> dict:
        """``{"pq", "sq", "rq", "pq_th", "pq_st", "pq_class": list}`` (NaN where no class counts)."""
        iou, tp, fp, fn = self.stats.unbind(1)
        denom = tp + 0.5 * fp + 0.5 * fn
        valid = denom > 0
        pq = torch.where(valid, iou / denom.clamp(min=1e-12), torch.full_like(iou, math.nan))
        sq = torch.where(tp > 0, iou / tp.clamp(min=1), torch.zeros_like(iou))
        rq = torch.where(valid, tp / denom.clamp(min=1e-12), torch.zeros_like(iou))
        thing = torch.zeros(self.num_classes, dtype=torch.bool)
        thing[[c for c in thing_train_ids() if c < self.num_classes]] = True

        def mean(x: torch.Tensor, keep: torch.Tensor) -> float:
            keep = keep & valid
            return float(x[keep].mean()) if keep.any() else math.nan

        every = torch.ones_like(thing)
        return {
            "pq": mean(pq, every),
            "sq": mean(sq, every),
            "rq": mean(rq, every),
            "pq_th": mean(pq, thing),
            "pq_st": mean(pq, ~thing),
            "pq_class": [float(v) for v in pq],
        }
