"""DepthMix and ClassMix for mean-teacher pseudo-labelling, and the strong augmentation.

Each image i of a batch is mixed with a partner ``j = perm[i]``: ``mixed[i] = where(M_i,
x_i, x_j)`` for the image, the teacher probabilities and (optionally) hard labels, all
with the same mask. DepthMix keeps, per pixel, whichever image is closer to the camera
(``M_i = depth_i < depth_j + eps``, via the fused :func:`sdeseg.ops.depth_mix`), so a
pasted object is never drawn in front of something nearer to the camera. ClassMix
(the baseline) keeps half of the classes image i's teacher predicts.

Ground truth can join the pool: convert it with :func:`labels_to_probs` and
concatenate it with the teacher probabilities of the unlabeled images, e.g.::

    images = torch.cat([labeled_images, unlabeled_images])
    probs = torch.cat([labels_to_probs(labels, C, 255), teacher_probs])
    depth = torch.cat([labeled_depth, unlabeled_depth])
    mix = depth_mix_batch(images, depth, probs=probs, generator=g)

Ignore pixels of the ground truth become all-zero probability vectors: their maximum
probability (0) is below any threshold and :func:`sdeseg.losses.pseudo_label_loss`
maps them to the ignore label, so they survive the mix as "no supervision".
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sdeseg.data.augment import Jitter, color_jitter
from sdeseg.ops import depth_mix


@dataclass
class MixResult:
    """A mixed batch (B = batch size).

    image: (B,C,H,W) mixed images.
    mask: (B,1,H,W) bool, True where image i itself is kept (False: its partner shows).
    perm: (B,) long, the partner ``j`` of each image ``i``.
    probs: (B,K,H,W) mixed probabilities, or None when none were given.
    label: (B,H,W) mixed hard labels, or None when none were given.
    """

    image: torch.Tensor
    mask: torch.Tensor
    perm: torch.Tensor
    probs: torch.Tensor | None = None
    label: torch.Tensor | None = None
    weight: torch.Tensor | None = None  # (B,H,W) per-pixel loss weight, see rebalance_weights


def _gen_device(generator: torch.Generator | None) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")


def mix_partners(batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Partner indices (B,) on the CPU.

    Without a generator: ``(i + 1) % B`` (deterministic, the paper's pairing). With one: a
    uniformly random derangement (no image is its own partner). For B = 1 the only
    partner is the image itself, so mixing leaves it unchanged.
    """
    if batch == 1:
        return torch.zeros(1, dtype=torch.long)
    if generator is None:
        return (torch.arange(batch) + 1) % batch
    # rejection sampling: a random permutation is a derangement with probability ~1/e
    while True:
        perm = torch.randperm(batch, generator=generator, device=_gen_device(generator)).cpu()
        if not (perm == torch.arange(batch)).any():
            return perm


def _resolve_perm(
    batch: int, perm: torch.Tensor | None, generator: torch.Generator | None, device
) -> torch.Tensor:
    if perm is None:
        perm = mix_partners(batch, generator)
    return torch.as_tensor(perm, dtype=torch.long).to(device)


def invalid_depth_as_far(depth: torch.Tensor) -> torch.Tensor:
    """Ground-truth depth for a DepthMix mask: invalid pixels (<= 0, e.g. sky) become
    infinitely far, so the partner always shows there."""
    return torch.where(depth > 0, depth, torch.full_like(depth, float("inf")))


