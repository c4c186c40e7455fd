"""Multi-task model: depth and segmentation decoders side by side, exchanging features.

Both decoders run levels 4 .. ``exchange_level``; there each adds an attention-gated
transform of the other's features,

    seg_feat   += conv(depth_feat) * sigmoid(attn(depth_feat))
    depth_feat += conv(seg_feat)   * sigmoid(attn(seg_feat)),

and both continue to level 0. ``conv`` is zero-initialised, so at initialisation the
model is exactly the two separate branches (the transferred SDE decoder is not
disturbed); the exchange is learned from there. (The paper's code zero-initialises
the attention conv instead, which starts the exchange at half strength.)

An auxiliary segmentation head reads the segmentation features before the exchange
(``("seg_aux", 0)``), giving the lower levels a direct training signal.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from sdeseg.models.depth_decoder import LEVELS, DepthDecoder
from sdeseg.models.layers import resize_to
from sdeseg.models.pose import PoseNet
from sdeseg.models.resnet import ResNetEncoder
from sdeseg.models.sde import Frames, as_frames
from sdeseg.models.seg import SegDecoder


class FeatureExchange(nn.Module):
    """``conv(x) * sigmoid(attn(x))`` with ``conv`` zero-initialised (output 0 at init).

    x (B,C,h,w) -> (B,C,h,w), added to the other branch's features.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.attn = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        nn.init.zeros_(self.conv.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) * torch.sigmoid(self.attn(x))


class MultiTaskModel(nn.Module):
    """Shared encoder, depth decoder and segmentation decoder with a feature exchange.

    Args:
        encoder: shared encoder.
        depth_decoder: :class:`DepthDecoder` (its ``body`` runs in two halves).
        seg_decoder: :class:`SegDecoder`.
        num_classes: classes of the auxiliary head.
        exchange_level: decoder level (4 .. 0) after which features are exchanged; its
            resolution is 1/2^level of the input.
        pose: pose net for the photometric loss on unlabeled sequences (None: no pose).

    ``forward(images)`` (frame id -> (B,3,H,W) in [0, 1]; a bare tensor means ``{0: x}``)
    returns, for frame 0: ``("disp", s)`` (B,1,H/2^s,W/2^s) for s in 0..3, ``("seg", 0)``
    and ``("seg_aux", 0)`` logits (B,num_classes,H,W), ``("enc", k)`` encoder maps; and
    ``("T", f)`` (B,4,4) for every pose frame id present in ``images``. The disparity at
    scale ``exchange_level`` is read from the exchanged features, so even with
    ``exchange_level=0`` the depth output sees the segmentation branch.
    """

    def __init__(
        self,
        encoder: ResNetEncoder,
        depth_decoder: DepthDecoder,
        seg_decoder: SegDecoder,
        num_classes: int,
        exchange_level: int = 2,
        pose: PoseNet | None = None,
    ) -> None:
        super().__init__()
        if exchange_level not in LEVELS:
            raise ValueError(f"exchange_level must be in 0..4, got {exchange_level}")
        ch = depth_decoder.body.channels[exchange_level]
        if seg_decoder.body.channels[exchange_level] != ch:
            raise ValueError("depth and segmentation decoders need equal channels at the exchange level")
        self.encoder = encoder
        self.depth_decoder = depth_decoder
        self.seg_decoder = seg_decoder
        self.exchange_level = exchange_level
        self.to_seg = FeatureExchange(ch)  # depth features -> segmentation branch
        self.to_depth = FeatureExchange(ch)  # segmentation features -> depth branch
        self.aux_head = nn.Conv2d(ch, num_classes, 1)
        self.pose = pose

    # (prefix here, prefix in a DepthModel-shaped SDE state_dict): both decoder bodies
    # start from the SDE decoder, as in the paper; the pose net continues from the SDE one.
    sde_key_map = (
        ("encoder.", "encoder."),
        ("depth_decoder.", "decoder."),
        ("seg_decoder.body.", "decoder.body."),
        ("pose.", "pose."),
    )

    def forward(self, images: Frames | torch.Tensor) -> dict[tuple, torch.Tensor]:
        images = as_frames(images)
        x = images[0]
        feats = self.encoder(x)
        lvl = self.exchange_level
        first = [i for i in LEVELS if i >= lvl]
        second = [i for i in LEVELS if i < lvl]

        depth = self.depth_decoder.body(feats, levels=first)
        seg = self.seg_decoder.body(feats, levels=first)
        out: dict[tuple, torch.Tensor] = {
            ("seg_aux", 0): resize_to(self.aux_head(seg[lvl]), x.shape[-2:], mode="bilinear")
        }
        # both updates read the features from before the exchange
        d, s = depth[lvl], seg[lvl]
        depth[lvl] = d + self.to_depth(s)
        seg[lvl] = s + self.to_seg(d)
        if second:
            depth.update(self.depth_decoder.body(feats, levels=second, x=depth[lvl]))
            seg.update(self.seg_decoder.body(feats, levels=second, x=seg[lvl]))

        out.update(self.depth_decoder.heads(depth))
        out[("seg", 0)] = self.seg_decoder.head(seg[0])
        out.update({("enc", k): f for k, f in enumerate(feats)})
        if self.pose is not None:
            out.update(self.pose(images, [f for f in self.pose.frame_ids if f in images]))
        return out
