"""Bottom-up instance segmentation network (Panoptic-DeepLab style) on our decoder.

The segmentation network (:class:`~sdeseg.models.seg.SegDecoder`: the SDE decoder body and
a classification head) gains an :class:`InstanceHead` on the same input-resolution decoder
features: an instance-centre heatmap and a per-pixel offset to the instance's centre.
``sdeseg.panoptic`` turns targets and predictions into and out of instance maps.

Panoptic-DeepLab runs a second decoder for the instance branch; here both branches share the
decoder (its body is what the SDE pretraining transfers), and only the prediction heads are
separate. Optionally frozen depth features are fused into the encoder
(:class:`~sdeseg.models.fusion.DepthFusion`, seed 002).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from sdeseg.models.fusion import DepthFusion
from sdeseg.models.resnet import ResNetEncoder
from sdeseg.models.sde import Frames, as_frames
from sdeseg.models.seg import SegDecoder

INSTANCE_HEAD_CHANNELS = 32  # Panoptic-DeepLab's centre / offset head channels
INSTANCE_HEAD_KERNEL = 5  # its depthwise-separable 5x5 head convolution


class PredictionHead(nn.Module):
    """Panoptic-DeepLab's prediction head: depthwise 5x5 conv + BN + ReLU, pointwise 1x1 conv +
    BN + ReLU, then a 1x1 convolution to ``cout`` channels. x (B,cin,H,W) -> (B,cout,H,W)."""

    def __init__(self, cin: int, cout: int, channels: int = INSTANCE_HEAD_CHANNELS) -> None:
        super().__init__()
        k = INSTANCE_HEAD_KERNEL
        self.conv = nn.Sequential(
            nn.Conv2d(cin, cin, k, padding=k // 2, groups=cin, bias=False),
            nn.BatchNorm2d(cin),
            nn.ReLU(inplace=True),
            nn.Conv2d(cin, channels, 1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
        )
        self.out = nn.Conv2d(channels, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.conv(x))


class InstanceHead(nn.Module):
    """Centre heatmap and offset heads on decoder features.

    ``forward(x)`` with x (B,cin,H,W) returns ``("center", 0)`` (B,1,H,W), a linear
    regression of the Gaussian centre heatmap (Panoptic-DeepLab trains it with a weighted
    MSE; no sigmoid), and ``("offset", 0)`` (B,2,H,W), (dy, dx) in pixels of this resolution
    from each pixel to its instance's centre.
    """

    def __init__(self, cin: int, channels: int = INSTANCE_HEAD_CHANNELS) -> None:
        super().__init__()
        self.center = PredictionHead(cin, 1, channels)
        self.offset = PredictionHead(cin, 2, channels)

    def forward(self, x: torch.Tensor) -> dict[tuple, torch.Tensor]:
        return {("center", 0): self.center(x), ("offset", 0): self.offset(x)}


class InstanceModel(nn.Module):
    """Encoder + segmentation decoder + instance head, with optional depth feature fusion.

    ``forward(images, depth_features=None)``: ``images`` frame id -> (B,3,H,W) in [0, 1]
    (only frame 0 is used; a bare tensor means ``{0: x}``); ``depth_features``, the frozen
    depth encoder's 5 maps of the same images, required exactly when the model has a
    ``fusion``. Returns ``("seg", 0)`` logits (B,num_classes,H,W), ``("center", 0)``
    (B,1,H,W), ``("offset", 0)`` (B,2,H,W), decoder features ``("feat", i)`` and encoder
    maps ``("enc", k)`` (after fusion).
    """

    def __init__(
        self,
        encoder: ResNetEncoder,
        decoder: SegDecoder,
        head: InstanceHead,
        fusion: DepthFusion | None = None,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.head = head
        self.fusion = fusion

    # (prefix in this model, prefix in a DepthModel-shaped SDE state_dict), as SegModel
    sde_key_map = (("encoder.", "encoder."), ("decoder.body.", "decoder.body."))

    def forward(
        self, images: Frames | torch.Tensor, depth_features: Sequence[torch.Tensor] | None = None
    ) -> dict[tuple, torch.Tensor]:
        if (self.fusion is None) != (depth_features is None):
            raise ValueError(
                "InstanceModel: depth_features are required with depth fusion and refused without it "
                f"(fusion: {'stages ' + str(self.fusion.stages) if self.fusion is not None else 'none'})"
            )
        fuse = None if self.fusion is None else self.fusion.hook(depth_features)
        feats = self.encoder(as_frames(images)[0], fuse)
        out = self.decoder(feats)
        out.update(self.head(out[("feat", 0)]))
        out.update({("enc", k): f for k, f in enumerate(feats)})
        return out


@torch.no_grad()
def depth_features(depth_encoder: ResNetEncoder, images: torch.Tensor, scale: float = 1.0) -> list[torch.Tensor]:
    """The frozen depth encoder's 5 maps of ``images`` (B,3,H,W) in [0, 1], times ``scale`` (the
    Depth Controller's ramp of the depth input; 0 gives all-zero maps, the RGB-only input)."""
    feats = depth_encoder(images)
    return feats if scale == 1.0 else [f * scale for f in feats]


class DepthGuidedInstanceNet(nn.Module):
    """An :class:`InstanceModel` and, when it fuses depth, the frozen depth encoder that feeds it.

    ``forward(images)`` with ``images`` (B,3,H,W) in [0, 1] (or ``{0: x}``) returns the instance
    model's outputs; the depth maps come from the same images, times ``depth_scale``. Wraps the
    modules given (no copy): the stages validate their student and teacher through it, and
    ``sdeseg.exports.load_model`` builds one from an instance export. The depth encoder stays in
    eval mode whatever ``train()`` is called with (its BatchNorm statistics are frozen too).
    """

    def __init__(
        self, model: InstanceModel, depth_encoder: ResNetEncoder | None = None, depth_scale: float = 1.0
    ) -> None:
        super().__init__()
        if (model.fusion is None) != (depth_encoder is None):
            raise ValueError("DepthGuidedInstanceNet: a depth encoder is needed exactly when the model fuses depth")
        self.model = model
        self.depth_encoder = depth_encoder
        self.depth_scale = float(depth_scale)
        self.train(model.training)

    def train(self, mode: bool = True) -> DepthGuidedInstanceNet:
        super().train(mode)
        if self.depth_encoder is not None:
            self.depth_encoder.eval()
        return self

    def forward(self, images: Frames | torch.Tensor) -> dict[tuple, torch.Tensor]:
        image = as_frames(images)[0]
        feats = None if self.depth_encoder is None else depth_features(self.depth_encoder, image, self.depth_scale)
        return self.model(image, feats)
