"""Coherent depth regions: superpixels merged by their 3D proximity (seed 003, CPCDR).

Zeng et al. group the pixels of an image into regions that are coherent in 3D, from the
estimated depth, and copy-paste those regions into other images for contrastive
pretraining (:mod:`sdeseg.copy_paste`, :mod:`sdeseg.losses.contrastive`). Pipeline of
:func:`depth_regions`:

1. **Superpixels** — scikit-image's SLIC (compactness 10, sigma 1, 10,000 segments: the
   paper's; fewer on small images, :func:`default_segments`). Ours: by default SLIC also
   sees log-depth as a fourth channel (``slic_depth_weight``), because a superpixel that
   straddles a depth edge can never be split again by the merging; ``slic_depth_weight=0``
   is the paper's colour-only SLIC.
2. **3D centroids** — every pixel is back-projected, ``X = z K^-1 [u, v, 1]`` (pixel centres
   at integer (u, v) = (column, row), the :mod:`sdeseg.camera` convention), each axis divided
   by its standard deviation over the image (``standardize``, the official code's), and
   averaged per superpixel. The paper's.
3. **Edge weights** — superpixels that touch (4-connectivity) get
   ``w = sigmoid(48 ‖c_i − c_j‖ / (z_i + z_j) − 4)``: the centroid distance relative to their
   depth, so a jump of a few metres separates near surfaces but not far ones. The paper's
   (``distance_weight``, ``bias``).
4. **Merging** — the paper runs Infomap on link strength 1/w and collapses communities that
   are still joined by an edge with w < 0.2, level after level. Ours (no Infomap dependency,
   and deterministic): greedy agglomeration with *average boundary linkage* — repeatedly
   merge the two adjacent regions whose boundary edges have the smallest mean w, while that
   mean is below ``merge_threshold`` (0.2, the paper's constant). The linkage of merged
   regions is the mean of the superpixel edges between them, as the official code's
   community graph averages its edge weights. Averaging, unlike chaining single edges
   (union-find), keeps apart two regions whose common boundary is mostly a depth jump even
   where a few edges along it are close in 3D (an object whose outline is mostly an
   occluding contour, touching the ground at its foot). Limitation (the paper's weight as
   much as ours): an object whose whole boundary with a surface is contact at equal depth —
   a box standing on the road, seen from the front — merges with that surface.

:func:`colour_regions` is the ablation "regions from colour superpixels only": the same
SLIC without depth and the same agglomeration on the CIE-Lab colour distance of superpixels.

Region ids are relabelled ``0..R-1`` in raster order of their first pixel. Everything is
deterministic (SLIC starts from a grid; the merge order breaks ties by region id).
Constants are the official ones unless marked (``../shared/METHODS.md``,
"Depth-region contrastive pretraining"). Nothing here imports ray, deepspeed or
torch.distributed.
"""

from __future__ import annotations

import heapq

import numpy as np
import torch
from scipy import ndimage
from skimage.color import rgb2lab
from skimage.segmentation import slic

# the official segmentation: 10,000 SLIC segments on KITTI images of 375 x 1242 pixels
OFFICIAL_SEGMENTS = 10_000
MIN_SEGMENT_PIXELS = 4  # small images: at most one segment per 2x2 pixels


