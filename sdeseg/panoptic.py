"""Bottom-up instance segmentation maths, Panoptic-DeepLab style (Cheng et al., CVPR 2020).

Instances are encoded as Cityscapes instanceIds (``sdeseg.data.classes``: label id * 1000 +
index on thing instances, the plain label id elsewhere). A network predicts semantic logits,
an instance-centre heatmap and, per pixel, the 2-D offset (dy, dx) in pixels to the centre
of its instance (:class:`sdeseg.models.InstanceModel`). This module holds the two pure
functions around it:

* :func:`instance_targets` -- instance map -> regression targets: a Gaussian heatmap peaking
  at 1 on every instance's centre of mass (rounded to a pixel), the offsets to it, and weights;
* :func:`group_instances` -- predictions -> instance map: centres are local maxima of the
  heatmap (max-pool NMS) above a threshold, at most ``top_k``; every thing pixel joins the
  centre nearest to where its offset points; an instance's class is the majority vote of
  the semantic prediction over its pixels; score = centre value x mean class probability.

From Panoptic-DeepLab: the target definition, sigma 8 px at 1024x2048 (scaled to other image
heights by :func:`center_sigma`), threshold 0.1, NMS kernel 7 and top-k 200 (its Cityscapes
settings, at full resolution), majority voting and the score. Ours: thing pixels that find no
centre keep the plain label id of their class (as Cityscapes' group regions), so the map
stays in one convention; instances are numbered per class by descending score.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from sdeseg.data.classes import (
    IGNORE_INDEX,
    INSTANCE_DIVISOR,
    label_ids_to_train_ids,
    thing_train_ids,
    train_ids_to_label_ids,
)

CENTER_SIGMA = 8.0  # Gaussian sigma of the centre heatmap in pixels, at REFERENCE_HEIGHT
REFERENCE_HEIGHT = 1024  # Cityscapes' full-resolution height, where Panoptic-DeepLab uses sigma 8
CENTER_THRESHOLD = 0.1
NMS_KERNEL = 7
TOP_K = 200
_CHUNK = 1 << 16  # thing pixels per block of the pixel-to-centre distance matrix


@lru_cache(maxsize=1)
def _tables() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """label id (0..999) -> train id, train id (0..255) -> label id, train id -> is thing."""
    to_train = np.full(INSTANCE_DIVISOR, IGNORE_INDEX, dtype=np.int64)
    to_train[:256] = label_ids_to_train_ids(np.arange(256))
    to_label = train_ids_to_label_ids(np.arange(256)).astype(np.int64)
    thing = np.zeros(256, dtype=bool)
    thing[list(thing_train_ids())] = True
    return to_train, to_label, thing


def _lut(i: int, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(_tables()[i]).to(device)


def semantic_of(instance_ids: torch.Tensor) -> torch.Tensor:
    """Cityscapes instanceIds (any shape, integer) -> train ids (int64, 255 = ignore)."""
    ids = instance_ids.long()
    label = torch.where(ids >= INSTANCE_DIVISOR, ids // INSTANCE_DIVISOR, ids).clamp(0, INSTANCE_DIVISOR - 1)
    return _lut(0, ids.device)[label]


def is_thing(train_ids: torch.Tensor) -> torch.Tensor:
    """Bool mask of pixels whose train id is a thing class (person .. bicycle)."""
    return _lut(2, train_ids.device)[train_ids.long().clamp(0, 255)]


def center_sigma(height: int, sigma: float = CENTER_SIGMA, reference_height: int = REFERENCE_HEIGHT) -> float:
    """Panoptic-DeepLab's sigma (8 px at 1024 rows) scaled to images ``height`` rows high."""
    return sigma * height / reference_height


