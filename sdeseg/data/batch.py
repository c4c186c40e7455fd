"""The typed batch every stage consumes."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

from sdeseg.data.augment import to_float


@dataclass
class Batch:
    """One batch of samples (all tensors share the batch dimension B).

    keys: sample keys ``<domain>/<split>/<id>``.
    images: frame id (-1, 0, 1) -> (B,3,H,W) float32 in [0, 1]; the photometric loss uses these.
        Streams may ship them as uint8 (``ShardStream(as_float=False)``); :meth:`to` and
        :meth:`as_float` convert.
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

    def to(self, device: torch.device | str, non_blocking: bool | None = None) -> Batch:
        """This batch on ``device`` with float32 images in [0, 1], however they were shipped.

        uint8 images (``ShardStream(as_float=False)``) travel as uint8 and are converted on
        ``device``: a quarter of the bytes to copy and no conversion on the host, where a GPU
        step would wait for it. ``images_aug is images`` stays true (one copy).
        ``non_blocking=None``: tensors in page-locked memory (:meth:`pin_memory`) are copied
        asynchronously (work queued later on the same CUDA stream is ordered after the copy;
        the caching host allocator keeps their memory until it is done), the others not.
        """
        def move(x: torch.Tensor) -> torch.Tensor:
            return x.to(device, non_blocking=x.is_pinned() if non_blocking is None else non_blocking)

        return self._map(move).as_float()

    def pin_memory(self) -> Batch:
        """A copy in page-locked memory (``DataLoader(pin_memory=True)`` calls this); needs CUDA."""
        return self._map(lambda x: x.pin_memory())

    def as_float(self) -> Batch:
        """Convert uint8 images and images_aug to float32 in [0, 1] in place (float ones are
        kept; ``images_aug is images`` stays true); returns ``self``."""
        def conv(images: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
            return {fid: to_float(x) if x.dtype == torch.uint8 else x for fid, x in images.items()}

        same = self.images_aug is self.images
        self.images = conv(self.images)
        self.images_aug = self.images if same else conv(self.images_aug)
        return self

    def _map(self, fn) -> Batch:
        """A new batch with ``fn`` applied to every tensor (also inside dicts)."""
        def mv(x):
            if isinstance(x, torch.Tensor):
                return fn(x)
            if isinstance(x, dict):
                return {k: mv(v) for k, v in x.items()}
            return x

        out = replace(self, **{f.name: mv(getattr(self, f.name)) for f in fields(self) if f.name != "images_aug"})
        out.images_aug = out.images if self.images_aug is self.images else mv(self.images_aug)
        return out
