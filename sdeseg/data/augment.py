"""Training augmentations of one decoded sample: crop, horizontal flip, colour jitter.

Pure functions; every random choice comes from an explicit ``numpy.random.Generator``
so that the reader can recreate the exact augmentation of any sample from its seed
(that is what makes a resumed stream bit-identical to an uninterrupted one).

Geometry conventions follow ``sdeseg.ops.inverse_warp``: pixel (u, v) = (column, row),
integer coordinates are pixel *centres*, K maps camera points to those pixels and
``T`` maps points of frame 0's camera into the neighbour's camera.

* Crop: one window for all frames, label and depth; ``cx -= x0``, ``cy -= y0``.
* Flip: ``u' = (W-1) - u``. The camera is mirrored too (``x' = -x``), so
  ``K' = A K F3`` with ``A = [[-1,0,W-1],[0,1,0],[0,0,1]]``, ``F3 = diag(-1,1,1)``
  (that is ``cx' = (W-1) - cx``, skew negated) and ``T' = F T F`` with
  ``F = diag(-1,1,1,1)``. Warping the flipped frames with the flipped K/T/depth
  equals flipping the warped result (``tests/test_augment.py``).
* Colour jitter (brightness, contrast, saturation, hue; torchvision semantics) is
  drawn once per sample and applied to every frame, producing ``images_aug``; the
  un-jittered ``images`` feed the photometric loss (Monodepth2 practice).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from sdeseg.config import AugmentConfig

FLIP_T = np.diag([-1.0, 1.0, 1.0, 1.0])  # mirror x of a camera frame (homogeneous)
FLIP_3 = np.diag([-1.0, 1.0, 1.0])
# ITU-R 601 luma weights, as torchvision's rgb_to_grayscale uses them
LUMA = (0.299, 0.587, 0.114)


# ----------------------------------------------------------------------------- geometry


def crop_window(
    height: int, width: int, crop: tuple[int, int], rng: np.random.Generator | None
) -> tuple[int, int]:
    """Top-left corner ``(y0, x0)`` of a ``crop = (h, w)`` window in an image of ``height x width``.

    Random (uniform over all valid positions) with ``rng``; centred when ``rng`` is None.
    A stored image exactly the crop size gives ``(0, 0)``; a smaller one is an error.
    """
    ch, cw = crop
    if height < ch or width < cw:
        raise ValueError(
            f"stored image {height}x{width} is smaller than the crop {ch}x{cw}: "
            "lower data.size or prepare the shards at a larger size"
        )
    if rng is None:
        return (height - ch) // 2, (width - cw) // 2
    y0 = int(rng.integers(0, height - ch + 1))
    x0 = int(rng.integers(0, width - cw + 1))
    return y0, x0


def crop_K(K: np.ndarray, y0: int, x0: int) -> np.ndarray:
    """(3,3) intrinsics of the window whose top-left pixel is (row y0, column x0) of the image."""
    K = np.array(K, dtype=np.float64)
    K[0, 2] -= x0
    K[1, 2] -= y0
    return K


def flip_K(K: np.ndarray, width: int) -> np.ndarray:
    """(3,3) intrinsics of the horizontally flipped image of ``width`` pixels (pixel-centre convention)."""
    A = np.array([[-1.0, 0.0, width - 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    return A @ np.asarray(K, dtype=np.float64) @ FLIP_3


def flip_T(T: np.ndarray) -> np.ndarray:
    """(4,4) camera transform expressed in the mirrored cameras: ``F T F``."""
    return FLIP_T @ np.asarray(T, dtype=np.float64) @ FLIP_T


@dataclass
class Geometric:
    """The geometric augmentation of one sample (same for all its frames)."""

    y0: int
    x0: int
    height: int  # output size
    width: int
    flip: bool


def draw_geometric(
    height: int,
    width: int,
    crop: tuple[int, int] | None,
    augment: AugmentConfig | None,
    rng: np.random.Generator,
) -> Geometric:
    """Draw the crop window and flip of a ``height x width`` sample.

    ``crop=None`` keeps the full image. The window is random with ``augment.crop`` and
    centred otherwise (also without ``augment``); the flip needs ``augment.hflip``.
    """
    if crop is None:
        y0, x0, ch, cw = 0, 0, height, width
    else:
        random_crop = augment is not None and augment.crop
        y0, x0 = crop_window(height, width, crop, rng if random_crop else None)
        ch, cw = crop
    flip = bool(augment is not None and augment.hflip and rng.random() < 0.5)
    return Geometric(y0, x0, ch, cw, flip)


def apply_geometric(sample: dict[str, Any], geo: Geometric) -> dict[str, Any]:
    """Crop and flip a decoded sample (``sdeseg.data.codec.decode_sample`` layout).

    Args:
        sample: ``{"key", "meta", "frames": {fid: (H,W,3) uint8}, "label": (H,W) uint8 | None,
            "depth": (H,W) float32 | None, "instance": (H,W) int32 | None (optional key)}``;
            ``meta["K"]`` (3,3), optional ``meta["T_prev"]``, ``meta["T_next"]`` (4,4).

    Returns:
        ``{"key", "frames": {fid: (h,w,3) uint8}, "label": (h,w) | None, "depth": (h,w) | None,
        "instance": (h,w) | None, "K": (3,3) float64, "T": {-1: (4,4), 1: (4,4)} (those present)}``.
        Arrays may be views. Label and instance map are cut like the frames: nearest sampling,
        ids are never interpolated.
    """
    ys = slice(geo.y0, geo.y0 + geo.height)
    xs = slice(geo.x0, geo.x0 + geo.width)
    step = -1 if geo.flip else 1

    def cut(a):
        return None if a is None else a[ys, xs][:, ::step]

    K = crop_K(sample["meta"]["K"], geo.y0, geo.x0)
    T = {}
    for fid, name in ((-1, "T_prev"), (1, "T_next")):
        if name in sample["meta"]:
            T[fid] = np.asarray(sample["meta"][name], dtype=np.float64)
    if geo.flip:
        K = flip_K(K, geo.width)
        T = {fid: flip_T(t) for fid, t in T.items()}
    return {
        "key": sample["key"],
        "frames": {fid: cut(img) for fid, img in sample["frames"].items()},
        "label": cut(sample["label"]),
        "depth": cut(sample["depth"]),
        "instance": cut(sample.get("instance")),
        "K": K,
        "T": T,
    }


# ----------------------------------------------------------------------------- colour


@dataclass
class Jitter:
    """Colour-jitter factors of one sample; ``order`` is a permutation of 0..3 (b, c, s, h)."""

    brightness: float = 1.0
    contrast: float = 1.0
    saturation: float = 1.0
    hue: float = 0.0
    order: tuple[int, ...] = (0, 1, 2, 3)
    # "hsv": rotate the HSV hue (torchvision, kornia); "yiq": rotate the chroma plane of YIQ,
    # which keeps luma (the semi-supervised stage's strong augmentation, see BENCHMARKS.md)
    hue_space: str = "hsv"

    @property
    def identity(self) -> bool:
        return self.brightness == 1.0 and self.contrast == 1.0 and self.saturation == 1.0 and self.hue == 0.0


def draw_jitter(augment: AugmentConfig | None, rng: np.random.Generator) -> Jitter:
    """Factors uniform in ``[1-m, 1+m]`` (hue: ``[-m, m]``) and a random order, like torchvision.

    Draws nothing when every magnitude is zero, so turning jitter off does not change the
    other random choices of a sample.
    """
    if augment is None or not (augment.brightness or augment.contrast or augment.saturation or augment.hue):
        return Jitter()

    def factor(m: float) -> float:
        return float(rng.uniform(max(0.0, 1.0 - m), 1.0 + m)) if m > 0 else 1.0

    b, c, s = factor(augment.brightness), factor(augment.contrast), factor(augment.saturation)
    h = float(rng.uniform(-augment.hue, augment.hue)) if augment.hue > 0 else 0.0
    return Jitter(b, c, s, h, tuple(int(i) for i in rng.permutation(4)))


def _gray(img: torch.Tensor) -> torch.Tensor:
    """(...,3,H,W) -> (...,1,H,W) luma."""
    r, g, b = img.unbind(-3)
    return (r * LUMA[0]).add_(g, alpha=LUMA[1]).add_(b, alpha=LUMA[2]).unsqueeze(-3)


def rgb_to_hsv(img: torch.Tensor) -> torch.Tensor:
    """(...,3,H,W) RGB in [0,1] -> HSV with hue in [0,1)."""
    r, g, b = img.unbind(-3)
    # amax/amin, not max/min: no argmax needed, and the indexed reduction is far slower
    maxc = img.amax(dim=-3)
    minc = img.amin(dim=-3)
    delta = maxc - minc
    v = maxc
    s = torch.where(maxc > 0, delta / maxc.clamp(min=1e-12), torch.zeros_like(maxc))
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))  # hue is 0 for greys
    rc, gc, bc = (maxc - r) / safe, (maxc - g) / safe, (maxc - b) / safe
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.where(delta > 0, (h / 6.0) % 1.0, torch.zeros_like(h))
    return torch.stack([h, s, v], dim=-3)


def _hsv_channels(h6: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Trapezoid weights (...,3,H,W) in [0,1] of r, g, b for a hue ``h6`` (...,H,W) in sixths
    of a turn, ``h6 >= -1``: ``rgb = v - v*s*weight``. That is ``clamp(min(k, 4-k), 0, 1)``,
    ``k = (n + h6) mod 6``, n = 5, 3, 1 for r, g, b: one broadcast over the channel axis
    instead of a six-sector lookup (several times faster on large frames). Written into
    ``out`` when given."""
    n = torch.arange(5.0, 0.0, -2.0, dtype=h6.dtype, device=h6.device).view(3, 1, 1)
    k = torch.add(h6.unsqueeze(-3), n, out=out)  # >= 0: floor division gives the modulo
    k.sub_((k * (1.0 / 6.0)).floor_().mul_(6.0))  # (cheaper than torch.remainder)
    return k.sub_(2.0).abs_().neg_().add_(2.0).clamp_(0.0, 1.0)  # clamp(2 - |k - 2|, 0, 1)