def instance_targets(instance_ids: torch.Tensor, sigma: float) -> dict[str, torch.Tensor]:
    """Regression targets of the instance head from Cityscapes instanceIds.

    Args:
        instance_ids: (B,H,W) or (H,W) integer instanceIds.
        sigma: Gaussian sigma of the centre heatmap in pixels (e.g. ``center_sigma(H)``).

    Returns:
        ``semantic`` (B,H,W) int64 train ids (255 = ignore); ``center`` (B,1,H,W) float32, the
        maximum over instances of ``exp(-|p - c|^2 / (2 sigma^2))`` with c the instance's
        centre of mass rounded to a pixel (so the peak is exactly 1); ``offset`` (B,2,H,W)
        float32, ``c - p`` as (dy, dx) on instance pixels, 0 elsewhere; ``center_weight``
        (B,1,H,W), 1 except on ignored pixels and thing regions without an instance (no
        centre is known there); ``offset_weight`` (B,1,H,W), 1 on thing-instance pixels.
        A thing instance is a pixel with an id >= 1000 whose class has a train id.
    """
    if sigma <= 0:
        raise ValueError(f"instance_targets: sigma must be > 0, got {sigma}")
    ids = instance_ids.long()
    if ids.dim() == 2:
        ids = ids[None]
    if ids.dim() != 3:
        raise ValueError(f"instance_targets: expected (B,H,W) or (H,W) ids, got {tuple(instance_ids.shape)}")
    b, h, w = ids.shape
    dev = ids.device
    semantic = semantic_of(ids)
    thing = is_thing(semantic)
    instance = thing & (ids >= INSTANCE_DIVISOR)
    center = torch.zeros(b, 1, h, w, device=dev)
    offset = torch.zeros(b, 2, h, w, device=dev)
    ys = torch.arange(h, device=dev, dtype=torch.float32)
    xs = torch.arange(w, device=dev, dtype=torch.float32)
    for i in range(b):
        mask = instance[i]
        if not mask.any():
            continue
        _, inverse = torch.unique(ids[i][mask], return_inverse=True)
        py, px = torch.nonzero(mask, as_tuple=True)
        count = torch.bincount(inverse).float()
        cy = torch.round(torch.bincount(inverse, weights=py.float()) / count)
        cx = torch.round(torch.bincount(inverse, weights=px.float()) / count)
        offset[i, 0][mask] = cy[inverse] - py.float()
        offset[i, 1][mask] = cx[inverse] - px.float()
        # separable Gaussians: (K,H) x (K,W), maximum over the K instances
        gy = torch.exp(-((ys[None] - cy[:, None]) ** 2) / (2 * sigma**2))
        gx = torch.exp(-((xs[None] - cx[:, None]) ** 2) / (2 * sigma**2))
        for k in range(len(cy)):
            center[i, 0] = torch.maximum(center[i, 0], gy[k][:, None] * gx[k][None, :])
    center_weight = ((semantic != IGNORE_INDEX) & ~(thing & ~instance)).float()[:, None]
    return {
        "semantic": semantic,
        "center": center,
        "offset": offset,
        "center_weight": center_weight,
        "offset_weight": instance.float()[:, None],
    }


