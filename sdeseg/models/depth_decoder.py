"""Monodepth2-style depth decoder, split into a reusable body and disparity heads.

The body is a U-Net decoder over the 5 encoder maps. Level ``i`` (run from 4 down to
0) applies a conv block, upsamples (nearest) to the size of encoder map ``i-1``,
concatenates that map as a skip connection (no skip at level 0, which instead
upsamples once more, to the input resolution), and applies a second conv block.
Level ``i``'s output is at 1/2^i of the input with ``channels[i]`` channels.

The segmentation decoder (``seg.py``) and the multi-task model reuse the same body
class, so the body's ``state_dict`` transfers from the SDE model unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
import torch.nn as nn

from sdeseg.models.layers import ASPP, Conv3x3, ConvBlock, aspp_rates_for, resize_to

LEVELS = (4, 3, 2, 1, 0)  # execution order of the decoder levels
NUM_DISP_SCALES = 4  # disparity outputs at scales 0..3, as Monodepth2


class DecoderLevel(nn.Module):
    """One decoder level: ``conv0`` -> upsample -> concat skip -> ``conv1``."""

    def __init__(self, conv0: nn.Module, conv1: nn.Module) -> None:
        super().__init__()
        self.conv0 = conv0
        self.conv1 = conv1


class DecoderBody(nn.Module):
    """U-Net decoder body shared by depth and segmentation decoders.

    Args:
        num_ch_enc: channels of the 5 encoder maps.
        channels: decoder channels per level (index = level; level 0 at input resolution).
        aspp: make level 4's first block an :class:`ASPP` (as in the paper's code).
        output_stride: encoder output stride (32, or 16 when dilated); picks ASPP rates.
        aspp_rates: override the ASPP rates.
    """

    def __init__(
        self,
        num_ch_enc: Sequence[int],
        channels: Sequence[int] = (16, 32, 64, 128, 256),
        aspp: bool = False,
        output_stride: int = 32,
        aspp_rates: tuple[int, ...] | None = None,
    ) -> None:
        super().__init__()
        if len(num_ch_enc) != 5 or len(channels) != 5:
            raise ValueError(
                f"DecoderBody needs 5 encoder and 5 decoder channel counts, got {num_ch_enc}, {channels}"
            )
        self.num_ch_enc = list(num_ch_enc)
        self.channels = list(channels)
        levels = []
        for i in range(5):  # stored by level index; run in LEVELS order
            cin = self.num_ch_enc[4] if i == 4 else self.channels[i + 1]
            if i == 4 and aspp:
                conv0: nn.Module = ASPP(cin, self.channels[i], aspp_rates or aspp_rates_for(output_stride))
            else:
                conv0 = ConvBlock(cin, self.channels[i])
            cskip = self.num_ch_enc[i - 1] if i > 0 else 0
            levels.append(DecoderLevel(conv0, ConvBlock(self.channels[i] + cskip, self.channels[i])))
        self.levels = nn.ModuleList(levels)

    def forward(
        self,
        features: Sequence[torch.Tensor],
        levels: Iterable[int] = LEVELS,
        x: torch.Tensor | None = None,
    ) -> dict[int, torch.Tensor]:
        """Run decoder levels in the given (descending) order.

        Args:
            features: the 5 encoder maps; map k is (B,num_ch_enc[k],H/2^(k+1),W/2^(k+1)).
            levels: which levels to run, e.g. ``(4, 3)`` then ``(2, 1, 0)`` to intervene in
                between (the multi-task exchange).
            x: input of the first level run (default: the last encoder map, right for
                level 4; pass the previous level's output otherwise).

        Returns:
            level -> (B,channels[level],H/2^level,W/2^level) for the levels run.
        """
        levels = list(levels)
        if x is None:
            if levels and levels[0] != 4:
                raise ValueError(
                    f"DecoderBody: starting at level {levels[0]} needs x (the level above's output)"
                )
            x = features[-1]
        out: dict[int, torch.Tensor] = {}
        for i in levels:
            level = self.levels[i]
            x = level.conv0(x)
            if i > 0:
                skip = features[i - 1]
                x = torch.cat([resize_to(x, skip.shape[-2:]), skip], 1)
            else:
                # encoder map 0 is at 1/2: one more upsampling reaches the input resolution
                h, w = features[0].shape[-2:]
                x = resize_to(x, (2 * h, 2 * w))
            x = level.conv1(x)
            out[i] = x
        return out


class DepthDecoder(nn.Module):
    """Decoder body + sigmoid disparity heads at scales 0..3.

    ``forward(features)`` returns ``("disp", s)`` (B,1,H/2^s,W/2^s) in (0, 1) for s in 0..3
    and ``("feat", i)`` (B,channels[i],H/2^i,W/2^i) for the 5 decoder levels.
    """

    def __init__(
        self,
        num_ch_enc: Sequence[int],
        channels: Sequence[int] = (16, 32, 64, 128, 256),
        aspp: bool = False,
        output_stride: int = 32,
        num_scales: int = NUM_DISP_SCALES,
        init_disp: float | None = None,
    ) -> None:
        super().__init__()
        self.body = DecoderBody(num_ch_enc, channels, aspp=aspp, output_stride=output_stride)
        self.scales = tuple(range(num_scales))
        self.disp_heads = nn.ModuleList([Conv3x3(channels[s], 1) for s in self.scales])
        if init_disp is not None:
            # Start at a plausible scene depth instead of sigmoid(0) = 0.5 (~0.2 m with a
            # 0.1-100 m range): from there the pose net explains the motion with tiny
            # translations and the disparity runs into the saturated sigmoid (a dead end).
            if not 0.0 < init_disp < 1.0:
                raise ValueError(f"init_disp must be in (0, 1), got {init_disp}")
            bias = math.log(init_disp / (1.0 - init_disp))
            for head in self.disp_heads:
                nn.init.constant_(head.conv.bias, bias)

    def heads(self, feats: dict[int, torch.Tensor]) -> dict[tuple, torch.Tensor]:
        """Disparity outputs for the scales whose level is in ``feats`` (level -> features)."""
        return {("disp", s): torch.sigmoid(self.disp_heads[s](feats[s])) for s in self.scales if s in feats}

    def forward(self, features: Sequence[torch.Tensor]) -> dict[tuple, torch.Tensor]:
        feats = self.body(features)
        out: dict[tuple, torch.Tensor] = {("feat", i): f for i, f in feats.items()}
        out.update(self.heads(feats))
        return out


def disp_to_depth(
    disp: torch.Tensor, min_depth: float, max_depth: float, mapping: str = "inverse"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Map sigmoid output to depth in [min_depth, max_depth].

    ``mapping="inverse"`` (Monodepth2) reads the sigmoid as an inverse depth between
    1/max_depth and 1/min_depth; ``"log"`` reads it as a log-depth between
    log(max_depth) (s = 0) and log(min_depth) (s = 1). Both are near for s -> 1.

    Returns:
        (scaled_disp, depth), both shaped like ``disp``; scaled_disp = 1 / depth.
    """
    if mapping == "inverse":
        min_disp, max_disp = 1.0 / max_depth, 1.0 / min_depth
        scaled = min_disp + (max_disp - min_disp) * disp
        return scaled, 1.0 / scaled
    if mapping == "log":
        log_max = math.log(max_depth)
        depth = torch.exp(log_max - (log_max - math.log(min_depth)) * disp)
        return 1.0 / depth, depth
    raise ValueError(f"disp_to_depth: mapping must be 'inverse' or 'log', got {mapping!r}")


def depth_to_disp(depth: torch.Tensor, min_depth: float, max_depth: float, mapping: str = "inverse") -> torch.Tensor:
    """Inverse of :func:`disp_to_depth`: the sigmoid output that gives ``depth``."""
    if mapping == "inverse":
        min_disp, max_disp = 1.0 / max_depth, 1.0 / min_depth
        return (1.0 / depth - min_disp) / (max_disp - min_disp)
    if mapping == "log":
        log_max = math.log(max_depth)
        return (log_max - torch.log(depth)) / (log_max - math.log(min_depth))
    raise ValueError(f"depth_to_disp: mapping must be 'inverse' or 'log', got {mapping!r}")
