"""Shared machinery of every converter: jobs -> atomic WebDataset shards + manifest + report.

A converter lists *jobs* (one per output sample, cheap to create) and a top-level,
picklable ``convert(job) -> members`` function that loads/renders one sample and
returns its encoded members (``sdeseg.data.codec.encode_sample``) or raises
:class:`SkipSample`. ``write_shards`` then

* assigns jobs to shards deterministically (sorted by domain, split, key; fixed
  ``shard_size``), so a re-run produces the same shard names and contents;
* converts shards in parallel (local processes, or any ``executor``, e.g. Ray tasks
  from ``sdeseg.runtime.prep_executor``);
* writes each shard under a temporary name and renames it, then writes a small
  sidecar ``<shard>.json`` (manifest rows, skips, warnings, class counts, the
  conversion settings) the same way: a shard whose sidecar exists and matches the
  plan and settings is finished and is skipped on re-runs, so an interrupted
  conversion resumes and never leaves a partial shard under its final name;
* writes ``manifest.parquet`` and ``prep_report.json`` at the end.

The output root is a local path or any fsspec URL (``file://``, ``s3://``, ``gs://``,
``memory://``); only fsspec calls touch it. One output directory may hold several
datasets (e.g. ``cityscapes`` and ``gta``): the manifest keeps the rows of the
(domain, split) groups a run does not touch.

The second half of this module holds small image helpers the image converters
(Cityscapes, GTA) share: reading files with reasons for every failure, resizing
once to the stored size, the ``--size`` argument, and the CLI options all converters use.
Intrinsics of resized images come from ``sdeseg.camera.scale_intrinsics``.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import re
import sys
import tarfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from multiprocessing import get_context
from typing import Any

import fsspec
import numpy as np
from PIL import Image
from tqdm import tqdm

from sdeseg.config import ConfigError, parse_size
from sdeseg.data.classes import IGNORE_INDEX, class_names, known_label_ids
from sdeseg.data.codec import IMAGE_EXTS, decode_image
from sdeseg.data.manifest import MANIFEST_NAME, join, read_manifest, write_manifest

REPORT_NAME = "prep_report.json"
# A converter may return this extra member: a list of strings naming problems it fixed
# (e.g. a resized label). They go into the report instead of the tar.
NOTES_KEY = "__notes__"
TMP_MARK = ".tmp-"

Executor = Callable[[Callable, list[tuple]], Iterator]


class SkipSample(Exception):
    """Raised by a converter for an input it cannot use; the reason goes into the report."""


class PrepError(RuntimeError):
    """Conversion cannot produce a usable dataset (bad root, nothing usable, too many skips)."""


@dataclass(frozen=True)
class Job:
    key: str  # sample key <domain>/<split>/<id>
    domain: str
    split: str
    payload: Any = None  # converter-specific: file paths, a seed, ...
    source: dict = field(default_factory=dict)  # identifiers recorded in the manifest


@dataclass(frozen=True)
class ShardPlan:
    name: str  # file name relative to the output root
    jobs: tuple[Job, ...]


def shard_name(domain: str, split: str, index: int) -> str:
    return f"{domain}-{split}-{index:05d}.tar"


def plan_shards(jobs: Iterable[Job], shard_size: int) -> list[ShardPlan]:
    """Deterministic assignment of jobs to shards, grouped by (domain, split).

    Jobs are sorted by key inside a group, so the plan depends only on the set of
    jobs and ``shard_size`` (not on listing order), and neighbouring frames of a
    sequence land in the same shard.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    jobs = sorted(jobs, key=lambda j: (j.domain, j.split, j.key))
    dupes = [k for k, n in Counter(j.key for j in jobs).items() if n > 1]
    if dupes:
        raise PrepError(f"duplicate sample keys, e.g. {dupes[:3]}")
    groups: dict[tuple[str, str], list[Job]] = {}
    for j in jobs:
        groups.setdefault((j.domain, j.split), []).append(j)
    plans: list[ShardPlan] = []
    for (domain, split), group in groups.items():
        for i in range(0, len(group), shard_size):
            name = shard_name(domain, split, i // shard_size)
            plans.append(ShardPlan(name, tuple(group[i : i + shard_size])))
    return plans


def _sidecar(name: str) -> str:
    return name[: -len(".tar")] + ".json"


def tmp_name(path: str) -> str:
    # uuid, not the pid: Ray tasks on different nodes may share pids
    return f"{path}{TMP_MARK}{uuid.uuid4().hex[:12]}"


def write_tar_sample(tar: tarfile.TarFile, members: dict) -> None:
    """Append one sample as ``<key>.<member>`` entries, the WebDataset convention.

    Written with the standard library rather than ``webdataset.TarWriter``: importing
    webdataset imports torch, which would add seconds to every worker's start-up. Members
    are sorted and mtime is 0 so that the same inputs give byte-identical shards.
    """
    key = members["__key__"]
    for name in sorted(members):
        if name.startswith("_"):
            continue
        data = members[name]
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"{key}: member {name} is {type(data).__name__}, expected encoded bytes")
        info = tarfile.TarInfo(f"{key}.{name}")
        info.size, info.mtime, info.mode = len(data), 0, 0o444
        info.uname = info.gname = "sdeseg"
        tar.addfile(info, io.BytesIO(data))


