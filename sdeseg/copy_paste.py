"""Copy-paste of coherent depth regions between images, with known correspondences (seed 003).

The views of CPCDR's contrastive pretraining (Zeng et al.): every region of a group of images
(:func:`sdeseg.regions.depth_regions`) is pasted a few times into the group's images — view 1
with 2 copies of each region, view 2 with 4 — so the same region appears in new contexts, and
the loss (:mod:`sdeseg.losses.contrastive`) asks its copies to agree. Each paste:

* draws a distance scale ``s`` with ``1/s`` uniform on ``[1/2, 1/0.2]`` (``scale_range``): the
  region's size is multiplied by ``s`` and its depth by ``1/s`` (disparity by ``s``), as if
  it were moved along the viewing direction; its rows move about the horizon row
  (``top' = (top - c) s + c``, ``c = horizon · H``) plus a small random shift, so a moved
  object stays on its side of the horizon; ``s`` is limited so the box stays partly inside;
* lands at a uniformly random column, flipped horizontally with probability 1/2;
* gets its own colour jitter (the reader's :func:`sdeseg.data.augment.color_jitter`);
* is kept only where it is closer than the pixel already there (``depth_order``; ``False`` is
  the ablation "pastes without depth ordering");
* is blended into the RGB with a Gaussian-blurred (soft) mask, while depth, region ids and
  source identities take the hard mask.

Every output pixel carries its source identity — (source image index, source row, source
column) — and its (global) region id, so pixel-level and region-level correspondences
between views are known without replaying any transform. Resampling is nearest-neighbour
(ours; the official code resizes RGB bilinearly): every pasted pixel is then an exact copy
of one source pixel and its identity is exact.

Constants are the official ones unless marked (``../shared/METHODS.md``,
"Depth-region contrastive pretraining"); the official code's pixel constants at 384 x 768
(horizon row 160, vertical shift ±16) are fractions of the height here. Pure torch, all
randomness from an explicit ``torch.Generator``. Nothing here imports ray, deepspeed or
torch.distributed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from sdeseg.data.augment import Jitter, color_jitter


@dataclass(frozen=True)
class Placement:
    """One applied paste: ``region`` (global id) of image ``source`` pasted into image ``target``,
    scaled by ``scale`` (depth × 1/scale), flipped or not, its ``height x width`` box with
    the top-left pixel at (``top``, ``left``) of the target (may lie outside the image)."""

    target: int
    source: int
    region: int
    scale: float
    flip: bool
    top: int
    left: int
    height: int
    width: int


@dataclass
class PasteResult:
    """One view: the batch after pasting (B images of H x W).

    image: (B,3,H,W) pasted images.
    depth: (B,H,W) depth after pasting (hard masks).
    region: (B,H,W) int64 global region id of every pixel (see :func:`global_regions`).
    source: (B,3,H,W) int64 (source image index, row, column) of every pixel; a pixel of the
        base image i at (y, x) has source (i, y, x).
    paste: (B,H,W) int64 index into ``placements`` of the paste a pixel shows, -1 where the
        base image shows.
    placements: the pastes made (all but the skipped small or frame-filling regions, including
        pastes that ended up fully hidden), in the order they were drawn.
    """

    image: torch.Tensor
    depth: torch.Tensor
    region: torch.Tensor
    source: torch.Tensor
    paste: torch.Tensor
    placements: list[Placement]

    def pixel_ids(self) -> torch.Tensor:
        """(B,H,W) int64 id of every pixel's source pixel, ``(index · H + row) · W + column``
        (sources have the outputs' size): equal ids = the same physical pixel."""
        _, _, h, w = self.image.shape
        idx, y, x = self.source.unbind(1)
        return (idx * h + y) * w + x


def global_regions(regions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image region ids made unique across the batch.

    Args:
        regions: (N,H,W) int region ids >= 0 of each image (e.g. ``depth_regions``).

    Returns:
        ``(global_ids, offsets)``: (N,H,W) int64 ``offsets[i] + regions[i]`` and the (N,) int64
        offsets (image i owns ids ``offsets[i] .. offsets[i] + max(regions[i])``).
    """
    regions = regions.long()
    counts = regions.flatten(1).amax(dim=1) + 1
    offsets = torch.cumsum(counts, 0) - counts
    return regions + offsets.view(-1, 1, 1), offsets


def _boxes(gid: torch.Tensor, num: int) -> torch.Tensor:
    """(num,4) int64 (top, left, bottom, right) bounding boxes (bottom/right exclusive) of the
    global ids in ``gid`` (N,H,W); absent ids get an empty box (bottom <= top)."""
    n, h, w = gid.shape
    ys = torch.arange(h, device=gid.device).view(1, h, 1).expand(n, h, w).reshape(-1)
    xs = torch.arange(w, device=gid.device).view(1, 1, w).expand(n, h, w).reshape(-1)
    flat = gid.reshape(-1)
    big = max(h, w)

    def reduce(values: torch.Tensor, how: str, init: int) -> torch.Tensor:
        out = torch.full((num,), init, dtype=torch.int64, device=gid.device)
        return out.scatter_reduce(0, flat, values, how, include_self=True)

    return torch.stack([reduce(ys, "amin", big), reduce(xs, "amin", big),
                        reduce(ys, "amax", -1) + 1, reduce(xs, "amax", -1) + 1], dim=1)


def _blur3(mask: torch.Tensor, sigma: float) -> torch.Tensor:
    """3x3 Gaussian blur (the official kernel size) of a (h,w) float mask, replicate padding.

    Separable sums of shifted copies: conv2d on the CPU sets up a new kernel for every window
    size, which costs milliseconds per paste."""
    g = math.exp(-1.0 / (2 * sigma**2))
    side, mid = g / (1 + 2 * g), 1 / (1 + 2 * g)
    for dim in (0, 1):
        n = mask.shape[dim]
        idx = torch.arange(n, device=mask.device)
        prev = mask.index_select(dim, (idx - 1).clamp(min=0))
        nxt = mask.index_select(dim, (idx + 1).clamp(max=n - 1))
        mask = mid * mask + side * (prev + nxt)
    return mask


def _draw_jitter(u: torch.Tensor, order: torch.Tensor, strength: tuple[float, float, float, float],
                 hue_space: str) -> Jitter:
    """torchvision-style ColorJitter factors from 4 uniforms: brightness, contrast, saturation in
    ``[max(0, 1-m), 1+m]``, hue in ``[-m, m]``, applied in a random order."""
    b, c, s, h = u.tolist()
    mb, mc, ms, mh = strength

    def factor(x: float, m: float) -> float:
        lo = max(0.0, 1.0 - m)
        return lo + (1.0 + m - lo) * x

    return Jitter(factor(b, mb), factor(c, mc), factor(s, ms), (2 * h - 1) * mh,
                  order=tuple(order.tolist()), hue_space=hue_space)


def paste_regions(
    images: torch.Tensor,
    depth: torch.Tensor,
    regions: torch.Tensor,
    copies: int,
    generator: torch.Generator,
    *,
    scale_range: tuple[float, float] = (0.2, 2.0),
    horizon: float = 160 / 384,
    vertical_shift: float = 16 / 384,
    flip_prob: float = 0.5,
    min_size: int = 8,
    jitter: tuple[float, float, float, float] = (0.5, 0.5, 0.5, 0.2),
    jitter_prob: float = 0.8,
    gray_prob: float = 0.1,
    hue_space: str = "hsv",
    depth_order: bool = True,
    blur_sigma: float = 1.0,
) -> PasteResult:
    """One view: every region of the batch pasted ``copies`` times into the batch's images.

    The list "each region × copies" is shuffled and dealt round-robin to the images (image j
    gets items j, j+B, ...), as the official code does; a region may land in its own image.
    Regions whose box is smaller than ``min_size`` on a side, or that nearly fill the frame
    (both sides within ``min_size`` of the image's), are not pasted (ours, simplified from the
    official size rules); they still count as one of the copies.

    Args:
        images: (B,3,H,W) float in [0, 1].
        depth: (B,H,W) depth > 0 (smaller = closer; SDE depth of a common scale works).
        regions: (B,H,W) int region ids >= 0 per image.
        copies: pastes per region (the paper: 2 for view 1, 4 for view 2).
        generator: the RNG of every random choice (a CPU generator).
        scale_range: (s_min, s_max); ``1/s`` is uniform between ``1/s_max`` and ``1/s_min``.
        horizon: the horizon row as a fraction of H (rows scale about it).
        vertical_shift: the largest random row shift, a fraction of H.
        flip_prob: probability of a horizontal flip.
        min_size: smallest side in pixels of a pasted box (the official 8) and of a pasted region.
        jitter: (brightness, contrast, saturation, hue) magnitudes of the per-paste colour jitter.
        jitter_prob, gray_prob: probabilities of the jitter and of a grey-scale paste
            (0 disables; the official 0.8 and 0.1). The official blur of pastes (p=0.2) is left out.
        hue_space: ``"hsv"`` (torchvision's ColorJitter, the official) or ``"yiq"``.
        depth_order: keep a pasted pixel only where it is closer than the pixel under it.
        blur_sigma: width of the 3x3 Gaussian that softens the RGB mask (the official 1).

    Returns:
        :class:`PasteResult` of the same batch size; random draws do not depend on
        ``depth_order`` or the images' content, so two calls with equally seeded generators
        place the same pastes.
    """
    b, c, h, w = images.shape
    if c != 3 or depth.shape != (b, h, w) or regions.shape != (b, h, w):
        raise ValueError(f"paste_regions: need images (B,3,H,W), depth and regions (B,H,W); got "
                         f"{tuple(images.shape)}, {tuple(depth.shape)}, {tuple(regions.shape)}")
    if copies < 0 or not 0 < scale_range[0] <= scale_range[1]:
        raise ValueError(f"paste_regions: copies must be >= 0 and 0 < s_min <= s_max; got {copies}, {scale_range}")
    if (depth <= 0).any():
        raise ValueError("paste_regions: depth must be > 0")
    device = images.device
    gid, offsets = global_regions(regions.to(device))
    num = int(gid.max()) + 1
    boxes = _boxes(gid, num).tolist()
    owner = (torch.searchsorted(offsets, torch.arange(num, device=device), right=True) - 1).tolist()

    ys = torch.arange(h, device=device)
    xs = torch.arange(w, device=device)
    out_image = images.clone()
    out_depth = depth.clone()
    out_region = gid.clone()
    out_source = torch.stack([torch.arange(b, device=device).view(b, 1, 1).expand(b, h, w),
                              ys.view(1, h, 1).expand(b, h, w), xs.view(1, 1, w).expand(b, h, w)], dim=1)
    out_paste = torch.full((b, h, w), -1, dtype=torch.int64, device=device)
    placements: list[Placement] = []

    items = torch.arange(num).repeat(copies)
    items = items[torch.randperm(len(items), generator=generator)].tolist()
    centre = horizon * h
    max_shift = round(vertical_shift * h)
    for k, r in enumerate(items):
        target = k % b
        u = torch.rand(10, generator=generator)  # drawn for every item: later draws never shift
        order = torch.randperm(4, generator=generator)
        t0, l0, t1, l1 = boxes[r]
        bh, bw = t1 - t0, l1 - l0
        if bh < min_size or bw < min_size or (bh > h - min_size and bw > w - min_size):
            continue
        s_hi = min(scale_range[1], 2 * h / bh, 2 * w / bw)  # the official max_size: twice the image
        if t1 - 1 < centre:  # above the horizon: the top must stay inside
            s_hi = min(s_hi, centre / (centre - (t1 - 1)))
        if t0 > centre:  # below: the top must stay above the last row
            s_hi = min(s_hi, (h - 1 - centre) / (t0 - centre))
        s_lo = max(scale_range[0], min_size / bh, min_size / bw)
        s = 1.0 if s_hi <= s_lo else 1.0 / (1.0 / s_hi + (1.0 / s_lo - 1.0 / s_hi) * float(u[0]))
        ph, pw = max(1, round(bh * s)), max(1, round(bw * s))
        top = int((t0 - centre) * s + centre) + math.floor(float(u[1]) * (2 * max_shift + 1)) - max_shift
        top = min(max(top, -ph + 1), h - 1)
        left = math.floor(float(u[2]) * (w + pw - 1)) - pw + 1
        flip = float(u[3]) < flip_prob

        # the target window and, per window pixel, the nearest source pixel
        y0, y1, x0, x1 = max(top, 0), min(top + ph, h), max(left, 0), min(left + pw, w)
        ly = ys[y0:y1] - top
        lx = xs[x0:x1] - left
        if flip:
            lx = pw - 1 - lx
        sy = t0 + torch.clamp(((ly + 0.5) * (bh / ph)).long(), max=bh - 1)
        sx = l0 + torch.clamp(((lx + 0.5) * (bw / pw)).long(), max=bw - 1)
        src = owner[r]
        member = gid[src][sy[:, None], sx[None, :]] == r  # (wh,ww)
        pasted_depth = depth[src][sy[:, None], sx[None, :]] / s
        rgb = images[src][:, sy[:, None], sx[None, :]]  # (3,wh,ww)
        if float(u[4]) < jitter_prob:
            rgb = color_jitter(rgb, _draw_jitter(u[5:9], order, jitter, hue_space))
        if float(u[9]) < gray_prob:
            rgb = color_jitter(rgb, Jitter(saturation=0.0))
        hard = member & (pasted_depth < out_depth[target, y0:y1, x0:x1]) if depth_order else member
        index = len(placements)  # recorded even when fully hidden: indices agree across depth_order
        placements.append(Placement(target, src, r, s, flip, top, left, ph, pw))
        if not bool(hard.any()):
            continue
        soft = _blur3(hard.to(images.dtype), blur_sigma)
        win = out_image[target, :, y0:y1, x0:x1]
        out_image[target, :, y0:y1, x0:x1] = win + (rgb - win) * soft
        out_depth[target, y0:y1, x0:x1] = torch.where(hard, pasted_depth, out_depth[target, y0:y1, x0:x1])
        out_region[target, y0:y1, x0:x1].masked_fill_(hard, r)
        out_paste[target, y0:y1, x0:x1].masked_fill_(hard, index)
        ident = torch.stack([torch.full_like(sy[:, None].expand(-1, len(sx)), src),
                             sy[:, None].expand(-1, len(sx)), sx[None, :].expand(len(sy), -1)])
        out_source[target, :, y0:y1, x0:x1] = torch.where(hard, ident, out_source[target, :, y0:y1, x0:x1])
    return PasteResult(out_image, out_depth, out_region, out_source, out_paste, placements)


def copy_paste_views(
    images: torch.Tensor,
    depth: torch.Tensor,
    regions: torch.Tensor,
    generator: torch.Generator,
    copies: tuple[int, ...] = (2, 4),
    **params,
) -> tuple[PasteResult, ...]:
    """The views of one group: :func:`paste_regions` once per entry of ``copies`` (the paper's
    2 and 4), all from the same originals and one generator; ``params`` go to each call.

    Region ids and source identities are shared by all views, so a region's copies and a
    pixel's copies can be matched across them (``PasteResult.region``, ``pixel_ids()``).
    """
    return tuple(paste_regions(images, depth, regions, n, generator, **params) for n in copies)


__all__ = ["Placement", "PasteResult", "copy_paste_views", "global_regions", "paste_regions"]
