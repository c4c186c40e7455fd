"""Depth Feature Fusion: frozen depth features enter the student's encoder (seed 002).

At each chosen encoder stage k the student's map is replaced by

    F_rgb + Conv1x1(concat(resize(F_depth), F_rgb)),

and the next stage reads the fused map. ``Conv1x1(concat(...))`` is the form a secondary
review gives for the paper's fusion; its stages, the depth network and any normalisation
are not public. Ours: the depth maps are resized bilinearly to the student's map (the two
encoders may differ in input size or output stride), the result is *added* to the RGB map,
and the 1x1 convolution (weight and bias) starts at zero, so a student with fusion
computes exactly what it computed without it until training moves the convolution (like
the zero-initialised multi-task exchange, ``sdeseg.models.multitask``).

The depth features come from outside (a frozen depth encoder's ``("enc", k)`` maps): the
frozen network stays out of the student's parameters, its optimizer and its EMA teacher.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from sdeseg.models.layers import resize_to
from sdeseg.models.resnet import StageHook

STAGES = (0, 1, 2, 3, 4)  # encoder maps: stem (1/2), layer1 (1/4) .. layer4 (1/32)


class FeatureFusion(nn.Module):
    """``rgb + Conv1x1(concat(resize(depth), rgb))`` with the convolution zero-initialised.

    rgb (B,C_rgb,h,w), depth (B,C_depth,h',w') -> (B,C_rgb,h,w); equals ``rgb`` at initialisation.
    """

    def __init__(self, rgb_channels: int, depth_channels: int) -> None:
        super().__init__()
        self.rgb_channels, self.depth_channels = rgb_channels, depth_channels
        self.conv = nn.Conv2d(depth_channels + rgb_channels, rgb_channels, 1)
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)

    def forward(self, rgb: torch.Tensor, depth: torch.Tensor) -> torch.Tensor:
        if depth.shape[1] != self.depth_channels or rgb.shape[1] != self.rgb_channels:
            raise ValueError(
                f"FeatureFusion expects {self.rgb_channels} RGB and {self.depth_channels} depth channels, "
                f"got {rgb.shape[1]} and {depth.shape[1]}"
            )
        depth = resize_to(depth.to(rgb.dtype), rgb.shape[-2:], mode="bilinear")
        return rgb + self.conv(torch.cat([depth, rgb], 1))


class DepthFusion(nn.Module):
    """One :class:`FeatureFusion` per chosen encoder stage.

    Args:
        rgb_channels: channels of the student's 5 encoder maps (``encoder.num_ch_enc``).
        depth_channels: channels of the depth encoder's 5 maps.
        stages: which maps (0..4) are fused; any non-empty subset.

    ``hook(depth_features)`` gives the per-stage function :meth:`ResNetEncoder.forward
    <sdeseg.models.resnet.ResNetEncoder.forward>` takes as ``fuse``; ``depth_features`` is the
    list of the depth encoder's 5 maps (only the fused stages are read).
    """

    def __init__(self, rgb_channels: Sequence[int], depth_channels: Sequence[int], stages: Sequence[int]) -> None:
        super().__init__()
        stages = tuple(sorted(set(stages)))
        if not stages or any(k not in STAGES for k in stages):
            raise ValueError(f"fusion stages must be a non-empty subset of {STAGES}, got {stages}")
        if len(rgb_channels) != len(STAGES) or len(depth_channels) != len(STAGES):
            raise ValueError(
                f"DepthFusion needs 5 channel counts per encoder, got {list(rgb_channels)} and {list(depth_channels)}"
            )
        self.stages = stages
        self.fuse = nn.ModuleDict({str(k): FeatureFusion(rgb_channels[k], depth_channels[k]) for k in stages})

    def hook(self, depth_features: Sequence[torch.Tensor]) -> StageHook:
        """The ``fuse(k, map)`` function of one forward pass over ``depth_features``."""
        if len(depth_features) != len(STAGES):
            raise ValueError(f"DepthFusion needs the depth encoder's 5 maps, got {len(depth_features)}")

        def fuse(k: int, rgb: torch.Tensor) -> torch.Tensor:
            return self.fuse[str(k)](rgb, depth_features[k]) if k in self.stages else rgb

        return fuse
