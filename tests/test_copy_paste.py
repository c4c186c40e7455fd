"""Copy-paste of depth regions: depth ordering, exact source identities, region ids."""

from __future__ import annotations

import functools
import math

import pytest
import torch

from sdeseg.copy_paste import copy_paste_views, global_regions, paste_regions

H, W = 48, 64
NO_COLOUR = {"jitter_prob": 0.0, "gray_prob": 0.0}


def uniform(labels: torch.Tensor) -> torch.Tensor:
    """(B,H,W) bool: pixels whose 3x3 neighbourhood (clamped at the border) holds one label.

    Shifted copies, not max-pooling: CPU pooling costs milliseconds per call on small maps."""
    _, h, w = labels.shape
    rows = [torch.arange(h).add(d).clamp(0, h - 1) for d in (-1, 0, 1)]
    cols = [torch.arange(w).add(d).clamp(0, w - 1) for d in (-1, 0, 1)]
    same = torch.ones_like(labels, dtype=torch.bool)
    for r in rows:
        for c in cols:
            same &= labels[:, r][:, :, c] == labels
    return same


def interior(mask: torch.Tensor) -> torch.Tensor:
    """(B,H,W) bool: pixels of ``mask`` whose whole 3x3 neighbourhood is in ``mask``."""
    return mask & uniform(mask.long())


