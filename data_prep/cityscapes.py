"""``sdeseg prep cityscapes``: the official Cityscapes layout -> WebDataset shards.

Layout under ``--root`` (the folders of the official zip files)::

    leftImg8bit_sequence/{split}/{city}/{city}_{seq:06d}_{frame:06d}_leftImg8bit.png
        30-frame snippets; the annotated frame is the 20th (index 19)
    leftImg8bit/{split}/{city}/{city}_{seq}_{frame}_leftImg8bit.png      the annotated frames
    gtFine/{split}/{city}/{city}_{seq}_{frame}_gtFine_labelIds.png       official label ids
    gtFine/{split}/{city}/{city}_{seq}_{frame}_gtFine_instanceIds.png    instances (optional)
    camera/{split}/{city}/{city}_{seq}_{frame}_camera.json              {"intrinsic": {fx, fy, u0, v0}}

``--frames labeled`` writes one sample per annotated frame: the frame, its neighbours
t-1 and t+1 from the sequences (none when ``leftImg8bit_sequence/{split}`` is absent),
the label mapped to the 19 train ids with the official tables (255 = ignore) and K;
where ``gtFine_instanceIds`` exists, also ``instance.png``: those ids as they are (label id
x 1000 + index on thing instances, the label id elsewhere), resized like the label.
``--frames all`` writes every sequence frame that has both neighbours, unlabeled, for
depth pretraining; its K comes from the camera file of the snippet's annotated frame.
Frames are resized once here (area for images, nearest for labels) and K is scaled to
the stored size. Bad files are skipped with a reason in the report (see data_prep.shards).
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass
from functools import lru_cache

import fsspec
import numpy as np
from PIL import Image

from data_prep.shards import (
    Job,
    PrepError,
    SkipSample,
    add_common_arguments,
    check_root,
    intrinsics_matrix,
    label_ids_of,
    parse_splits,
    read_bytes,
    read_image,
    resize_label,
    resize_rgb,
    run_conversion,
    size_arg,
)
from sdeseg.camera import scale_intrinsics
from sdeseg.data.classes import (
    INSTANCE_DIVISOR,
    instance_label_ids,
    known_label_ids,
    label_ids_to_train_ids,
)
from sdeseg.data.codec import encode_sample, make_key
from sdeseg.data.manifest import join

DOMAIN = "cityscapes"
SEQUENCE_DIR = "leftImg8bit_sequence"
IMAGE_DIR = "leftImg8bit"
LABEL_DIR = "gtFine"
CAMERA_DIR = "camera"
IMAGE_SUFFIX = "leftImg8bit.png"
LABEL_SUFFIX = "gtFine_labelIds.png"
INSTANCE_SUFFIX = "gtFine_instanceIds.png"
CAMERA_SUFFIX = "camera.json"
SNIPPET_LENGTH = 30
ANNOTATED_INDEX = 19  # the annotated frame is the 20th of its 30-frame snippet
DEFAULT_SIZE = (512, 1024)
LAYOUT = f"{SEQUENCE_DIR}/, {IMAGE_DIR}/, {LABEL_DIR}/, {CAMERA_DIR}/"

NAME_RE = re.compile(r"^(?P<city>.+?)_(?P<seq>\d{6})_(?P<frame>\d{6})_(?P<suffix>.+)$")

FrameId = tuple[str, int, int]  # (city, sequence, frame)


@dataclass(frozen=True)
class CityscapesFrame:
    """Payload of one job: paths relative to ``root`` (an absolute fsspec URL)."""

    root: str
    cur: str
    prev: str | None  # None: single-frame sample (no sequences for this split)
    next: str | None
    label: str | None  # None: unlabeled sample (--frames all)
    camera: str | None  # None: no camera file found for this sequence
    size: tuple[int, int]
    image_format: str
    instance: str | None = None  # None: no gtFine_instanceIds for this frame


def frame_name(fid: FrameId) -> str:
    city, seq, frame = fid
    return f"{city}_{seq:06d}_{frame:06d}"


def rel_path(top: str, split: str, fid: FrameId, suffix: str) -> str:
    return f"{top}/{split}/{fid[0]}/{frame_name(fid)}_{suffix}"


def _list(fs, root: str, top: str, split: str, suffix: str) -> dict[FrameId, str]:
    """{frame id: path relative to root} of ``top/split/*/*_suffix``."""
    base = root.rstrip("/") + "/"
    found = {}
    for path in fs.glob(join(root, f"{top}/{split}/*/*_{suffix}")):
        m = NAME_RE.match(path.rsplit("/", 1)[-1])
        if m and m["suffix"] == suffix and path.startswith(base):
            found[(m["city"], int(m["seq"]), int(m["frame"]))] = path[len(base):]
    return found


