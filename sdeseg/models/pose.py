"""Pose network: relative camera motion between frame 0 and each neighbour.

Convention (Monodepth2's, and exactly the ``T`` of :func:`sdeseg.ops.inverse_warp`):
``("T", f)`` maps a point from frame 0's camera coordinates to frame f's,
``X_f = R X_0 + t``. The network always sees a pair in temporal order (earlier
frame first): for f > 0 it sees ``(0, f)`` and its output is used as is; for f < 0
it sees ``(f, 0)``, i.e. the motion one step forward in time, and that transform is
inverted. So the network predicts the same kind of motion for both pairs and a
constant-velocity camera gives the same output twice.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from sdeseg.models.resnet import ResNetEncoder

FRAME_IDS = (-1, 1)


def _skew(v: torch.Tensor) -> torch.Tensor:
    """(B,3) -> (B,3,3) cross-product matrices [v]x."""
    zero = torch.zeros_like(v[:, 0])
    x, y, z = v.unbind(1)
    return torch.stack(
        [torch.stack([zero, -z, y], 1), torch.stack([z, zero, -x], 1), torch.stack([-y, x, zero], 1)], 1
    )


def rot_from_axisangle(axisangle: torch.Tensor) -> torch.Tensor:
    """Rodrigues: axis-angle (B,3) (direction = axis, norm = angle in radians) -> (B,3,3).

    ``R = I + sin(a)/a [v]x + (1 - cos a)/a^2 [v]x^2``. The angle gets a tiny floor inside
    the square root so the gradient is finite at zero rotation (where training starts).
    """
    v = axisangle.reshape(-1, 3)
    angle = torch.sqrt((v * v).sum(1) + 1e-12)[:, None, None]
    k = _skew(v)
    eye = torch.eye(3, dtype=v.dtype, device=v.device).expand(v.shape[0], 3, 3)
    return eye + torch.sin(angle) / angle * k + (1 - torch.cos(angle)) / angle**2 * (k @ k)


def transformation_from_parameters(
    axisangle: torch.Tensor, translation: torch.Tensor, invert: bool = False
) -> torch.Tensor:
    """4x4 rigid transforms from axis-angle and translation (Monodepth2 convention).

    Args:
        axisangle: (B,3) (or (B,1,3)) rotation.
        translation: (B,3) (or (B,1,3)).
        invert: return the inverse transform.

    Returns:
        (B,4,4): ``[R | t]`` (``X' = R X + t``), or its inverse ``[R^T | -R^T t]``.
    """
    R = rot_from_axisangle(axisangle)
    t = translation.reshape(-1, 3)
    if invert:
        R = R.transpose(1, 2)
        t = -(R @ t[:, :, None])[:, :, 0]
    T = torch.zeros(R.shape[0], 4, 4, dtype=R.dtype, device=R.device)
    T[:, :3, :3] = R
    T[:, :3, 3] = t
    T[:, 3, 3] = 1.0
    return T


class PoseDecoder(nn.Module):
    """Last encoder map of a pair -> axis-angle and translation (B,3) each.

    1x1 squeeze, two 3x3 convs, a 1x1 to 6 numbers per pixel, spatial mean (Monodepth2),
    then scaled: Monodepth2 scales both by 0.01; we keep that for rotation but default to
    1.0 for translation, because with 0.01 the predicted motion started so small that the
    photometric loss pushed the disparity to collapse within ~30 steps in a prototype.
    """

    def __init__(
        self, cin: int, hidden: int = 256, rot_scale: float = 0.01, trans_scale: float = 1.0,
        init_forward: float = 0.0,
    ) -> None:
        super().__init__()
        self.squeeze = nn.Conv2d(cin, hidden, 1)
        self.conv1 = nn.Conv2d(hidden, hidden, 3, padding=1)
        self.conv2 = nn.Conv2d(hidden, hidden, 3, padding=1)
        self.out = nn.Conv2d(hidden, 6, 1)
        self.relu = nn.ReLU()
        self.rot_scale, self.trans_scale = rot_scale, trans_scale
        if init_forward:
            # Start from a camera moving forward (z) by init_forward per frame instead of from
            # no motion: with a plausible initial depth the first warps are then roughly right
            # and depth learns from the start. The pair (earlier, later) predicts the later
            # camera's pose, so forward motion is -init_forward in the frame-0 -> frame-1 T.
            with torch.no_grad():
                self.out.weight.mul_(0.1)
                self.out.bias.zero_()
                self.out.bias[5] = -init_forward / trans_scale

    def forward(self, feat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """feat (B,cin,h,w) -> (axisangle (B,3), translation (B,3))."""
        x = self.relu(self.squeeze(feat))
        x = self.relu(self.conv1(x))
        x = self.relu(self.conv2(x))
        p = self.out(x).mean((2, 3))
        return p[:, :3] * self.rot_scale, p[:, 3:] * self.trans_scale


class PoseNet(nn.Module):
    """ResNet encoder on a stacked frame pair (6 channels) + :class:`PoseDecoder`.

    Args:
        depth: ResNet depth (18 or 34).
        width: ResNet stem width.
        rot_scale, trans_scale: output scales of rotation and translation.
        frame_ids: neighbours to predict a transform for (default (-1, 1)).
    """

    def __init__(
        self,
        depth: int = 18,
        width: int = 64,
        rot_scale: float = 0.01,
        trans_scale: float = 1.0,
        frame_ids: Sequence[int] = FRAME_IDS,
        init_forward: float = 0.0,
    ) -> None:
        super().__init__()
        if 0 in frame_ids:
            raise ValueError("PoseNet.frame_ids lists the neighbours of frame 0; 0 itself is not one")
        self.encoder = ResNetEncoder(depth, width=width, in_channels=6)
        # 256 hidden channels at the standard width (Monodepth2), fewer for slim demo nets
        self.decoder = PoseDecoder(
            self.encoder.num_ch_enc[-1], hidden=4 * width, rot_scale=rot_scale, trans_scale=trans_scale,
            init_forward=init_forward,
        )
        self.frame_ids = tuple(frame_ids)

    def forward(
        self, images: dict[int, torch.Tensor], frame_ids: Sequence[int] | None = None
    ) -> dict[tuple, torch.Tensor]:
        """Predict the transform from frame 0 to each neighbour.

        Args:
            images: frame id -> (B,3,H,W) in [0, 1]; must hold 0 and every requested id.
            frame_ids: neighbours (default ``self.frame_ids``).

        Returns:
            ``("T", f)`` (B,4,4) frame-0 camera -> frame-f camera (the ``T`` of
            ``inverse_warp(images[f], depth_0, T, K)``), plus the raw network outputs
            ``("axisangle", f)`` and ``("translation", f)`` (B,3) of the ordered pair.
        """
        frame_ids = tuple(self.frame_ids if frame_ids is None else frame_ids)
        if not frame_ids:
            return {}
        # temporal order inside each pair: (f, 0) for past frames, (0, f) for future ones
        pairs = [torch.cat([images[f], images[0]] if f < 0 else [images[0], images[f]], 1) for f in frame_ids]
        b = images[0].shape[0]
        # all pairs through the encoder as one batch: one pass instead of len(frame_ids)
        axisangle, translation = self.decoder(self.encoder(torch.cat(pairs, 0))[-1])
        # the pose matrices are geometry: float32 even when the network runs in bf16/fp16
        # (a bf16 rotation is off by ~1e-2 and makes the warps inconsistent)
        axisangle, translation = axisangle.float(), translation.float()
        out: dict[tuple, torch.Tensor] = {}
        with torch.autocast(axisangle.device.type, enabled=False):
            for k, f in enumerate(frame_ids):
                aa, tr = axisangle[k * b : (k + 1) * b], translation[k * b : (k + 1) * b]
                out[("axisangle", f)] = aa
                out[("translation", f)] = tr
                out[("T", f)] = transformation_from_parameters(aa, tr, invert=f < 0)
        return out
