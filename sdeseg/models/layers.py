"""Small building blocks shared by the decoders."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class Conv3x3(nn.Module):
    """3x3 convolution on a reflection-padded input (Monodepth2: no zero border that the
    disparity would have to learn around).

    A map with a side of 1 pixel (the 1/32 bottleneck of a 32-pixel-high demo image) has
    nothing to reflect; it is padded by replication, the limit of reflection there.
    """

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mode = "reflect" if min(x.shape[-2:]) > 1 else "replicate"
        return self.conv(F.pad(x, (1, 1, 1, 1), mode=mode))


class ConvBlock(nn.Module):
    """Reflection-padded 3x3 convolution followed by ELU."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = Conv3x3(cin, cout)
        self.nonlin = nn.ELU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.nonlin(self.conv(x))


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling (DeepLabv3), the paper's first decoder block.

    Branches: 1x1 conv, one dilated 3x3 conv per rate, and global average pooling; each
    gives ``cout`` channels, they are concatenated and projected back to ``cout``.
    The pooling branch has no BatchNorm (unlike DeepLabv3): on a 1x1 map BatchNorm
    fails in training for a per-rank batch of 1, which the cluster runs hit.
    """

    def __init__(
        self, cin: int, cout: int, rates: tuple[int, ...] = (6, 12, 18), dropout: float = 0.5
    ) -> None:
        super().__init__()

        def branch(k: int, d: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, k, padding=d if k == 3 else 0, dilation=d, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
            )

        self.branches = nn.ModuleList([branch(1, 1)] + [branch(3, r) for r in rates])
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(cin, cout, 1), nn.ReLU(inplace=True))
        self.project = nn.Sequential(
            nn.Conv2d(cout * (len(rates) + 2), cout, 1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B,cin,h,w) -> (B,cout,h,w)."""
        outs = [b(x) for b in self.branches]
        outs.append(self.pool(x).expand(-1, -1, *x.shape[-2:]))
        return self.project(torch.cat(outs, 1))


def aspp_rates_for(output_stride: int) -> tuple[int, int, int]:
    """DeepLab's rates (6, 12, 18) are for output stride 16; at stride 32 the bottleneck is
    half as large, so the rates are halved to cover the same image area."""
    return (6, 12, 18) if output_stride <= 16 else (3, 6, 9)


def resize_to(x: torch.Tensor, size: tuple[int, int] | torch.Size, mode: str = "nearest") -> torch.Tensor:
    """Resize x (B,C,h,w) to ``size`` (H,W); a no-op when already there.

    Sizes are taken from the skip connection rather than a fixed factor 2 so inputs whose
    sides are not multiples of 32 still line up, and dilated stages (no downsampling)
    are not upsampled.
    """
    size = tuple(size)
    if tuple(x.shape[-2:]) == size:
        return x
    if mode == "nearest":
        return F.interpolate(x, size=size, mode="nearest")
    return F.interpolate(x, size=size, mode=mode, align_corners=False)