def square_over_split_depth(seed: int = 0):
    """Image 0: a textured 12x12 region at 10 m on a background at 50 m; image 1: one region,
    its left half at 2 m and its right half at 100 m. The backgrounds fill the frame, so only
    the square is ever pasted, and any pasted depth 10/s (s in [0.2, 2]) lies between 2 and 100."""
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(2, 3, H, W, generator=g)
    regions = torch.zeros(2, H, W, dtype=torch.int64)
    regions[0, 20:32, 8:20] = 1
    depth = torch.full((2, H, W), 50.0)
    depth[0][regions[0] == 1] = 10.0
    depth[1, :, : W // 2] = 2.0
    depth[1, :, W // 2:] = 100.0
    return images, depth, regions


def paste_both_ways(seed: int):
    images, depth, regions = square_over_split_depth()
    runs = [paste_regions(images, depth, regions, 1, torch.Generator().manual_seed(seed), depth_order=order,
                          **NO_COLOUR) for order in (True, False)]
    return images, depth, runs


@functools.lru_cache(maxsize=1)
def find_straddling_paste():
    """A seed whose one paste of the square lands in image 1 across the depth edge."""
    for seed in range(200):
        images, depth, (ordered, unordered) = paste_both_ways(seed)
        (p,) = ordered.placements
        footprint = unordered.paste[1] == 0
        far = footprint.clone()
        far[:, : W // 2] = False
        if p.target == 1 and footprint[:, : W // 2].sum() > 9 and interior(far[None]).sum() > 9:
            return images, depth, ordered, unordered
    raise AssertionError("no seed pasted the square across the depth edge")


def test_a_paste_shows_exactly_where_it_is_closer():
    images, depth, ordered, unordered = find_straddling_paste()
    (p,) = ordered.placements
    assert ordered.placements == unordered.placements  # the draws do not depend on depth_order
    footprint = unordered.paste[1] == 0  # where the region lands, drawn regardless of depth
    pasted_depth = unordered.depth[1]
    assert torch.allclose(pasted_depth[footprint], torch.full_like(pasted_depth[footprint], 10.0 / p.scale))
    visible = ordered.paste[1] == 0
    closer = footprint & (pasted_depth < depth[1])
    assert torch.equal(visible, closer)
    # the near half (2 m) hides it, the far half (100 m) shows it
    assert not visible[:, : W // 2].any() and torch.equal(visible[:, W // 2:], footprint[:, W // 2:])
    assert torch.equal(ordered.depth[1], torch.where(visible, pasted_depth, depth[1]))
    # RGB: the pasted colour away from the soft edge, the untouched image away from the paste
    src = ordered.source[1]
    source_rgb = images[src[0], :, src[1], src[2]].permute(2, 0, 1)  # (3,H,W)
    inside = interior(visible[None])[0]
    outside = interior(~visible[None])[0]
    assert inside.sum() > 0 and torch.allclose(ordered.image[1][:, inside], source_rgb[:, inside])
    assert torch.equal(ordered.image[1][:, outside], images[1][:, outside])
    edge = ~inside & ~outside
    assert not torch.allclose(ordered.image[1][:, edge], images[1][:, edge])  # blended, not hard


def test_without_depth_order_a_paste_covers_even_closer_pixels():
    images, depth, ordered, unordered = find_straddling_paste()
    footprint = unordered.paste[1] == 0
    near = footprint[:, : W // 2]
    assert near.any() and (unordered.depth[1][:, : W // 2][near] > 2.0).all()  # pasted behind, shown anyway
    assert (ordered.paste[1][:, : W // 2] == -1).all()


def random_scene(b: int, seed: int, side: int = 16):
    """Textured images, regions = blocks of side x side pixels (ids per image), one random
    depth per block."""
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(b, 3, H, W, generator=g)
    blocks = (torch.arange(H).view(H, 1) // side) * (W // side) + torch.arange(W).view(1, W) // side
    regions = blocks.expand(b, H, W).clone()
    block_depth = torch.rand(b, (H // side) * (W // side), generator=g) * 60 + 2
    depth = torch.gather(block_depth, 1, regions.flatten(1)).view(b, H, W)
    return images, depth, regions


@pytest.mark.parametrize("b", [1, 3])
def test_every_pixel_points_back_to_its_source_pixel(b):
    images, depth, regions = random_scene(b, seed=b)
    gid, _ = global_regions(regions)
    out = paste_regions(images, depth, regions, 2, torch.Generator().manual_seed(7), **NO_COLOUR)
    assert out.image.shape == images.shape and out.region.shape == regions.shape
    pasted = out.paste >= 0
    assert 0.1 < pasted.float().mean() < 0.95 and len(out.placements) > 0
    idx, ys, xs = out.source.unbind(1)
    # region ids and depth travel with the source pixel (depth x 1/s where pasted)
    assert torch.equal(out.region, gid[idx, ys, xs])
    scale = torch.tensor([p.scale for p in out.placements] + [1.0])[out.paste]  # index -1: base
    assert torch.allclose(out.depth, depth[idx, ys, xs] / scale)
    # colours: exact copies of the source pixel wherever no soft edge blends them
    same = uniform(out.paste)
    source_rgb = images[idx, :, ys, xs].permute(0, 3, 1, 2)
    assert same.float().mean() > 0.3
    assert torch.allclose(out.image.permute(1, 0, 2, 3)[:, same], source_rgb.permute(1, 0, 2, 3)[:, same])
    # base pixels name themselves; pasted pixels name their placement's source and region
    ii, yy, xx = torch.meshgrid(torch.arange(b), torch.arange(H), torch.arange(W), indexing="ij")
    assert torch.equal(out.source.permute(1, 0, 2, 3)[:, ~pasted], torch.stack([ii, yy, xx])[:, ~pasted])
    flips = {True: 0, False: 0}
    for k, p in enumerate(out.placements):
        mine = out.paste == k
        if not mine.any():
            continue
        assert (mine.nonzero()[:, 0] == p.target).all()
        assert (idx[mine] == p.source).all() and (out.region[mine] == p.region).all()
        assert 0.2 - 1e-9 <= p.scale <= 2.0 + 1e-9
        # within a row, source columns run backwards exactly when the paste is flipped
        row = mine[p.target].sum(1).argmax()
        cols = mine[p.target, row].nonzero()[:, 0]
        step = int(torch.sign(xs[p.target, row, cols[-1]] - xs[p.target, row, cols[0]]))
        if step != 0:
            assert step == (-1 if p.flip else 1)
            flips[p.flip] += 1
    assert flips[True] > 0 and flips[False] > 0
    # pixel ids: one number per source pixel
    assert torch.equal(out.pixel_ids(), (idx * H + ys) * W + xs)


def test_pastes_scale_about_the_horizon():
    images, depth, regions = random_scene(2, seed=3, side=8)
    # min_size=1: the 8x8 blocks may shrink to the paper's s = 0.2
    out = paste_regions(images, depth, regions, 4, torch.Generator().manual_seed(1), min_size=1, **NO_COLOUR)
    centre, shift = 160 / 384 * H, round(16 / 384 * H)
    inv = [1 / p.scale for p in out.placements]
    assert 0.5 <= min(inv) and max(inv) <= 5.0 and max(inv) - min(inv) > 2.0  # 1/s spread over [0.5, 5]
    gid, _ = global_regions(regions)
    for p in out.placements:
        rows = (gid[p.source] == p.region).any(1).nonzero()[:, 0]
        t0 = int(rows.min())
        expected = int((t0 - centre) * p.scale + centre)
        assert abs(p.top - expected) <= shift or p.top in (-p.height + 1, H - 1)
        assert p.height == max(1, round(8 * p.scale))


def test_views_share_identities_and_are_reproducible():
    images, depth, regions = random_scene(3, seed=5)
    v1, v2 = copy_paste_views(images, depth, regions, torch.Generator().manual_seed(0))
    again = copy_paste_views(images, depth, regions, torch.Generator().manual_seed(0))
    assert torch.equal(v1.image, again[0].image) and torch.equal(v2.source, again[1].source)
    other = copy_paste_views(images, depth, regions, torch.Generator().manual_seed(1))
    assert not torch.equal(v1.image, other[0].image)
    # view 2 pastes twice as many copies (2 vs 4 per region)
    assert len(v2.placements) == 2 * len(v1.placements)
    # most regions seen in one view are seen in the other, and many source pixels too
    shared = set(v1.region.unique().tolist()) & set(v2.region.unique().tolist())
    assert len(shared) > 0.6 * len(set(v1.region.unique().tolist()))
    ids1, ids2 = v1.pixel_ids(), v2.pixel_ids()
    assert torch.isin(ids1, ids2).float().mean() > 0.3
    # colour jitter (on by default) changes pasted pixels only
    base = (v1.paste == -1) & interior(v1.paste == -1)
    assert torch.equal(v1.image.permute(1, 0, 2, 3)[:, base], images.permute(1, 0, 2, 3)[:, base])


def test_bad_input_is_refused():
    images, depth, regions = random_scene(2, seed=0)
    with pytest.raises(ValueError, match="depth must be > 0"):
        paste_regions(images, depth * 0, regions, 1, torch.Generator())
    with pytest.raises(ValueError, match="need images"):
        paste_regions(images[:, :2], depth, regions, 1, torch.Generator())
    assert math.isclose(160 / 384, 5 / 12)