def atomic_write_bytes(fs, path: str, data: bytes) -> None:
    tmp = tmp_name(path)
    try:
        with fs.open(tmp, "wb") as f:
            f.write(data)
        fs.mv(tmp, path)
    except BaseException:
        if fs.exists(tmp):
            fs.rm(tmp)
        raise


def _normalise_settings(settings: dict | None) -> dict:
    # JSON round trip, so tuples compare equal to the lists read back from a sidecar
    return json.loads(json.dumps(settings or {}, sort_keys=True))


def convert_shard(
    root: str, plan: ShardPlan, convert: Callable[[Job], dict], settings: dict | None = None
) -> dict:
    """Convert one shard (runs in a worker process or Ray task). Returns its sidecar record.

    The tar is written under a temporary name and renamed when complete; the sidecar
    (which marks the shard finished) is written after the rename. A converter error
    other than SkipSample is a bug or an infrastructure failure: it aborts the run,
    naming the sample, and removes the temporary file.
    """
    fs, path = fsspec.core.url_to_fs(root)
    start, cpu_start = time.perf_counter(), time.process_time()
    rows, skipped, warnings = [], [], []
    num_classes = len(class_names())
    class_counts = np.zeros(num_classes, dtype=np.int64)
    final = join(path, plan.name)
    tmp = tmp_name(final)
    side = join(path, _sidecar(plan.name))
    if fs.exists(side):
        # a stale record (other inputs or settings) must never vouch for the tar written next
        fs.rm(side)
    try:
        with fs.open(tmp, "wb") as f, tarfile.open(fileobj=f, mode="w|") as tar:  # streamed: fine for s3
            for job in plan.jobs:
                try:
                    members = convert(job)
                except SkipSample as e:
                    skipped.append({"key": job.key, "reason": str(e), "source": job.source})
                    continue
                except Exception as e:
                    raise PrepError(f"{job.key}: converter failed ({type(e).__name__}: {e})") from e
                members = dict(members)
                for note in members.pop(NOTES_KEY, ()):
                    warnings.append({"key": job.key, "message": str(note)})
                meta = json.loads(members["json"])
                if "label.png" in members:
                    label = decode_image(members["label.png"])
                    counts = np.bincount(label[label != IGNORE_INDEX].ravel(), minlength=num_classes)
                    class_counts += counts[:num_classes]
                write_tar_sample(tar, members)
                rows.append(
                    {
                        "key": job.key,
                        "shard": plan.name,
                        "index": len(rows),
                        "split": job.split,
                        "domain": job.domain,
                        "has_label": bool(meta.get("has_label", False)),
                        "height": int(meta["height"]),
                        "width": int(meta["width"]),
                        "source": json.dumps(job.source, sort_keys=True),
                    }
                )
        if rows:
            fs.mv(tmp, final)
        else:  # an empty tar is useless to readers; record the skips only
            fs.rm(tmp)
            if fs.exists(final):  # a shard of an earlier run whose inputs have all gone bad since
                fs.rm(final)
    except BaseException:
        if fs.exists(tmp):
            fs.rm(tmp)
        raise
    record = {
        "shard": plan.name,
        "rows": rows,
        "skipped": skipped,
        "warnings": warnings,
        "class_counts": class_counts.tolist(),
        "settings": _normalise_settings(settings),
        "seconds": time.perf_counter() - start,
        "cpu_seconds": time.process_time() - cpu_start,  # unaffected by other load on the machine
    }
    atomic_write_bytes(fs, side, json.dumps(record).encode())
    return record


