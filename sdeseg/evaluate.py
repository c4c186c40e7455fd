"""Evaluation shared by the stages' validation and ``sdeseg eval``: one loop, so the numbers agree.

A model here is any network of sdeseg called on a bare (B,3,H,W) image in [0, 1]: it returns
``("seg", 0)`` logits (segmentation and multi-task models) and/or ``("disp", 0)`` sigmoid
disparity (SDE depth nets, multi-task models). :func:`accumulate` runs it over batches and
adds to the metrics given; the caller reduces across ranks (the stages) or not (``sdeseg
eval``) and turns the sums into the flat dicts of :func:`seg_summary` / :func:`depth_summary`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable

import torch

from sdeseg.data.classes import class_names
from sdeseg.metrics import DepthMetric, SegmentationMetric
from sdeseg.models import DepthRange


@torch.no_grad()
def accumulate(
    model: torch.nn.Module,
    batches: Iterable,
    device: torch.device,
    *,
    seg: SegmentationMetric | None = None,
    depth: tuple[DepthMetric, DepthMetric] | None = None,
    depth_range: DepthRange | None = None,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> None:
    """Add the model's predictions on ``batches`` to ``seg`` (argmax against the labels) and
    ``depth`` (``(model, constant baseline)``: median-scaled errors against ground-truth depth,
    the baseline predicting a constant). Batches without labels / depth are skipped for that
    metric. The model is evaluated in eval mode and put back in its previous mode."""
    if depth is not None and depth_range is None:
        raise ValueError("accumulate: depth metrics need the model's DepthRange")
    was_training = model.training
    model.eval()
    for batch in batches:
        want_seg = seg is not None and batch.label is not None
        want_depth = depth is not None and batch.depth is not None
        if not (want_seg or want_depth):
            continue
        batch = batch.to(device)
        with autocast():
            out = model(batch.images[0])
        if want_seg:
            seg.update(out[("seg", 0)].argmax(1), batch.label)
        if want_depth:
            gt = batch.depth.cpu()
            depth[0].update(depth_range.depth(out[("disp", 0)]).cpu(), gt)
            depth[1].update(torch.ones_like(gt), gt)
    model.train(was_training)


def seg_summary(metric: SegmentationMetric, prefix: str = "seg") -> dict[str, float]:
    """``<prefix>/miou``, ``<prefix>/acc`` and ``<prefix>/iou/<class>`` of an accumulated metric."""
    res = metric.compute()
    out = {f"{prefix}/miou": res["miou"], f"{prefix}/acc": res["acc"]}
    out.update({f"{prefix}/iou/{name}": v for name, v in zip(class_names(), res["iou"])})
    return out


def depth_summary(ours: DepthMetric, const: DepthMetric, prefix: str = "depth") -> dict[str, float]:
    """The model's depth errors, the constant baseline's abs_rel / a1 / rmse and their ratio."""
    metrics = {f"{prefix}/{k}": v for k, v in ours.compute().items()}
    base = const.compute()
    for k in ("abs_rel", "a1", "rmse"):
        metrics[f"{prefix}/{k}_baseline"] = base[k]
    if not math.isnan(metrics[f"{prefix}/abs_rel"]):
        metrics[f"{prefix}/abs_rel_ratio"] = metrics[f"{prefix}/abs_rel"] / base["abs_rel"]
    return metrics
