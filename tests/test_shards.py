"""The shared conversion machinery: planning, atomic shards, resume, report, executors."""

from __future__ import annotations

import argparse
import functools
import json
import os
import random
import sys

import fsspec
import numpy as np
import pytest

from data_prep.bench_prep import make_fake_cityscapes
from data_prep.shards import (
    NOTES_KEY,
    Job,
    PrepError,
    SkipSample,
    add_common_arguments,
    executor_from_args,
    format_report,
    plan_shards,
    size_arg,
    write_shards,
)
from sdeseg.cli import main
from sdeseg.data.codec import encode_sample
from sdeseg.data.manifest import read_manifest


def toy_convert(job: Job) -> dict:
    """A converter driven by the payload: {"skip": reason} / {"crash": True} / {"note": text}."""
    p = job.payload or {}
    if p.get("skip"):
        raise SkipSample(p["skip"])
    if p.get("crash"):
        raise ZeroDivisionError("a converter bug")
    img = np.full((8, 16, 3), len(job.key), np.uint8)
    label = np.zeros((8, 16), np.uint8)
    members = encode_sample(job.key, {0: img}, {"K": np.eye(3), "domain": job.domain, "split": job.split},
                            label=label)
    if p.get("note"):
        members[NOTES_KEY] = [p["note"]]
    return members


def toy_jobs(n: int, domain: str = "toy", split: str = "train", **payloads) -> list[Job]:
    """n jobs; ``payloads`` maps an index (as "i3") to that job's payload."""
    keys = [f"{domain}/{split}/s{i:03d}" for i in range(n)]
    return [Job(key, domain, split, payloads.get(f"i{i}"), {"i": i}) for i, key in enumerate(keys)]


def files(path) -> list[str]:
    return sorted(os.listdir(path))


def test_plan_is_deterministic_and_grouped():
    jobs = toy_jobs(5) + toy_jobs(3, split="val")
    shuffled = jobs[:]
    random.Random(0).shuffle(shuffled)
    plans = plan_shards(shuffled, 2)
    assert plans == plan_shards(jobs, 2)
    assert [p.name for p in plans] == ["toy-train-00000.tar", "toy-train-00001.tar", "toy-train-00002.tar",
                                       "toy-val-00000.tar", "toy-val-00001.tar"]
    assert [j.key for j in plans[0].jobs] == ["toy/train/s000", "toy/train/s001"]
    with pytest.raises(PrepError, match="duplicate sample keys"):
        plan_shards(jobs + jobs[:1], 2)


def test_skips_warnings_and_report(tmp_path):
    jobs = toy_jobs(6, i1={"skip": "corrupt image a.png"}, i4={"note": "label resized"})
    rep = write_shards(str(tmp_path), jobs, toy_convert, shard_size=4, procs=1, progress=False,
                       max_skip_fraction=0.2)
    assert rep["samples"] == 5 and rep["num_skipped"] == 1 and rep["shards"] == 2
    assert rep["skipped"] == [{"key": "toy/train/s001", "reason": "corrupt image a.png", "source": {"i": 1}}]
    assert rep["warnings"] == [{"key": "toy/train/s004", "message": "label resized"}]
    assert rep["class_pixels"]["road"] == 5 * 8 * 16 and rep["class_frequency"]["road"] == 1.0
    on_disk = json.loads((tmp_path / "prep_report.json").read_text())
    assert on_disk["samples"] == 5 and on_disk["manifest_rows_kept"] == 0
    table = format_report(rep)
    assert "toy/train" in table and "toy/train/s001: corrupt image a.png" in table and "warnings (1)" in table
    rows = read_manifest(str(tmp_path))
    assert [r["index"] for r in rows if r["shard"] == "toy-train-00000.tar"] == [0, 1, 2]
    assert files(tmp_path) == ["manifest.parquet", "prep_report.json", "toy-train-00000.json",
                               "toy-train-00000.tar", "toy-train-00001.json", "toy-train-00001.tar"]


def test_skip_limit(tmp_path):
    jobs = toy_jobs(4, i0={"skip": "bad"})
    assert write_shards(str(tmp_path / "a"), jobs, toy_convert, procs=1, progress=False,
                        max_skip_fraction=0.25)["samples"] == 3  # exactly at the limit is fine
    with pytest.raises(PrepError, match=r"skipped 1 of 4 inputs \(25.0% > limit 20.0%"):
        write_shards(str(tmp_path / "b"), jobs, toy_convert, procs=1, progress=False, max_skip_fraction=0.2)
    with pytest.raises(PrepError, match="found no input samples"):
        write_shards(str(tmp_path / "c"), [], toy_convert, procs=1, progress=False)


def test_converter_crash_names_the_sample_and_leaves_no_file(tmp_path):
    jobs = toy_jobs(4, i2={"crash": True})
    with pytest.raises(PrepError, match=r"toy/train/s002: converter failed \(ZeroDivisionError: a converter"):
        write_shards(str(tmp_path), jobs, toy_convert, shard_size=2, procs=1, progress=False)
    # the first shard finished; the crashed one left neither a tar nor a temporary file
    assert files(tmp_path) == ["toy-train-00000.json", "toy-train-00000.tar"]