def _require(fs, root: str, root_url: str, top: str, why: str) -> None:
    if not fs.isdir(join(root, top)):
        raise PrepError(f"no {top}/ under {root_url}: {why}")


def _camera_for(fid: FrameId, cameras: dict[FrameId, str]) -> str | None:
    """Camera file of the snippet holding ``fid``: its annotated frame, else the nearest one.

    Camera files exist only for annotated frames; a sequence frame uses the one of its
    own recording (same city and sequence number), else any of the same city (the
    intrinsics are per car, and each city was recorded with one car).
    """
    city, seq, frame = fid
    same_seq = [c for c in cameras if c[0] == city and c[1] == seq]
    if same_seq:
        def rank(c: FrameId) -> tuple:
            first = c[2] - ANNOTATED_INDEX  # first frame of the snippet annotated at c
            return (not first <= frame < first + SNIPPET_LENGTH, abs(c[2] - frame), c)

        return cameras[min(same_seq, key=rank)]
    same_city = sorted(c for c in cameras if c[0] == city)
    return cameras[same_city[0]] if same_city else None


def list_jobs(
    root_url: str,
    splits: tuple[str, ...] = ("train", "val"),
    frames: str = "labeled",
    size: tuple[int, int] = DEFAULT_SIZE,
    image_format: str = "png",
) -> tuple[list[Job], dict]:
    """Jobs for ``write_shards`` and extra report fields; PrepError for a wrong root."""
    if frames not in ("labeled", "all"):
        raise ValueError(f"frames must be 'labeled' or 'all', got {frames!r}")
    fs, root = fsspec.core.url_to_fs(root_url)
    check_root(fs, root, root_url, "Cityscapes", (SEQUENCE_DIR, IMAGE_DIR), LAYOUT)
    _require(fs, root, root_url, CAMERA_DIR, "the intrinsics come from camera_trainvaltest")
    if frames == "labeled":
        _require(fs, root, root_url, LABEL_DIR, "--frames labeled needs gtFine_trainvaltest")
    else:
        _require(fs, root, root_url, SEQUENCE_DIR, "--frames all needs leftImg8bit_sequence_trainvaltest")
    abs_root = fs.unstrip_protocol(root)  # workers may run with another cwd, or on other nodes
    jobs: list[Job] = []
    extra: dict = {"root": root_url, "frames": frames, "splits": list(splits), "neighbours": {}}
    without_neighbours = 0
    for split in splits:
        has_seq = fs.isdir(join(root, f"{SEQUENCE_DIR}/{split}"))
        extra["neighbours"][split] = has_seq
        seqs = _list(fs, root, SEQUENCE_DIR, split, IMAGE_SUFFIX) if has_seq else {}
        cameras = _list(fs, root, CAMERA_DIR, split, CAMERA_SUFFIX)
        if frames == "labeled":
            images = _list(fs, root, IMAGE_DIR, split, IMAGE_SUFFIX)
            labels = _list(fs, root, LABEL_DIR, split, LABEL_SUFFIX)
            instances = _list(fs, root, LABEL_DIR, split, INSTANCE_SUFFIX)
            ids = sorted(set(images) | set(labels))
            if not ids:
                raise PrepError(
                    f"no annotated frames for split {split!r}: "
                    f"{root_url}/{IMAGE_DIR}/{split}/*/*_{IMAGE_SUFFIX} and "
                    f"{LABEL_DIR}/{split}/*/*_{LABEL_SUFFIX} match nothing (check --splits)"
                )
        else:
            ids = sorted(f for f in seqs if (f[0], f[1], f[2] - 1) in seqs and (f[0], f[1], f[2] + 1) in seqs)
            without_neighbours += len(seqs) - len(ids)
            if not ids:
                raise PrepError(
                    f"no sequence frames with both neighbours for split {split!r} under "
                    f"{root_url}/{SEQUENCE_DIR}/{split}/ (check --splits)"
                )
        for fid in ids:
            city, seq, frame = fid
            prev_id, next_id = (city, seq, frame - 1), (city, seq, frame + 1)
            if frames == "labeled":
                # the annotated image itself; the sequence copy of it when leftImg8bit is absent
                cur = images.get(fid) or seqs.get(fid) or rel_path(IMAGE_DIR, split, fid, IMAGE_SUFFIX)
                label = labels.get(fid) or rel_path(LABEL_DIR, split, fid, LABEL_SUFFIX)
                camera = cameras.get(fid) or rel_path(CAMERA_DIR, split, fid, CAMERA_SUFFIX)
                instance = instances.get(fid)  # optional: absent files are not an error
            else:
                cur, label, camera, instance = seqs[fid], None, _camera_for(fid, cameras), None
            payload = CityscapesFrame(
                root=abs_root,
                cur=cur,
                prev=rel_path(SEQUENCE_DIR, split, prev_id, IMAGE_SUFFIX) if has_seq else None,
                next=rel_path(SEQUENCE_DIR, split, next_id, IMAGE_SUFFIX) if has_seq else None,
                label=label,
                camera=camera,
                size=tuple(size),
                image_format=image_format,
                instance=instance,
            )
            name = frame_name(fid)
            source = {"id": name, "city": city, "sequence": seq, "frame": frame}
            jobs.append(Job(make_key(DOMAIN, split, name), DOMAIN, split, payload, source))
    if frames == "all":
        extra["frames_without_both_neighbours"] = without_neighbours
    return jobs, extra