def _load_finished(fs, path: str, plan: ShardPlan) -> dict | None:
    """The sidecar record of a finished shard of this plan, or None when it must be (re)made."""
    side = join(path, _sidecar(plan.name))
    if not fs.exists(side):
        return None
    try:
        with fs.open(side, "rb") as f:
            record = json.loads(f.read())
        done = {r["key"] for r in record["rows"]} | {s["key"] for s in record["skipped"]}
    except (ValueError, KeyError, TypeError):
        return None  # unreadable sidecar: convert again
    if done != {j.key for j in plan.jobs} or (record["rows"] and not fs.exists(join(path, plan.name))):
        return None  # written by a different plan (inputs changed), or the tar vanished: redo
    record.setdefault("warnings", [])
    record.setdefault("settings", {})
    return record


def local_executor(procs: int) -> Executor:
    """Run shard conversions in ``procs`` local processes (in-process when 1)."""

    def run(fn: Callable, arglist: list[tuple]) -> Iterator:
        if procs <= 1 or len(arglist) <= 1:
            for args in arglist:
                yield fn(*args)
            return
        # spawn: workers must not inherit the parent's threads (tqdm monitor, arrow pools)
        pool = ProcessPoolExecutor(max_workers=min(procs, len(arglist)), mp_context=get_context("spawn"))
        try:
            futures = [pool.submit(fn, *args) for args in arglist]
            for fut in as_completed(futures):
                yield fut.result()
        finally:
            # on an error (or Ctrl-C) do not convert the remaining shards before re-raising
            pool.shutdown(wait=True, cancel_futures=True)

    return run


def _remove_stale(fs, path: str, plans: list[ShardPlan]) -> list[str]:
    """Delete shards of the planned (domain, split) groups that the plan no longer has.

    They come from an earlier run over a larger input set (or another shard size) and
    would otherwise be picked up by readers that glob the directory.
    """
    wanted = {p.name for p in plans} | {_sidecar(p.name) for p in plans}
    prefixes = {p.name.rsplit("-", 1)[0] + "-" for p in plans}
    pattern = re.compile(r"-\d{5}\.(tar|json)$")
    removed = []
    for entry in list_dir(fs, path):
        name = entry.rstrip("/").rsplit("/", 1)[-1]
        if name not in wanted and pattern.search(name) and any(name.startswith(p) for p in prefixes):
            fs.rm(entry)
            removed.append(name)
    return sorted(removed)


def list_dir(fs, path: str) -> list[str]:
    """Entries under ``path``; empty when it does not exist (an object-store prefix with
    nothing under it does not exist: ``makedirs`` cannot create it)."""
    try:
        return fs.ls(path, detail=False)
    except FileNotFoundError:
        return []


def remove_temporaries(fs, path: str) -> None:
    # leftovers of a killed run; one converter per output directory at a time
    for entry in list_dir(fs, path):
        if TMP_MARK in entry.rsplit("/", 1)[-1]:
            fs.rm(entry)


def _kept_manifest_rows(out: str, fs, path: str, plans: list[ShardPlan]) -> list[dict]:
    """Rows of an existing manifest that belong to (domain, split) groups this run does not write."""
    if not fs.exists(join(path, MANIFEST_NAME)):
        return []
    try:
        rows = read_manifest(out)
    except Exception:  # an unreadable old manifest is simply replaced
        return []
    groups = {(j.domain, j.split) for p in plans for j in p.jobs}
    return [r for r in rows if (r["domain"], r["split"]) not in groups and fs.exists(join(path, r["shard"]))]


