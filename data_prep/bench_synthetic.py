"""Benchmark of the procedural dataset: generation throughput and class statistics.

``python -m data_prep.bench_synthetic`` renders the default dataset (1000 train
samples at 96x192, city style) with all local processes, then smaller runs with
one process and at 256x512, and prints two markdown tables: throughput (wall clock
of ``generate`` -- rendering, PNG encoding, shard writing and worker start-up -- and
the CPU time it used, which stays comparable when other jobs share the machine) and
the class frequencies of the default dataset (percentage of pixels,
and the fraction of images that contain each class).
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import webdataset as wds

from data_prep.bench_prep import cpu_name
from data_prep.synthetic import generate
from sdeseg.data.classes import class_names
from sdeseg.data.codec import decode_image

# (height, width, processes, samples): the first run is the default dataset
RUNS = [
    ((96, 192), None, 1000),
    ((96, 192), 1, 200),
    ((256, 512), None, 48),
    ((256, 512), 1, 24),
]


def _cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the worker processes).

    Unlike wall time it does not grow when other jobs share the cores, so it is the
    figure to compare between runs on a busy machine.
    """
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def class_table(root: Path) -> list[tuple[str, float, float]]:
    """(class, % of labelled pixels, % of images containing it) over every sample under ``root``."""
    names = class_names()
    pixels = np.zeros(len(names), dtype=np.int64)
    images = np.zeros(len(names), dtype=np.int64)
    shards = sorted({r["shard"] for r in pq.read_table(root / "manifest.parquet").to_pylist()})
    count = 0
    for sample in wds.WebDataset([str(root / s) for s in shards], shardshuffle=False, empty_check=False):
        label = decode_image(sample["label.png"])
        hist = np.bincount(label.ravel(), minlength=256)[: len(names)]
        pixels += hist
        images += hist > 0
        count += 1
    total = max(int(pixels.sum()), 1)
    return [(n, 100.0 * p / total, 100.0 * i / max(count, 1)) for n, p, i in zip(names, pixels, images)]


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print markdown tables."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every sample count (quick look: 0.1)")
    parser.add_argument("--work-dir", default=None, help="where to write the datasets (default: a temp dir)")
    args = parser.parse_args(argv)
    cores = os.cpu_count() or 1
    print(f"machine: {cores} cores, {cpu_name()}; load average before: {os.getloadavg()}")
    rows = []
    with tempfile.TemporaryDirectory(dir=args.work_dir) as tmp:
        default_root = None
        for k, ((h, w), procs, n) in enumerate(RUNS):
            n = max(2, int(round(n * args.scale)))
            p = procs or cores
            out = Path(tmp) / f"run{k}"
            # enough shards to keep every process busy until the end
            shard_size = max(1, min(64, n // (4 * p)))
            start = time.perf_counter()
            cpu_start = _cpu_seconds()
            report = generate(
                str(out),
                num_train=n,
                num_val=0,
                num_test=0,
                size=(h, w),
                style="city",
                seed=0,
                procs=p,
                shard_size=shard_size,
                progress=False,
            )
            seconds = time.perf_counter() - start
            cpu = _cpu_seconds() - cpu_start
            rows.append((f"{h}x{w}", p, report["samples"], seconds, report["samples"] / seconds, cpu))
            print(f"  {h}x{w} procs={p}: {report['samples']} samples in {seconds:.1f} s", flush=True)
            if k == 0:
                default_root = out
        table = class_table(default_root)
    print(f"\nload average after: {os.getloadavg()}\n")
    print("| size | processes | samples | wall s | samples/s | CPU s per sample | samples per CPU-second |")
    print("|---|---|---|---|---|---|---|")
    for size, p, n, sec, rate, cpu in rows:
        print(f"| {size} | {p} | {n} | {sec:.1f} | {rate:.2f} | {cpu / n:.3f} | {n / cpu:.2f} |")
    print(f"\nclass frequencies of the default dataset ({rows[0][2]} train samples, 96x192, city, seed 0):\n")
    print("| class | % of pixels | % of images |")
    print("|---|---|---|")
    for name, pix, img in table:
        print(f"| {name} | {pix:.2f} | {img:.1f} |")
    present = sum(1 for _, pix, _ in table if pix > 0)
    print(f"\n{present} of {len(table)} classes present")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
