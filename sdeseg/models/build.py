"""Every network of sdeseg built from the typed config, in one module.

The architecture files (``sde.py``, ``seg.py``, ``multitask.py``, ``pose.py``) hold
modules only; this module decides how the config assembles them, so the builders can
call each other without import cycles between the architecture files.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn as nn

from sdeseg.config import ModelConfig
from sdeseg.models.contrastive import ContrastiveModel, ProjectionDecoder
from sdeseg.models.depth_decoder import DepthDecoder
from sdeseg.models.fusion import DepthFusion
from sdeseg.models.instance import InstanceHead, InstanceModel
from sdeseg.models.multitask import MultiTaskModel
from sdeseg.models.pose import FRAME_IDS, PoseNet
from sdeseg.models.resnet import ResNetEncoder, load_pretrained, resnet_depth
from sdeseg.models.sde import DepthModel, SDEModel
from sdeseg.models.seg import SegDecoder, SegModel


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


def build_seg_decoder(cfg: ModelConfig, encoder: ResNetEncoder) -> SegDecoder:
    return SegDecoder(
        encoder.num_ch_enc, cfg.num_classes, cfg.decoder_channels, aspp=cfg.aspp,
        output_stride=encoder.output_stride, head_channels=cfg.seg_head_channels,
    )


def build_pose_net(cfg: ModelConfig, frame_ids: Sequence[int] = FRAME_IDS) -> PoseNet:
    """Pose net from the config. Starts from scratch: ``cfg.pretrained`` is for the main
    encoder's architecture, which the pose encoder generally does not share."""
    return PoseNet(
        resnet_depth(cfg.pose_encoder), width=cfg.pose_width, rot_scale=cfg.pose_rot_scale,
        trans_scale=cfg.pose_trans_scale, frame_ids=frame_ids, init_forward=cfg.pose_init_forward,
    )


def build_depth_model(cfg: ModelConfig) -> DepthModel:
    enc = build_encoder(cfg)
    return DepthModel(enc, build_depth_decoder(cfg, enc))


def build_sde_model(cfg: ModelConfig, frame_ids: Sequence[int] = FRAME_IDS) -> SDEModel:
    """Depth model + pose net as one module (see :class:`SDEModel`)."""
    return SDEModel(build_depth_model(cfg), build_pose_net(cfg, frame_ids))


def build_multitask_model(
    cfg: ModelConfig, with_pose: bool = True, frame_ids: Sequence[int] = FRAME_IDS
) -> MultiTaskModel:
    """Multi-task model from the config (``cfg.exchange_level``), with a pose net unless
    ``with_pose=False`` (e.g. no sequences in the data)."""
    enc = build_encoder(cfg)
    return MultiTaskModel(
        enc, build_depth_decoder(cfg, enc), build_seg_decoder(cfg, enc), cfg.num_classes,
        exchange_level=cfg.exchange_level, pose=build_pose_net(cfg, frame_ids) if with_pose else None,
    )


def build_seg_model(cfg: ModelConfig) -> nn.Module:
    """The segmentation network of the semi-supervised stage.

    :class:`SegModel` or, with ``cfg.multitask``, :class:`MultiTaskModel` (which also
    predicts depth and pose). Both take the same input and return ``("seg", 0)``; the
    multi-task model returns more keys.
    """
    if cfg.multitask:
        return build_multitask_model(cfg)
    enc = build_encoder(cfg)
    return SegModel(enc, build_seg_decoder(cfg, enc))


def build_instance_model(
    cfg: ModelConfig, depth_channels: Sequence[int] | None = None, fusion_stages: Sequence[int] = ()
) -> InstanceModel:
    """Instance segmentation network: :class:`SegModel`'s encoder and decoder plus an
    :class:`InstanceHead`; with ``fusion_stages``, frozen depth features (``depth_channels``:
    channels of the depth encoder's 5 maps, e.g. its ``num_ch_enc``) are fused into those
    encoder stages (:class:`DepthFusion`)."""
    enc = build_encoder(cfg)
    fusion = None
    if fusion_stages:
        if depth_channels is None:
            raise ValueError("build_instance_model: fusion_stages need depth_channels (the depth encoder's num_ch_enc)")
        fusion = DepthFusion(enc.num_ch_enc, depth_channels, fusion_stages)
    decoder = build_seg_decoder(cfg, enc)
    return InstanceModel(enc, decoder, InstanceHead(decoder.body.channels[0]), fusion)


def build_contrastive_model(cfg: ModelConfig, dim: int, hidden: int, num_prototypes: int) -> ContrastiveModel:
    """The contrastive pretraining network (seed 003): the segmentation model's encoder and decoder
    body, a projection head of ``hidden`` channels to ``dim`` and ``num_prototypes`` prototypes."""
    enc = build_encoder(cfg)
    decoder = ProjectionDecoder(enc.num_ch_enc, cfg.decoder_channels, dim, hidden, aspp=cfg.aspp,
                                output_stride=enc.output_stride)
    return ContrastiveModel(enc, decoder, num_prototypes)