def write_shards(
    out: str,
    jobs: list[Job],
    convert: Callable[[Job], dict],
    *,
    shard_size: int = 64,
    procs: int | None = None,
    executor: Executor | None = None,
    max_skip_fraction: float = 0.05,
    desc: str = "prep",
    progress: bool = True,
    extra_report: dict | None = None,
    settings: dict | None = None,
    overwrite: bool = False,
) -> dict:
    """Convert ``jobs`` into shards under ``out`` (path or fsspec URL); return the report.

    Args:
        executor: ``run(fn, arglist) -> iterator of fn(*args)`` in completion order;
            default: ``procs`` local processes (``os.cpu_count()`` when None).
        max_skip_fraction: fail when more than this fraction of the jobs is skipped.
        settings: everything besides the job list that changes shard contents (size,
            image format, ...). Finished shards written with other settings are an
            error unless ``overwrite``, so a re-run never mixes two configurations.
        overwrite: convert every shard again, ignoring finished ones.

    Raises PrepError when there are no jobs, nothing could be converted, or more than
    ``max_skip_fraction`` of the jobs were skipped (the report is written first, so the
    reasons can be read), or when finished shards have different settings.
    """
    if not jobs:
        raise PrepError(f"{desc}: found no input samples")
    if not 0.0 <= max_skip_fraction <= 1.0:
        raise ValueError(f"max_skip_fraction must be in [0, 1], got {max_skip_fraction}")
    start = time.perf_counter()
    settings = _normalise_settings(settings)
    fs, path = fsspec.core.url_to_fs(out)
    fs.makedirs(path, exist_ok=True)
    plans = plan_shards(jobs, shard_size)
    remove_temporaries(fs, path)

    records, todo, conflicts = [], [], []
    for plan in plans:
        rec = None if overwrite else _load_finished(fs, path, plan)
        if rec is not None and rec["settings"] != settings:
            conflicts.append((plan.name, rec["settings"]))
            rec = None
        (records.append(rec) if rec is not None else todo.append(plan))
    if conflicts:
        name, old = conflicts[0]
        diff = {k: (old.get(k), settings.get(k)) for k in sorted(set(old) | set(settings))
                if old.get(k) != settings.get(k)}
        raise PrepError(
            f"{desc}: {len(conflicts)} finished shards in {out} were written with other settings "
            f"(e.g. {name}: {', '.join(f'{k}: {a!r} -> {b!r}' for k, (a, b) in diff.items())}); "
            "use another --out or pass --overwrite"
        )
    resumed = len(records)

    # workers get an absolute URL: a relative local path would resolve against their own cwd
    root_url = fs.unstrip_protocol(path)
    run = executor or local_executor(procs if procs is not None else max(1, os.cpu_count() or 1))
    bar = tqdm(total=len(jobs), initial=sum(len(r["rows"]) + len(r["skipped"]) for r in records),
               desc=desc, unit="sample", disable=not progress, dynamic_ncols=True)
    try:
        # nothing to do (a finished run again) must not start workers or a Ray cluster
        results = run(convert_shard, [(root_url, plan, convert, settings) for plan in todo]) if todo else ()
        for rec in results:
            records.append(rec)
            bar.update(len(rec["rows"]) + len(rec["skipped"]))
            bar.set_postfix(skipped=sum(len(r["skipped"]) for r in records), refresh=False)
    finally:
        bar.close()

    records.sort(key=lambda r: r["shard"])
    rows = [row for r in records for row in r["rows"]]
    skipped = [s for r in records for s in r["skipped"]]
    extra = {"settings": settings, "shards_resumed": resumed, **(extra_report or {})}
    report = build_report(out, jobs, rows, skipped, records, time.perf_counter() - start, len(todo), extra)
    atomic_write_bytes(fs, join(path, REPORT_NAME), json.dumps(report, indent=2).encode())
    if not rows:
        first = f"; first: {skipped[0]['key']}: {skipped[0]['reason']}" if skipped else ""
        raise PrepError(
            f"{desc}: no usable samples in {len(jobs)} inputs{first} "
            f"(all reasons in {join(out, REPORT_NAME)})"
        )
    frac = len(skipped) / len(jobs)
    if frac > max_skip_fraction:
        raise PrepError(
            f"{desc}: skipped {len(skipped)} of {len(jobs)} inputs "
            f"({frac:.1%} > limit {max_skip_fraction:.1%}, see --max-skip-fraction); "
            f"first: {skipped[0]['key']}: {skipped[0]['reason']} "
            f"(all reasons in {join(out, REPORT_NAME)})"
        )
    kept = _kept_manifest_rows(out, fs, path, plans)
    report["removed_stale_files"] = _remove_stale(fs, path, plans)
    report["manifest_rows_kept"] = len(kept)
    write_manifest(out, kept + rows)
    atomic_write_bytes(fs, join(path, REPORT_NAME), json.dumps(report, indent=2).encode())
    return report