def default_segments(height: int, width: int) -> int:
    """SLIC segment count for an image of ``height x width``: the official 10,000, capped at one
    segment per :data:`MIN_SEGMENT_PIXELS` pixels on small images.

    The count, not the segment size, is kept across resolutions: with standardised 3D
    coordinates (``standardize``) the merge threshold measures distances in units of the
    scene's spread, so it expects segments of the same size *relative to the image*.
    """
    return max(1, min(OFFICIAL_SEGMENTS, (height * width) // MIN_SEGMENT_PIXELS))


def _check_image(image: torch.Tensor) -> np.ndarray:
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"regions: image must be (3,H,W), got {tuple(image.shape)}")
    return image.detach().to("cpu", torch.float64).clamp(0.0, 1.0).permute(1, 2, 0).numpy()


def _lab(img: np.ndarray) -> np.ndarray:
    """CIE-Lab (H,W,3) of an RGB image (H,W,3) in [0, 1], contrast-stretched to [0, 1] first as
    ``skimage.segmentation.slic`` does with its input."""
    lo, hi = img.min(), img.max()
    return rgb2lab((img - lo) / (hi - lo) if hi > lo else img - lo)


def _superpixels(lab: np.ndarray, extra: np.ndarray | None, n_segments: int, compactness: float,
                 sigma: float) -> np.ndarray:
    """SLIC labels (H,W) int64 in 0..S-1 (contiguous) of a CIE-Lab image (H,W,3) from :func:`_lab`.

    Without ``extra`` this is ``slic(rgb, n_segments, compactness, sigma, start_label=0)``: the
    Lab channels are smoothed with a Gaussian of width ``sigma`` (reflect padding) and the
    colour distance is in Lab units. The ``extra`` channels (H,W,C), e.g. scaled log-depth, are
    in the same units and are not smoothed, so a depth edge stays sharp and no superpixel
    straddles it.
    """
    features = ndimage.gaussian_filter(lab, sigma=(sigma, sigma, 0.0), mode="reflect") if sigma > 0 else lab
    if extra is not None:
        features = np.concatenate([features, extra], axis=-1)
    # slic rescales a non-RGB input to [0, 1] by its global range; dividing the compactness by
    # that range keeps the ratio of colour to spatial distance in Lab units
    spread = float(features.max() - features.min()) or 1.0
    sp = slic(features, n_segments=n_segments, compactness=compactness / spread, sigma=0, start_label=0,
              convert2lab=False, channel_axis=-1)
    return np.unique(sp, return_inverse=True)[1].reshape(sp.shape).astype(np.int64)


def _adjacent_pairs(sp: np.ndarray) -> np.ndarray:
    """(E,2) int64 unique pairs i < j of superpixels that touch (4-connectivity), sorted."""
    a = np.concatenate([sp[:, :-1].ravel(), sp[:-1, :].ravel()])
    b = np.concatenate([sp[:, 1:].ravel(), sp[1:, :].ravel()])
    differ = a != b
    lo, hi = np.minimum(a[differ], b[differ]), np.maximum(a[differ], b[differ])
    n = int(sp.max()) + 1
    keys = np.unique(lo * n + hi)
    return np.stack([keys // n, keys % n], axis=1)


def _segment_means(sp: np.ndarray, values: np.ndarray) -> np.ndarray:
    """(S,C) per-superpixel means of per-pixel ``values`` (H,W,C)."""
    flat = sp.ravel()
    count = np.bincount(flat).astype(np.float64)
    return np.stack([np.bincount(flat, weights=values[..., c].ravel()) / count
                     for c in range(values.shape[-1])], axis=1)


def back_project(depth: np.ndarray, K: np.ndarray) -> np.ndarray:
    """Camera coordinates (H,W,3) of every pixel: ``X = depth * K^-1 [u, v, 1]``, (u, v) =
    (column, row), integer coordinates at pixel centres (``sdeseg.ops.inverse_warp``'s)."""
    h, w = depth.shape
    v, u = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing="ij")
    rays = np.stack([u, v, np.ones_like(u)], axis=-1) @ np.linalg.inv(K).T  # (H,W,3)
    return rays * depth[..., None]


def _merge(num_nodes: int, pairs: np.ndarray, weights: np.ndarray, threshold: float) -> np.ndarray:
    """Greedy agglomeration with average boundary linkage.

    Repeatedly merges the two adjacent groups with the smallest linkage (the mean of the
    ``weights`` of the node pairs between them) while it is below ``threshold``; ties go to
    the smallest group ids. Returns the (num_nodes,) group representative of every node.

    Cost: O(E log E) — merging a group into another only changes the linkage to their common
    neighbours, so only those get new heap entries (stale ones are skipped when popped).
    """
    parent = np.arange(num_nodes)
    links: list[dict[int, list[float]]] = [{} for _ in range(num_nodes)]  # node -> {neighbour: [sum, count]}
    for (i, j), wt in zip(pairs.tolist(), weights.tolist()):
        links[i][j] = links[j][i] = [wt, 1.0]  # one list per pair, shared by both ends
    heap = [(wt, i, j) for (i, j), wt in zip(pairs.tolist(), weights.tolist()) if wt < threshold]
    heapq.heapify(heap)

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = int(parent[i])
        return i

    while heap:
        wt, i, j = heapq.heappop(heap)
        ri, rj = find(i), find(j)
        if ri == rj:
            continue
        s, c = links[ri][rj]
        if s / c != wt:  # stale: the linkage changed since this entry was pushed
            continue
        keep, gone = (ri, rj) if len(links[ri]) >= len(links[rj]) else (rj, ri)
        parent[gone] = keep
        del links[keep][gone]
        for n, (sn, cn) in links[gone].items():
            if n == keep:
                continue
            del links[n][gone]
            if n in links[keep]:
                entry = links[keep][n]
                entry[0] += sn
                entry[1] += cn
                links[n][keep] = entry
                mean = entry[0] / entry[1]
                if mean < threshold:
                    heapq.heappush(heap, (mean, min(keep, n), max(keep, n)))
            else:
                entry = [sn, cn]
                links[keep][n] = entry
                links[n][keep] = entry
        links[gone] = {}
    return np.array([find(i) for i in range(num_nodes)], dtype=np.int64)


def relabel_raster(labels: np.ndarray) -> np.ndarray:
    """Ids renumbered ``0..R-1`` in raster order of each id's first pixel (same shape, int64)."""
    uniq, first, inverse = np.unique(labels.ravel(), return_index=True, return_inverse=True)
    rank = np.empty(len(uniq), dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(uniq))
    return rank[inverse].reshape(labels.shape)


def depth_regions(
    image: torch.Tensor,
    depth: torch.Tensor,
    K: torch.Tensor,
    *,
    n_segments: int | None = None,
    compactness: float = 10.0,
    sigma: float = 1.0,
    slic_depth_weight: float = 20.0,
    standardize: bool = True,
    distance_weight: float = 48.0,
    bias: float = -4.0,
    merge_threshold: float = 0.2,
) -> torch.Tensor:
    """Coherent depth regions of one image (see the module docstring for the steps).

    Args:
        image: (3,H,W) float RGB in [0, 1].
        depth: (H,W) depth > 0 (metres, or self-supervised depth of any scale: the weights are
            ratios of distances, invariant to a global scale). Fill invalid pixels first.
        K: (3,3) pixel intrinsics of this image size.
        n_segments: SLIC segments; default :func:`default_segments`.
        compactness, sigma: SLIC's (the paper's 10 and 1).
        slic_depth_weight: ours — weight of ``log(depth)`` as an extra SLIC channel, in CIE-Lab
            units per unit of log-depth (20: a 2x depth jump is ~14 Lab units); 0 = the
            paper's colour-only SLIC.
        standardize: divide each 3D axis by its standard deviation over the image (the
            official code's).
        distance_weight, bias: ``w = sigmoid(distance_weight · ‖c_i − c_j‖ / (z_i + z_j) + bias)``.
        merge_threshold: adjacent regions merge while their mean boundary weight is below it.

    Returns:
        (H,W) int64 region ids ``0..R-1`` on the image's device, every pixel covered,
        numbered in raster order of first occurrence.
    """
    img = _check_image(image)
    h, w = img.shape[:2]
    if depth.shape != (h, w):
        raise ValueError(f"depth_regions: depth must be (H,W) = ({h},{w}), got {tuple(depth.shape)}")
    if K.shape != (3, 3):
        raise ValueError(f"depth_regions: K must be (3,3), got {tuple(K.shape)}")
    z = depth.detach().to("cpu", torch.float64).numpy()
    if not np.isfinite(z).all() or (z <= 0).any():
        raise ValueError("depth_regions: depth must be finite and > 0 everywhere (fill invalid pixels first)")
    extra = slic_depth_weight * np.log(z)[..., None] if slic_depth_weight > 0 else None
    sp = _superpixels(_lab(img), extra, n_segments or default_segments(h, w), compactness, sigma)

    points = back_project(z, K.detach().to("cpu", torch.float64).numpy())
    if standardize:
        std = points.reshape(-1, 3).std(axis=0)
        scale = np.abs(points).reshape(-1, 3).mean(axis=0)
        # a constant axis (a single fronto-parallel plane has constant z) would divide by 0:
        # a tiny floor makes it dominate, i.e. "no spread along it", so everything stays close
        points = points / np.maximum(std, 1e-6 * np.maximum(scale, 1e-12))
    centres = _segment_means(sp, points)
    pairs = _adjacent_pairs(sp)
    dist = np.linalg.norm(centres[pairs[:, 0]] - centres[pairs[:, 1]], axis=1)
    rel = dist / (centres[pairs[:, 0], 2] + centres[pairs[:, 1], 2])
    weights = 1.0 / (1.0 + np.exp(-(distance_weight * rel + bias)))
    groups = _merge(int(sp.max()) + 1, pairs, weights, merge_threshold)
    return torch.from_numpy(relabel_raster(groups[sp])).to(image.device)


def colour_regions(
    image: torch.Tensor,
    *,
    n_segments: int | None = None,
    compactness: float = 10.0,
    sigma: float = 1.0,
    merge_threshold: float = 10.0,
) -> torch.Tensor:
    """Regions from colour alone (the ablation "regions from colour superpixels only").

    SLIC on the image (no depth), then the agglomeration of :func:`depth_regions` with the
    CIE-Lab distance (ΔE 1976) of adjacent superpixels' mean colours as edge weight.

    Args:
        image: (3,H,W) float RGB in [0, 1].
        n_segments, compactness, sigma: as in :func:`depth_regions`.
        merge_threshold: ours — adjacent regions merge while the mean ΔE over their boundary is
            below it (10: clearly different colours stay apart, shading of one surface does not).

    Returns:
        (H,W) int64 region ids ``0..R-1`` in raster order of first occurrence.
    """
    img = _check_image(image)
    h, w = img.shape[:2]
    sp = _superpixels(_lab(img), None, n_segments or default_segments(h, w), compactness, sigma)
    colours = _segment_means(sp, rgb2lab(img))  # the image's own colours, not slic's contrast stretch
    pairs = _adjacent_pairs(sp)
    weights = np.linalg.norm(colours[pairs[:, 0]] - colours[pairs[:, 1]], axis=1)
    groups = _merge(int(sp.max()) + 1, pairs, weights, merge_threshold)
    return torch.from_numpy(relabel_raster(groups[sp])).to(image.device)


__all__ = ["back_project", "colour_regions", "default_segments", "depth_regions", "relabel_raster"]
