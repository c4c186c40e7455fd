"""Encoding and decoding of one sample of the data contract (docs/architecture.md).

A sample is a centre frame with its neighbours; members of the tar are
``prev.<ext>``, ``cur.<ext>``, ``next.<ext>`` (uint8 RGB, ext png or jpg),
``label.png`` (train ids, 255 = ignore), ``depth.npy`` (float32 metres, 0 = invalid)
and ``json`` (intrinsics K in pixels of the stored size, height, width, domain,
split, has_label, source ids; synthetic data also T_prev / T_next). Optional:
``instance.png``, a 16-bit grayscale PNG of Cityscapes instanceIds (label id * 1000 + index
on thing instances, the label id elsewhere; see ``sdeseg.data.classes``), read with
:func:`decode_instance`; its json records ``has_instance``.
"""

from __future__ import annotations

import io
import json
import re
from typing import Any

import numpy as np
from PIL import Image

FRAME_NAMES = {-1: "prev", 0: "cur", 1: "next"}
IMAGE_EXTS = ("png", "jpg")
KEY_RE = re.compile(r"[A-Za-z0-9_\-]+/[A-Za-z0-9_\-]+/[A-Za-z0-9_\-/]+")


class SampleError(ValueError):
    """A sample is malformed; the message names the key and member."""


def make_key(domain: str, split: str, sample_id: str) -> str:
    key = f"{domain}/{split}/{sample_id}"
    if not KEY_RE.fullmatch(key):
        raise SampleError(f"bad sample key {key!r}: use letters, digits, '_', '-' (no dots: WebDataset splits on them)")
    return key


def encode_image(img: np.ndarray, fmt: str = "png", quality: int = 95) -> bytes:
    if img.dtype != np.uint8 or img.ndim not in (2, 3):
        raise SampleError(f"image must be uint8 HxW or HxWx3, got {img.dtype} {img.shape}")
    buf = io.BytesIO()
    pil = Image.fromarray(img)
    if fmt == "png":
        pil.save(buf, format="PNG", compress_level=1)
    elif fmt == "jpg":
        pil.save(buf, format="JPEG", quality=quality)
    else:
        raise SampleError(f"image format must be one of {IMAGE_EXTS}, got {fmt!r}")
    return buf.getvalue()


def encode_npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


INSTANCE_MEMBER = "instance.png"
INSTANCE_MAX = np.iinfo(np.uint16).max  # 16-bit PNG; Cityscapes instance ids stay below 34000


def encode_instance(ids: np.ndarray) -> bytes:
    """(H,W) Cityscapes instanceIds (any integer dtype, 0..65535) -> 16-bit grayscale PNG bytes."""
    ids = np.asarray(ids)
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
        raise SampleError(f"instance map must be an integer HxW array, got {ids.dtype} {ids.shape}")
    if ids.size and (ids.min() < 0 or ids.max() > INSTANCE_MAX):
        raise SampleError(f"instance ids must lie in [0, {INSTANCE_MAX}], got [{ids.min()}, {ids.max()}]")
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(ids, dtype=np.uint16)).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def decode_instance(data: bytes) -> np.ndarray:
    """``instance.png`` bytes -> (H,W) int32 Cityscapes instanceIds.

    Pillow opens 16-bit PNGs as mode ``I;16`` (uint16) or, in older versions, ``I`` (int32);
    both come back as int32 (torch's integer ops lack uint16). Raises SampleError for
    another kind of image.
    """
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            if img.mode not in ("I;16", "I", "L"):
                raise SampleError(f"instance map has mode {img.mode}, expected a 16-bit grayscale PNG")
            return np.asarray(img).astype(np.int32)
    except SampleError:
        raise
    except Exception as e:  # PIL raises many types on corrupt data
        raise SampleError(f"cannot decode {INSTANCE_MEMBER} ({type(e).__name__}: {e})") from e


def encode_sample(
    key: str,
    frames: dict[int, np.ndarray],
    meta: dict[str, Any],
    label: np.ndarray | None = None,
    depth: np.ndarray | None = None,
    image_format: str = "png",
    instance: np.ndarray | None = None,
) -> dict[str, Any]:
    """Build the member dict of one sample (bytes per member, plus ``__key__``).

    Args:
        frames: {-1: prev, 0: cur, 1: next} uint8 (H,W,3); only 0 is required.
        meta: json fields; must hold K (3x3), domain, split. height/width/has_label are filled in,
            and has_instance when an instance map is given.
        label: (H,W) uint8 train ids or None. depth: (H,W) float32 metres or None.
        instance: (H,W) integer Cityscapes instanceIds or None -> ``instance.png`` (16-bit).
    """
    if 0 not in frames:
        raise SampleError(f"{key}: the centre frame (0) is required")
    h, w = frames[0].shape[:2]
    for fid, img in frames.items():
        if img.shape != (h, w, 3):
            raise SampleError(f"{key}: frame {fid} has shape {img.shape}, expected {(h, w, 3)}")
    K = np.asarray(meta["K"], dtype=np.float64)
    if K.shape != (3, 3):
        raise SampleError(f"{key}: K must be 3x3, got {K.shape}")
    out: dict[str, Any] = {"__key__": key}
    for fid, img in sorted(frames.items()):
        out[f"{FRAME_NAMES[fid]}.{image_format}"] = encode_image(img, image_format)
    if label is not None:
        if label.shape != (h, w) or label.dtype != np.uint8:
            raise SampleError(f"{key}: label must be uint8 {(h, w)}, got {label.dtype} {label.shape}")
        out["label.png"] = encode_image(label, "png")
    if depth is not None:
        if depth.shape != (h, w):
            raise SampleError(f"{key}: depth must be {(h, w)}, got {depth.shape}")
        out["depth.npy"] = encode_npy(depth.astype(np.float32))
    full = dict(meta)
    full.update(K=K.tolist(), height=h, width=w, has_label=label is not None)
    if instance is not None:
        if instance.shape != (h, w):
            raise SampleError(f"{key}: instance map must be {(h, w)}, got {instance.shape}")
        try:
            out[INSTANCE_MEMBER] = encode_instance(instance)
        except SampleError as e:
            raise SampleError(f"{key}: {e}") from None
        # only samples with the member say so: the json of every other sample keeps its bytes
        full["has_instance"] = True
    for name in ("T_prev", "T_next"):
        if name in full:
            full[name] = np.asarray(full[name], dtype=np.float64).tolist()
    out["json"] = json.dumps(full).encode()
    return out


