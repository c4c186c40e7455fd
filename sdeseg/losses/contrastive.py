"""Contrastive loss of copy-pasted depth regions: SwAV-style swapped prediction with group codes.

CPCDR (Zeng et al., seed 003) trains a dense projection head (128-d per pixel) and learnable
prototypes (1000 unit vectors) on two views built by :mod:`sdeseg.copy_paste`. Per level:

1. sample points of both views (7,200 per image for regions, 4,000 for pixels);
2. score each point's normalised projection against the normalised prototypes;
3. turn the scores of all points into soft codes balanced over the prototypes with
   Sinkhorn-Knopp (ε = 0.05, 3 iterations), without gradient;
4. average the codes over a *group id*: at region level all points of one region — in all its
   copies — form a group; at pixel level all points showing the same source pixel;
5. cross-entropy of each point's softmax(scores / 0.1) against its group's code from the
   *other* view (SwAV's swapped prediction); points whose group is absent from the other
   view teach nothing.

Total = 0.5 · pixel + 0.5 · region. The official code pools both views when it averages
the codes (a point also predicts its own view's code); ``swapped=False`` does that.
Constants are the official ones (``../shared/METHODS.md``, "Depth-region contrastive
pretraining"). The official code re-normalises the prototype weights before every step; here
the loss normalises them itself, so it is right whatever the stage does.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from sdeseg.losses.common import LossOutput


@torch.no_grad()
def sinkhorn(scores: torch.Tensor, eps: float = 0.05, iterations: int = 3) -> torch.Tensor:
    """Balanced soft assignments of N samples to K prototypes (Sinkhorn-Knopp, SwAV's).

    Starts from ``exp(scores / eps)`` and alternately rescales the prototypes' totals to be
    equal and every sample's total to 1; computed in the log domain, so no score range
    over- or underflows.

    Args:
        scores: (N,K) similarities (e.g. cosine); no gradient flows.
        eps: the entropic regularisation (smaller = harder codes).
        iterations: rounds of (prototype, sample) normalisation.

    Returns:
        (N,K) float32 codes: every row sums to 1; every column sums to about N/K (exactly in
        the limit of many iterations).
    """
    if scores.dim() != 2:
        raise ValueError(f"sinkhorn: scores must be (N,K), got {tuple(scores.shape)}")
    n, k = scores.shape
    log_q = scores.float() / eps
    log_q = log_q - torch.logsumexp(log_q.flatten(), 0)
    for _ in range(iterations):
        log_q = log_q - torch.logsumexp(log_q, dim=0, keepdim=True) - math.log(k)  # each prototype: 1/K
        log_q = log_q - torch.logsumexp(log_q, dim=1, keepdim=True) - math.log(n)  # each sample: 1/N
    return torch.exp(log_q + math.log(n))


def group_mean(values: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """Every row of ``values`` (N,K) replaced by the mean of the rows with the same group id
    (``groups`` (N,) int); returns (N,K)."""
    _, inverse = torch.unique(groups, return_inverse=True)
    return _means(values, inverse, int(inverse.max()) + 1 if inverse.numel() else 0)[0][inverse]


def _means(values: torch.Tensor, inverse: torch.Tensor, num: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(num,K) per-group means (0 for empty groups) and (num,) counts."""
    sums = torch.zeros(num, values.shape[1], dtype=values.dtype, device=values.device).index_add_(0, inverse, values)
    counts = torch.bincount(inverse, minlength=num)
    return sums / counts.clamp(min=1).unsqueeze(1).to(values.dtype), counts


def swapped_prediction_loss(
    feats_a: torch.Tensor,
    feats_b: torch.Tensor,
    groups_a: torch.Tensor,
    groups_b: torch.Tensor,
    prototypes: torch.Tensor,
    *,
    temperature: float = 0.1,
    eps: float = 0.05,
    iterations: int = 3,
    swapped: bool = True,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Swapped prediction between two views with codes averaged over group ids.

    Args:
        feats_a, feats_b: (Na,D), (Nb,D) projections of the points of view a and view b.
        groups_a, groups_b: (Na,), (Nb,) int group ids (equal id = same region / source pixel).
        prototypes: (K,D) prototype vectors (normalised here; gradient flows into them).
        temperature: of the softmax over prototype scores (the official 0.1).
        eps, iterations: :func:`sinkhorn`'s; the codes of both views are balanced together.
        swapped: True: a point's target is its group's mean code in the *other* view; False:
            the mean over both views (the official code's pooling).

    Returns:
        ``(loss, stats)``: the mean cross-entropy over the points whose group occurs in both
        views (0, with a graph, when there is none), and detached ``groups`` (groups present in
        both views) and ``kept`` (fraction of points with a target).
    """
    protos = F.normalize(prototypes.float(), dim=1)
    scores_a = F.normalize(feats_a.float(), dim=1) @ protos.t()
    scores_b = F.normalize(feats_b.float(), dim=1) @ protos.t()
    na = scores_a.shape[0]
    codes = sinkhorn(torch.cat([scores_a, scores_b]).detach(), eps, iterations)
    _, inverse = torch.unique(torch.cat([groups_a, groups_b]), return_inverse=True)
    num = int(inverse.max()) + 1 if inverse.numel() else 0
    inv_a, inv_b = inverse[:na], inverse[na:]
    mean_a, count_a = _means(codes[:na], inv_a, num)
    mean_b, count_b = _means(codes[na:], inv_b, num)
    shared = (count_a > 0) & (count_b > 0)
    if swapped:
        target_a, target_b = mean_b[inv_a], mean_a[inv_b]
    else:
        pooled = (mean_a * count_a[:, None] + mean_b * count_b[:, None]) / (count_a + count_b).clamp(min=1)[:, None]
        target_a, target_b = pooled[inv_a], pooled[inv_b]
    keep = torch.cat([shared[inv_a], shared[inv_b]])
    log_p = torch.cat([F.log_softmax(scores_a / temperature, dim=1), F.log_softmax(scores_b / temperature, dim=1)])
    ce = -(torch.cat([target_a, target_b]) * log_p).sum(dim=1)
    loss = ce[keep].mean() if bool(keep.any()) else log_p.sum() * 0.0
    stats = {"groups": shared.sum().detach(), "kept": keep.float().mean().detach()}
    return loss, stats


def sample_points(valid: torch.Tensor, num: int, generator: torch.Generator) -> torch.Tensor:
    """``num`` random pixels per image, uniform over the ``valid`` ones, with replacement.

    Args:
        valid: (B,H,W) bool; an image without valid pixels gets arbitrary (masked-out) indices.
        generator: RNG (its device does the drawing).

    Returns:
        (B,num) int64 flat pixel indices ``row * W + column`` on ``valid``'s device.
    """
    weights = valid.flatten(1).to(generator.device, torch.float32)
    empty = weights.sum(1) == 0
    weights[empty] = 1.0
    return torch.multinomial(weights, num, replacement=True, generator=generator).to(valid.device)


def _bilinear(proj: torch.Tensor, img: torch.Tensor, pix: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(M,D) features of ``proj`` (B,D,h,w) at the centres of pixels ``pix`` (M,) (flat indices of
    the image grid ``size`` = (H,W)) of images ``img`` (M,): bilinear, ``align_corners=False``
    geometry, border clamping (``grid_sample(..., padding_mode="border")``).

    Rows are gathered from a channels-last copy with ``index_select``: advanced indexing of the
    (B,D,h,w) layout reads D strided values per point and scatters them back in the backward,
    an order of magnitude slower on the CPU for the ~10^5 points of a step. At the image's own
    resolution a pixel centre is a feature centre and the interpolation is the pixel itself.
    """
    h_img, w_img = size
    _, d, h, w = proj.shape
    flat = proj.permute(0, 2, 3, 1).reshape(-1, d)  # row (i·h + y)·w + x
    base = img * (h * w)
    y = torch.div(pix, w_img, rounding_mode="floor")
    x = pix % w_img
    if (h, w) == (h_img, w_img):
        return flat.index_select(0, base + y * w + x)
    fy = ((y.to(proj.dtype) + 0.5) * (h / h_img) - 0.5).clamp(0, h - 1)
    fx = ((x.to(proj.dtype) + 0.5) * (w / w_img) - 0.5).clamp(0, w - 1)
    y0, x0 = fy.floor().long(), fx.floor().long()
    y1, x1 = (y0 + 1).clamp(max=h - 1), (x0 + 1).clamp(max=w - 1)
    wy, wx = (fy - y0).unsqueeze(1), (fx - x0).unsqueeze(1)

    def at(yy: torch.Tensor, xx: torch.Tensor) -> torch.Tensor:
        return flat.index_select(0, base + yy * w + xx)

    top = at(y0, x0) * (1 - wx) + at(y0, x1) * wx
    bottom = at(y1, x0) * (1 - wx) + at(y1, x1) * wx
    return top * (1 - wy) + bottom * wy


def gather_features(proj: torch.Tensor, index: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear features at pixel centres of the image grid.

    Args:
        proj: (B,D,h,w) projection maps (any resolution, e.g. stride 4).
        index: (B,M) flat pixel indices ``row * W + column`` of the (H,W) image grid ``size``.

    Returns:
        (B,M,D) features at those pixels' centres, as ``grid_sample`` (bilinear,
        ``align_corners=False``, border padding) would give them.
    """
    b, m = index.shape
    img = torch.arange(b, device=index.device).repeat_interleave(m)
    return _bilinear(proj, img, index.reshape(-1), size).reshape(b, m, -1)


def _matches(query: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Flat positions in ``ids`` (any shape, flattened) of every occurrence of every ``query``
    id, concatenated (query order, then ascending position)."""
    flat = ids.reshape(-1)
    sorted_ids, order = torch.sort(flat, stable=True)
    lo = torch.searchsorted(sorted_ids, query)
    counts = torch.searchsorted(sorted_ids, query, right=True) - lo
    starts = torch.repeat_interleave(lo, counts)
    first = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)  # where each query's run begins
    return order[starts + torch.arange(starts.numel(), device=ids.device) - first]


def _level_points(ids_a: torch.Tensor, ids_b: torch.Tensor, num: int, generator: torch.Generator,
                  match: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat indices into (B·H·W) of the points of views a and b: ``num`` random valid pixels per
    image of each view and, with ``match``, every pixel of the other view with the same id as
    one of them (the copies of the sampled source pixels)."""
    b, h, w = ids_a.shape
    base = (torch.arange(b, device=ids_a.device) * h * w).unsqueeze(1)
    pts_a = (sample_points(ids_a >= 0, num, generator) + base).reshape(-1)
    pts_b = (sample_points(ids_b >= 0, num, generator) + base).reshape(-1)
    pts_a, pts_b = pts_a[ids_a.reshape(-1)[pts_a] >= 0], pts_b[ids_b.reshape(-1)[pts_b] >= 0]
    if match:
        extra_b = _matches(ids_a.reshape(-1)[pts_a], ids_b)
        extra_a = _matches(ids_b.reshape(-1)[pts_b], ids_a)
        pts_a, pts_b = torch.cat([pts_a, extra_a]), torch.cat([pts_b, extra_b])
    return pts_a, pts_b


def _features(proj: torch.Tensor, flat: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(M,D) features at the flat (B·H·W) indices ``flat`` of the image grid ``size``."""
    hw = size[0] * size[1]
    return _bilinear(proj, torch.div(flat, hw, rounding_mode="floor"), flat % hw, size)


def copy_paste_contrastive_loss(
    proj_a: torch.Tensor,
    proj_b: torch.Tensor,
    region_a: torch.Tensor,
    region_b: torch.Tensor,
    pixel_a: torch.Tensor,
    pixel_b: torch.Tensor,
    prototypes: torch.Tensor,
    generator: torch.Generator,
    *,
    pixel_weight: float = 0.5,
    region_weight: float = 0.5,
    pixel_points: int = 4000,
    region_points: int = 7200,
    temperature: float = 0.1,
    eps: float = 0.05,
    iterations: int = 3,
    swapped: bool = True,
) -> LossOutput:
    """The CPCDR loss of two views of one group of images.

    Args:
        proj_a, proj_b: (B,D,h,w) projection-head outputs of the two views (any resolution;
            sampled bilinearly at the image pixels' centres).
        region_a, region_b: (B,H,W) int region ids of the views' pixels (``PasteResult.region``);
            negative = no region (never sampled).
        pixel_a, pixel_b: (B,H,W) int source-pixel ids (``PasteResult.pixel_ids()``); negative =
            unknown.
        prototypes: (K,D) learnable prototypes.
        generator: RNG of the point sampling.
        pixel_weight, region_weight: weights of the two levels (0 skips a level).
        pixel_points, region_points: sampled points per image and view (the official 4,000
            and 7,200); at pixel level every copy of a sampled source pixel in the other view
            joins too (its group's members there).
        temperature, eps, iterations, swapped: as in :func:`swapped_prediction_loss`.

    Returns:
        :class:`LossOutput` with terms ``contrast/pixel`` and ``contrast/region`` (each already
        × its weight; a level with weight 0 is left out) and stats ``contrast/<level>_groups``
        (groups seen in both views) and ``contrast/<level>_kept`` (fraction of points with a
        target).
    """
    size = tuple(region_a.shape[-2:])
    if proj_a.shape != proj_b.shape or region_a.shape != region_b.shape or pixel_a.shape != region_a.shape \
            or pixel_b.shape != region_a.shape or proj_a.shape[0] != region_a.shape[0]:
        raise ValueError(f"copy_paste_contrastive_loss: views disagree: proj {tuple(proj_a.shape)}, "
                         f"{tuple(proj_b.shape)}; ids {tuple(region_a.shape)}, {tuple(region_b.shape)}, "
                         f"{tuple(pixel_a.shape)}, {tuple(pixel_b.shape)}")
    terms: dict[str, torch.Tensor] = {}
    stats: dict[str, torch.Tensor] = {}
    levels = (("pixel", pixel_weight, pixel_a, pixel_b, pixel_points, True),
              ("region", region_weight, region_a, region_b, region_points, False))
    for name, weight, ids_a, ids_b, num, match in levels:
        if weight == 0:
            continue
        ids_a, ids_b = ids_a.long(), ids_b.long()
        pts_a, pts_b = _level_points(ids_a, ids_b, num, generator, match)
        loss, level_stats = swapped_prediction_loss(
            _features(proj_a, pts_a, size), _features(proj_b, pts_b, size),
            ids_a.reshape(-1)[pts_a], ids_b.reshape(-1)[pts_b], prototypes,
            temperature=temperature, eps=eps, iterations=iterations, swapped=swapped)
        terms[f"contrast/{name}"] = weight * loss
        stats.update({f"contrast/{name}_{k}": v for k, v in level_stats.items()})
    return LossOutput(terms, stats)


__all__ = [
    "copy_paste_contrastive_loss",
    "gather_features",
    "group_mean",
    "sample_points",
    "sinkhorn",
    "swapped_prediction_loss",
]
