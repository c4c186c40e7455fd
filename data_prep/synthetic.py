"""The embedded procedural street-scene dataset: ``sdeseg prep synthetic``.

Every sample is a frame triplet (t-1, t, t+1) of a randomly generated street, ray
cast from analytic primitives (see ``data_prep.synth``), with exact ground truth:
Cityscapes train-id labels, the thing objects' Cityscapes instanceIds (``instance.png``,
16 bit), metric z-depth of frame t (0 on sky), the pinhole K
(pixel-centre convention) and the ego-motion T_prev / T_next in the convention of
``sdeseg.ops.inverse_warp``. Two styles give two domains: ``city`` (target,
domain ``synth-city``) and ``game`` (a synthetic source, ``synth-game``).

Samples are a pure function of (seed, split, style, index), so any subset can be
re-rendered anywhere, and shards are written through ``data_prep.shards`` (atomic,
resumable, parallel over processes).
"""

from __future__ import annotations

import argparse
import functools
import sys

from data_prep.shards import Job, PrepError, format_report, size_arg, write_shards
from data_prep.synth import render_sample
from data_prep.synth.styles import STYLES, get_style
from sdeseg.data.codec import encode_sample, make_key

# Each split's scenes come from its own random streams: ``render_sample`` seeds a sample by
# (seed, split name, style, index), so train, val and test never share a scene, and adding a
# split leaves the samples of the others unchanged.
SPLITS = ("train", "val", "test")
GENERATOR = "sdeseg-synthetic-v1"  # recorded in every sample's source ids
MIN_SIDE = 8  # smaller images leave no room for the street's primitives
MEMBERS = ["instance.png"]  # optional members beyond frames, label, depth and json


def sample_key(style: str, split: str, seed: int, index: int) -> str:
    """Key of one sample, e.g. ``synth-city/train/city_0_000042``."""
    return make_key(get_style(style).domain, split, f"{style}_{seed}_{index:06d}")


def make_jobs(
    num_train: int, num_val: int, num_test: int, size: tuple[int, int], style: str, seed: int
) -> list[Job]:
    """One job per sample; the payload is everything ``render_sample`` needs."""
    domain = get_style(style).domain
    jobs = []
    for split, count in zip(SPLITS, (num_train, num_val, num_test)):
        for index in range(count):
            jobs.append(
                Job(
                    key=sample_key(style, split, seed, index),
                    domain=domain,
                    split=split,
                    payload=(index, split, tuple(size), style, seed),
                    source={"generator": GENERATOR, "style": style, "seed": seed, "index": index},
                )
            )
    return jobs


def convert(job: Job) -> dict:
    """Render one job and encode it (top level so spawned worker processes can unpickle it)."""
    index, split, size, style, seed = job.payload
    s = render_sample(index, split, size, style, seed)
    meta = {
        "K": s["K"].tolist(),
        "T_prev": s["T_prev"].tolist(),
        "T_next": s["T_next"].tolist(),
        "domain": job.domain,
        "split": split,
        "style": style,
        "seed": seed,
        "index": index,
        "generator": GENERATOR,
        "camera_height": s["info"]["camera_height"],
    }
    return encode_sample(
        job.key, s["frames"], meta, label=s["label"], depth=s["depth"], image_format="png", instance=s["instance"]
    )


def generate(
    out: str,
    num_train: int = 1000,
    num_val: int = 100,
    num_test: int = 100,
    size: tuple[int, int] = (96, 192),
    style: str = "city",
    seed: int = 0,
    procs: int | None = None,
    shard_size: int = 64,
    progress: bool = True,
) -> dict:
    """Render the dataset into shards + ``manifest.parquet`` under ``out`` and return the report.

    Splits ``train``, ``val`` and ``test`` hold ``num_train``, ``num_val`` and ``num_test``
    samples; each split's scenes are its own (a held-out test split shares none with val).
    Finished shards of an earlier run with the same arguments are kept (the report's
    ``shards_converted_this_run`` counts the new ones). ``procs`` defaults to all cores.
    """
    get_style(style)  # fail early on a bad name
    counts = {"num_train": num_train, "num_val": num_val, "num_test": num_test}
    if min(counts.values()) < 0 or sum(counts.values()) == 0:
        shown = " ".join(f"{k}={v}" for k, v in counts.items())
        raise ValueError(f"need a positive number of samples, got {shown}")
    jobs = make_jobs(num_train, num_val, num_test, size, style, seed)
    extra = {
        "generator": {
            "name": GENERATOR,
            "style": style,
            "seed": seed,
            "size": list(size),
            "num_train": num_train,
            "num_val": num_val,
            "num_test": num_test,
        }
    }
    return write_shards(
        out,
        jobs,
        convert,
        shard_size=shard_size,
        procs=procs,
        desc=f"synthetic-{style}",
        progress=progress,
        extra_report=extra,
        max_skip_fraction=0.0,
        # a re-run with another size/style/seed must not resume these shards, nor shards written
        # before the instance maps (they lack the member)
        settings={**{k: extra["generator"][k] for k in ("name", "style", "seed", "size")}, "members": MEMBERS},
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``sdeseg prep synthetic``."""
    parser.add_argument("--out", required=True, help="output directory or fsspec URL")
    parser.add_argument("--num-train", type=int, default=1000, help="training samples (default 1000)")
    parser.add_argument("--num-val", type=int, default=100, help="validation samples (default 100)")
    parser.add_argument("--num-test", type=int, default=100,
                        help="held-out test samples, scenes distinct from train and val (default 100)")
    parser.add_argument(
        "--size",
        type=functools.partial(size_arg, min_side=MIN_SIDE),
        default=(96, 192),
        metavar="HxW",
        help="image size, height x width (default 96x192)",
    )
    parser.add_argument(
        "--style",
        choices=sorted(STYLES),
        default="city",
        help="visual domain: city (target) or game (synthetic source); default city",
    )
    parser.add_argument("--seed", type=int, default=0, help="dataset seed (default 0)")
    parser.add_argument("--shard-size", type=int, default=64, help="samples per shard (default 64)")
    parser.add_argument("--procs", type=int, default=None, help="worker processes (default: all cores)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    """Entry point of ``sdeseg prep synthetic``; prints the report summary."""
    try:
        report = generate(
            args.out,
            num_train=args.num_train,
            num_val=args.num_val,
            num_test=args.num_test,
            size=args.size,
            style=args.style,
            seed=args.seed,
            procs=args.procs,
            shard_size=args.shard_size,
            progress=not args.quiet,
        )
    except (PrepError, ValueError) as e:
        print(f"sdeseg prep synthetic: error: {e}", file=sys.stderr)
        return 2
    print(format_report(report))
    return 0


__all__ = ["add_arguments", "run", "generate", "render_sample", "convert", "make_jobs", "sample_key"]
