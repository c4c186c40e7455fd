"""Checkpoint upload and download time to an S3-compatible server, per checkpoint size.

    python -m tune.storage_bench [--sizes-mb 4 32 128 512] [--repeats 3]

Uploads a directory like a checkpoint's (one rank: a model file and an optimizer shard,
plus the small files) the way Ray Train does (``pyarrow.fs.copy_files`` to the
``runtime.storage_path`` URL) and downloads it back the way a resuming rank does. Against
``AWS_ENDPOINT_URL`` when it is set; otherwise a moto server is started on 127.0.0.1 (this
measures the client side and a local server, not a network: on a real bucket the network
is the limit). Prints a markdown table and writes ``--out`` as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

BUCKET = "sdeseg-bench"


def start_moto() -> tuple[subprocess.Popen, str]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exe = Path(sys.executable).with_name("moto_server")
    proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            urllib.request.urlopen(url, timeout=1).close()
            return proc, url
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("moto_server did not start")


def fake_checkpoint(directory: Path, size_mb: int) -> None:
    """A model file (1/3) and an optimizer shard (2/3, Adam's two moments) of random bytes."""
    directory.mkdir(parents=True)
    (directory / "state").mkdir()
    model = size_mb * (1 << 20) // 3
    with open(directory / "state" / "mp_rank_00_model_states.pt", "wb") as f:
        f.write(os.urandom(model))
    with open(directory / "state" / "zero_pp_rank_0_mp_rank_00_optim_states.pt", "wb") as f:
        f.write(os.urandom(size_mb * (1 << 20) - model))
    (directory / "latest").write_text("state")
    (directory / "rank_00000.pt").write_bytes(os.urandom(4096))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes-mb", type=int, nargs="+", default=[4, 32, 128, 512])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="storage_bench.json")
    args = p.parse_args(argv)
    server = None
    if "AWS_ENDPOINT_URL" not in os.environ:
        server, url = start_moto()
        os.environ.update({"AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                           "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"})
    import pyarrow.fs as pafs

    from sdeseg.runtime.checkpoint import verify_checkpoint, write_hashes

    s3, _ = pafs.FileSystem.from_uri(f"s3://{BUCKET}?allow_bucket_creation=true")
    if s3.get_file_info(BUCKET).type == pafs.FileType.NotFound:
        s3.create_dir(BUCKET)
    rows = []
    try:
        for size in args.sizes_mb:
            with tempfile.TemporaryDirectory() as tmp:
                src = Path(tmp) / "ckpt"
                fake_checkpoint(src, size)
                t0 = time.perf_counter()
                write_hashes(src, 0)
                hash_s = time.perf_counter() - t0
                up, down, verify = [], [], []
                for i in range(args.repeats):
                    dest = f"{BUCKET}/ckpt_{size}_{i}"
                    t0 = time.perf_counter()
                    pafs.copy_files(str(src), dest, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=s3)
                    up.append(time.perf_counter() - t0)
                    back = Path(tmp) / f"back{i}"
                    t0 = time.perf_counter()
                    pafs.copy_files(dest, str(back), source_filesystem=s3,
                                    destination_filesystem=pafs.LocalFileSystem())
                    down.append(time.perf_counter() - t0)
                    t0 = time.perf_counter()
                    verify_checkpoint(back)
                    verify.append(time.perf_counter() - t0)
                    shutil.rmtree(back)
                    s3.delete_dir(dest)
            row = {"size_mb": size, "upload_s": statistics.median(up), "download_s": statistics.median(down),
                   "hash_s": hash_s, "verify_s": statistics.median(verify)}
            row["upload_mb_per_s"] = size / row["upload_s"]
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        if server is not None:
            server.terminate()
    print("\n| checkpoint | upload | MB/s | download | sha256 at save | verify at load |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['size_mb']} MB | {r['upload_s']:.2f} s | {r['upload_mb_per_s']:.0f} | {r['download_s']:.2f} s | "
              f"{r['hash_s']:.2f} s | {r['verify_s']:.2f} s |")
    Path(args.out).write_text(json.dumps({"endpoint": os.environ["AWS_ENDPOINT_URL"], "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