def read_camera(fs, root: str, rel: str | None) -> np.ndarray:
    """3x3 K in pixels of the original images from a Cityscapes camera JSON."""
    if rel is None:
        raise SkipSample(f"no {CAMERA_DIR}/ file for this sequence (needed for the intrinsics)")
    data = read_bytes(fs, root, rel, "camera json")
    try:
        intr = json.loads(data)["intrinsic"]
        return intrinsics_matrix(float(intr["fx"]), float(intr["fy"]), float(intr["u0"]), float(intr["v0"]))
    except (ValueError, KeyError, TypeError) as e:  # UnicodeDecodeError is a ValueError
        raise SkipSample(f"unreadable camera json {rel} ({type(e).__name__}: {e})") from e


@lru_cache(maxsize=4)
def _frame(root_url: str, rel: str, size: tuple[int, int]) -> tuple[np.ndarray, tuple[int, int]]:
    """Decoded, resized frame and its original (H, W).

    Cached per worker process: with --frames all, consecutive jobs of a shard share two
    of their three frames, so each frame is decoded once instead of three times. (lru_cache
    does not cache exceptions, so a bad file is reported by every sample that needs it.)
    """
    fs, root = fsspec.core.url_to_fs(root_url)
    img = read_image(fs, root, rel, "image")
    return resize_rgb(img, size), (img.height, img.width)


