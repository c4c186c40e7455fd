"""Evaluation shared by the stages' validation and ``sdeseg eval``: one loop, so the numbers agree.

A model here is any network of sdeseg called on a bare (B,3,H,W) image in [0, 1]: it returns
``("seg", 0)`` logits (segmentation and multi-task models) and/or ``("disp", 0)`` sigmoid
disparity (SDE depth nets, multi-task models). :func:`accumulate` runs it over batches and
adds to the metrics given; the caller reduces across ranks (the stages) or not (``sdeseg
eval``) and turns the sums into the flat dicts of :func:`seg_summary` / :func:`depth_summary`.
Instance models (``("center", 0)`` and ``("offset", 0)`` too) go through
:func:`accumulate_instances` and :func:`instance_summary` (mask AP, AP50, PQ).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Mapping

import torch

from sdeseg.data.classes import class_names
from sdeseg.metrics import DepthMetric, MaskAP, PanopticQuality, SegmentationMetric
from sdeseg.models import DepthRange
from sdeseg.panoptic import instances_from_outputs


def _outputs(model: torch.nn.Module, batches: Iterable, device: torch.device,
             wanted: Callable[[object], bool], autocast: Callable[[], contextlib.AbstractContextManager]):
    """Yield ``(batch, model outputs)`` for every batch ``wanted(batch)`` accepts (on ``device``),
    the model in eval mode; its previous mode is restored at the end."""
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            if not wanted(batch):
                continue
            batch = batch.to(device)
            with autocast():
                out = model(batch.images[0])
            yield batch, out
    finally:
        model.train(was_training)


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
    def want_seg(b):
        return seg is not None and b.label is not None

    def want_depth(b):
        return depth is not None and b.depth is not None

    for batch, out in _outputs(model, batches, device, lambda b: want_seg(b) or want_depth(b), autocast):
        if want_seg(batch):
            seg.update(out[("seg", 0)].argmax(1), batch.label)
        if want_depth(batch):
            gt = batch.depth.cpu()
            depth[0].update(depth_range.depth(out[("disp", 0)]).cpu(), gt)
            depth[1].update(torch.ones_like(gt), gt)


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


@torch.no_grad()
def accumulate_instances(
    model: torch.nn.Module,
    batches: Iterable,
    device: torch.device,
    grouping: Mapping[str, float | int],
    *,
    seg: SegmentationMetric | None = None,
    mask_ap: MaskAP | None = None,
    pq: PanopticQuality | None = None,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> None:
    """Add an instance model's predictions on ``batches`` to ``seg`` (argmax against the labels),
    ``mask_ap`` and ``pq`` (instances grouped with ``grouping``, the keyword arguments of
    :func:`sdeseg.panoptic.instances_from_outputs`, against the instance maps).

    ``model(images)`` returns ``("seg", 0)``, ``("center", 0)`` and ``("offset", 0)`` (e.g. a
    :class:`sdeseg.models.DepthGuidedInstanceNet`). A sample whose instance map is all 0
    (it has no ``instance.png``) is left out of AP and PQ. Eval mode, as :func:`accumulate`.
    """
    def want_seg(b):
        return seg is not None and b.label is not None

    def want_inst(b):
        return (mask_ap is not None or pq is not None) and b.instance is not None

    for batch, out in _outputs(model, batches, device, lambda b: want_seg(b) or want_inst(b), autocast):
        if want_seg(batch):
            seg.update(out[("seg", 0)].argmax(1), batch.label)
        if want_inst(batch):
            for (ids, scores), target in zip(instances_from_outputs(out, **grouping), batch.instance.cpu()):
                if not bool((target != 0).any()):
                    continue
                if mask_ap is not None:
                    mask_ap.update(ids.cpu(), scores, target)
                if pq is not None:
                    pq.update(ids.cpu(), target)


def instance_summary(mask_ap: MaskAP, pq: PanopticQuality, prefix: str = "inst") -> dict[str, float]:
    """``<prefix>/ap``, ``/ap50`` (thing classes, COCO mask AP), ``/pq``, ``/sq``, ``/rq``, ``/pq_th``,
    ``/pq_st`` and ``<prefix>/ap/<class>`` of accumulated (and reduced) metrics."""
    ap = mask_ap.compute()
    out = {f"{prefix}/ap": ap["ap"], f"{prefix}/ap50": ap["ap50"]}
    out.update({f"{prefix}/{k}": v for k, v in pq.compute().items() if k != "pq_class"})
    out.update({f"{prefix}/ap/{name}": v for name, v in ap["ap_class"].items()})
    return out
