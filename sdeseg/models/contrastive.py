"""The network of depth-region contrastive pretraining (seed 003): encoder, decoder body,
dense projection head and learnable prototypes.

The decoder body is the segmentation decoder's (:class:`DecoderBody`, same parameter names
under ``decoder.body``), so the encoder and body of a pretrained model initialise the
segmentation network exactly as an SDE export does (:func:`sdeseg.models.transfer_from_sde`
with the segmentation model's ``sde_key_map``). The projection head sits on the level-0
(input-resolution) features, the ones the segmentation head reads, so pretraining shapes the
whole body that is transferred. Pure PyTorch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from sdeseg.models.depth_decoder import DecoderBody
from sdeseg.models.resnet import ResNetEncoder
from sdeseg.models.sde import Frames, as_frames


class ProjectionHead(nn.Module):
    """Per-pixel projection (SwAV's 2-layer MLP as 1x1 convolutions): 1x1 conv + BN + ReLU, 1x1 conv.

    ``forward(x)``: (B,cin,H,W) -> (B,dim,H,W), not normalised (the loss normalises).
    """

    def __init__(self, cin: int, dim: int, hidden: int) -> None:
        super().__init__()
        self.hidden = nn.Sequential(nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden),
                                    nn.ReLU(inplace=True))
        self.out = nn.Conv2d(hidden, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.hidden(x))


class ProjectionDecoder(nn.Module):
    """:class:`DecoderBody` + :class:`ProjectionHead` on the level-0 features.

    ``forward(features)`` -> ``("proj", 0)`` (B,dim,H,W) and the body's ``("feat", i)``.
    """

    def __init__(self, num_ch_enc: Sequence[int], channels: Sequence[int], dim: int, hidden: int,
                 aspp: bool = False, output_stride: int = 32) -> None:
        super().__init__()
        self.body = DecoderBody(num_ch_enc, channels, aspp=aspp, output_stride=output_stride)
        self.head = ProjectionHead(channels[0], dim, hidden)

    def forward(self, features: Sequence[torch.Tensor]) -> dict[tuple, torch.Tensor]:
        feats = self.body(features)
        out: dict[tuple, torch.Tensor] = {("feat", i): f for i, f in feats.items()}
        out[("proj", 0)] = self.head(feats[0])
        return out


class ContrastiveModel(nn.Module):
    """Encoder + projection decoder + ``num_prototypes`` prototype vectors (a parameter (K,dim)).

    ``forward(images)`` with ``images`` frame id -> (B,3,H,W) in [0, 1] (only frame 0 is used;
    a bare tensor means ``{0: x}``) returns ``("proj", 0)`` (B,dim,H,W) and ``("feat", i)``.
    The prototypes are read by the loss and the unsupervised evaluation (``model.prototypes``);
    their norm does not matter (both normalise).
    """

    # initialised from an SDE export the way the segmentation model is (transfer_from_sde)
    sde_key_map = (("encoder.", "encoder."), ("decoder.body.", "decoder.body."))

    def __init__(self, encoder: ResNetEncoder, decoder: ProjectionDecoder, num_prototypes: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        dim = decoder.head.out.out_channels
        self.prototypes = nn.Parameter(F.normalize(torch.randn(num_prototypes, dim), dim=1))

    def forward(self, images: Frames | torch.Tensor) -> dict[tuple, torch.Tensor]:
        return self.decoder(self.encoder(as_frames(images)[0]))


__all__ = ["ContrastiveModel", "ProjectionDecoder", "ProjectionHead"]
