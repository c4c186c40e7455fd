"""Conversion throughput of ``sdeseg prep cityscapes`` on a fake full-resolution tree.

    python -m data_prep.bench_prep [--frames 24] [--procs 1,2] [--formats png,jpg]

Writes a fake Cityscapes tree in the official layout (1024x2048 frames, labeled
triplets: each annotated frame with its t-1/t+1 sequence frames, gtFine labelIds,
camera JSON), converts it to 512x1024 shards with every (processes, format)
combination and prints a Markdown table of samples/s (docs/bench/prep.md).

``make_fake_cityscapes`` is also the fixture of the tests (tiny frames there): it
writes exactly the official folder and file names.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

# ids of the official tables used by the fake labels
SKY, BUILDING, ROAD, CAR, UNLABELED = 23, 11, 7, 26, 0
# the intrinsics of a real Cityscapes camera file (aachen), for 1024x2048 frames
CITYSCAPES_CAMERA = {"fx": 2262.52, "fy": 2265.3017905988554, "u0": 1096.98, "v0": 513.137}
FULL_SIZE = (1024, 2048)


def frame_colour(city_index: int, seq: int, frame: int) -> tuple[int, int, int]:
    """The flat colour of a fake frame: tests recognise which frame a sample holds."""
    return ((40 * city_index + 7 * seq) % 256, frame % 256, (frame // 256 * 50 + 3) % 256)


def fake_label_ids(height: int, width: int) -> np.ndarray:
    """(H,W) official label ids: sky / building / road bands, a car, an unlabeled column."""
    ids = np.full((height, width), ROAD, np.uint8)
    ids[: height // 3] = SKY
    ids[height // 3 : 2 * height // 3] = BUILDING
    ids[3 * height // 4 :, width // 2 :] = CAR
    ids[:, 0] = UNLABELED
    return ids


def _fake_frame(colour, size, texture: bool, rng: np.random.Generator | None) -> np.ndarray:
    h, w = size
    img = np.empty((h, w, 3), np.uint8)
    img[:] = colour
    if texture:
        # smooth gradients, blocks and mild noise: PNGs compress about like street photos
        # (~1/3 of the raw size), so decoding costs what it costs on real data
        yy, xx = np.mgrid[0:h, 0:w]
        base = (xx * 97 // w + yy * 61 // h).astype(np.int16)
        for _ in range(12):
            y0, x0 = rng.integers(0, h), rng.integers(0, w)
            base[y0 : y0 + h // 6, x0 : x0 + w // 8] += int(rng.integers(-60, 60))
        noise = rng.integers(-6, 7, size=(h, w, 3), dtype=np.int16)
        img = np.clip(img.astype(np.int16) + base[..., None] + noise, 0, 255).astype(np.uint8)
    return img


def _save(path: Path, img: np.ndarray, **kw) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path, **kw)


def make_fake_cityscapes(
    root: str | Path,
    layout: dict[str, dict[str, list[tuple[int, int]]]] | None = None,
    size: tuple[int, int] = (32, 64),
    snippet: str = "full",
    texture: bool = False,
    leftimg8bit: bool = True,
    sequences: bool = True,
    seed: int = 0,
) -> dict:
    """Write a fake Cityscapes tree in the official layout; return what was written.

    Args:
        layout: {split: {city: [(sequence, annotated frame), ...]}}; default two train
            cities (aachen with two snippets, bochum) and one val city (frankfurt, whose
            annotated frame numbers are not 19, as in the real data).
        size: (H, W) of every frame and label.
        snippet: "full" writes the 30-frame snippet around each annotated frame (frames
            a-19 .. a+10); "neighbours" only a-1, a, a+1 (enough for labeled triplets).
        texture: textured frames (benchmarks) instead of flat colours (tests).
        leftimg8bit / sequences: write those folders.

    Returns ``{"annotated": {split: [frame id string, ...]}, "K": 3x3 list (of ``size``),
    "layout": layout}``. Frame colours follow ``frame_colour``; labels ``fake_label_ids``.
    """
    root = Path(root)
    layout = layout or {
        "train": {"aachen": [(0, 19), (1, 19)], "bochum": [(0, 19)]},
        "val": {"frankfurt": [(0, 294)]},
    }
    h, w = size
    s = w / FULL_SIZE[1]
    cam = {"fx": CITYSCAPES_CAMERA["fx"] * s, "fy": CITYSCAPES_CAMERA["fy"] * s,
           "u0": CITYSCAPES_CAMERA["u0"] * s, "v0": CITYSCAPES_CAMERA["v0"] * s}
    rng = np.random.default_rng(seed)
    label = fake_label_ids(h, w)
    annotated: dict[str, list[str]] = {}
    for split, cities in layout.items():
        for ci, (city, snippets) in enumerate(sorted(cities.items())):
            for seq, ann in snippets:
                name = f"{city}_{seq:06d}_{ann:06d}"
                annotated.setdefault(split, []).append(name)
                frames = range(ann - 19, ann + 11) if snippet == "full" else range(ann - 1, ann + 2)
                for f in frames:
                    img = _fake_frame(frame_colour(ci, seq, f), size, texture, rng)
                    fname = f"{city}_{seq:06d}_{f:06d}_leftImg8bit.png"
                    if sequences:
                        _save(root / "leftImg8bit_sequence" / split / city / fname, img)
                    if f == ann and leftimg8bit:
                        _save(root / "leftImg8bit" / split / city / fname, img)
                _save(root / "gtFine" / split / city / f"{name}_gtFine_labelIds.png", label)
                cam_path = root / "camera" / split / city / f"{name}_camera.json"
                cam_path.parent.mkdir(parents=True, exist_ok=True)
                extrinsic = {"baseline": 0.209313, "pitch": 0.038, "roll": 0.0, "x": 1.7, "y": 0.1,
                             "yaw": -0.0195, "z": 1.22}
                cam_path.write_text(json.dumps({"extrinsic": extrinsic, "intrinsic": cam}, indent=4))
    K = [[cam["fx"], 0.0, cam["u0"]], [0.0, cam["fy"], cam["v0"]], [0.0, 0.0, 1.0]]
    return {"annotated": annotated, "K": K, "layout": layout}


def bench_layout(frames: int) -> dict:
    """``frames`` annotated frames over two train cities, one snippet each."""
    half = frames // 2
    cities = {"aachen": range(half), "bochum": range(frames - half)}
    return {"train": {city: [(i, 19) for i in seqs] for city, seqs in cities.items()}}


def cpu_name() -> str:
    """The CPU model for benchmark headers (also used by bench_synthetic)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _convert(tree: Path, out: Path, mode: str, fmt: str, procs: int, shard_size: int) -> tuple:
    """One conversion; (samples, wall s, samples/s, CPU ms/sample, MiB/sample, load after)."""
    from data_prep import cityscapes
    from data_prep.shards import write_shards

    jobs, _ = cityscapes.list_jobs(str(tree), ("train",), mode, (512, 1024), fmt)
    start = time.perf_counter()
    report = write_shards(str(out), jobs, cityscapes.convert, shard_size=shard_size, procs=procs,
                          progress=False, desc="bench")
    secs = time.perf_counter() - start
    n = report["samples"]
    mb = sum(p.stat().st_size for p in out.glob("*.tar")) / 2**20
    # CPU time inside shard conversions: what one sample costs a core, whatever else runs on
    # the machine (the wall-clock rate depends on that load)
    cpu_s = sum(json.loads(p.read_text())["cpu_seconds"] for p in out.glob("*-?????.json"))
    shutil.rmtree(out)
    return n, secs, n / secs, 1000 * cpu_s / n, mb / n, os.getloadavg()[0]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, default=24, help="annotated frames (labeled triplets)")
    ap.add_argument("--procs", default="1,2", help="process counts to compare")
    ap.add_argument("--formats", default="png,jpg", help="stored image formats to compare")
    ap.add_argument("--shard-size", type=int, default=4, help="small, so 2 processes have shards to share")
    ap.add_argument("--all-snippets", type=int, default=0,
                    help="also time --frames all on this many full 30-frame snippets (1 process)")
    ap.add_argument("--workdir", default=None, help="folder for fake trees + shards (default: temp dir)")
    args = ap.parse_args(argv)

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_prep_"))
    try:
        tree = work / f"cityscapes_{args.frames}"
        if not tree.exists():  # a --workdir keeps the tree for the next run
            make_fake_cityscapes(tree, bench_layout(args.frames), size=FULL_SIZE, snippet="neighbours",
                                 texture=True)
        src_mb = sum(p.stat().st_size for p in tree.rglob("*.png")) / 2**20
        size = f"{FULL_SIZE[0]}x{FULL_SIZE[1]}"
        print(f"fake tree: {args.frames} labeled triplets at {size}, {src_mb:.0f} MiB of PNG")
        load = os.getloadavg()[0]
        print(f"machine: {os.cpu_count()} CPUs ({cpu_name()}), load average {load:.2f} at start")
        rows = []
        for fmt in args.formats.split(","):
            for procs in (int(p) for p in args.procs.split(",")):
                out = work / f"out_{fmt}_{procs}"
                result = _convert(tree, out, "labeled", fmt, procs, args.shard_size)
                rows.append(("labeled", procs, fmt, *result))
        if args.all_snippets:
            seq_tree = work / f"cityscapes_snippets_{args.all_snippets}"
            if not seq_tree.exists():
                layout = {"train": {"aachen": [(i, 19) for i in range(args.all_snippets)]}}
                make_fake_cityscapes(seq_tree, layout, size=FULL_SIZE, snippet="full", texture=True)
            for fmt in args.formats.split(","):
                out = work / f"out_all_{fmt}"
                rows.append(("all", 1, fmt, *_convert(seq_tree, out, "all", fmt, 1, 28)))
        print()
        print("| frames | processes | format | samples | wall s | samples/s | CPU ms/sample | MiB/sample "
              "| load |")
        print("|---|---:|---|---:|---:|---:|---:|---:|---:|")
        for mode, procs, fmt, n, secs, rate, ms, mbs, load in rows:
            print(f"| {mode} | {procs} | {fmt} | {n} | {secs:.1f} | {rate:.2f} | {ms:.0f} | {mbs:.2f} "
                  f"| {load:.2f} |")
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
