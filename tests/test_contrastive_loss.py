"""The copy-paste contrastive loss: balanced Sinkhorn codes, group codes, swapped prediction."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sdeseg.copy_paste import copy_paste_views
from sdeseg.losses.contrastive import (
    copy_paste_contrastive_loss,
    gather_features,
    group_mean,
    sinkhorn,
    swapped_prediction_loss,
)


def skewed_scores(n: int, k: int, seed: int = 0) -> torch.Tensor:
    """Cosine-like scores where prototype 0 is everyone's favourite (a softmax would put most
    of the mass there)."""
    g = torch.Generator().manual_seed(seed)
    z = F.normalize(torch.randn(n, 16, generator=g), dim=1)
    protos = F.normalize(torch.randn(k, 16, generator=g), dim=1)
    scores = z @ protos.t()
    scores[:, 0] += 0.5
    return scores


def test_sinkhorn_codes_are_balanced():
    n, k = 600, 12
    scores = skewed_scores(n, k)
    codes = sinkhorn(scores, eps=0.05, iterations=3)
    assert codes.shape == (n, k) and (codes >= 0).all()
    assert torch.allclose(codes.sum(1), torch.ones(n), atol=1e-5)  # one unit per sample
    # N/K per prototype: 3 rounds balance to within ~30% here, where the plain softmax of the
    # same scores gives prototype 0 about 8 times its share (so this check can fail)
    assert torch.allclose(codes.sum(0), torch.full((k,), n / k), rtol=0.3)
    assert F.softmax(scores / 0.05, dim=1).sum(0)[0] > 3 * n / k
    # more rounds balance further (exactly in the limit); huge scores neither over- nor underflow
    assert torch.allclose(sinkhorn(scores, iterations=50).sum(0), torch.full((k,), n / k), rtol=1e-3)
    assert torch.isfinite(sinkhorn(scores * 1e4)).all()


def test_group_mean_gives_one_code_per_group():
    g = torch.Generator().manual_seed(0)
    values = torch.rand(7, 5, generator=g)
    groups = torch.tensor([4, 9, 4, 4, 2, 9, 7])
    out = group_mean(values, groups)
    for gid in groups.unique():
        members = groups == gid
        assert torch.allclose(out[members], values[members].mean(0).expand(int(members.sum()), -1))
    assert not torch.allclose(out[0], out[1])  # different groups keep different codes


def test_swapped_prediction_targets_the_other_views_group_code():
    g = torch.Generator().manual_seed(1)
    fa, fb, protos = torch.randn(6, 8, generator=g), torch.randn(5, 8, generator=g), torch.randn(4, 8, generator=g)
    ga = torch.tensor([0, 0, 1, 2, 2, 3])  # group 3 only in view a
    gb = torch.tensor([0, 1, 1, 2, 5])  # group 5 only in view b
    loss, stats = swapped_prediction_loss(fa, fb, ga, gb, protos, temperature=0.1, eps=0.05, iterations=3)
    # reference written out by hand
    p = F.normalize(protos, dim=1)
    sa, sb = F.normalize(fa, dim=1) @ p.t(), F.normalize(fb, dim=1) @ p.t()
    q = sinkhorn(torch.cat([sa, sb]))
    qa, qb = q[:6], q[6:]
    terms = []
    for i in range(6):
        if (gb == ga[i]).any():
            terms.append(-(qb[gb == ga[i]].mean(0) * F.log_softmax(sa[i] / 0.1, dim=0)).sum())
    for j in range(5):
        if (ga == gb[j]).any():
            terms.append(-(qa[ga == gb[j]].mean(0) * F.log_softmax(sb[j] / 0.1, dim=0)).sum())
    assert torch.allclose(loss, torch.stack(terms).mean(), atol=1e-6)
    assert int(stats["groups"]) == 3 and math.isclose(float(stats["kept"]), 9 / 11, rel_tol=1e-6)
    pooled, _ = swapped_prediction_loss(fa, fb, ga, gb, protos, swapped=False)
    assert not torch.allclose(pooled, loss)
    # no shared group: zero, still differentiable
    protos.requires_grad_(True)
    apart_a, apart_b = torch.zeros(6, dtype=torch.long), torch.ones(5, dtype=torch.long)
    empty, _ = swapped_prediction_loss(fa, fb, apart_a, apart_b, protos)
    empty.backward()
    assert empty.item() == 0.0 and protos.grad is not None


@pytest.mark.parametrize("h, w", [(24, 32), (6, 9)])  # a finer image grid; the features' own (a plain lookup)
def test_gather_features_matches_grid_sample(h, w):
    g = torch.Generator().manual_seed(2)
    proj = torch.randn(2, 5, 6, 9, generator=g, dtype=torch.float64)
    index = torch.randint(0, h * w, (2, 40), generator=g)
    y, x = (index // w).double(), (index % w).double()
    grid = torch.stack([(x + 0.5) / w * 2 - 1, (y + 0.5) / h * 2 - 1], dim=-1).unsqueeze(2)
    ref = F.grid_sample(proj, grid, mode="bilinear", padding_mode="border", align_corners=False)[..., 0]
    assert torch.allclose(gather_features(proj, index, (h, w)), ref.transpose(1, 2), atol=1e-12)


STEPS, LR = 30, 0.5


def test_loss_decreases_when_views_share_content():
    """A toy encoder: each group has a content vector; both views see it with noise. Learning
    the projection and the prototypes should lower the swapped-prediction loss."""
    g = torch.Generator().manual_seed(3)
    content = torch.randn(12, 10, generator=g)
    groups = torch.arange(12).repeat_interleave(8)
    xa = content[groups] + 0.3 * torch.randn(96, 10, generator=g)
    xb = content[groups] + 0.3 * torch.randn(96, 10, generator=g)
    encoder = torch.nn.Linear(10, 8)
    torch.nn.init.normal_(encoder.weight, generator=g)
    protos = torch.nn.Parameter(torch.randn(6, 8, generator=g))
    params = [*encoder.parameters(), protos]
    losses = []
    for _ in range(STEPS):
        loss, _ = swapped_prediction_loss(encoder(xa), encoder(xb), groups, groups, protos)
        assert torch.isfinite(loss)
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():  # plain gradient descent (torch.optim's first step imports seconds of code)
            for p, grad in zip(params, grads):
                p -= LR * grad
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


@pytest.mark.parametrize("weights", [(0.5, 0.5), (0.0, 1.0)])
def test_copy_paste_loss_on_two_pasted_views(weights):
    g = torch.Generator().manual_seed(4)
    b, h, w = 2, 48, 64
    images = torch.rand(b, 3, h, w, generator=g)
    regions = ((torch.arange(h).view(h, 1) // 16) * 4 + torch.arange(w).view(1, w) // 16).expand(b, h, w).clone()
    depth = torch.rand(b, h, w, generator=g) * 40 + 2
    v1, v2 = copy_paste_views(images, depth, regions, g)
    proj_a = torch.randn(b, 8, h // 4, w // 4, generator=g, requires_grad=True)
    proj_b = torch.randn(b, 8, h // 4, w // 4, generator=g, requires_grad=True)
    protos = torch.randn(10, 8, generator=g, requires_grad=True)
    out = copy_paste_contrastive_loss(proj_a, proj_b, v1.region, v2.region, v1.pixel_ids(), v2.pixel_ids(), protos,
                                      g, pixel_weight=weights[0], region_weight=weights[1], pixel_points=300,
                                      region_points=500)
    names = {"contrast/region"} | ({"contrast/pixel"} if weights[0] else set())
    assert set(out.terms) == names
    total = sum(out.terms.values())
    assert torch.isfinite(total) and total.item() > 0
    total.backward()
    assert proj_a.grad.abs().sum() > 0 and proj_b.grad.abs().sum() > 0 and protos.grad.abs().sum() > 0
    assert int(out.stats["contrast/region_groups"]) > 5 and float(out.stats["contrast/region_kept"]) > 0.5
    if weights[0]:
        # every sampled source pixel brings its copies from the other view: most points pair up
        assert float(out.stats["contrast/pixel_kept"]) > 0.5 and int(out.stats["contrast/pixel_groups"]) > 100