def depth_mix_batch(
    images: torch.Tensor,
    depth: torch.Tensor,
    probs: torch.Tensor | None = None,
    label: torch.Tensor | None = None,
    *,
    perm: torch.Tensor | None = None,
    eps: float = 0.0,
    generator: torch.Generator | None = None,
) -> MixResult:
    """DepthMix: per pixel, keep image i where it is closer than its partner.

    Args:
        images: (B,3,H,W) student inputs.
        depth: (B,1,H,W) depth (smaller = closer): the SDE model's or the multi-task
            student's, any monotone stand-in for depth works.
        probs: (B,K,H,W) teacher probabilities (or one-hot ground truth) to mix alike.
        label: (B,H,W) hard labels to mix alike.
        perm: (B,) partners; default from :func:`mix_partners` (``(i+1)%B``, or a random
            derangement when ``generator`` is given).
        eps: ``M_i = depth_i < depth_j + eps`` (``semiseg.mix_eps``).
        generator: RNG for the partners.

    Returns:
        :class:`MixResult`; works for any B >= 1.
    """
    perm = _resolve_perm(images.shape[0], perm, generator, images.device)
    tensors = [t for t in (images, probs, label) if t is not None]
    mask, mixed = depth_mix(depth, *tensors, perm=perm, eps=eps)
    mixed = list(mixed)
    return MixResult(
        image=mixed.pop(0),
        mask=mask,
        perm=perm,
        probs=mixed.pop(0) if probs is not None else None,
        label=mixed.pop(0) if label is not None else None,
    )


# ----------------------------------------------------------------------------- domain adaptation


def geometry_distance(
    target_depth: torch.Tensor,
    source_depth: torch.Tensor,
    ignore_top: int = 0,
    ignore_bottom: int = 0,
    mode: str = "median",
) -> torch.Tensor:
    """Matching Geometry Sampling's criterion: how far each source candidate's geometry is from its target's.

    Args:
        target_depth: (B,H,W) > 0, the target images' depth (their SDE's).
        source_depth: (B,K,H,W) > 0, K source candidates per target (the source SDE's depth).
        ignore_top, ignore_bottom: rows left out at the top and bottom (sky, ego car).
        mode: ``"median"`` (default): each map is divided by its own median over the kept rows,
            since the two domains' SDE networks have their own scales, and the criterion is the
            mean over the kept rows of ``|log t - log s_k|``. ``"official"``: the official
            code's criterion on raw disparities (pass disparities ``p`` instead of depths):
            mean ``|log(p_t + 1) - log(p_s + 1)|``, no normalisation.

    Returns:
        (B,K) float64, smaller = closer geometry.
    """
    if target_depth.dim() != 3 or source_depth.dim() != 4 or source_depth.shape[0] != target_depth.shape[0] \
            or source_depth.shape[2:] != target_depth.shape[1:]:
        raise ValueError(f"match_geometry: need target (B,H,W) and source (B,K,H,W) of one size, got "
                         f"{tuple(target_depth.shape)} and {tuple(source_depth.shape)}")
    h = target_depth.shape[1]
    if ignore_top < 0 or ignore_bottom < 0 or ignore_top + ignore_bottom >= h:
        raise ValueError(f"match_geometry: ignore_top={ignore_top} and ignore_bottom={ignore_bottom} leave no "
                         f"rows of {h}")
    t = target_depth[:, ignore_top:h - ignore_bottom].double()
    s = source_depth[:, :, ignore_top:h - ignore_bottom].double()
    if mode == "median":
        if (t <= 0).any() or (s <= 0).any():
            raise ValueError("match_geometry: depths must be > 0")
        t = torch.log(t) - torch.log(t.flatten(1).median(dim=1).values).view(-1, 1, 1)
        s = torch.log(s) - torch.log(s.flatten(2).median(dim=2).values)[..., None, None]
    elif mode == "official":
        t, s = torch.log1p(t), torch.log1p(s)
    else:
        raise ValueError(f"match_geometry: mode must be 'median' or 'official', got {mode!r}")
    return (t[:, None] - s).abs().flatten(2).mean(dim=2)


def match_geometry(
    target_depth: torch.Tensor,
    source_depth: torch.Tensor,
    ignore_top: int = 0,
    ignore_bottom: int = 0,
    mode: str = "median",
) -> torch.Tensor:
    """Matching Geometry Sampling: per target image, the source candidate whose depth map is closest.

    Arguments as :func:`geometry_distance` (target (B,H,W), source (B,K,H,W) depths, or
    disparities with ``mode="official"``).

    Returns:
        (B,) long: per target, the k with the smallest criterion (ties: smallest k).
    """
    criterion = geometry_distance(target_depth, source_depth, ignore_top, ignore_bottom, mode)
    return torch.argmin(criterion, dim=1)  # the first minimum: ties go to the smallest k


