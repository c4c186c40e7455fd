"""Unsupervised evaluation: prototype clustering, nearest-prototype clusters, Hungarian matching."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sdeseg.unsup_eval import ClusterMatchMetric, assign_clusters, cluster_prototypes, match_clusters

C = 4


def labels(seed: int = 0, ignore: bool = True) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, C, (2, 12, 16), generator=g)
    if ignore:
        target[:, 0, :] = 255
    return target


def test_a_permuted_perfect_clustering_scores_one():
    target = labels()
    perm = torch.tensor([2, 0, 3, 1])  # cluster = perm[class]
    clusters = torch.where(target == 255, torch.zeros_like(target), perm[target.clamp(max=C - 1)])
    metric = ClusterMatchMetric(num_clusters=C, num_classes=C)
    metric.update(clusters, target)
    out = metric.compute()
    assert out["miou"] == 1.0 and out["iou"] == [1.0] * C and out["acc"] == 1.0
    assert out["mapping"] == [int((perm == c).nonzero()) for c in range(C)]  # cluster -> class


def test_matching_and_ious_of_an_imperfect_clustering():
    # clusters 0 and 1 both hold class 0; class 1 has no cluster of its own
    confusion = torch.tensor([[8, 0, 0], [2, 3, 0], [0, 0, 5]])  # [cluster, class]
    out = match_clusters(confusion)
    # the best one-to-one matching: 0->0 (IoU 8/10), 1->1 (3/5), 2->2 (1)
    assert out["mapping"] == [0, 1, 2]
    assert out["iou"] == pytest.approx([0.8, 0.6, 1.0])
    assert out["miou"] == pytest.approx(0.8) and out["acc"] == pytest.approx(16 / 18)
    # more clusters than classes: the unmatched cluster's pixels are misses
    out = match_clusters(torch.tensor([[5, 0], [0, 5], [3, 0]]))
    assert out["mapping"] == [0, 1, -1] and out["iou"] == pytest.approx([5 / 8, 1.0])
    # a class absent from the ground truth and never predicted is NaN, left out of the mean
    out = match_clusters(torch.tensor([[4, 0, 0], [0, 6, 0], [0, 0, 0]]))
    assert math.isnan(out["iou"][2]) and out["miou"] == 1.0


def test_ignore_pixels_do_not_count():
    target = labels()
    clusters = target.clamp(max=C - 1).clone()
    clusters[target == 255] = 3  # whatever the clusters say on ignore pixels
    metric = ClusterMatchMetric(C, C)
    metric.update(clusters, target)
    assert metric.compute()["miou"] == 1.0
    assert int(metric.confusion.sum()) == int((target != 255).sum())


def test_prototypes_cluster_by_direction_and_pixels_take_the_nearest():
    g = torch.Generator().manual_seed(1)
    centres = F.normalize(torch.randn(C, 16, generator=g), dim=1) * 3
    members = torch.tensor([0, 2, 1, 3, 0, 1, 2, 3, 3, 0])
    # prototypes: noisy copies of the centres at different lengths (cosine ignores length)
    protos = centres[members] * torch.rand(10, 1, generator=g).add(0.5) + 0.05 * torch.randn(10, 16, generator=g)
    clusters = cluster_prototypes(protos, C)
    for a in range(10):
        for b in range(10):
            assert (clusters[a] == clusters[b]) == (members[a] == members[b])
    assert clusters.tolist()[:4] == [0, 1, 2, 3]  # numbered by first prototype
    # pixel features near a centre land in that centre's cluster
    target = labels(2, ignore=False)
    feats = centres[target].permute(0, 3, 1, 2) + 0.1 * torch.randn(2, 16, 12, 16, generator=g)
    pred = assign_clusters(feats, protos, clusters)
    assert pred.shape == target.shape
    metric = ClusterMatchMetric(C, C)
    metric.update(pred, target)
    assert metric.compute()["miou"] == 1.0
    with pytest.raises(ValueError, match="num_clusters"):
        cluster_prototypes(protos, 11)
