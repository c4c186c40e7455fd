"""``sdeseg infer --model EXPORT --data URL --out URL``: a derived dataset of predictions.

Runs the export over every sample of a shard dataset (or one ``--split``) and writes its
predictions as shards keyed by the source keys, with their own manifest (see
``sdeseg.infer``): ``--actors N`` spreads the shards over N Ray Data model actors (a GPU each
when the cluster has GPUs); 0 runs in this process. Re-running skips finished shards.
``--outputs depth,regions`` with an SDE export makes the region dataset of ``stage: contrastive``.
"""

from __future__ import annotations

import argparse
import json


def add_arguments(p: argparse.ArgumentParser) -> None:
    from data_prep.shards import size_arg

    p.add_argument("--model", required=True, help="export: <run>/export/best.pt or a .safetensors")
    p.add_argument("--data", required=True, help="source shard dataset (directory or URL)")
    p.add_argument("--out", required=True, help="derived dataset root, e.g. <data>-pseudo-depth")
    p.add_argument("--outputs", default="depth",
                   help="comma-separated: depth, seg, probs, features, regions (default depth); the contrastive "
                        "stage reads depth,regions of an SDE export")
    p.add_argument("--regions", default="depth", choices=("depth", "colour"),
                   help="kind of the regions output: coherent depth regions (default) or colour superpixels only")
    p.add_argument("--split", default=None, help="only this split (default: all)")
    p.add_argument("--size", type=size_arg, default=None, help="working size HxW (default: pad to multiples of 32)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--actors", type=int, default=0, help="Ray Data model actors (0: this process)")


def run(args: argparse.Namespace) -> int:
    from sdeseg.infer import infer_dataset

    outputs = [o.strip() for o in args.outputs.split(",") if o.strip()]
    report = infer_dataset(args.model, args.data, args.out, outputs=outputs, split=args.split, size=args.size,
                           batch_size=args.batch_size, actors=args.actors, regions=args.regions)
    print(json.dumps(report, indent=2))
    return 0
