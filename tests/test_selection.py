"""Data selection maths (sdeseg.selection, sdeseg.losses.distill) against hand-computed cases."""

import math

import pytest
import torch

from sdeseg.losses.distill import berhu
from sdeseg.selection import (
    bottom_rows_mask,
    depth_difficulty,
    farthest_point_selection,
    greedy_picks,
    normalise_disparity,
    normalised_entropy,
    pool_features,
    standardise_features,
    top_scores,
)


def _points(*xs):
    return torch.tensor([[float(x)] for x in xs])


def test_farthest_point_on_a_line():
    # from 0: 10 is farthest; then 5 (4 from 1? no: min(|5-0|, |5-10|) = 5 beats 6's 4 and 1's 1)
    assert farthest_point_selection(_points(0, 1, 5, 6, 10), None, [0], 3, 0.0) == [0, 4, 2]
    assert farthest_point_selection(_points(0, 1, 5, 6, 10), None, [0], 5, 0.0) == [0, 4, 2, 1, 3]


def test_ties_go_to_the_smallest_index():
    assert farthest_point_selection(_points(0, -1, 1), None, [0], 2, 0.0) == [0, 1]
    assert farthest_point_selection(_points(0, 1, -1), None, [0], 2, 0.0) == [0, 1]


def test_selected_is_kept_in_order_and_budget_equal_to_it_adds_nothing():
    assert farthest_point_selection(_points(0, 1, 5), None, [2, 0], 2, 1.0) == [2, 0]


def test_difficulty_raises_a_near_point_over_a_far_one():
    feats, diff = _points(0, 1, 5), torch.tensor([0.0, 10.0, 0.0])
    assert farthest_point_selection(feats, diff, [0], 2, 1.0) == [0, 1]  # 1 + 10 > 5
    assert farthest_point_selection(feats, diff, [0], 2, 0.3) == [0, 2]  # 1 + 3 < 5
    picks = greedy_picks(feats, diff, [0], 3, 1.0)
    assert [(p.index, p.diversity, p.difficulty) for p in picks] == [(1, 1.0, 10.0), (2, 4.0, 0.0)]


def test_none_difficulty_is_zero_difficulty():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(40, 6, generator=g)
    zeros = torch.zeros(40)
    assert farthest_point_selection(feats, None, [3], 12, 5.0) == farthest_point_selection(feats, zeros, [3], 12, 5.0)


def test_with_zero_weight_every_pick_is_the_farthest_point():
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(60, 5, generator=g, dtype=torch.float64)
    difficulty = torch.rand(60, generator=g)
    chosen = farthest_point_selection(feats, difficulty, [7, 11], 20, 0.0)
    assert len(chosen) == len(set(chosen)) == 20
    for k in range(2, 20):
        done = chosen[:k]
        nearest = [min(float((feats[j] - feats[i]).norm()) for i in done) for j in range(60)]
        best = max(nearest[j] for j in range(60) if j not in done)
        assert nearest[chosen[k]] == pytest.approx(best, abs=1e-12)
        assert chosen[k] == min(j for j in range(60) if j not in done and nearest[j] == pytest.approx(best, abs=1e-12))


@pytest.mark.parametrize(("selected", "budget", "message"), [
    ([], 2, "at least one"), ([0, 0], 3, "repeats"), ([5], 3, "outside"), ([0, 1], 1, "smaller"),
    ([0], 4, "larger"),
])
def test_bad_arguments_are_named(selected, budget, message):
    with pytest.raises(ValueError, match=message):
        farthest_point_selection(_points(0, 1, 2), None, selected, budget, 0.0)


def test_shapes_are_checked():
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        farthest_point_selection(torch.zeros(3), None, [0], 2, 0.0)
    with pytest.raises(ValueError, match=r"difficulty must be \(N,\)"):
        farthest_point_selection(torch.zeros(3, 2), torch.zeros(4), [0], 2, 1.0)


def test_top_scores():
    assert top_scores(torch.tensor([0.5, 0.9, 0.9, 0.1]), [1], 3) == [1, 2, 0]
    with pytest.raises(ValueError):
        top_scores(torch.zeros(3), [0, 1], 1)


def test_pooling_and_standardisation():
    g = torch.Generator().manual_seed(2)
    feats = torch.randn(5, 3, 12, 16, generator=g) * torch.tensor([1.0, 10.0, 0.1]).view(1, 3, 1, 1) + 4.0
    pooled = pool_features(feats, (4, 8))
    assert pooled.shape == (5, 3, 4, 8)
    assert torch.allclose(pooled[:, :, 0, 0], feats[:, :, :3, :2].mean(dim=(2, 3)), atol=1e-6)
    flat = standardise_features(pooled)
    assert flat.shape == (5, 96)
    per_channel = flat.view(5, 3, 32).permute(1, 0, 2).reshape(3, -1)
    assert torch.allclose(per_channel.mean(1), torch.zeros(3), atol=1e-5)
    assert torch.allclose(per_channel.std(1, unbiased=False), torch.ones(3), atol=1e-4)


def test_normalise_disparity_per_image():
    disp = torch.stack([torch.linspace(0.2, 0.6, 12).view(1, 3, 4), torch.full((1, 3, 4), 0.3)])
    out = normalise_disparity(disp)
    assert out[0].min() == 0 and out[0].max() == pytest.approx(1.0)
    assert torch.equal(out[1], torch.zeros(1, 3, 4))  # a constant map has no range: 0, not nan


def test_depth_difficulty_masks_far_pixels_dilated_and_the_bottom_rows():
    teacher = torch.full((1, 1, 10, 10), 0.5)
    teacher[0, 0, 3, 3] = 0.01  # far: its 3x3 neighbourhood does not count
    student = teacher.clone() + 0.2
    err = abs(math.log1p(0.7) - math.log1p(0.5))
    got = depth_difficulty(student, teacher, far_disp=0.07, far_dilate=3, ignore_bottom=0.2)
    assert got.shape == (1,)
    assert float(got) == pytest.approx(err * (100 - 20 - 9) / 100, rel=1e-5)
    assert float(depth_difficulty(teacher, teacher)) == 0.0
    assert bottom_rows_mask(10, 4, 0.13).sum() == 9 * 4


def test_normalised_entropy_bounds():
    uniform = torch.full((2, 19, 4, 4), 1 / 19)
    onehot = torch.zeros(1, 19, 4, 4)
    onehot[:, 3] = 1
    assert torch.allclose(normalised_entropy(uniform), torch.ones(2), atol=1e-6)
    assert float(normalised_entropy(onehot)) == pytest.approx(0.0, abs=1e-6)


def test_berhu_is_l1_below_c_and_scaled_l2_above():
    r = torch.tensor([0.1, -0.5, 1.0])  # c = 0.2 * 1.0 = 0.2
    expected = (0.1 + (0.25 + 0.04) / 0.4 + (1.0 + 0.04) / 0.4) / 3
    assert float(berhu(r)) == pytest.approx(expected, rel=1e-6)
    mask = torch.tensor([True, False, False])  # c = 0.02 over the kept pixel: 0.1 is above it
    assert float(berhu(r, mask)) == pytest.approx((0.01 + 0.0004) / 0.04, rel=1e-6)
    assert float(berhu(torch.zeros(3))) == 0.0