def decode_image(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        if img.mode not in ("RGB", "L", "P"):
            img = img.convert("RGB")
        return np.asarray(img)


def decode_sample(members: dict[str, Any], frames: tuple[int, ...] = (-1, 0, 1)) -> dict[str, Any]:
    """Raw tar members -> numpy sample.

    Returns ``{"key", "meta", "frames": {fid: (H,W,3) uint8}, "label": (H,W) uint8 | None,
    "depth": (H,W) float32 | None, "instance": (H,W) int32 Cityscapes instanceIds | None}``.
    Raises SampleError naming the key and member when a member is missing or undecodable, or
    disagrees with the contract: json without a finite 3x3 ``K``, ``T_prev``/``T_next`` present
    but not finite 4x4, a neighbour frame, label, depth or instance map of another size than
    the cur frame.
    """
    key = members.get("__key__", "?")
    if "json" not in members:
        raise SampleError(f"{key}: missing json member")
    try:
        meta = json.loads(members["json"])
    except (ValueError, UnicodeDecodeError) as e:
        raise SampleError(f"{key}: json member is not valid JSON ({e})") from e
    if not isinstance(meta, dict):
        raise SampleError(f"{key}: json member is a {type(meta).__name__}, expected an object")
    # checked here, not where they are used: a malformed sample must be skipped and counted
    # like an undecodable one, not crash a reader worker later (augment reads K and T)
    _check_matrix(meta, "K", 3, key, required=True)
    _check_matrix(meta, "T_prev", 4, key)
    _check_matrix(meta, "T_next", 4, key)
    out: dict[str, Any] = {"key": key, "meta": meta, "frames": {}, "label": None, "depth": None, "instance": None}
    decoded_from: dict[int, str] = {}  # frame id -> member name, for messages
    for fid in frames:
        name = FRAME_NAMES[fid]
        member = next((f"{name}.{ext}" for ext in IMAGE_EXTS if f"{name}.{ext}" in members), None)
        if member is None:
            if fid == 0:
                raise SampleError(f"{key}: missing centre frame cur.png/cur.jpg")
            continue
        try:
            img = decode_image(members[member])
        except Exception as e:  # PIL raises many types on corrupt data
            raise SampleError(f"{key}: cannot decode {member} ({type(e).__name__}: {e})") from e
        if img.ndim != 3 or img.shape[2] != 3:
            raise SampleError(f"{key}: {member} is not an RGB image (shape {img.shape})")
        out["frames"][fid] = img
        decoded_from[fid] = member
    h, w = out["frames"][0].shape[:2]
    if (meta.get("height"), meta.get("width")) != (h, w):
        raise SampleError(f"{key}: json says {meta.get('height')}x{meta.get('width')}, cur frame is {h}x{w}")
    for fid, img in out["frames"].items():
        if img.shape[:2] != (h, w):
            raise SampleError(f"{key}: {decoded_from[fid]} is {img.shape[:2]}, the cur frame is {(h, w)}")
    if "label.png" in members:
        try:
            out["label"] = decode_image(members["label.png"])
        except Exception as e:
            raise SampleError(f"{key}: cannot decode label.png ({type(e).__name__}: {e})") from e
        if out["label"].shape != (h, w):
            raise SampleError(f"{key}: label.png is {out['label'].shape}, frame is {(h, w)}")
    if "depth.npy" in members:
        try:
            out["depth"] = np.load(io.BytesIO(members["depth.npy"]), allow_pickle=False).astype(np.float32, copy=False)
        except Exception as e:
            raise SampleError(f"{key}: cannot decode depth.npy ({type(e).__name__}: {e})") from e
        if out["depth"].shape != (h, w):
            raise SampleError(f"{key}: depth.npy is {out['depth'].shape}, frame is {(h, w)}")
    if INSTANCE_MEMBER in members:
        try:
            out["instance"] = decode_instance(members[INSTANCE_MEMBER])
        except SampleError as e:
            raise SampleError(f"{key}: {e}") from None
        if out["instance"].shape != (h, w):
            raise SampleError(f"{key}: {INSTANCE_MEMBER} is {out['instance'].shape}, frame is {(h, w)}")
    return out


def _check_matrix(meta: dict[str, Any], name: str, n: int, key: str, required: bool = False) -> None:
    """SampleError unless ``meta[name]`` is an n x n matrix of finite numbers (absent: only if required)."""
    if name not in meta:
        if required:
            raise SampleError(f"{key}: json member has no {name}")
        return
    try:
        m = np.asarray(meta[name], dtype=np.float64)
    except (TypeError, ValueError):  # strings, None, ragged lists
        raise SampleError(f"{key}: json member's {name} is not a numeric matrix: {meta[name]!r:.80}") from None
    if m.shape != (n, n) or not np.isfinite(m).all():
        raise SampleError(f"{key}: json member's {name} must be {n}x{n} finite numbers, got {meta[name]!r:.80}")
