"""The typed batch every stage consumes."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch


@dataclass
class Batch:
    """One batch of samples (all tensors share the batch dimension B).

    keys: sample keys ``<domain>/<split>/<id>``.
    images: frame id (-1, 0, 1) -> (B,3,H,W) float32 in [0, 1]; the photometric loss uses these.
    images_aug: the same frames after colour jitter; networks take these as input
        (Monodepth2 practice). Identical to ``images`` when jitter is off.
    K, inv_K: (B,3,3) float32 intrinsics of the (cropped, flipped) images and their inverse.
    label: (B,H,W) int64 train ids, 255 = ignore; None when no sample in the batch has a label
        (samples without one are all-255).
    depth: (B,1,H,W) float32 ground-truth depth in metres, 0 = invalid; None when absent.
    T: frame id -> (B,4,4) ground-truth transform from frame 0's camera to that frame's; None when absent.
    geometry: (B,5) int64 ``(y0, x0, h, w, flip)`` of each sample's crop and flip in its source
        image (``sdeseg.data.augment.apply_geometry`` aligns maps of the full image with it).
    instance: (B,H,W) int64 Cityscapes instanceIds (``instance.png``, cropped and flipped with
        the label), 0 ("unlabeled", void) for samples without a map; None when no sample has one
        (and in unlabeled streams, which drop it with the label).
    derived: name -> (B,H,W) maps joined by key from derived datasets (``ShardStream(derived=)``:
        pseudo-depth, regions, pseudo-masks), cropped and flipped like the images; None without.
    """

    keys: list[str]
    images: dict[int, torch.Tensor]
    images_aug: dict[int, torch.Tensor]
    K: torch.Tensor
    inv_K: torch.Tensor
    label: torch.Tensor | None = None
    depth: torch.Tensor | None = None
    T: dict[int, torch.Tensor] | None = None
    geometry: torch.Tensor | None = None
    instance: torch.Tensor | None = None
    derived: dict[str, torch.Tensor] | None = None

    def __len__(self) -> int:
        return len(self.keys)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        def mv(x):
            if isinstance(x, torch.Tensor):
                return x.to(device, non_blocking=non_blocking)
            if isinstance(x, dict):
                return {k: mv(v) for k, v in x.items()}
            return x

        return replace(self, **{f.name: mv(getattr(self, f.name)) for f in fields(self)})