def hsv_to_rgb(img: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`rgb_to_hsv`: (...,3,H,W) HSV -> RGB."""
    h, s, v = img.unbind(-3)
    return v.unsqueeze(-3) - (v * s).unsqueeze(-3) * _hsv_channels(6.0 * h)


def adjust_hue(img: torch.Tensor, shift: float | torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Rotate the HSV hue of (...,3,H,W) RGB in [0,1] by ``shift`` turns (a float, or a tensor
    broadcasting against (...,H,W), e.g. (N,1,1) for one shift per image of (N,3,H,W)).

    Equals ``hsv_to_rgb`` of the rotated ``rgb_to_hsv`` (torchvision's ``adjust_hue``) without
    the round trip: a hue rotation keeps ``v = max`` and ``v*s = max - min``, so only the hue
    is computed, in sixths of a turn. ``out`` (may be ``img`` itself) receives the result.
    """
    r, g, b = img.unbind(-3)
    maxc = img.amax(dim=-3)
    delta = maxc - img.amin(dim=-3)
    # which channel is the maximum, as 0/1 floats: lerp with them selects exactly and, on the
    # CPU, is many times faster than torch.where with a bool condition
    is_r = torch.eq(maxc, r, out=torch.empty_like(maxc))
    is_g = torch.eq(maxc, g, out=torch.empty_like(maxc))
    h6 = (r - g).add_(delta, alpha=4.0).lerp_((b - r).add_(delta, alpha=2.0), is_g).lerp_(g - b, is_r)
    h6.div_(delta.clamp(min=1e-12)).add_((shift % 1.0) * 6.0)  # in [-1, 11); greys: weight * 0
    return _hsv_channels(h6, out).mul_(-delta.unsqueeze(-3)).add_(maxc.unsqueeze(-3))


_RGB_TO_YIQ = ((0.299, 0.587, 0.114), (0.596, -0.274, -0.322), (0.211, -0.523, 0.312))


def rotate_hue_yiq(img: torch.Tensor, shift: float | torch.Tensor) -> torch.Tensor:
    """Rotate the chroma (I, Q) plane of YIQ by ``shift`` turns: (...,3,H,W) RGB -> RGB
    (unclamped). ``shift`` is a float or an (N,1,1) tensor, one per image of (N,3,H,W)."""
    to_yiq = torch.tensor(_RGB_TO_YIQ, dtype=torch.float64)
    theta = 2 * math.pi * torch.as_tensor(shift, dtype=torch.float64).reshape(-1)
    cos, sin = torch.cos(theta), torch.sin(theta)
    rot = torch.zeros(theta.shape[0], 3, 3, dtype=torch.float64)
    rot[:, 0, 0] = 1.0
    rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = cos, -sin, sin, cos
    m = (torch.linalg.inv(to_yiq) @ rot @ to_yiq).to(img)  # (N,3,3), N = 1 for a float shift
    if m.shape[0] == 1:
        return torch.einsum("ij,...jhw->...ihw", m[0], img)
    return torch.einsum("nij,n...jhw->n...ihw", m, img)


def color_jitter(img: torch.Tensor, jitter: Jitter | Sequence[Jitter]) -> torch.Tensor:
    """Colour-jitter float images (...,3,H,W) in [0,1]; returns a new tensor (or ``img`` itself
    when there is nothing to do).

    One :class:`Jitter` applies to every image alike (the (F,3,H,W) frames of one sample). A
    sequence of N jitters that share one order applies jitter i to ``img[i]`` of (N,...,3,H,W)
    in one pass over the batch (:func:`sdeseg.mixing.strong_augment`).

    Contrast blends each image (...,3,H,W) with its own mean luma, saturation with its
    per-pixel luma (torchvision's definitions); the hue step rotates the HSV hue
    (torchvision) or the YIQ chroma plane (``Jitter.hue_space``); results are clamped to [0,1]
    after every step.
    """
    single = isinstance(jitter, Jitter)
    jitters = [jitter] if single else list(jitter)
    order = jitters[0].order
    space = jitters[0].hue_space
    if space not in ("hsv", "yiq"):
        raise ValueError(f"color_jitter: hue_space must be 'hsv' or 'yiq', got {space!r}")
    if not single and (len(jitters) != img.shape[0] or any(j.order != order or j.hue_space != space
                                                            for j in jitters)):
        raise ValueError(f"color_jitter: need {img.shape[0]} jitters with one common order and hue space, got "
                         f"{[(j.order, j.hue_space) for j in jitters]}")
    if all(j.identity for j in jitters):
        return img

    def factor(name: str, neutral: float, dims: int) -> float | torch.Tensor | None:
        """None when no image changes; else a float, or an (N,1,..,1) tensor of ``dims`` dims."""
        values = [getattr(j, name) for j in jitters]
        if all(v == neutral for v in values):
            return None
        if single:
            return values[0]
        return torch.tensor(values, dtype=img.dtype).view(-1, *[1] * (dims - 1)).to(img.device)

    img = img.clone()  # one copy, then every step in place (fewer passes over memory)
    for op in order:
        if op == 0 and (f := factor("brightness", 1.0, img.dim())) is not None:
            img.mul_(f).clamp_(0.0, 1.0)
        elif op == 1 and (f := factor("contrast", 1.0, img.dim())) is not None:
            mean = _gray(img).mean(dim=(-3, -2, -1), keepdim=True)
            img.mul_(f).add_(mean * (1.0 - f)).clamp_(0.0, 1.0)
        elif op == 2 and (f := factor("saturation", 1.0, img.dim())) is not None:
            gray = _gray(img).mul_(1.0 - f)
            img.mul_(f).add_(gray).clamp_(0.0, 1.0)
        elif op == 3 and space == "yiq" and (f := factor("hue", 0.0, 1)) is not None:
            img = rotate_hue_yiq(img, f).clamp_(0.0, 1.0)
        elif op == 3 and (f := factor("hue", 0.0, img.dim() - 1)) is not None:
            adjust_hue(img, f, out=img).clamp_(0.0, 1.0)
    return img


# ----------------------------------------------------------------------------- one sample


def _tensor(a: np.ndarray) -> torch.Tensor:
    """Contiguous tensor of an array or view. Decoded images are read-only numpy arrays
    (PIL buffers); torch warns on those, so they are copied (cheap next to decoding)."""
    a = np.ascontiguousarray(a)
    return torch.from_numpy(a if a.flags.writeable else a.copy())


def to_float(img: torch.Tensor) -> torch.Tensor:
    """uint8 image tensor -> float32 in [0,1], same shape."""
    return img.float().div_(255.0)


def augment_sample(
    sample: dict[str, Any],
    crop: tuple[int, int] | None,
    augment: AugmentConfig | None,
    rng: np.random.Generator,
    frames: tuple[int, ...],
) -> dict[str, Any]:
    """Decoded sample -> tensors of one training example.

    Images stay uint8 here: a DataLoader worker ships a quarter of the bytes of float32
    through shared memory, and the reader converts whole batches to float32 in [0,1]
    (``Batch.as_float``). The jittered frames are rounded back to uint8, as
    Monodepth2's PIL-based ColorJitter does.

    Returns ``{"key", "images": {fid: (3,h,w) uint8}, "images_aug": {fid: (3,h,w) uint8} | None
    (None: no jitter), "K": (3,3), "label": (h,w) int64 | None, "depth": (1,h,w) | None,
    "instance": (h,w) int64 | None, "T": {fid: (4,4)}, "geometry": (5,) int64 = (y0, x0, h, w,
    flip)}`` (K, depth, T float32).
    """
    h, w = sample["frames"][0].shape[:2]
    geo = draw_geometric(h, w, crop, augment, rng)
    jit = draw_jitter(augment, rng)
    out = apply_geometric(sample, geo)
    # one numpy copy gathers the (possibly flipped, read-only) views, one torch copy transposes
    hwc = np.stack([out["frames"][fid] for fid in frames])  # (F,h,w,3) uint8
    stacked = torch.from_numpy(hwc).permute(0, 3, 1, 2).contiguous()
    aug = None
    if not jit.identity:
        aug = color_jitter(to_float(stacked), jit).mul_(255.0).round_().to(torch.uint8)
    label, depth, instance = out["label"], out["depth"], out["instance"]
    return {
        "key": out["key"],
        "images": dict(zip(frames, stacked.unbind(0))),
        "images_aug": None if aug is None else dict(zip(frames, aug.unbind(0))),
        "K": torch.from_numpy(out["K"]).float(),
        "label": None if label is None else torch.from_numpy(np.ascontiguousarray(label, dtype=np.int64)),
        "depth": None if depth is None else _tensor(depth).float().unsqueeze(0),
        "instance": None if instance is None else torch.from_numpy(np.ascontiguousarray(instance, dtype=np.int64)),
        "T": {fid: torch.from_numpy(t).float() for fid, t in out["T"].items() if fid in frames},
        "geometry": torch.tensor([geo.y0, geo.x0, geo.height, geo.width, int(geo.flip)], dtype=torch.int64),
    }


def apply_geometry(maps: torch.Tensor, geometry: torch.Tensor) -> torch.Tensor:
    """Crop and flip per-sample maps of the full images as a batch's samples were.

    ``maps`` (B,...,H,W) at the source images' size (e.g. a derived dataset's pseudo-labels
    joined by ``batch.keys``); ``geometry`` (B,5) int64 rows ``(y0, x0, h, w, flip)``
    (``Batch.geometry``). Returns (B,...,h,w), aligned pixel for pixel with the batch's images.
    """
    out = []
    for m, (y0, x0, h, w, flip) in zip(maps, geometry.tolist()):
        m = m[..., y0:y0 + h, x0:x0 + w]
        out.append(m.flip(-1) if flip else m)
    return torch.stack(out)