def instance_ids_of(img: Image.Image, rel: str) -> np.ndarray:
    """Cityscapes instanceIds of a 16-bit (or 8-bit) grayscale PNG as (H,W) uint16.

    Raises SkipSample for colour images and for ids that are neither a Cityscapes label id
    nor ``label id * 1000 + index`` of a class with instances.
    """
    if img.mode not in ("I;16", "I", "L"):
        raise SkipSample(f"instance map {rel} has mode {img.mode}, expected a one-channel image of instance ids")
    ids = np.asarray(img).astype(np.int64)
    values = np.unique(ids)
    plain, inst = values[values < INSTANCE_DIVISOR], values[values >= INSTANCE_DIVISOR]
    bad = np.concatenate([
        np.setdiff1d(plain, known_label_ids()),
        inst[~np.isin(inst // INSTANCE_DIVISOR, instance_label_ids())],
    ])
    if bad.size:
        shown = ", ".join(str(int(v)) for v in bad[:8]) + (" ..." if bad.size > 8 else "")
        raise SkipSample(f"instance map {rel} has ids {shown} that are not Cityscapes instanceIds")
    return ids.astype(np.uint16)


def convert(job: Job) -> dict:
    """One job -> encoded sample members; SkipSample (with the file and reason) for bad inputs."""
    p: CityscapesFrame = job.payload
    fs, root = fsspec.core.url_to_fs(p.root)
    K_src = read_camera(fs, root, p.camera)
    frames, src_hw = {}, None
    # prev, cur, next in that order: it keeps the cache hits of --frames all at 2 of 3
    for fid, rel in ((-1, p.prev), (0, p.cur), (1, p.next)):
        if rel is None:
            continue
        try:
            frames[fid], hw = _frame(p.root, rel, p.size)
        except SkipSample as e:
            if fid == 0:
                raise
            raise SkipSample(f"{e} (neighbour frame t{fid:+d})") from None
        if src_hw is None:
            src_hw = hw
        elif hw != src_hw:
            raise SkipSample(f"{rel} is {hw[1]}x{hw[0]}, its neighbours are {src_hw[1]}x{src_hw[0]}")
    label = None
    if p.label is not None:
        ids = label_ids_of(read_image(fs, root, p.label, "label"), p.label)
        if ids.shape != src_hw:
            raise SkipSample(
                f"label {p.label} is {ids.shape[1]}x{ids.shape[0]}, image {p.cur} is {src_hw[1]}x{src_hw[0]}"
            )
        label = resize_label(label_ids_to_train_ids(ids), p.size)
    instance = None
    if p.instance is not None:
        inst = instance_ids_of(read_image(fs, root, p.instance, "instance map"), p.instance)
        if inst.shape != src_hw:
            raise SkipSample(
                f"instance map {p.instance} is {inst.shape[1]}x{inst.shape[0]}, image {p.cur} is "
                f"{src_hw[1]}x{src_hw[0]}"
            )
        instance = resize_label(inst, p.size)  # the same nearest-neighbour grid as the label
    meta = {
        "K": scale_intrinsics(K_src, src_hw, p.size),
        "domain": DOMAIN,
        "split": job.split,
        **job.source,
        "source_size": list(src_hw),
        "camera": p.camera,
    }
    return encode_sample(job.key, frames, meta, label=label, image_format=p.image_format, instance=instance)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--root", required=True,
                        help=f"the Cityscapes folder holding {LAYOUT} (path or fsspec URL)")
    parser.add_argument("--size", type=size_arg, default=DEFAULT_SIZE,
                        help="stored HxW (default 512x1024; area resize for images, nearest for labels)")
    parser.add_argument("--frames", choices=("labeled", "all"), default="labeled",
                        help="labeled: annotated frames with neighbours and labels; "
                             "all: every sequence frame with both neighbours, unlabeled (depth pretraining)")
    parser.add_argument("--splits", type=parse_splits, default=("train", "val"),
                        help="comma-separated splits (default train,val)")
    add_common_arguments(parser)


def run(args: argparse.Namespace) -> int:
    settings = {"converter": DOMAIN, "frames": args.frames, "size": list(args.size)}
    if args.frames == "labeled":  # shards converted before instance maps were read lack them
        settings["members"] = ["instance.png"]
    return run_conversion(
        args,
        lambda: list_jobs(args.root, args.splits, args.frames, args.size, args.image_format),
        convert,
        desc=DOMAIN,
        settings=settings,
    )
