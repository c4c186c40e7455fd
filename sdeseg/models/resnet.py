"""ResNet-18/34/50/101 encoders with torchvision parameter names.

The module tree (``conv1``, ``bn1``, ``layer1``..``layer4`` made of blocks with
``conv1``/``bn1``/``conv2``/``bn2``(/``conv3``/``bn3``) and ``downsample.0``/``.1``,
optional ``fc``) mirrors torchvision's, so a published torchvision ImageNet
``state_dict`` loads with ``strict=True`` through :func:`load_pretrained`. Nothing is
downloaded: the caller points at a file.

Two knobs beyond torchvision:

* ``width`` — channels of the stem (64 = standard). Every stage scales with it, so
  ``width=16`` gives a 16x cheaper network for CPU demos and tests (no published
  weights exist for it).
* ``in_channels`` — 6 for the pose network, which sees a frame pair stacked on the
  channel axis. Loading 3-channel ImageNet weights then repeats ``conv1`` over the
  frames and divides by their number, as Monodepth2 does, so the initial response to
  a pair of identical frames equals the ImageNet response to one frame.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn

# Monodepth2 normalises inputs in [0, 1] with one scalar mean/std for all channels
# (not the per-channel ImageNet statistics); the published SDE weights expect it.
INPUT_MEAN = 0.45
INPUT_STD = 0.225

# (stage index 0..4, that stage's map) -> the map the next stage reads; see ResNet.features
StageHook = Callable[[int, torch.Tensor], torch.Tensor]


def _keep(k: int, x: torch.Tensor) -> torch.Tensor:
    return x


# depth -> (block type, blocks per stage), as in torchvision
ARCHS: dict[int, tuple[str, tuple[int, int, int, int]]] = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
}


def _conv3x3(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)


def _conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with an identity (or 1x1 projection) shortcut."""

    expansion = 1

    def __init__(
        self, cin: int, planes: int, stride: int = 1, downsample: nn.Module | None = None, dilation: int = 1
    ) -> None:
        super().__init__()
        # torchvision refuses dilation in BasicBlock; we allow it so ResNet-18/34 can
        # also run at output stride 16 (the padding keeps the spatial size).
        self.conv1 = _conv3x3(cin, planes, stride, dilation)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes, 1, dilation)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carries the stride, torchvision "v1.5"), 1x1 expand by 4."""

    expansion = 4

    def __init__(
        self, cin: int, planes: int, stride: int = 1, downsample: nn.Module | None = None, dilation: int = 1
    ) -> None:
        super().__init__()
        self.conv1 = _conv1x1(cin, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride, dilation)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = _conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """Plain ResNet with torchvision module names.

    Args:
        depth: 18, 34, 50 or 101.
        width: stem channels (64 = standard); stage widths are width * (1, 2, 4, 8).
        in_channels: input channels (3 for an image, 6 for a stacked frame pair).
        dilate_last: replace the stride of ``layer4`` by dilation 2 (output stride 16).
        num_classes: add ``avgpool`` + ``fc`` with this many outputs (None: no head).
            The head is only there so a full classification checkpoint can be held;
            :meth:`features` never uses it.
    """

    def __init__(
        self,
        depth: int = 18,
        width: int = 64,
        in_channels: int = 3,
        dilate_last: bool = False,
        num_classes: int | None = None,
    ) -> None:
        super().__init__()
        if depth not in ARCHS:
            raise ValueError(f"ResNet depth must be one of {sorted(ARCHS)}, got {depth}")
        if width < 8 or width % 8:
            raise ValueError(f"ResNet width must be a multiple of 8, >= 8, got {width}")
        kind, blocks = ARCHS[depth]
        block = BasicBlock if kind == "basic" else Bottleneck
        self.depth, self.width, self.in_channels, self.dilate_last = depth, width, in_channels, dilate_last
        self._cin, self._dilation = width, 1

        self.conv1 = nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, width, blocks[0])
        self.layer2 = self._make_layer(block, width * 2, blocks[1], stride=2)
        self.layer3 = self._make_layer(block, width * 4, blocks[2], stride=2)
        self.layer4 = self._make_layer(block, width * 8, blocks[3], stride=2, dilate=dilate_last)
        self.num_ch_enc = [width] + [width * m * block.expansion for m in (1, 2, 4, 8)]
        self.output_stride = 16 if dilate_last else 32
        self.fc: nn.Linear | None = None
        if num_classes is not None:
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(self.num_ch_enc[-1], num_classes)
        self._init_weights()

    def _make_layer(self, block, planes: int, n: int, stride: int = 1, dilate: bool = False) -> nn.Sequential:
        # Same bookkeeping as torchvision's replace_stride_with_dilation: the first block
        # of a dilated stage keeps the previous dilation, later blocks use the new one.
        previous_dilation = self._dilation
        if dilate:
            self._dilation *= stride
            stride = 1
        downsample = None
        if stride != 1 or self._cin != planes * block.expansion:
            downsample = nn.Sequential(
                _conv1x1(self._cin, planes * block.expansion, stride),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self._cin, planes, stride, downsample, previous_dilation)]
        self._cin = planes * block.expansion
        layers += [block(self._cin, planes, dilation=self._dilation) for _ in range(1, n)]
        return nn.Sequential(*layers)

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def features(self, x: torch.Tensor, fuse: StageHook | None = None) -> list[torch.Tensor]:
        """x (B,in_channels,H,W) -> 5 maps: stem after relu (1/2), layer1 (1/4), layer2 (1/8),
        layer3 (1/16), layer4 (1/32, or 1/16 with ``dilate_last``); channels ``num_ch_enc``.

        ``fuse(k, map_k)``, when given, replaces each map k before the next stage reads it
        (and in the returned list): how depth features enter the backbone
        (:class:`~sdeseg.models.fusion.DepthFusion`). It must keep the map's shape.
        """
        fuse = fuse or _keep
        f0 = fuse(0, self.relu(self.bn1(self.conv1(x))))
        f1 = fuse(1, self.layer1(self.maxpool(f0)))
        f2 = fuse(2, self.layer2(f1))
        f3 = fuse(3, self.layer3(f2))
        f4 = fuse(4, self.layer4(f3))
        return [f0, f1, f2, f3, f4]

    def forward(self, x: torch.Tensor, fuse: StageHook | None = None) -> list[torch.Tensor]:
        return self.features(x, fuse)

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet-style logits (B,num_classes); only when built with ``num_classes``."""
        if self.fc is None:
            raise RuntimeError("ResNet.classify: built without a classification head (num_classes=None)")
        return self.fc(torch.flatten(self.avgpool(self.features(x)[-1]), 1))


