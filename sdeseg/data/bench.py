"""Reader throughput: WebDataset shards through ``ShardStream`` vs. one PNG file per member.

``python -m sdeseg.data.bench`` writes the same synthetic-like samples (3 frames, label,
depth, K/T) twice into a temporary directory: as shards (``data_prep.shards``) and as
plain files (one directory per sample holding the very same PNG/NPY/JSON bytes). It then
reads both with the same decode + crop + flip + to-tensor + batching (batches of 8) and
prints samples/s (wall clock) and samples per CPU-second (this process and its finished
DataLoader workers: the per-core cost, robust to other load on the machine).

``--join`` measures instead what joining a derived dataset costs the reader
(``ShardStream(derived=)``: one float32 depth map per sample, read by key, cropped and flipped
with the images): samples per CPU-second of the centre frames alone and with the join, and the
join's cost per sample, i.e. the time that left the training step when the join moved into the
reader.

``--handoff`` measures what the training process itself spends handing one batch to its device
(``next(stream).to(device)`` after the batch has arrived from a DataLoader worker), at the paper
size's SDE batch (2 triplets of 512x1024, jittered copies beside the originals): converting the
uint8 images to float32 on the host and copying float32 (``ShardStream(as_float=True)``), against
copying the uint8 batch, page-locked where the device is a GPU, and converting it there (what
``StageContext.train_stream`` ships). Each repeat gets a freshly allocated batch, as from a
worker; on a GPU the time includes the copy's completion (``torch.cuda.synchronize``).

Results and the command line are recorded in ``docs/bench/reader.md`` and BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset

from data_prep.shards import Job, write_shards
from sdeseg.config import AugmentConfig
from sdeseg.data.augment import augment_sample
from sdeseg.data.batch import Batch
from sdeseg.data.codec import encode_npy, encode_sample
from sdeseg.data.derived import write_derived
from sdeseg.data.reader import ShardStream
from sdeseg.data.shardio import collate, seeded_rng

BATCH = 8
FRAMES = (-1, 0, 1)
NO_JITTER = AugmentConfig(brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0)


def _smooth(rng: np.random.Generator, h: int, w: int, c: int, cells: int = 8) -> np.ndarray:
    """(h,w,c) float in [0,1]: a coarse random grid, bilinearly upsampled."""
    coarse = torch.from_numpy(rng.random((1, c, cells, 2 * cells)))
    up = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
    return up[0].permute(1, 2, 0).numpy()


def synth_sample(job: Job) -> dict:
    """A synthetic-like sample: smooth shaded frames with finer texture, blocky labels, smooth depth.

    The texture mix is chosen so that a 512x1024 frame is ~0.65 MB as PNG, about what a
    Cityscapes frame downscaled to that size weighs (pure noise would be unrealistically big,
    flat colour unrealistically small).
    """
    h, w, seed = job.payload
    rng = np.random.default_rng(seed)
    base = 0.7 * _smooth(rng, h, w, 3) + 0.3 * _smooth(rng, h, w, 3, cells=64)
    frames = {}
    for fid in FRAMES:
        shifted = np.roll(base, 2 * fid, axis=1)  # the camera moves a little between frames
        frames[fid] = np.clip(shifted * 255, 0, 255).astype(np.uint8)
    label = np.kron(rng.integers(0, 19, (max(h // 16, 1), max(w // 16, 1))), np.ones((16, 16)))[:h, :w]
    depth = (2.0 + 40.0 * _smooth(rng, h, w, 1)[..., 0]).astype(np.float32)
    f = 0.6 * w
    meta = {"K": [[f, 0, (w - 1) / 2], [0, f, (h - 1) / 2], [0, 0, 1]], "domain": "bench", "split": "train",
            "T_prev": np.eye(4).tolist(), "T_next": np.eye(4).tolist()}
    return encode_sample(job.key, frames, meta, label.astype(np.uint8), depth)


def write_both(root: Path, h: int, w: int, n: int) -> tuple[str, Path]:
    """The same n samples as shards under ``root/shards`` and as files under ``root/files``."""
    jobs = [Job(f"bench/train/{i:05d}", "bench", "train", (h, w, i)) for i in range(n)]
    shards = root / "shards"
    write_shards(str(shards), jobs, synth_sample, shard_size=64, procs=1, progress=False)
    files = root / "files"
    for job in jobs:
        d = files / job.key.replace("/", "_")
        d.mkdir(parents=True, exist_ok=True)
        for name, data in synth_sample(job).items():
            if name != "__key__":
                (d / name).write_bytes(data)
    return str(shards), files


class PerFileReader(IterableDataset):
    """Baseline: one directory per sample, members read with PIL / numpy from separate files.

    Same crop, flip and batching as the shard reader (``augment_sample`` + ``collate``); only
    the storage (one open per member instead of one tar stream per shard) differs.
    """

    def __init__(self, files: Path, crop: tuple[int, int], augment: AugmentConfig, seed: int = 0):
        super().__init__()
        self.dirs = sorted(files.iterdir())
        self.crop, self.augment, self.seed = crop, augment, seed

    def _load(self, d: Path) -> dict:
        frames = {}
        for fid, name in zip(FRAMES, ("prev", "cur", "next")):
            with Image.open(d / f"{name}.png") as img:
                frames[fid] = np.asarray(img)
        with Image.open(d / "label.png") as img:
            label = np.asarray(img)
        depth = np.load(d / "depth.npy")
        meta = json.loads((d / "json").read_bytes())
        return {"key": d.name, "meta": meta, "frames": frames, "label": label, "depth": depth}

    def __iter__(self) -> Iterator[Batch]:
        order = seeded_rng(self.seed).permutation(len(self.dirs))
        samples = []
        for slot, i in enumerate(order[: len(order) // BATCH * BATCH]):
            rng = seeded_rng(self.seed, slot)
            samples.append(augment_sample(self._load(self.dirs[i]), self.crop, self.augment, rng, FRAMES))
            if len(samples) == BATCH:
                yield collate(samples, FRAMES)
                samples = []


def _timed(make_iter) -> tuple[float, float, int]:
    """(wall seconds, CPU seconds incl. finished child processes, samples) of one full pass."""
    cpu0 = time.process_time()
    child0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    n = sum(len(b) for b in make_iter())
    wall = time.perf_counter() - t0
    child1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    children = (child1.ru_utime - child0.ru_utime) + (child1.ru_stime - child0.ru_stime)
    cpu = time.process_time() - cpu0 + children
    return wall, cpu, n


def measure(shards: str, files: Path, crop: tuple[int, int], workers: int, augment: AugmentConfig,
            repeats: int) -> dict:
    def reader():
        return iter(ShardStream(shards, batch_size=BATCH, crop=crop, augment=augment, num_workers=workers,
                                epochs=1, frames=FRAMES))

    def baseline():
        ds = PerFileReader(files, crop, augment)
        if workers == 0:
            return iter(ds)
        return iter(DataLoader(ds, batch_size=None, num_workers=workers))

    out = {}
    for name, make in (("shards", reader), ("files", baseline)):
        runs = [_timed(make) for _ in range(repeats)]
        wall, cpu, n = min(runs)  # best of the repeats: least disturbed by other load
        out[name] = {"samples_per_s": n / wall, "samples_per_cpu_s": n / cpu, "samples": n}
    return out


def _random_depth(key: str, frame: np.ndarray) -> dict[str, bytes]:
    """A derived sample: a float32 depth map of the frame's size (values do not matter here)."""
    rng = seeded_rng(int(key.rsplit("/", 1)[-1]))
    return {"depth.npy": encode_npy((2.0 + 40.0 * rng.random(frame.shape[:2])).astype(np.float32))}


