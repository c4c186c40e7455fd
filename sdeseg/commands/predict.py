"""``sdeseg predict --model EXPORT --input DIR|GLOB|URL --out DIR``: predictions as image files.

For every input image (a folder's image files, a glob, one file, or the centre frames of a
shard dataset) writes what the export predicts, at the image's own size (see
``sdeseg.infer`` for the padding / ``--size`` policy): segmentation as train-id PNG, colour
PNG and overlay; depth as a 16-bit PNG in millimetres (the raw prediction × ``--depth-scale``)
and a colour map. Unreadable images are skipped, named and counted in
``<out>/predict_report.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    from data_prep.shards import size_arg

    p.add_argument("--model", required=True, help="export: <run>/export/best.pt or a .safetensors")
    p.add_argument("--input", required=True,
                   help="image folder, glob ('imgs/*.jpg'), image file, or shard dataset (with manifest.parquet)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--size", type=size_arg, default=None,
                   help="working size HxW: resize in, outputs resized back (default: pad to multiples of 32)")
    p.add_argument("--depth-scale", type=float, default=1.0,
                   help="multiply the depth before writing it (e.g. a median ratio from sdeseg eval)")
    p.add_argument("--split", default=None, help="shard dataset input: only this split")


def inputs(spec: str, split: str | None = None):
    """(count, iterator of (name, image)) of ``spec``: each image is (H,W,3) uint8, or the
    ValueError that names why it could not be read. FileNotFoundError when there is nothing."""
    import fsspec

    from sdeseg.data.manifest import MANIFEST_NAME, join
    from sdeseg.infer import list_images, read_image

    fs, path = fsspec.core.url_to_fs(spec)
    if fs.exists(join(path, MANIFEST_NAME)):
        return _dataset_inputs(spec, split)
    urls = list_images(spec)

    def read(url: str):
        try:
            return read_image(url)
        except ValueError as e:
            return e

    return len(urls), ((Path(url.split("://")[-1]).stem, read(url)) for url in urls)


def _dataset_inputs(root: str, split: str | None):
    from sdeseg.data.codec import SampleError, decode_sample
    from sdeseg.data.shardio import ShardIndex, scan_shard

    index = ShardIndex.load(root)
    selection = index.select(split, None)
    if not selection:
        raise FileNotFoundError(f"{root}: no samples of split {split!r}")

    def items():
        for shard, positions in sorted(selection.items()):
            for _, members in scan_shard(root, shard, index.shard_keys[shard], positions):
                try:
                    yield members["__key__"].replace("/", "__"), decode_sample(members, frames=(0,))["frames"][0]
                except SampleError as e:
                    yield members["__key__"].replace("/", "__"), ValueError(str(e))

    return sum(len(p) for p in selection.values()), items()


def run(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from sdeseg.exports import load_model
    from sdeseg.infer import predict_images, to_tensor, write_prediction

    model = load_model(args.model)
    total, items = inputs(args.input, args.split)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    written, skipped = 0, []
    start = time.perf_counter()
    with torch.inference_mode():
        for name, image in tqdm(items, total=total, desc="predict", unit="img"):
            if isinstance(image, Exception):
                skipped.append({"input": name, "reason": str(image)})
                continue
            write_prediction(out, name, image, predict_images(model, to_tensor(image), args.size), args.depth_scale)
            written += 1
    seconds = time.perf_counter() - start
    report = {"model": str(args.model), "input": args.input, "written": written, "skipped": len(skipped),
              "skipped_inputs": skipped, "seconds": seconds, "images_per_s": written / max(seconds, 1e-9)}
    (out / "predict_report.json").write_text(json.dumps(report, indent=2))
    for s in skipped:
        print(f"skipped {s['input']}: {s['reason']}")
    print(f"{written} image(s) predicted into {out}, {len(skipped)} skipped ({report['images_per_s']:.1f} images/s)")
    return 0