def build_report(out, jobs, rows, skipped, records, seconds, converted_shards, extra) -> dict:
    """The run summary written to ``prep_report.json`` (see format_report for the table)."""
    num_classes = len(class_names())
    counts = np.sum([r["class_counts"] for r in records], axis=0) if records else np.zeros(num_classes)
    total = max(int(np.sum(counts)), 1)
    per_split: dict[str, dict[str, int]] = {}
    for j in sorted(jobs, key=lambda j: (j.domain, j.split)):
        per_split.setdefault(f"{j.domain}/{j.split}", {"samples": 0, "labeled": 0, "skipped": 0})
    for r in rows:
        entry = per_split[f"{r['domain']}/{r['split']}"]
        entry["samples"] += 1
        entry["labeled"] += int(r["has_label"])
    split_of = {j.key: f"{j.domain}/{j.split}" for j in jobs}
    for s in skipped:
        per_split[split_of[s["key"]]]["skipped"] += 1
    warnings = [w for r in records for w in r.get("warnings", [])]
    report = {
        "out": out,
        "manifest": join(out, MANIFEST_NAME),
        "inputs": len(jobs),
        "samples": len(rows),
        "per_split": per_split,
        "samples_per_split": {k: v["samples"] for k, v in per_split.items()},
        "labeled": sum(r["has_label"] for r in rows),
        "skipped": skipped,
        "num_skipped": len(skipped),
        "warnings": warnings,
        "num_warnings": len(warnings),
        "shards": len([r for r in records if r["rows"]]),
        "shards_converted_this_run": converted_shards,
        "class_frequency": {name: int(c) / total for name, c in zip(class_names(), counts)},
        "class_pixels": {name: int(c) for name, c in zip(class_names(), counts)},
        "seconds": seconds,
        "samples_per_second": len(rows) / seconds if seconds > 0 else float("nan"),
    }
    report.update(extra or {})
    return report


def format_report(report: dict, max_lines: int = 10) -> str:
    """One-screen summary table of a prep report."""
    lines = [f"wrote {report['samples']} samples in {report['shards']} shards to {report['out']} "
             f"({report['seconds']:.1f} s, {report['samples_per_second']:.1f} samples/s; "
             f"{report.get('shards_resumed', 0)} shards resumed)"]
    per_split = report.get("per_split") or {
        k: {"samples": n, "labeled": 0, "skipped": 0} for k, n in report["samples_per_split"].items()
    }
    lines.append(f"  {'domain/split':<28} {'samples':>8} {'labeled':>8} {'skipped':>8}")
    for split, e in per_split.items():
        lines.append(f"  {split:<28} {e['samples']:>8} {e['labeled']:>8} {e['skipped']:>8}")
    lines.append(f"  {'total':<28} {report['samples']:>8} {report['labeled']:>8} {report['num_skipped']:>8}")
    for title, items, fmt in (
        ("skipped", report["skipped"], lambda s: f"{s['key']}: {s['reason']}"),
        ("warnings", report.get("warnings", []), lambda w: f"{w['key']}: {w['message']}"),
    ):
        if items:
            lines.append(f"  {title} ({len(items)}):")
            lines.extend(f"    {fmt(item)}" for item in items[:max_lines])
            if len(items) > max_lines:
                lines.append(f"    ... {len(items) - max_lines} more in {join(report['out'], REPORT_NAME)}")
    freq = {k: v for k, v in report["class_frequency"].items() if v > 0}
    if freq:
        lines.append("  class frequency (% of labeled pixels):")
        ranked = sorted(freq.items(), key=lambda kv: -kv[1])
        lines.append("    " + ", ".join(f"{k} {100 * v:.1f}" for k, v in ranked))
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# CLI options shared by every converter
# --------------------------------------------------------------------------------------


