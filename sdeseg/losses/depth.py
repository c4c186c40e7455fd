"""Monodepth2-style self-supervised depth loss.

For each disparity scale s, each neighbour frame f is warped into frame 0 with the
predicted depth and pose and compared photometrically: at the input resolution with
the disparity upsampled (``scale_mode="full"``, Monodepth2), or at the scale's own
resolution against downsampled frames (``"pyramid"``, Monodepth v1); the loss
takes the per-pixel minimum over neighbours (occlusions: a pixel hidden in one
neighbour is usually visible in the other). Auto-masking adds the error of the
*unwarped* neighbours to that minimum: where doing nothing explains frame 0 better
than the warp (static camera, objects moving with the camera), the pixel contributes
only that constant and no gradient. Edge-aware smoothness on mean-normalised disparity
at scale s is weighted by ``cfg.smoothness / 2^s``. Per-scale terms are averaged.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from sdeseg.camera import scale_intrinsics
from sdeseg.config import DepthLossConfig
from sdeseg.losses.common import LossOutput
from sdeseg.models.depth_decoder import DepthRange
from sdeseg.ops import inverse_warp, photometric_error

IDENTITY_NOISE = 1e-5  # breaks exact ties between identity and warped errors (Monodepth2)


def edge_aware_smoothness(disp: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """Edge-aware first-order smoothness of mean-normalised disparity.

    ``disp / mean(disp)`` makes the term blind to the global scale of disparity (which
    would otherwise shrink to cheat it). Disparity gradients are down-weighted by
    ``exp(-|image gradient|)`` (channel mean) so depth may jump at image edges.

    Args:
        disp: (B,1,h,w) disparity.
        image: (B,C,h,w) image at the same resolution.

    Returns:
        scalar: mean |d_x disp|·exp(-|d_x I|) + mean |d_y disp|·exp(-|d_y I|).
    """
    d = disp / (disp.mean((2, 3), keepdim=True) + 1e-7)
    dx = (d[..., :, :-1] - d[..., :, 1:]).abs()
    dy = (d[..., :-1, :] - d[..., 1:, :]).abs()
    ix = (image[..., :, :-1] - image[..., :, 1:]).abs().mean(1, keepdim=True)
    iy = (image[..., :-1, :] - image[..., 1:, :]).abs().mean(1, keepdim=True)
    return (dx * torch.exp(-ix)).mean() + (dy * torch.exp(-iy)).mean()


def sde_loss(
    images: dict[int, torch.Tensor],
    outputs: dict[tuple, torch.Tensor],
    K: torch.Tensor,
    inv_K: torch.Tensor | None,
    cfg: DepthLossConfig,
    frame_ids: Sequence[int] = (-1, 1),
    *,
    imagenet_encoder: nn.Module | None = None,
    encoder_input: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> LossOutput:
    """Photometric + smoothness (+ ImageNet feature-distance) loss of an SDE forward pass.

    Args:
        images: frame id -> (B,3,H,W) in [0, 1], the frames *without* colour jitter
            (the loss compares true colours; the network saw the jittered ones).
        outputs: model outputs with ``("disp", s)`` (B,1,H/2^s,W/2^s) for
            s < cfg.num_scales and ``("T", f)`` (B,4,4) frame 0 -> frame f for f in
            ``frame_ids``; ``("enc", 4)`` (the encoder bottleneck) for the feature distance.
        K: (B,3,3) pixel intrinsics of the (H,W) images.
        inv_K: (B,3,3) inverse intrinsics or None. Accepted so a batch's fields pass
            straight through; :func:`sdeseg.ops.inverse_warp` inverts ``K`` itself (a 3x3
            inverse per image is negligible), so it is only checked for shape.
        cfg: loss settings (SSIM weight, smoothness, depth range, scales, auto-masking,
            feature-distance weight). ``cfg.weight`` is *not* applied here: it weighs the
            whole depth loss against segmentation in the multi-task stage.
        frame_ids: source frames warped into frame 0.
        imagenet_encoder: frozen ImageNet encoder (see ``frozen_imagenet_encoder``), needed
            when ``cfg.feature_distance > 0``.
        encoder_input: what the student encoder saw, fed to ``imagenet_encoder`` (default
            ``images[0]``; pass the jittered frame to compare like with like).
        generator: RNG for the tie-breaking noise (default: the global RNG).

    Returns:
        :class:`LossOutput`. ``terms``: ``depth/photo``, ``depth/smooth`` (already multiplied by
        its weight), ``depth/feat`` (only when ``cfg.feature_distance > 0``, weighted) and
        ``depth/total`` = their sum; all float32 scalars (network outputs in bf16/fp16 are
        upcast first). ``stats`` (detached, for visualisation): ``("warped", f, s)`` (B,3,H',W')
        warped neighbours and ``("automask", s)`` (B,1,H',W') 1 where a warped frame won (pixel
        used), 0 where identity won (masked); H',W' is the input size, or scale s's with the pyramid.
    """
    if inv_K is not None and inv_K.shape != K.shape:
        raise ValueError(f"sde_loss: inv_K must be shaped like K {tuple(K.shape)}, got {tuple(inv_K.shape)}")
    target = images[0]
    h, w = target.shape[-2:]
    depth_range = DepthRange.from_config(cfg)
    alpha = cfg.ssim_weight
    pyramid = cfg.scale_mode == "pyramid"
    frames, scale_K = {f: images[f] for f in (0, *frame_ids)}, K
    identity = _identity_error(frames, frame_ids, alpha, generator) if cfg.automask and not pyramid else None

    photo_terms, smooth_terms = [], []
    stats: dict = {}
    for s in range(cfg.num_scales):
        disp = outputs[("disp", s)].float()
        size = tuple(disp.shape[-2:])
        small = _resize(target, size)  # frame 0 at this scale: smoothness edges (and pyramid target)
        if pyramid:  # compare at the disparity's own resolution
            frames = {0: small, **{f: _resize(images[f], size) for f in frame_ids}}
            scale_K = scale_intrinsics(K, (h, w), size)
            identity = _identity_error(frames, frame_ids, alpha, generator) if cfg.automask else None
            disp_cmp = disp
        else:  # Monodepth2: upsample the disparity to the input resolution
            disp_cmp = F.interpolate(disp, size=(h, w), mode="bilinear", align_corners=False)
        depth = depth_range.depth(disp_cmp)
        warped = {f: inverse_warp(frames[f], depth, outputs[("T", f)].float(), scale_K) for f in frame_ids}
        reproj = torch.cat([photometric_error(warped[f], frames[0], alpha=alpha) for f in frame_ids], 1)
        combined = reproj if identity is None else torch.cat([identity, reproj], 1)
        best, idx = combined.min(1, keepdim=True)
        photo_terms.append(best.mean())
        smooth_terms.append(cfg.smoothness / 2**s * edge_aware_smoothness(disp, small))

        for f in frame_ids:
            stats[("warped", f, s)] = warped[f].detach()
        n_id = 0 if identity is None else identity.shape[1]
        stats[("automask", s)] = (idx >= n_id).to(target.dtype).detach()

    losses = {
        "depth/photo": torch.stack(photo_terms).mean(),
        "depth/smooth": torch.stack(smooth_terms).mean(),
    }
    if cfg.feature_distance > 0:
        losses["depth/feat"] = cfg.feature_distance * feature_distance(
            outputs, imagenet_encoder, target if encoder_input is None else encoder_input
        )
    losses["depth/total"] = sum(losses.values())
    return LossOutput(losses, stats)


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Antialiased downsampling of an image to ``size`` (a no-op at its own size)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False, antialias=True)


def _identity_error(frames: dict[int, torch.Tensor], frame_ids, alpha: float, generator) -> torch.Tensor:
    """Photometric error of the unwarped neighbours (auto-masking), with tie-breaking noise."""
    identity = torch.cat([photometric_error(frames[f], frames[0], alpha=alpha) for f in frame_ids], 1)
    # drawn where the generator lives (a CPU generator also serves CUDA tensors)
    gen_device = generator.device if generator is not None else identity.device
    noise = torch.randn(identity.shape, generator=generator, device=gen_device, dtype=identity.dtype)
    return identity + noise.to(identity.device) * IDENTITY_NOISE


def feature_distance(
    outputs: dict[tuple, torch.Tensor], imagenet_encoder: nn.Module | None, x: torch.Tensor
) -> torch.Tensor:
    """L2 distance (one norm over the whole batch tensor, as in the paper's code) between
    the student's bottleneck ``outputs[("enc", 4)]`` and a frozen ImageNet encoder's on
    ``x`` (B,3,H,W). Keeps the SDE features close to semantically useful ones."""
    if imagenet_encoder is None:
        raise ValueError(
            "depth_loss.feature_distance > 0 needs a frozen ImageNet encoder: pass "
            "imagenet_encoder=sdeseg.models.frozen_imagenet_encoder(depth, cfg.model.pretrained), "
            "or set depth_loss.feature_distance=0 to disable the term"
        )
    if ("enc", 4) not in outputs:
        raise KeyError("feature distance needs the encoder bottleneck outputs[('enc', 4)]")
    with torch.no_grad():
        ref = imagenet_encoder(x)[-1]
    return torch.dist(outputs[("enc", 4)].float(), ref.float(), p=2)
