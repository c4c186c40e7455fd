"""Segmentation network initialised from the SDE model (transfer learning).

The segmentation decoder is the depth decoder's body (same class, same parameter
names) with the disparity heads replaced by a classification head, so the SDE
encoder and decoder body load into it directly (:func:`transfer_from_sde`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from sdeseg.models.depth_decoder import DecoderBody
from sdeseg.models.resnet import ResNetEncoder
from sdeseg.models.sde import Frames, as_frames

HEAD_CHANNELS = 64  # channels of the classification head (the paper's head_inter_channels)
HEAD_DROPOUT = 0.1


class SegHead(nn.Module):
    """Decoder features -> class logits at the same resolution.

    1x1 projection (the paper's ``project``), 3x3 conv + BN + ReLU + dropout, then a 1x1
    classifier.
    """

    def __init__(
        self, cin: int, num_classes: int, channels: int = HEAD_CHANNELS, dropout: float = HEAD_DROPOUT
    ) -> None:
        super().__init__()
        self.project = nn.Conv2d(cin, channels, 1, bias=False)
        self.conv = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
        )
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B,cin,H,W) -> logits (B,num_classes,H,W)."""
        return self.classifier(self.conv(self.project(x)))


class SegDecoder(nn.Module):
    """:class:`DecoderBody` + :class:`SegHead` on the level-0 (input-resolution) features.

    ``forward(features)`` -> ``("seg", 0)`` logits (B,num_classes,H,W) and ``("feat", i)``.
    """

    def __init__(
        self,
        num_ch_enc: Sequence[int],
        num_classes: int,
        channels: Sequence[int] = (16, 32, 64, 128, 256),
        aspp: bool = False,
        output_stride: int = 32,
        head_channels: int = HEAD_CHANNELS,
    ) -> None:
        super().__init__()
        self.body = DecoderBody(num_ch_enc, channels, aspp=aspp, output_stride=output_stride)
        self.head = SegHead(channels[0], num_classes, head_channels)

    def forward(self, features: Sequence[torch.Tensor]) -> dict[tuple, torch.Tensor]:
        feats = self.body(features)
        out: dict[tuple, torch.Tensor] = {("feat", i): f for i, f in feats.items()}
        out[("seg", 0)] = self.head(feats[0])
        return out


class SegModel(nn.Module):
    """Encoder + segmentation decoder.

    ``forward(images)`` with ``images`` frame id -> (B,3,H,W) in [0, 1] (only frame 0 is
    used; a bare tensor means ``{0: x}``) returns ``("seg", 0)`` logits
    (B,num_classes,H,W), decoder features ``("feat", i)`` and encoder maps ``("enc", k)``.
    """

    def __init__(self, encoder: ResNetEncoder, decoder: SegDecoder) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder

    # (prefix in this model, prefix in a DepthModel-shaped SDE state_dict)
    sde_key_map = (("encoder.", "encoder."), ("decoder.body.", "decoder.body."))

    def forward(self, images: Frames | torch.Tensor) -> dict[tuple, torch.Tensor]:
        feats = self.encoder(as_frames(images)[0])
        out = self.decoder(feats)
        out.update({("enc", k): f for k, f in enumerate(feats)})
        return out


# ----------------------------------------------------------------------------- transfer


@dataclass
class TransferReport:
    """What :func:`transfer_from_sde` did, by parameter/buffer name."""

    loaded: list[str] = field(default_factory=list)  # target keys copied from the SDE model
    initialised: list[str] = field(default_factory=list)  # target keys left at their initialisation
    unused: list[str] = field(default_factory=list)  # SDE keys nothing took (disp heads, pose, ...)

    def summary(self) -> str:
        return (
            f"transferred {len(self.loaded)} tensors from the SDE model; {len(self.initialised)} left "
            f"initialised ({_prefixes(self.initialised)}); {len(self.unused)} SDE tensors unused "
            f"({_prefixes(self.unused)})"
        )


def _prefixes(keys: list[str], depth: int = 2) -> str:
    seen = sorted({".".join(k.split(".")[:depth]) for k in keys})
    return ", ".join(seen) if seen else "none"


def normalize_sde_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Bring an SDE checkpoint to :class:`DepthModel` names (``encoder.*``, ``decoder.*``)
    plus ``pose.*``: strips a DDP/DeepSpeed ``module.`` prefix and the ``depth.`` prefix of
    an :class:`~sdeseg.models.sde.SDEModel` state_dict."""
    out = {}
    for k, v in state.items():
        k = k.removeprefix("module.")
        k = k.removeprefix("depth.")
        out[k] = v
    return out


def transfer_from_sde(model: nn.Module, sde_state_dict: dict[str, torch.Tensor]) -> TransferReport:
    """Initialise ``model`` from an SDE model's weights.

    ``model`` names the parts to copy in its ``sde_key_map``: (own prefix, SDE prefix)
    pairs, e.g. ``SegModel``: encoder <- encoder, decoder.body <- decoder.body (the
    disparity heads have no counterpart). The SDE state_dict may come from a
    :class:`DepthModel`, an :class:`SDEModel` or a wrapped engine (``module.``).

    Returns:
        A :class:`TransferReport` (``report.summary()`` is a one-line log message).

    Raises:
        ValueError: a copied tensor has a different shape (another encoder / width / decoder
            channels), naming the keys; or nothing at all matched.
    """
    src = normalize_sde_state_dict(sde_state_dict)
    own = model.state_dict()
    new, loaded, mismatched = {}, [], []
    used: set[str] = set()
    for key in own:
        for mine, theirs in model.sde_key_map:
            if key.startswith(mine):
                skey = theirs + key[len(mine) :]
                if skey in src:
                    if src[skey].shape != own[key].shape:
                        mismatched.append(
                            f"{key}: SDE {tuple(src[skey].shape)} vs model {tuple(own[key].shape)}"
                        )
                    else:
                        new[key] = src[skey]
                        loaded.append(key)
                        used.add(skey)
                break
    if mismatched:
        raise ValueError(
            f"transfer_from_sde: {len(mismatched)} shape mismatches (is the SDE model built with the same "
            f"encoder, width and decoder channels?): {', '.join(mismatched[:8])}"
        )
    if not loaded:
        raise ValueError(
            "transfer_from_sde: no tensor of the SDE state_dict matched the model; expected keys like "
            f"'encoder.net.conv1.weight', got e.g. {list(src)[:4]}"
        )
    model.load_state_dict({**own, **new}, strict=True)
    return TransferReport(
        loaded=loaded,
        initialised=[k for k in own if k not in new],
        unused=[k for k in src if k not in used],
    )