def add_common_arguments(parser: argparse.ArgumentParser, *, default_shard_size: int = 64) -> None:
    """Options every ``sdeseg prep`` target takes (output, parallelism, limits, format)."""
    parser.add_argument("--out", required=True, help="output directory: a path or fsspec URL "
                        "(file://; s3://, gs:// with the fsspec backend installed)")
    g = parser.add_argument_group("conversion")
    g.add_argument("--shard-size", type=int, default=default_shard_size,
                   help="samples per shard (default %(default)s)")
    g.add_argument("--procs", type=int, default=None, help="local worker processes (default: all CPU cores)")
    g.add_argument("--ray", action="store_true",
                   help="convert shards as Ray tasks (connects to RAY_ADDRESS or starts a local cluster)")
    g.add_argument("--ray-address", default=None, help="address of the Ray cluster to use (implies --ray)")
    g.add_argument("--max-skip-fraction", type=float, default=0.05,
                   help="fail when more than this fraction of inputs is skipped (default %(default)s)")
    g.add_argument("--image-format", choices=IMAGE_EXTS, default="png",
                   help="encoding of stored frames: png (lossless) or jpg (q95, ~3x faster to decode)")
    g.add_argument("--overwrite", action="store_true", help="convert every shard again instead of resuming")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def executor_from_args(args: argparse.Namespace) -> Executor | None:
    """The Ray executor when ``--ray``/``--ray-address`` is given, else None (local processes)."""
    if not (args.ray or args.ray_address):
        return None
    # imported lazily: sdeseg.runtime is the only package that imports ray
    from sdeseg.runtime.prep_executor import ray_executor

    return ray_executor(args.ray_address)


def run_conversion(
    args: argparse.Namespace,
    jobs_fn: Callable[[], tuple[list[Job], dict]],
    convert: Callable[[Job], dict],
    *,
    desc: str,
    settings: dict,
) -> int:
    """List jobs, write shards with the common options, print the summary; the exit code.

    ``jobs_fn`` returns ``(jobs, extra_report)``; a PrepError from it or from the
    conversion is printed as one clear line and gives exit code 1.
    """
    try:
        jobs, extra = jobs_fn()
        report = write_shards(
            args.out, jobs, convert,
            shard_size=args.shard_size,
            procs=args.procs,
            executor=executor_from_args(args),
            max_skip_fraction=args.max_skip_fraction,
            desc=desc,
            progress=not args.no_progress,
            extra_report=extra,
            settings={**settings, "image_format": args.image_format},
            overwrite=args.overwrite,
        )
    except PrepError as e:
        print(f"sdeseg prep {desc}: error: {e}", file=sys.stderr)
        return 1
    print(format_report(report))
    return 0


# --------------------------------------------------------------------------------------
# Image helpers shared by the image converters
# --------------------------------------------------------------------------------------


def size_arg(text: str, min_side: int = 1) -> tuple[int, int]:
    """argparse ``type`` of ``--size``: ``"512x1024"`` -> (512, 1024) (height, width).

    Parsed by ``sdeseg.config.parse_size`` (the one size parser), its ConfigError turned
    into argparse's error; sides below ``min_side`` are refused too (bind it with
    ``functools.partial`` for a converter that needs a minimum).
    """
    try:
        h, w = parse_size(text, "size")
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("size: ")) from None
    if h < min_side or w < min_side:
        raise argparse.ArgumentTypeError(f"size must be at least {min_side}x{min_side}, got {text!r}")
    return h, w


def parse_splits(text: str) -> tuple[str, ...]:
    """``"train,val"`` -> ("train", "val"); names must be usable in sample keys."""
    splits = tuple(s.strip() for s in text.split(",") if s.strip())
    bad = [s for s in splits if not re.fullmatch(r"[A-Za-z0-9_]+", s)]
    if not splits or bad:
        raise argparse.ArgumentTypeError(f"splits must be comma-separated names like train,val; got {text!r}")
    return splits