def cross_domain_depth_mix(
    source_images: torch.Tensor,
    source_depth: torch.Tensor,
    source_label: torch.Tensor,
    target_images: torch.Tensor,
    target_depth: torch.Tensor,
    target_probs: torch.Tensor,
    *,
    eps: float = 0.0,
    threshold: float = 0.968,
    ignore_index: int = 255,
    generator: torch.Generator | None = None,
    target_weight: torch.Tensor | None = None,
) -> MixResult:
    """Cross-Domain DepthMix: source image i pasted over target image i where the source is closer.

    ``mask[i] = source_depth[i] < target_depth[i] + m_i`` with ``m_i = ±eps`` (the sign drawn
    per image with probability 1/2, as the official code's margin), through
    :func:`sdeseg.ops.depth_mix`. The mixed "probabilities" are the source's one-hot ground
    truth where the source shows and the target teacher's probabilities elsewhere; the
    per-pixel ``weight`` is 1 on source pixels and, on target pixels, the fraction of target
    pixels whose teacher confidence reaches ``threshold`` (one scalar over the batch), or
    ``target_weight`` where given (e.g. :func:`sdeseg.losses.pseudo_label_weight`'s per-pixel
    weight of the target images).

    Args:
        source_images, target_images: (B,3,H,W). source_depth, target_depth: (B,1,H,W), smaller = closer.
        source_label: (B,H,W) ground-truth train ids (``ignore_index`` = no label).
        target_probs: (B,C,H,W) teacher probabilities of the target images.
        target_weight: optional (B,H,W) weight of each target pixel's pseudo-label.

    Returns:
        :class:`MixResult`: ``image``, ``mask`` (True = source pixel), ``probs``, ``label``
        (argmax of the mix; ``ignore_index`` where the source pixel has no label), ``weight``.
    """
    b = source_images.shape[0]
    if target_images.shape[0] != b or source_images.shape[2:] != target_images.shape[2:]:
        raise ValueError(f"cross_domain_depth_mix: source {tuple(source_images.shape)} and target "
                         f"{tuple(target_images.shape)} batches differ")
    signs = torch.where(torch.rand(b, generator=generator, device=_gen_device(generator)) < 0.5, -1.0, 1.0)
    shift = (eps * signs).to(source_depth).view(b, 1, 1, 1)
    depth = torch.cat([source_depth - shift, target_depth])  # s - m < t  <=>  s < t + m
    source_probs = labels_to_probs(source_label, target_probs.shape[1], ignore_index).to(target_probs)
    images = torch.cat([source_images, target_images])
    probs = torch.cat([source_probs, target_probs])
    perm = torch.cat([torch.arange(b) + b, torch.arange(b)]).to(images.device)
    mask, (image, mixed_probs) = depth_mix(depth, images, probs, perm=perm, eps=0.0)
    mask, image, mixed_probs = mask[:b], image[:b], mixed_probs[:b]
    max_probs, label = mixed_probs.max(1)
    label = label.masked_fill(max_probs == 0, ignore_index)
    if target_weight is None:
        target_weight = (target_probs.max(1).values >= threshold).float().mean().expand_as(max_probs)
    weight = torch.where(mask[:, 0], torch.ones_like(max_probs), target_weight.to(max_probs))
    return MixResult(image=image, mask=mask, perm=perm[:b] - b, probs=mixed_probs, label=label, weight=weight)


