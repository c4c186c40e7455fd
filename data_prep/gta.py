"""``sdeseg prep gta``: GTA5 (Richter et al. 2016) -> single-frame labeled shards.

Layout under ``--root``::

    images/NNNNN.png    RGB frames (1914x1052 in the released dataset)
    labels/NNNNN.png    label ids of the Cityscapes tables (palette PNG)

Every pair becomes one sample ``gta/<split>/NNNNN`` (no neighbours: GTA5 is not a
video), labels mapped to the 19 train ids. A few released labels differ in size from
their image; they are resized to the image size (nearest) and listed as warnings in
the report rather than dropped.

GTA5 ships no camera parameters. K is built from an assumed vertical field of view
(default 50 degrees, the game's default gameplay camera), square pixels and the
principal point at the image centre; ``--intrinsics fx,fy,cx,cy`` (pixels of the
original images) replaces it when the real camera is known. GTA K only matters for
geometry-aware steps on GTA samples; the depth network itself learns on Cityscapes.
"""

from __future__ import annotations

import argparse
import math
import re
from dataclasses import dataclass

import fsspec
import numpy as np

from data_prep.shards import (
    NOTES_KEY,
    Job,
    PrepError,
    add_common_arguments,
    check_root,
    intrinsics_matrix,
    label_ids_of,
    parse_splits,
    read_image,
    resize_label,
    resize_rgb,
    run_conversion,
    size_arg,
)
from sdeseg.camera import scale_intrinsics
from sdeseg.data.classes import label_ids_to_train_ids
from sdeseg.data.codec import encode_sample, make_key
from sdeseg.data.manifest import join

DOMAIN = "gta"
IMAGE_DIR = "images"
LABEL_DIR = "labels"
DEFAULT_VFOV_DEG = 50.0
# Same stored size as Cityscapes: cross-domain DepthMix mixes a GTA and a Cityscapes image
# pixel by pixel, so both must share a shape. 1914x1052 -> 1024x512 stretches the width
# by ~9%; K is scaled per axis, so the geometry stays consistent.
DEFAULT_SIZE = (512, 1024)
LAYOUT = f"{IMAGE_DIR}/NNNNN.png, {LABEL_DIR}/NNNNN.png"
ID_RE = re.compile(r"^[A-Za-z0-9_\-]+$")


@dataclass(frozen=True)
class GtaFrame:
    """Payload of one job: paths relative to ``root`` (an absolute fsspec URL)."""

    root: str
    image: str
    label: str
    size: tuple[int, int]
    image_format: str
    intrinsics: tuple[float, float, float, float] | None  # fx, fy, cx, cy in original pixels
    vfov_deg: float


def default_intrinsics(height: int, width: int, vfov_deg: float = DEFAULT_VFOV_DEG) -> np.ndarray:
    """K of a pinhole camera with vertical field of view ``vfov_deg``, square pixels, centred.

    ``fy = (H / 2) / tan(vfov / 2)``; the principal point is the image centre in the
    pixel-centre convention, ((W - 1) / 2, (H - 1) / 2).
    """
    f = (height / 2) / math.tan(math.radians(vfov_deg) / 2)
    return intrinsics_matrix(f, f, (width - 1) / 2, (height - 1) / 2)


def _stems(fs, root: str, top: str) -> tuple[dict[str, str], list[str]]:
    """{id: relative path} of ``top/*.png`` and the names that cannot be sample ids."""
    found, ignored = {}, []
    for path in fs.glob(join(root, f"{top}/*.png")):
        name = path.rsplit("/", 1)[-1]
        stem = name[: -len(".png")]
        if ID_RE.match(stem):
            found[stem] = f"{top}/{name}"
        else:  # e.g. a dot in the name: WebDataset would split the key there
            ignored.append(f"{top}/{name}")
    return found, ignored