def read_bytes(fs, root: str, rel: str, what: str) -> bytes:
    """The bytes of ``root/rel``; a missing or unreadable file becomes a SkipSample naming it."""
    try:
        with fs.open(join(root, rel), "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise SkipSample(f"missing {what} {rel}") from None
    except OSError as e:
        raise SkipSample(f"cannot read {what} {rel} ({e})") from e


def read_image(fs, root: str, rel: str, what: str) -> Image.Image:
    """Open and fully decode ``root/rel``; every failure becomes a SkipSample naming the file."""
    data = read_bytes(fs, root, rel, what)
    try:
        img = Image.open(io.BytesIO(data))
        img.load()  # decoding errors of truncated files surface here, not in open()
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, zlib.error ... on bad data
        raise SkipSample(f"corrupt {what} {rel} ({type(e).__name__}: {e})") from e
    return img


def rgb_of(img: Image.Image) -> Image.Image:
    return img if img.mode == "RGB" else img.convert("RGB")


def label_ids_of(img: Image.Image, rel: str) -> np.ndarray:
    """Label ids of an 8-bit grayscale / palette / 16-bit label PNG as (H,W) uint8.

    Raises SkipSample for colour images (e.g. gtFine_color given instead of labelIds)
    and for ids outside the official Cityscapes tables (e.g. a labelTrainIds file, whose
    255s are not label ids): both mean the file is not what the converter expects.
    """
    if img.mode not in ("L", "P", "I", "I;16"):
        raise SkipSample(f"label {rel} has mode {img.mode}, expected a one-channel image of label ids")
    ids = np.asarray(img)
    unknown = np.setdiff1d(np.unique(ids), known_label_ids())
    if unknown.size:
        shown = ", ".join(str(int(v)) for v in unknown[:8]) + (" ..." if unknown.size > 8 else "")
        raise SkipSample(f"label {rel} has ids {shown} that are not Cityscapes label ids (0..33)")
    return ids.astype(np.uint8)


def resize_rgb(img: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """RGB image -> (H,W,3) uint8 at ``size`` = (H, W).

    Shrinking uses area averaging (BOX) so thin structures are not aliased away;
    enlarging (only for inputs smaller than the stored size) is bilinear.
    """
    h, w = size
    img = rgb_of(img)
    if img.size != (w, h):
        shrink = w <= img.width and h <= img.height
        img = img.resize((w, h), Image.Resampling.BOX if shrink else Image.Resampling.BILINEAR)
    return np.asarray(img)


def resize_label(label: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H,W) uint8 or uint16 ids -> ``size`` with nearest neighbour (ids must never be averaged)."""
    h, w = size
    if label.shape == (h, w):
        return label
    return np.asarray(Image.fromarray(label).resize((w, h), Image.Resampling.NEAREST))


def intrinsics_matrix(fx: float, fy: float, cx: float, cy: float) -> np.ndarray:
    vals = (fx, fy, cx, cy)
    if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in vals) or fx <= 0 or fy <= 0:
        raise ValueError(f"intrinsics must be finite numbers with fx, fy > 0, got {vals}")
    return np.array([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]])


def find_layout_hint(fs, root: str, wanted: tuple[str, ...], depth: int = 2) -> str | None:
    """A folder near ``root`` that contains one of ``wanted`` (for "did you mean ...?").

    Looks below ``root`` (up to ``depth`` levels, e.g. ROOT/cityscapes) and at its
    parents (ROOT given as ROOT/leftImg8bit or ROOT/leftImg8bit/train).
    """
    level, budget = [root], 200  # bounded: on object storage every listing is a request
    for _ in range(depth):
        nxt = []
        for d in level[:budget]:
            budget -= 1
            try:
                children = sorted(e["name"] for e in fs.ls(d, detail=True) if e["type"] == "directory")
            except OSError:
                continue
            for c in children:
                if any(fs.isdir(join(c, w)) for w in wanted):
                    return c
            nxt.extend(children)
        level = nxt
    parent = root.rstrip("/")
    for _ in range(3):
        if "/" not in parent.strip("/"):
            break
        parent = parent.rsplit("/", 1)[0] or "/"
        if any(fs.isdir(join(parent, w)) for w in wanted):
            return parent
    return None


def check_root(fs, root: str, root_url: str, dataset: str, wanted: tuple[str, ...], layout: str) -> None:
    """PrepError with a clear message unless ``root`` holds one of the ``wanted`` folders."""
    if not fs.exists(root):
        raise PrepError(f"--root {root_url} does not exist")
    if not fs.isdir(root):
        raise PrepError(f"--root {root_url} is a file, expected the {dataset} folder ({layout})")
    if not fs.ls(root, detail=False):
        raise PrepError(f"--root {root_url} is empty, expected the {dataset} layout ({layout})")
    if any(fs.isdir(join(root, w)) for w in wanted):
        return
    names = " or ".join(f"{w}/" for w in wanted)
    hint = find_layout_hint(fs, root, wanted)
    proto = root_url.split("://", 1)[0] + "://" if "://" in root_url else ""
    suggestion = f"; did you mean {proto}{hint}?" if hint else f"; expected the {dataset} layout ({layout})"
    raise PrepError(f"no {names} under {root_url}{suggestion}")