def classmix_masks(teacher_probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """ClassMix masks (B,1,H,W) bool: for each image, a random half (rounded down) of the
    classes present in its teacher argmax; pixels with an all-zero probability vector
    (ground-truth ignore) are never part of a class."""
    max_probs, argmax = teacher_probs.max(1)
    valid = max_probs > 0
    masks = []
    for i in range(teacher_probs.shape[0]):
        classes = torch.unique(argmax[i][valid[i]])
        order = torch.randperm(classes.numel(), generator=generator, device=_gen_device(generator))
        chosen = classes[order[: classes.numel() // 2].to(classes.device)]
        masks.append(torch.isin(argmax[i], chosen) & valid[i])
    return torch.stack(masks)[:, None]


def classmix_batch(
    images: torch.Tensor,
    teacher_probs: torch.Tensor,
    label: torch.Tensor | None = None,
    *,
    perm: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> MixResult:
    """ClassMix: paste the pixels of half of image i's predicted classes onto its partner.

    Args:
        images: (B,3,H,W).
        teacher_probs: (B,K,H,W) teacher probabilities (or one-hot ground truth).
        label: (B,H,W) hard labels to mix alike (optional).
        perm, generator: as in :func:`depth_mix_batch`; the generator also picks the classes.

    Returns:
        :class:`MixResult` with the mixed probabilities.
    """
    perm = _resolve_perm(images.shape[0], perm, generator, images.device)
    mask = classmix_masks(teacher_probs, generator)

    def mix(t: torch.Tensor) -> torch.Tensor:
        return torch.where(mask if t.dim() == 4 else mask[:, 0], t, t[perm])

    return MixResult(
        image=mix(images),
        mask=mask,
        perm=perm,
        probs=mix(teacher_probs),
        label=mix(label) if label is not None else None,
    )


def labels_to_probs(label: torch.Tensor, num_classes: int, ignore_index: int = 255) -> torch.Tensor:
    """One-hot "probabilities" (B,K,H,W) float from labels (B,H,W); ignore pixels get an
    all-zero vector (maximum probability 0: below any threshold, ignored by the
    pseudo-label loss)."""
    valid = label != ignore_index
    if (label[valid] >= num_classes).any() or (label[valid] < 0).any():
        raise ValueError(f"labels_to_probs: labels must be in [0, {num_classes}) or {ignore_index}")
    onehot = F.one_hot(torch.where(valid, label, 0).long(), num_classes).permute(0, 3, 1, 2)
    return onehot.float() * valid[:, None]


def rebalance_weights(
    pool_probs: torch.Tensor, mixed_probs: torch.Tensor, clamp: tuple[float, float] = (0.25, 4.0)
) -> torch.Tensor:
    """Per-pixel weights (B,H,W) that give each class of the mixed pseudo-labels the share
    of pixels it had in the pool before mixing.

    A mix changes the class prior of the targets: DepthMix keeps what is near and drops
    what is far or flat, so on street scenes vegetation, cars and poles gain pixels and
    terrain, road and sky lose them (``python -m tune.mix_probe`` measures the keep
    rates). Class ``c`` with pool share ``p_c`` and mixed share ``m_c`` (shares of the
    pixels with a label, the argmax of a non-zero probability vector) gets weight
    ``p_c / m_c``, clamped to ``clamp``; without clamping the weights average to exactly 1
    over the labelled mixed pixels. ClassMix keeps every class at 1/2 in expectation, so
    its weights stay near 1. Pixels without a label (all-zero vectors) get weight 1.

    Args:
        pool_probs: (B,K,H,W) teacher probabilities / one-hot ground truth before the mix.
        mixed_probs: (B,K,H,W) the same after the mix.
        clamp: (low, high) bounds of the weights.
    """
    k = pool_probs.shape[1]

    def shares(probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        max_probs, label = probs.max(1)
        valid = max_probs > 0
        counts = torch.bincount(label[valid], minlength=k).to(probs.dtype)
        return counts / counts.sum().clamp(min=1), label, valid

    pool_share = shares(pool_probs)[0]
    mixed_share, label, valid = shares(mixed_probs)
    ratio = torch.where(mixed_share > 0, pool_share / mixed_share.clamp(min=1e-12), torch.ones_like(mixed_share))
    weight = ratio.clamp(*clamp)[label]
    return torch.where(valid, weight, torch.ones_like(weight))


# ----------------------------------------------------------------------------- strong augmentation

def _strong_jitter(s: float, u: torch.Tensor, hue_space: str = "yiq") -> Jitter:
    """The colour jitter of strength s from 4 uniforms u in [0, 1): brightness, contrast and
    saturation factors in [1-s, 1+s], hue shift in [-s, s] of a full turn (the magnitudes of
    the paper's kornia ColorJitter), applied in the fixed order b, c, s, h."""
    b, c, sat, h = u.tolist()
    return Jitter(1 - s + 2 * s * b, 1 - s + 2 * s * c, 1 - s + 2 * s * sat, (2 * h - 1) * s, order=(0, 1, 2, 3),
                  hue_space=hue_space)


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of x (C,H,W); kernel about 10% of each side (odd), as in
    the paper's augmentation; reflection padding keeps the borders' colours."""
    out = x[None]
    for dim, side in ((2, x.shape[1]), (3, x.shape[2])):
        c10 = math.ceil(0.1 * side)
        k = max(3, c10 if c10 % 2 else c10 - 1)  # largest odd size <= 10% of the side
        k = min(k, 2 * side - 1)  # reflection padding needs pad < side
        r = torch.arange(k, dtype=x.dtype, device=x.device) - k // 2
        g = torch.exp(-(r**2) / (2 * sigma**2))
        g = g / g.sum()
        c = x.shape[0]
        if dim == 2:
            weight, pad = g.view(1, 1, k, 1).expand(c, 1, k, 1), (0, 0, k // 2, k // 2)
        else:
            weight, pad = g.view(1, 1, 1, k).expand(c, 1, 1, k), (k // 2, k // 2, 0, 0)
        out = F.conv2d(F.pad(out, pad, mode="reflect"), weight, groups=c)
    return out[0]


def strong_augment(
    images: torch.Tensor,
    generator: torch.Generator | None = None,
    *,
    jitter: float = 0.2,
    blur: bool = True,
    jitter_prob: float = 0.8,
    blur_prob: float = 0.5,
    hue_space: str = "yiq",
) -> torch.Tensor:
    """Colour jitter and Gaussian blur on the mixed student input, drawn per image.

    The jitter is the reader's (:func:`sdeseg.data.augment.color_jitter`) with the factors of
    :func:`_strong_jitter`, in the order b, c, s, h; its hue step rotates the YIQ chroma plane
    (default, ``semiseg.hue_space``) or the HSV hue (torchvision's and kornia's semantics).

    Args:
        images: (B,3,H,W) in [0, 1].
        generator: RNG (CPU generator; default: the global RNG).
        jitter: colour-jitter strength (``semiseg.color_jitter``; 0 disables).
        blur: Gaussian blur with sigma ~ U(0.15, 1.15) (``semiseg.blur``).
        jitter_prob, blur_prob: per-image probabilities (the paper's 0.8 and 0.5).
        hue_space: ``"yiq"`` or ``"hsv"``.

    Returns:
        (B,3,H,W) augmented images (``images`` itself when nothing was drawn); labels are
        unaffected by these transforms.
    """
    u = torch.rand(images.shape[0], 7, generator=generator)  # on the CPU: cheap scalars
    out = images
    chosen = (u[:, 0] < jitter_prob).nonzero()[:, 0].tolist() if jitter > 0 else []
    if chosen:  # one pass over the jittered images, each with its own factors
        jitters = [_strong_jitter(jitter, u[i, 1:5], hue_space) for i in chosen]
        if len(chosen) == len(images):
            out = color_jitter(images, jitters)
        else:
            idx = torch.tensor(chosen, device=images.device)
            out = images.index_copy(0, idx, color_jitter(images.index_select(0, idx), jitters))
    blurred = [i for i in range(images.shape[0]) if blur and u[i, 5] < blur_prob]
    if blurred:
        out = torch.stack([_gaussian_blur(x, 0.15 + u[i, 6].item()) if i in blurred else x
                           for i, x in enumerate(out)])
    return out