def find_centers(
    center: torch.Tensor, threshold: float = CENTER_THRESHOLD, nms_kernel: int = NMS_KERNEL, top_k: int = TOP_K
) -> tuple[torch.Tensor, torch.Tensor]:
    """Instance centres: local maxima of the heatmap over ``nms_kernel`` x ``nms_kernel``
    windows (max-pool NMS) with a value above ``threshold``, the ``top_k`` highest.

    Args:
        center: (H,W) or (1,H,W) heatmap.

    Returns:
        ``(yx, scores)``: (K,2) int64 pixel coordinates and (K,) heatmap values, by
        descending value (ties in raster order). A plateau keeps all its pixels.
    """
    if nms_kernel < 1 or nms_kernel % 2 == 0:
        raise ValueError(f"find_centers: nms_kernel must be odd and >= 1, got {nms_kernel}")
    heat = center.detach().float().reshape(1, 1, *center.shape[-2:])
    pooled = F.max_pool2d(heat, nms_kernel, stride=1, padding=nms_kernel // 2)
    keep = (heat == pooled) & (heat > threshold)
    yx = torch.nonzero(keep[0, 0])
    scores = heat[0, 0][keep[0, 0]]
    order = torch.argsort(scores, descending=True, stable=True)[:top_k]
    return yx[order], scores[order]


def group_instances(
    semantic: torch.Tensor,
    center: torch.Tensor,
    offset: torch.Tensor,
    probs: torch.Tensor | None = None,
    threshold: float = CENTER_THRESHOLD,
    nms_kernel: int = NMS_KERNEL,
    top_k: int = TOP_K,
) -> tuple[torch.Tensor, dict[int, float]]:
    """One image's instance map from the semantic prediction, heatmap and offsets.

    Args:
        semantic: (H,W) predicted train ids (255 = ignore).
        center: (H,W) or (1,H,W) centre heatmap.
        offset: (2,H,W) predicted (dy, dx) in pixels from each pixel to its centre.
        probs: optional (C,H,W) class probabilities for the scores (default: score = centre value).
        threshold, nms_kernel, top_k: centre selection (:func:`find_centers`).

    Returns:
        ``(ids, scores)``: (H,W) int64 Cityscapes instanceIds -- a thing pixel joins the
        centre nearest to ``pixel + offset`` (ties: the higher-scoring centre); each centre's
        pixels form one instance of the majority class of ``semantic`` over them (ties: the
        smaller train id), numbered per class from 0 by descending score; thing pixels
        without any centre and all other pixels hold their class's label id (ignore -> 0) --
        and ``scores``, instance id -> centre value x mean probability of its class over its
        pixels (centre value alone without ``probs``).
    """
    semantic = semantic.long()
    h, w = semantic.shape
    dev = semantic.device
    ids = _lut(1, dev)[semantic.clamp(0, 255)]
    thing = is_thing(semantic)
    yx, heat = find_centers(center, threshold, nms_kernel, top_k)
    if len(yx) == 0 or not thing.any():
        return ids, {}
    py, px = torch.nonzero(thing, as_tuple=True)
    target = torch.stack([py + offset[0][thing].float(), px + offset[1][thing].float()], 1)
    centers = yx.to(dev).float()
    nearest = torch.cat([torch.cdist(t, centers).argmin(1) for t in target.split(_CHUNK)])
    cls = semantic[thing]
    num_centers = len(yx)
    votes = torch.zeros(num_centers, 256, dtype=torch.int64, device=dev)
    votes.index_put_((nearest, cls), torch.ones_like(cls), accumulate=True)
    present = votes.sum(1) > 0
    majority = votes.argmax(1)  # the first maximum: the smaller train id wins a tie
    # index per class in centre order (centres come by descending score)
    value = torch.zeros(num_centers, dtype=torch.int64, device=dev)
    counter: dict[int, int] = {}
    for k in torch.nonzero(present)[:, 0].tolist():
        c = int(majority[k])
        value[k] = int(_tables()[1][c]) * INSTANCE_DIVISOR + counter.get(c, 0)
        counter[c] = counter.get(c, 0) + 1
    ids[thing] = value[nearest]
    scores: dict[int, float] = {}
    for k in torch.nonzero(present)[:, 0].tolist():
        score = float(heat[k])
        if probs is not None:
            members = nearest == k
            score *= float(probs[int(majority[k])][py[members], px[members]].float().mean())
        scores[int(value[k])] = score
    return ids, scores


def instances_from_outputs(
    outputs: dict[tuple, torch.Tensor],
    threshold: float = CENTER_THRESHOLD,
    nms_kernel: int = NMS_KERNEL,
    top_k: int = TOP_K,
) -> list[tuple[torch.Tensor, dict[int, float]]]:
    """:func:`group_instances` for every image of an instance model's outputs.

    ``outputs`` holds ``("seg", 0)`` logits (B,C,H,W), ``("center", 0)`` (B,1,H,W) and
    ``("offset", 0)`` (B,2,H,W); the semantic prediction is the argmax of the logits and the
    scores use their softmax. Returns one ``(ids (H,W), scores)`` per image.
    """
    logits = outputs[("seg", 0)].detach().float()
    probs = logits.softmax(1)
    semantic = logits.argmax(1)
    return [
        group_instances(semantic[i], outputs[("center", 0)][i], outputs[("offset", 0)][i].detach(), probs[i],
                        threshold, nms_kernel, top_k)
        for i in range(len(logits))
    ]


def pseudo_instances(
    outputs: dict[tuple, torch.Tensor],
    class_threshold: float,
    score_threshold: float,
    threshold: float = CENTER_THRESHOLD,
    nms_kernel: int = NMS_KERNEL,
    top_k: int = TOP_K,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A teacher's confidence-filtered instance maps, the pseudo-labels of unlabeled images.

    Pixels whose largest class probability is below ``class_threshold`` become void (label id
    0); the rest are grouped as :func:`instances_from_outputs` does (centres from ``threshold``,
    ``nms_kernel``, ``top_k``), and an instance whose score is below ``score_threshold`` keeps
    its class but loses its identity (its pixels hold the plain label id, like a Cityscapes
    group region). :func:`instance_targets` of the result then trains the semantic output on
    the confident pixels, and the centre and offset outputs on the kept instances only (no
    centre target where a dropped instance was, no offset target on its pixels).

    Args:
        outputs: the teacher's ``("seg", 0)`` logits (B,C,H,W), ``("center", 0)`` (B,1,H,W),
            ``("offset", 0)`` (B,2,H,W).

    Returns:
        ``(ids, stats)``: (B,H,W) int64 instanceIds; ``stats`` ``confident`` (the fraction of
        confident pixels) and ``instances`` (kept instances per image), detached scalars.
    """
    logits = outputs[("seg", 0)].detach().float()
    probs = logits.softmax(1)
    confidence, semantic = probs.max(1)
    semantic = semantic.masked_fill(confidence < class_threshold, IGNORE_INDEX)
    maps, kept = [], 0
    for i in range(len(logits)):
        ids, scores = group_instances(semantic[i], outputs[("center", 0)][i].detach(),
                                      outputs[("offset", 0)][i].detach(), probs[i], threshold, nms_kernel, top_k)
        for value, score in scores.items():
            if score < score_threshold:
                ids[ids == value] = value // INSTANCE_DIVISOR
            else:
                kept += 1
        maps.append(ids)
    stats = {"confident": (confidence >= class_threshold).float().mean(),
             "instances": torch.tensor(kept / max(len(logits), 1))}
    return torch.stack(maps), stats