def list_jobs(
    root_url: str,
    split: str = "train",
    size: tuple[int, int] = DEFAULT_SIZE,
    image_format: str = "png",
    intrinsics: tuple[float, float, float, float] | None = None,
    vfov_deg: float = DEFAULT_VFOV_DEG,
) -> tuple[list[Job], dict]:
    """Jobs for ``write_shards`` (one per id found in images/ or labels/) and report fields."""
    fs, root = fsspec.core.url_to_fs(root_url)
    check_root(fs, root, root_url, "GTA5", (IMAGE_DIR,), LAYOUT)
    if not fs.isdir(join(root, LABEL_DIR)):
        raise PrepError(f"no {LABEL_DIR}/ under {root_url}: GTA5 needs its labels ({LAYOUT})")
    images, ignored_img = _stems(fs, root, IMAGE_DIR)
    labels, ignored_lab = _stems(fs, root, LABEL_DIR)
    ids = sorted(set(images) | set(labels))
    if not ids:
        raise PrepError(f"no {IMAGE_DIR}/*.png or {LABEL_DIR}/*.png under {root_url} ({LAYOUT})")
    abs_root = fs.unstrip_protocol(root)
    jobs = []
    for sid in ids:
        payload = GtaFrame(
            root=abs_root,
            # a missing partner keeps its expected path, so the skip reason names it
            image=images.get(sid, f"{IMAGE_DIR}/{sid}.png"),
            label=labels.get(sid, f"{LABEL_DIR}/{sid}.png"),
            size=tuple(size),
            image_format=image_format,
            intrinsics=tuple(intrinsics) if intrinsics else None,
            vfov_deg=vfov_deg,
        )
        jobs.append(Job(make_key(DOMAIN, split, sid), DOMAIN, split, payload, {"id": sid}))
    extra = {
        "root": root_url,
        "intrinsics": list(intrinsics) if intrinsics else f"assumed vertical field of view {vfov_deg} deg",
        "ignored_files": ignored_img + ignored_lab,
    }
    return jobs, extra


def convert(job: Job) -> dict:
    """One image/label pair -> encoded sample members; SkipSample for bad inputs."""
    p: GtaFrame = job.payload
    fs, root = fsspec.core.url_to_fs(p.root)
    img = read_image(fs, root, p.image, "image")
    ids = label_ids_of(read_image(fs, root, p.label, "label"), p.label)
    src_hw = (img.height, img.width)
    notes = []
    if ids.shape != src_hw:
        # occurs in the released dataset; the pair is still usable once aligned
        notes.append(f"label {p.label} is {ids.shape[1]}x{ids.shape[0]}, image is {src_hw[1]}x{src_hw[0]}: "
                     "label resized to the image size (nearest)")
        ids = resize_label(ids, src_hw)
    label = resize_label(label_ids_to_train_ids(ids), p.size)
    K_src = intrinsics_matrix(*p.intrinsics) if p.intrinsics else default_intrinsics(*src_hw, p.vfov_deg)
    meta = {
        "K": scale_intrinsics(K_src, src_hw, p.size),
        "domain": DOMAIN,
        "split": job.split,
        **job.source,
        "source_size": list(src_hw),
        "intrinsics": "given" if p.intrinsics else f"assumed vfov {p.vfov_deg} deg",
    }
    frames = {0: resize_rgb(img, p.size)}
    members = encode_sample(job.key, frames, meta, label=label, image_format=p.image_format)
    members[NOTES_KEY] = notes
    return members


def _parse_intrinsics(text: str) -> tuple[float, float, float, float]:
    try:
        vals = tuple(float(v) for v in text.split(","))
        if len(vals) != 4:
            raise ValueError("need 4 numbers")
        intrinsics_matrix(*vals)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"--intrinsics must be fx,fy,cx,cy with fx, fy > 0 ({e})") from e
    return vals


def _parse_split(text: str) -> str:
    splits = parse_splits(text)
    if len(splits) != 1:
        raise argparse.ArgumentTypeError(f"--split takes one name, got {text!r}")
    return splits[0]


def _parse_fov(text: str) -> float:
    v = float(text)
    if not 1.0 <= v <= 179.0:
        raise argparse.ArgumentTypeError(f"--vfov must be in [1, 179] degrees, got {v}")
    return v


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--root", required=True, help=f"the GTA5 folder ({LAYOUT}): path or fsspec URL")
    parser.add_argument("--size", type=size_arg, default=DEFAULT_SIZE,
                        help="stored HxW (default 512x1024, the Cityscapes size; area/nearest resize)")
    parser.add_argument("--split", type=_parse_split, default="train",
                        help="split of the samples (default train)")
    cam = parser.add_mutually_exclusive_group()
    cam.add_argument("--vfov", type=_parse_fov, default=DEFAULT_VFOV_DEG,
                     help="assumed vertical field of view in degrees (default %(default)s: GTA V's gameplay "
                          "camera); K = square pixels, centred principal point")
    cam.add_argument("--intrinsics", type=_parse_intrinsics, default=None,
                     help="fx,fy,cx,cy in pixels of the original images, instead of --vfov")
    add_common_arguments(parser)


def run(args: argparse.Namespace) -> int:
    settings = {
        "converter": DOMAIN,
        "size": list(args.size),
        "intrinsics": list(args.intrinsics) if args.intrinsics else None,
        "vfov": None if args.intrinsics else args.vfov,
    }
    return run_conversion(
        args,
        lambda: list_jobs(args.root, args.split, args.size, args.image_format, args.intrinsics, args.vfov),
        convert,
        desc=DOMAIN,
        settings=settings,
    )
