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
from dataclasses import dataclass

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


@dataclass(frozen=True)
class DepthRange:
    """How the sigmoid output ``s`` of a disparity head maps to metric depth.

    ``mapping="inverse"`` (Monodepth2) reads ``s`` as an inverse depth linear between
    1/max_depth (s = 0) and 1/min_depth (s = 1); ``"log"`` reads it as a log-depth linear
    between log(max_depth) and log(min_depth), which puts street-scene depth ratios in the
    sigmoid's linear range. Both are near for s -> 1. The SDE stage writes this object
    into its exports (:meth:`to_dict`), so every later consumer reads depth the way the
    network was trained.
    """

    min_depth: float = 0.1
    max_depth: float = 100.0
    mapping: str = "inverse"

    def __post_init__(self) -> None:
        if self.mapping not in ("inverse", "log"):
            raise ValueError(f"DepthRange: mapping must be 'inverse' or 'log', got {self.mapping!r}")
        if not 0.0 < self.min_depth < self.max_depth:
            raise ValueError(f"DepthRange: need 0 < min_depth < max_depth, got {self.min_depth}, {self.max_depth}")

    @classmethod
    def from_config(cls, cfg) -> DepthRange:
        """From a ``DepthLossConfig`` (``min_depth``, ``max_depth``, ``disp_mapping``)."""
        return cls(float(cfg.min_depth), float(cfg.max_depth), str(cfg.disp_mapping))

    @classmethod
    def from_dict(cls, value: dict | list | tuple) -> DepthRange:
        """Read :meth:`to_dict`'s form; also the ``[min, max(, mapping)]`` lists of exports written
        before this object existed (two numbers meant the "inverse" mapping)."""
        if isinstance(value, dict):
            return cls(float(value["min_depth"]), float(value["max_depth"]), str(value["mapping"]))
        return cls(float(value[0]), float(value[1]), str(value[2]) if len(value) > 2 else "inverse")

    def to_dict(self) -> dict:
        return {"min_depth": self.min_depth, "max_depth": self.max_depth, "mapping": self.mapping}

    def depth(self, disp: torch.Tensor) -> torch.Tensor:
        """Sigmoid output (any shape) -> depth in [min_depth, max_depth], computed in float32 or wider."""
        disp = disp.float() if disp.dtype in (torch.float16, torch.bfloat16) else disp
        if self.mapping == "inverse":
            min_disp, max_disp = 1.0 / self.max_depth, 1.0 / self.min_depth
            return 1.0 / (min_disp + (max_disp - min_disp) * disp)
        log_max = math.log(self.max_depth)
        return torch.exp(log_max - (log_max - math.log(self.min_depth)) * disp)

    def sigmoid(self, depth: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`depth`: the sigmoid output that gives ``depth``."""
        if self.mapping == "inverse":
            min_disp, max_disp = 1.0 / self.max_depth, 1.0 / self.min_depth
            return (1.0 / depth - min_disp) / (max_disp - min_disp)
        log_max = math.log(self.max_depth)
        return (log_max - torch.log(depth)) / (log_max - math.log(self.min_depth))
