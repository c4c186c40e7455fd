"""Inference throughput: ``sdeseg predict`` in one process and ``sdeseg infer`` with 1 and 2 Ray actors.

    python -m tune.infer_bench --model demo_out/runs/semiseg/export/best.pt --images 48

For each size (default 96x192 and 512x1024) renders a small synthetic dataset (test split
only), then times, in one run: the predict loop of ``sdeseg predict`` (read, predict, write
the PNG files) in this process, and ``infer_dataset`` (a derived dataset of pseudo-labels)
with 1 and with 2 Ray Data model actors on a local Ray cluster of all cores. Prints images/s
and the 2-actor / 1-actor ratio (BENCHMARKS.md). Times include each path's fixed costs (model
loading, actor start-up), as a user sees them.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path


def _dataset(root: Path, size: tuple[int, int], n: int) -> str:
    from data_prep.synthetic import generate

    out = root / f"data_{size[0]}x{size[1]}"
    if not (out / "manifest.parquet").exists():
        # a dozen shards: the unit of work of the actors
        generate(str(out), num_train=0, num_val=0, num_test=n, size=size, procs=os.cpu_count() or 1,
                 shard_size=max(1, n // 12), progress=False)
    return str(out)


def _predict(model_path: str, data: str, out: Path) -> float:
    """Images/s of ``sdeseg predict``'s loop over the dataset's test split."""
    import torch

    from sdeseg.commands.predict import inputs
    from sdeseg.exports import load_model
    from sdeseg.infer import predict_images, to_tensor, write_prediction

    start = time.perf_counter()
    model = load_model(model_path)
    total, items = inputs(data, "test")
    with torch.inference_mode():
        for name, image in items:
            write_prediction(out, name, image, predict_images(model, to_tensor(image)))
    return total / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="segmentation export")
    p.add_argument("--images", type=int, default=48, help="images per size")
    p.add_argument("--sizes", nargs="+", default=["96x192", "512x1024"])
    p.add_argument("--work", default=None, help="folder for the datasets and outputs (default: a temporary one)")
    args = p.parse_args(argv)
    import ray
    import torch

    from data_prep.shards import size_arg
    from sdeseg.infer import infer_dataset

    torch.set_num_threads(1)
    work = Path(args.work or tempfile.mkdtemp(prefix="infer_bench_"))
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False)
    print("| size | images | predict, 1 process (img/s) | infer, 1 actor (img/s) | infer, 2 actors (img/s) "
          "| 2 / 1 actors |\n|---|---|---|---|---|---|")
    try:
        for text in args.sizes:
            size = size_arg(text)
            data = _dataset(work, size, args.images)
            single = _predict(args.model, data, work / f"predict_{text}")
            rates = []
            for actors in (1, 2):
                start = time.perf_counter()
                r = infer_dataset(args.model, data, str(work / f"derived_{text}_{actors}"), outputs=["seg"],
                                  split="test", actors=actors)
                rates.append(r["samples"] / (time.perf_counter() - start))
            print(f"| {text} | {args.images} | {single:.2f} | {rates[0]:.2f} | {rates[1]:.2f} | "
                  f"{rates[1] / rates[0]:.2f} |", flush=True)
    finally:
        ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