class ResNetEncoder(nn.Module):
    """The encoder the depth, pose and segmentation networks use.

    Normalises inputs in [0, 1] with ``(x - 0.45) / 0.225`` (Monodepth2) and returns the
    five feature maps of :meth:`ResNet.features`. Attributes: ``net`` (the
    torchvision-named :class:`ResNet`), ``num_ch_enc`` (channels of the 5 maps),
    ``output_stride`` (32, or 16 with ``dilate_last``).
    """

    def __init__(
        self, depth: int = 18, width: int = 64, in_channels: int = 3, dilate_last: bool = False
    ) -> None:
        super().__init__()
        self.net = ResNet(depth, width=width, in_channels=in_channels, dilate_last=dilate_last)
        self.num_ch_enc = list(self.net.num_ch_enc)
        self.output_stride = self.net.output_stride

    def forward(self, x: torch.Tensor, fuse: StageHook | None = None) -> list[torch.Tensor]:
        """x (B,in_channels,H,W) in [0, 1] -> list of 5 maps (B,num_ch_enc[i],H/2^(i+1),W/2^(i+1)).

        ``fuse``: optional per-stage hook, see :meth:`ResNet.features`.
        """
        return self.net.features((x - INPUT_MEAN) / INPUT_STD, fuse)


def resnet_depth(name: str) -> int:
    """``"resnet50"`` -> 50 (the config's encoder names)."""
    if not name.startswith("resnet") or not name[6:].isdigit() or int(name[6:]) not in ARCHS:
        raise ValueError(f"unknown encoder {name!r}; expected one of {[f'resnet{d}' for d in ARCHS]}")
    return int(name[6:])


# ----------------------------------------------------------------------------- pretrained weights


class PretrainedMismatchError(ValueError):
    """A checkpoint does not fit the encoder; the message names the offending keys."""


def _describe(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return f"{shown}{f', ... ({len(keys) - limit} more)' if len(keys) > limit else ''}"


def adapt_state_dict(net: ResNet, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fit a torchvision-format ResNet ``state_dict`` to ``net`` or raise a clear error.

    * ``fc.*`` is dropped when ``net`` has no classification head.
    * A 3-channel ``conv1.weight`` is repeated over ``net.in_channels / 3`` frames and
      divided by their number (Monodepth2's multi-image input).

    Raises:
        PretrainedMismatchError: missing / unexpected keys or shape mismatches, all named.
    """
    state = dict(state)
    if net.fc is None:
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    w = state.get("conv1.weight")
    if (
        w is not None
        and w.dim() == 4
        and w.shape[1] == 3
        and net.in_channels != 3
        and net.in_channels % 3 == 0
    ):
        k = net.in_channels // 3
        state["conv1.weight"] = torch.cat([w] * k, dim=1) / k

    own = net.state_dict()
    # listed in state_dict order (conv1 before bn1), which reads like the architecture
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        arch = f"resnet{net.depth} (width {net.width}, in_channels {net.in_channels})"
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys [{_describe(missing)}]")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys [{_describe(unexpected)}]")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatches [{_describe(shapes)}]")
        raise PretrainedMismatchError(
            f"checkpoint does not fit {arch}: "
            + "; ".join(parts)
            + ". Is it a torchvision state_dict of the "
            "same architecture?"
        )
    return state


def load_pretrained(encoder: ResNetEncoder | ResNet, path: str | Path) -> None:
    """Load a torchvision-format ImageNet ``state_dict`` file into ``encoder`` (strict).

    Args:
        encoder: a :class:`ResNetEncoder` (weights go to ``encoder.net``) or a :class:`ResNet`.
        path: file written by ``torch.save(model.state_dict(), path)``; read with
            ``weights_only=True`` so no code in it is executed.

    Raises:
        FileNotFoundError: no such file.
        PretrainedMismatchError: the checkpoint is of another architecture/width; names the keys.
    """
    net = encoder.net if isinstance(encoder, ResNetEncoder) else encoder
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained encoder weights not found: {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise PretrainedMismatchError(f"{path}: expected a plain state_dict (name -> tensor)")
    net.load_state_dict(adapt_state_dict(net, state), strict=True)


def frozen_imagenet_encoder(
    depth: int, path: str | Path, dilate_last: bool = False, width: int = 64
) -> ResNetEncoder:
    """An ImageNet encoder for the feature-distance loss: weights from ``path``, eval mode,
    no gradients. Keep it out of the optimizer and the EMA teacher."""
    enc = ResNetEncoder(depth, width=width, dilate_last=dilate_last)
    load_pretrained(enc, path)
    enc.eval()
    enc.requires_grad_(False)
    return enc
