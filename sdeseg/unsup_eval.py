"""Unsupervised segmentation evaluation: prototype clusters matched to classes (seed 003).

CPCDR evaluates its pretrained features without labels in training: the 1,000 learned
prototypes are clustered into as many clusters as there are classes (agglomerative, cosine
distance, average linkage), each pixel gets the cluster of its nearest prototype, and the
clusters are matched one-to-one to the classes by the Hungarian method on the confusion
matrix (cost −IoU); the reported number is the mIoU under that matching. Ignore pixels
(255) are left out. SciPy does the clustering and the matching.

Plain torch + scipy; nothing here imports ray, deepspeed or torch.distributed.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.optimize import linear_sum_assignment


def cluster_prototypes(prototypes: torch.Tensor, num_clusters: int) -> torch.Tensor:
    """Agglomerative clustering of prototypes: cosine distance, average linkage.

    Args:
        prototypes: (K,D) prototype vectors (their norms do not matter).
        num_clusters: clusters wanted (the number of classes); at most K.

    Returns:
        (K,) int64 cluster of each prototype, ``0..C-1`` numbered by the first prototype of each
        cluster (C = ``num_clusters`` unless fewer distinct clusters exist, e.g. duplicates).
    """
    k = prototypes.shape[0]
    if not 1 <= num_clusters <= k:
        raise ValueError(f"cluster_prototypes: need 1 <= num_clusters <= {k} prototypes, got {num_clusters}")
    if k == 1:
        return torch.zeros(1, dtype=torch.int64)
    x = F.normalize(prototypes.detach().to("cpu", torch.float64), dim=1).numpy()
    tree = linkage(x, method="average", metric="cosine")
    labels = fcluster(tree, t=num_clusters, criterion="maxclust")
    _, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
    rank = np.empty(len(first), dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(first))
    return torch.from_numpy(rank[inverse])


def assign_clusters(
    features: torch.Tensor, prototypes: torch.Tensor, prototype_cluster: torch.Tensor, chunk: int = 65536
) -> torch.Tensor:
    """Each pixel's cluster: that of its nearest prototype by cosine similarity.

    Args:
        features: (B,D,H,W) projections.
        prototypes: (K,D).
        prototype_cluster: (K,) int cluster of each prototype (:func:`cluster_prototypes`).
        chunk: pixels scored at once (bounds the (chunk, K) score matrix; 1,000 prototypes at
            65,536 pixels is 256 MiB in float32).

    Returns:
        (B,H,W) int64 cluster ids on ``features``' device.
    """
    b, d, h, w = features.shape
    protos = F.normalize(prototypes.detach().to(features.device, features.dtype), dim=1)
    flat = features.detach().permute(0, 2, 3, 1).reshape(-1, d)
    nearest = torch.cat([(F.normalize(part, dim=1) @ protos.t()).argmax(dim=1) for part in flat.split(chunk)])
    return prototype_cluster.to(features.device)[nearest].view(b, h, w)


class ClusterMatchMetric:
    """Cluster-vs-class confusion accumulated over updates; ``compute`` matches clusters to
    classes by the Hungarian method (maximum total IoU) and reports the IoUs under it.

    With more clusters than classes the unmatched clusters' pixels count as misses of their
    ground-truth class; with fewer, the unmatched classes get IoU 0 where present.
    ``iou[c]`` is NaN where class c is absent from the ground truth and no pixel is predicted
    as c; ``miou = nanmean(iou)`` (the convention of :class:`sdeseg.metrics.SegmentationMetric`).
    """

    def __init__(self, num_clusters: int, num_classes: int = 19, ignore_index: int = 255):
        self.num_clusters = num_clusters
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.confusion = torch.zeros(num_clusters, num_classes, dtype=torch.int64)  # [cluster, class]

    def update(self, clusters: torch.Tensor, target: torch.Tensor) -> None:
        """clusters, target: integer maps of equal shape; target may hold ``ignore_index``."""
        if clusters.shape != target.shape:
            raise ValueError(f"ClusterMatchMetric: clusters {tuple(clusters.shape)} != target {tuple(target.shape)}")
        pred = clusters.detach().reshape(-1).to("cpu", torch.int64)
        gt = target.detach().reshape(-1).to("cpu", torch.int64)
        keep = gt != self.ignore_index
        pred, gt = pred[keep], gt[keep]
        if gt.numel() and (gt.min() < 0 or gt.max() >= self.num_classes):
            raise ValueError(f"ClusterMatchMetric: target holds a class outside [0, {self.num_classes})")
        if pred.numel() and (pred.min() < 0 or pred.max() >= self.num_clusters):
            raise ValueError(f"ClusterMatchMetric: cluster id outside [0, {self.num_clusters})")
        idx = pred * self.num_classes + gt
        self.confusion += torch.bincount(idx, minlength=self.num_clusters * self.num_classes).reshape(
            self.num_clusters, self.num_classes)

    def merge(self, confusion: torch.Tensor) -> None:
        """Add a confusion matrix accumulated elsewhere (e.g. all-reduced across ranks)."""
        self.confusion += confusion.to("cpu", torch.int64)

    def reset(self) -> None:
        self.confusion.zero_()

    def compute(self) -> dict:
        """``{"miou", "iou": per class, "acc": pixel accuracy under the matching, "mapping":
        class of each cluster (-1 = unmatched)}``."""
        return match_clusters(self.confusion)


def match_clusters(confusion: torch.Tensor) -> dict:
    """Hungarian matching of clusters to classes and the IoUs under it.

    Args:
        confusion: (C_clusters, C_classes) pixel counts.

    Returns:
        ``{"miou": float, "iou": list[float], "acc": float, "mapping": list[int]}``, mapping =
        the class of each cluster (-1 where unmatched).
    """
    cm = confusion.to(torch.float64)
    cluster_size = cm.sum(1, keepdim=True)
    class_size = cm.sum(0, keepdim=True)
    union = cluster_size + class_size - cm
    pair_iou = torch.where(union > 0, cm / union.clamp(min=1), torch.zeros_like(cm))
    rows, cols = linear_sum_assignment(-pair_iou.numpy())  # cost -IoU
    mapping = [-1] * cm.shape[0]
    iou = [float("nan") if class_size[0, k] == 0 else 0.0 for k in range(cm.shape[1])]
    correct = 0.0
    for c, k in zip(rows.tolist(), cols.tolist()):
        mapping[c] = k
        if union[c, k] > 0:
            iou[k] = float(pair_iou[c, k])
        correct += float(cm[c, k])
    valid = [v for v in iou if v == v]
    total = float(cm.sum())
    return {
        "miou": float(np.mean(valid)) if valid else float("nan"),
        "iou": iou,
        "acc": correct / total if total > 0 else float("nan"),
        "mapping": mapping,
    }


__all__ = ["ClusterMatchMetric", "assign_clusters", "cluster_prototypes", "match_clusters"]