def test_inputs_shrink_stale_shards_go_other_groups_stay(tmp_path):
    out = str(tmp_path)
    write_shards(out, toy_jobs(3, domain="other"), toy_convert, procs=1, progress=False)
    write_shards(out, toy_jobs(6), toy_convert, shard_size=2, procs=1, progress=False)
    rep = write_shards(out, toy_jobs(3), toy_convert, shard_size=2, procs=1, progress=False)
    assert rep["removed_stale_files"] == ["toy-train-00002.json", "toy-train-00002.tar"]
    assert rep["shards_resumed"] == 1  # shard 0 holds the same keys as before; shard 1 changed
    assert not (tmp_path / "toy-train-00002.tar").exists()
    keys = sorted(r["key"] for r in read_manifest(out))
    assert keys == [f"other/train/s{i:03d}" for i in range(3)] + [f"toy/train/s{i:03d}" for i in range(3)]


def test_object_storage_url(tmp_path):
    out = "memory://bucket/toy"
    try:
        write_shards(out, toy_jobs(3), toy_convert, shard_size=2, procs=1, progress=False)
        assert [r["key"] for r in read_manifest(out)] == [f"toy/train/s{i:03d}" for i in range(3)]
        fs = fsspec.filesystem("memory")
        assert fs.exists("/bucket/toy/toy-train-00001.tar") and fs.exists("/bucket/toy/prep_report.json")
    finally:
        fsspec.filesystem("memory").rm("/bucket", recursive=True)


def test_size_argument():
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=size_arg)
    parser.add_argument("--big", type=functools.partial(size_arg, min_side=8))
    assert parser.parse_args(["--size", "512x1024", "--big", " 8X16 "]) == argparse.Namespace(
        size=(512, 1024), big=(8, 16))
    for argv in (["--size", "512"], ["--size", "0x4"], ["--size", "axb"], ["--big", "4x64"]):
        with pytest.raises(SystemExit):
            parser.parse_args(argv)
    with pytest.raises(argparse.ArgumentTypeError, match=r"expected HxW such as 96x192, got '1x2x3'"):
        size_arg("1x2x3")
    with pytest.raises(argparse.ArgumentTypeError, match=r"at least 8x8, got '4x64'"):
        size_arg("4x64", min_side=8)


def test_common_arguments():
    parser = argparse.ArgumentParser()
    add_common_arguments(parser)
    args = parser.parse_args(["--out", "s3://b/x"])
    assert (args.shard_size, args.procs, args.max_skip_fraction, args.image_format) == (64, None, 0.05, "png")
    assert executor_from_args(args) is None
    args = parser.parse_args(["--out", "o", "--shard-size", "8", "--procs", "2", "--max-skip-fraction",
                              "0.5", "--image-format", "jpg", "--ray-address", "auto", "--overwrite",
                              "--no-progress"])
    assert (args.shard_size, args.procs, args.max_skip_fraction, args.image_format) == (8, 2, 0.5, "jpg")
    assert args.overwrite and args.no_progress and callable(executor_from_args(args))
    with pytest.raises(SystemExit):
        parser.parse_args(["--out", "o", "--image-format", "webp"])


# ------------------------------------------------------------------------- Ray


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_ray_executor_matches_local_processes(ray_local, tmp_path):
    root = tmp_path / "cityscapes"
    make_fake_cityscapes(root, size=(32, 64))
    common = ["--size", "16x32", "--shard-size", "1", "--no-progress"]
    prep = ["prep", "cityscapes", "--root", str(root), *common]
    assert main([*prep, "--out", str(tmp_path / "local"), "--procs", "1"]) == 0
    assert main([*prep, "--out", str(tmp_path / "ray"), "--ray"]) == 0
    assert ray_local.is_initialized()  # the executor reused the running Ray and left it up
    tars = sorted(p.name for p in (tmp_path / "local").glob("*.tar"))
    assert len(tars) == 4 and tars == sorted(p.name for p in (tmp_path / "ray").glob("*.tar"))
    for n in tars:
        assert (tmp_path / "local" / n).read_bytes() == (tmp_path / "ray" / n).read_bytes()
    assert len(read_manifest(str(tmp_path / "ray"))) == 4


def test_ray_task_error_reaches_the_driver(ray_local, tmp_path):
    from ray import cloudpickle

    from sdeseg.runtime.prep_executor import ray_executor

    # Ray workers cannot import this test module: ship its functions by value
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    try:
        with pytest.raises(PrepError, match="toy/train/s001: converter failed"):
            write_shards(str(tmp_path), toy_jobs(4, i1={"crash": True}), toy_convert, shard_size=1,
                         executor=ray_executor(), progress=False)
        assert not [n for n in files(tmp_path) if ".tmp-" in n]
        rep = write_shards(str(tmp_path), toy_jobs(4), toy_convert, shard_size=1, executor=ray_executor(),
                           progress=False)
    finally:
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    assert rep["samples"] == 4 and len(read_manifest(str(tmp_path))) == 4