def measure_join(shards: str, derived: str, crop: tuple[int, int], repeats: int) -> dict:
    """Samples per CPU-second of the centre frames without and with the derived depth joined."""
    out = {}
    for name, joins in (("plain", None), ("joined", {"depth": (derived, "depth.npy")})):
        def reader(joins=joins):
            return iter(ShardStream(shards, batch_size=BATCH, crop=crop, augment=NO_JITTER, num_workers=0,
                                    epochs=1, frames=(0,), labels=False, derived=joins))

        wall, cpu, n = min(_timed(reader) for _ in range(repeats))
        out[name] = n / cpu
    out["join_ms_per_sample"] = 1e3 * (1 / out["joined"] - 1 / out["plain"])
    return out


def join_main(args) -> None:
    rows = []
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        for (h, w), n in (((96, 192), args.small), ((512, 1024), args.large)):
            shards, _ = write_both(Path(tmp) / f"{h}x{w}", h, w, n)
            derived = write_derived(shards, f"{tmp}/{h}x{w}/derived", _random_depth)
            mb = sum(f.stat().st_size for f in Path(derived).glob("*.tar")) / n / 1e6
            rows.append((f"{h}x{w}", n, mb, measure_join(shards, derived, (h - h // 8, w - w // 8), args.repeats)))
    print(f"derived-join benchmark: batches of {BATCH}, centre frame, crop 7/8 of each side, random flip, "
          f"in-process reader; torch threads 1; cpu count {os.cpu_count()}")
    print("| size | samples | derived MB/sample | plain samples/CPU-s | joined samples/CPU-s | join ms/sample |")
    print("|---|---|---|---|---|---|")
    for size, n, mb, r in rows:
        print(f"| {size} | {n} | {mb:.2f} | {r['plain']:.1f} | {r['joined']:.1f} | {r['join_ms_per_sample']:.2f} |")


def _uint8_batch(batch: int, h: int, w: int, seed: int) -> Batch:
    """A reader's uint8 batch of ``batch`` jittered triplets of (h, w), label and K/T as shipped."""
    g = torch.Generator().manual_seed(seed)

    def img():
        return torch.randint(0, 256, (batch, 3, h, w), dtype=torch.uint8, generator=g)

    K = torch.eye(3).expand(batch, 3, 3).clone()
    return Batch(keys=[f"b/train/{i}" for i in range(batch)], images={f: img() for f in FRAMES},
                 images_aug={f: img() for f in FRAMES}, K=K, inv_K=K.clone(),
                 label=torch.randint(0, 19, (batch, h, w), generator=g), T={-1: torch.eye(4).expand(batch, 4, 4),
                                                                           1: torch.eye(4).expand(batch, 4, 4)})


def measure_handoff(device: torch.device, batch: int, size: tuple[int, int], repeats: int) -> dict:
    """Median milliseconds per batch of the two hand-offs (module doc), and the image bytes each
    copies to a GPU (0 on the CPU, where both convert on the host and nothing is copied)."""
    cuda = device.type == "cuda"

    def done():
        if cuda:
            torch.cuda.synchronize(device)

    out = {}
    for name in ("host float32", "uint8, converted on the device"):
        times = []
        for r in range(repeats + 1):  # repeat 0 warms up (allocators, CUDA context)
            b = _uint8_batch(batch, *size, seed=r)
            if name.startswith("uint8") and cuda:
                b = b.pin_memory()  # the DataLoader's pin thread does this, beside the training process
            done()
            t0 = time.perf_counter()
            moved = (b.as_float() if name.startswith("host") else b).to(device)
            done()
            if r:
                times.append(time.perf_counter() - t0)
        images = [*moved.images.values(), *moved.images_aug.values()]
        copied = sum(x.numel() for x in images) * (4 if name.startswith("host") else 1) if cuda else 0
        out[name] = {"ms": 1e3 * float(np.median(times)), "image_mb": copied / 1e6}
    return out


def handoff_main(args) -> None:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.set_num_threads(args.threads)
    print(f"hand-off benchmark: {args.batch} jittered triplets of {args.size[0]}x{args.size[1]} + label, "
          f"device {device}, torch threads {torch.get_num_threads()}, median of {args.repeats}")
    print("| hand-off | ms / batch | image MB copied |\n|---|---|---|")
    for name, r in measure_handoff(device, args.batch, tuple(args.size), args.repeats).items():
        print(f"| {name} | {r['ms']:.1f} | {r['image_mb']:.1f} |")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--small", type=int, default=320, help="samples at 96x192")
    p.add_argument("--large", type=int, default=32, help="samples at 512x1024")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1])
    p.add_argument("--tmp", default=None, help="scratch directory (default: a temporary one)")
    p.add_argument("--join", action="store_true", help="measure joining a derived dataset instead")
    p.add_argument("--handoff", action="store_true", help="measure the hand-off of a batch to its device instead")
    p.add_argument("--device", default=None, help="--handoff: the device (default: cuda if there is one)")
    p.add_argument("--batch", type=int, default=2, help="--handoff: triplets per batch")
    p.add_argument("--size", type=int, nargs=2, default=[512, 1024], help="--handoff: image height and width")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="--handoff: torch threads")
    args = p.parse_args(argv)
    if args.handoff:
        return handoff_main(args)
    torch.set_num_threads(1)  # one core per reader: the figures are per core
    if args.join:
        return join_main(args)
    rows = []
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        for (h, w), n in (((96, 192), args.small), ((512, 1024), args.large)):
            shards, files = write_both(Path(tmp) / f"{h}x{w}", h, w, n)
            crop = (h - h // 8, w - w // 8)
            shard_bytes = sum(f.stat().st_size for f in Path(shards).glob("*.tar"))
            for jitter in (False, True):
                augment = AugmentConfig(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.05) if jitter \
                    else NO_JITTER
                for workers in args.workers:
                    r = measure(shards, files, crop, workers, augment, args.repeats)
                    rows.append((f"{h}x{w}", n, shard_bytes / n / 1e6, "on" if jitter else "off", workers, r))
    print(f"reader benchmark: batches of {BATCH}, frames {FRAMES} + label + depth, crop 7/8 of each side, "
          f"random flip; torch threads 1; cpu count {os.cpu_count()}")
    print("| size | samples | MB/sample | jitter | workers | shards samples/s | files samples/s | "
          "shards samples/CPU-s | files samples/CPU-s | ratio (per CPU-s) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for size, n, mb, jit, workers, r in rows:
        s, f = r["shards"], r["files"]
        ratio = s["samples_per_cpu_s"] / f["samples_per_cpu_s"]
        print(f"| {size} | {n} | {mb:.2f} | {jit} | {workers} | {s['samples_per_s']:.1f} | "
              f"{f['samples_per_s']:.1f} | {s['samples_per_cpu_s']:.1f} | {f['samples_per_cpu_s']:.1f} | "
              f"{ratio:.2f} |")


if __name__ == "__main__":
    main()
