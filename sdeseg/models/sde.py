"""Self-supervised depth model: depth network + pose network in one ``nn.Module``.

One module so that one optimizer / one DeepSpeed engine wraps both networks and a
single ``forward`` call goes through the engine.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from sdeseg.config import ModelConfig
from sdeseg.models.depth_decoder import DepthDecoder
from sdeseg.models.pose import FRAME_IDS, PoseNet
from sdeseg.models.resnet import ResNetEncoder, load_pretrained, resnet_depth

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


def build_encoder(cfg: ModelConfig) -> ResNetEncoder:
    """The main encoder from the config, with ImageNet weights when ``cfg.pretrained`` is set."""
    enc = ResNetEncoder(resnet_depth(cfg.encoder), width=cfg.width, dilate_last=cfg.dilate_last)
    if cfg.pretrained is not None:
        load_pretrained(enc, cfg.pretrained)
    return enc


def build_depth_decoder(cfg: ModelConfig, encoder: ResNetEncoder) -> DepthDecoder:
    return DepthDecoder(
        encoder.num_ch_enc, cfg.decoder_channels, aspp=cfg.aspp, output_stride=encoder.output_stride,
        init_disp=cfg.init_disp,
    )


def build_pose_net(cfg: ModelConfig, frame_ids: Sequence[int] = FRAME_IDS) -> PoseNet:
    """Pose net from the config. Starts from scratch: ``cfg.pretrained`` is for the main
    encoder's architecture, which the pose encoder generally does not share."""
    return PoseNet(
        resnet_depth(cfg.pose_encoder),
        width=cfg.pose_width,
        rot_scale=cfg.pose_rot_scale,
        trans_scale=cfg.pose_trans_scale,
        frame_ids=frame_ids,
        init_forward=cfg.pose_init_forward,
    )


def build_depth_model(cfg: ModelConfig) -> DepthModel:
    enc = build_encoder(cfg)
    return DepthModel(enc, build_depth_decoder(cfg, enc))


def build_sde_model(cfg: ModelConfig, frame_ids: Sequence[int] = FRAME_IDS) -> SDEModel:
    """Depth model + pose net as one module (see :class:`SDEModel`)."""
    return SDEModel(build_depth_model(cfg), build_pose_net(cfg, frame_ids))
