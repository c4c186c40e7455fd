"""Self-supervised depth model: depth network + pose network in one ``nn.Module``.

One module so that one optimizer / one DeepSpeed engine wraps both networks and a
single ``forward`` call goes through the engine.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from sdeseg.models.depth_decoder import DepthDecoder
from sdeseg.models.pose import PoseNet
from sdeseg.models.resnet import ResNetEncoder

Frames = dict[int, torch.Tensor]


def as_frames(images: Frames | torch.Tensor) -> Frames:
    """Accept a bare (B,3,H,W) tensor as ``{0: tensor}`` (single-frame inference)."""
    return {0: images} if isinstance(images, torch.Tensor) else images


class DepthModel(nn.Module):
    """Encoder + depth decoder.

    ``forward(x)`` with x (B,3,H,W) in [0, 1] returns ``("disp", s)`` (B,1,H/2^s,W/2^s)
    for s in 0..3, ``("feat", i)`` decoder features (B,C_i,H/2^i,W/2^i) for i in 0..4 and
    ``("enc", k)`` encoder maps for k in 0..4 (the feature-distance loss and data
    selection read these).
    """

    def __init__(self, encoder: ResNetEncoder, decoder: DepthDecoder) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder

    def forward(self, x: torch.Tensor) -> dict[tuple, torch.Tensor]:
        feats = self.encoder(x)
        out = self.decoder(feats)
        out.update({("enc", k): f for k, f in enumerate(feats)})
        return out


class SDEModel(nn.Module):
    """Depth model + pose net.

    ``forward(images)`` with ``images`` frame id -> (B,3,H,W) (network inputs, i.e. the
    colour-jittered frames) returns the :class:`DepthModel` outputs for frame 0 plus
    ``("T", f)`` (B,4,4) frame-0 -> frame-f camera transforms (and the raw pose outputs)
    for every pose frame id present in ``images``. A bare tensor means ``{0: x}``: depth
    only, no pose.
    """

    def __init__(self, depth: DepthModel, pose: PoseNet) -> None:
        super().__init__()
        self.depth = depth
        self.pose = pose

    def forward(self, images: Frames | torch.Tensor) -> dict[tuple, torch.Tensor]:
        images = as_frames(images)
        out = self.depth(images[0])
        frame_ids = [f for f in self.pose.frame_ids if f in images]
        out.update(self.pose(images, frame_ids))
        return out
