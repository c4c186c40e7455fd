"""Matching Geometry Sampling and Cross-Domain DepthMix (sdeseg.mixing) on hand-built cases."""

import math

import pytest
import torch

from sdeseg.mixing import cross_domain_depth_mix, labels_to_probs, match_geometry


def _ramp(h=6, w=4, near=2.0, far=40.0):
    """A road-like depth map: far at the top, near at the bottom."""
    return torch.linspace(far, near, h).view(h, 1).expand(h, w).clone()


def test_match_geometry_picks_the_candidate_of_the_same_shape_whatever_its_scale():
    target = _ramp()[None]
    flat = torch.full((6, 4), 10.0)
    steep = _ramp(near=1.0, far=80.0)
    same_shape_other_scale = 3.7 * _ramp()
    source = torch.stack([flat, steep, same_shape_other_scale])[None]
    assert match_geometry(target, source).tolist() == [2]
    # multiplying either domain's depth by a constant changes nothing
    assert match_geometry(5.0 * target, source).tolist() == [2]
    assert match_geometry(target, 0.01 * source).tolist() == [2]


def test_match_geometry_criterion_by_hand_and_ignored_rows():
    target = torch.tensor([[[1.0, 1.0], [2.0, 2.0], [4.0, 4.0]]])  # median over all rows: 2
    a = torch.tensor([[1.0, 1.0], [1.0, 1.0], [9.0, 9.0]])  # differs from the target's shape in the top rows
    b = torch.tensor([[7.0, 7.0], [2.0, 2.0], [4.0, 4.0]])  # differs only in the first row
    source = torch.stack([a, b])[None]
    # all rows: a: median 1 -> log(1/2 / 1) = -0.69, 0, log(2/9)... -> b wins
    crit_a = (abs(math.log(0.5) - 0) * 2 + abs(0 - 0) * 2 + abs(math.log(2) - math.log(9)) * 2) / 6
    crit_b = (abs(math.log(0.5) - math.log(7 / 4)) * 2 + abs(0 - math.log(0.5)) * 2 + abs(math.log(2) - 0) * 2) / 6
    assert (crit_b < crit_a) == (match_geometry(target, source).item() == 1)
    # without the top row b matches exactly (after each map's own median), a does not
    assert match_geometry(target, source, ignore_top=1).item() == 1
    # without the bottom row: target rows (1, 2) / 1.5 vs a (1, 1) / 1 and b (7, 2) / 4.5
    assert match_geometry(target, source, ignore_bottom=1).item() == 0


def test_match_geometry_ties_go_to_the_smallest_k_and_batches_are_independent():
    t = torch.stack([_ramp(), torch.full((6, 4), 3.0)])
    s = torch.stack([torch.stack([_ramp(), _ramp()]), torch.stack([_ramp(), torch.full((6, 4), 9.0)])])
    assert match_geometry(t, s).tolist() == [0, 1]


def test_match_geometry_official_mode_compares_raw_disparities():
    p_t = torch.full((1, 4, 4), 0.5)
    p_s = torch.stack([torch.full((4, 4), 0.1), torch.full((4, 4), 0.45)])[None]
    assert match_geometry(p_t, p_s, mode="official").item() == 1
    with pytest.raises(ValueError, match="mode"):
        match_geometry(p_t, p_s, mode="raw")
    with pytest.raises(ValueError, match="leave no rows"):
        match_geometry(p_t, p_s, ignore_top=2, ignore_bottom=2)
    with pytest.raises(ValueError, match=r"\(B,K,H,W\)"):
        match_geometry(p_t, p_s[0])


@pytest.mark.parametrize("batch", [1, 3])
def test_cross_domain_mix_takes_source_ground_truth_exactly_where_the_source_is_closer(batch):
    g = torch.Generator().manual_seed(0)
    h, w, c = 8, 10, 19
    src_img, tgt_img = torch.rand(batch, 3, h, w, generator=g), torch.rand(batch, 3, h, w, generator=g)
    src_depth = torch.rand(batch, 1, h, w, generator=g) * 50 + 1
    tgt_depth = torch.rand(batch, 1, h, w, generator=g) * 50 + 1
    src_label = torch.randint(0, c, (batch, h, w), generator=g)
    src_label[:, 0, :3] = 255
    tgt_probs = torch.softmax(torch.randn(batch, c, h, w, generator=g) * 4, dim=1)
    mix = cross_domain_depth_mix(src_img, src_depth, src_label, tgt_img, tgt_depth, tgt_probs, eps=0.0,
                                 generator=torch.Generator().manual_seed(1))
    closer = (src_depth < tgt_depth)[:, 0]
    assert torch.equal(mix.mask[:, 0], closer)
    assert torch.equal(mix.label[closer], src_label[closer])  # ignore stays ignore, the rest exact
    assert torch.equal(mix.label[~closer], tgt_probs.argmax(1)[~closer])
    assert torch.equal(mix.image, torch.where(closer[:, None], src_img, tgt_img))
    assert torch.equal(mix.probs[closer.unsqueeze(1).expand_as(mix.probs)],
                       labels_to_probs(src_label, c)[closer.unsqueeze(1).expand_as(mix.probs)])
    q = (tgt_probs.max(1).values >= 0.968).float().mean()
    assert torch.equal(mix.weight[closer], torch.ones(int(closer.sum())))
    assert torch.allclose(mix.weight[~closer], q.expand(int((~closer).sum())))


def test_cross_domain_mix_takes_a_per_pixel_target_weight():
    g = torch.Generator().manual_seed(2)
    b, h, w, c = 2, 6, 8, 19
    src_depth = torch.rand(b, 1, h, w, generator=g) * 50 + 1
    tgt_depth = torch.rand(b, 1, h, w, generator=g) * 50 + 1
    probs = torch.softmax(torch.randn(b, c, h, w, generator=g) * 4, dim=1)
    target_weight = torch.rand(b, h, w, generator=g)
    mix = cross_domain_depth_mix(torch.rand(b, 3, h, w, generator=g), src_depth,
                                 torch.randint(0, c, (b, h, w), generator=g), torch.rand(b, 3, h, w, generator=g),
                                 tgt_depth, probs, eps=0.0, target_weight=target_weight)
    closer = (src_depth < tgt_depth)[:, 0]
    assert 0 < int(closer.sum()) < closer.numel()
    assert torch.equal(mix.weight, torch.where(closer, torch.ones_like(target_weight), target_weight))


def test_cross_domain_margin_has_a_random_sign_per_image():
    b, h, w = 64, 2, 2
    depth = torch.full((b, 1, h, w), 10.0)
    src_depth = depth + 0.02  # 0.02 farther: the source shows only where the margin is +0.03
    probs = torch.full((b, 19, h, w), 1 / 19)
    mix = cross_domain_depth_mix(torch.zeros(b, 3, h, w), src_depth, torch.zeros(b, h, w, dtype=torch.long),
                                 torch.ones(b, 3, h, w), depth, probs, eps=0.03,
                                 generator=torch.Generator().manual_seed(4))
    per_image = mix.mask.flatten(1).all(1)
    assert torch.equal(per_image, mix.mask.flatten(1).any(1))  # one sign per image
    assert 16 < int(per_image.sum()) < 48  # both signs drawn, about half each
