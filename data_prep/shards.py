"""Shared machinery of every converter: jobs -> atomic WebDataset shards + manifest + report.

A converter lists *jobs* (one per output sample, cheap to create) and a top-level,
picklable ``convert(job) -> members`` function that loads/renders one sample and
returns its encoded members (``sdeseg.data.codec.encode_sample``) or raises
:class:`SkipSample`. ``write_shards`` then

* assigns jobs to shards deterministically (sorted by domain, split, key; fixed
  ``shard_size``), so a re-run produces the same shard names and contents;
* converts shards in parallel (local processes, or any ``executor``, e.g. Ray tasks);
* writes each shard under a temporary name and renames it, then writes a small
  sidecar ``<shard>.json`` (manifest rows, skips, class counts) the same way: a shard
  whose sidecar exists is finished and is skipped on re-runs, so an interrupted
  conversion resumes and never leaves a partial shard under its final name;
* writes ``manifest.parquet`` and ``prep_report.json`` at the end.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from multiprocessing import get_context
from typing import Any

import fsspec
import numpy as np
import webdataset as wds
from tqdm import tqdm

from sdeseg.data.classes import IGNORE_INDEX, class_names
from sdeseg.data.codec import decode_image
from sdeseg.data.manifest import MANIFEST_NAME, join, write_manifest

REPORT_NAME = "prep_report.json"


class SkipSample(Exception):
    """Raised by a converter for an input it cannot use; the reason goes into the report."""


class PrepError(RuntimeError):
    """Conversion cannot produce a usable dataset (nothing usable, or too many skips)."""


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


def plan_shards(jobs: Iterable[Job], shard_size: int) -> list[ShardPlan]:
    """Deterministic assignment of jobs to shards, grouped by (domain, split)."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    jobs = sorted(jobs, key=lambda j: (j.domain, j.split, j.key))
    keys = [j.key for j in jobs]
    dupes = [k for k, n in Counter(keys).items() if n > 1]
    if dupes:
        raise PrepError(f"duplicate sample keys, e.g. {dupes[:3]}")
    plans: list[ShardPlan] = []
    groups: dict[tuple[str, str], list[Job]] = {}
    for j in jobs:
        groups.setdefault((j.domain, j.split), []).append(j)
    for (domain, split), group in groups.items():
        for i in range(0, len(group), shard_size):
            plans.append(ShardPlan(f"{domain}-{split}-{i // shard_size:05d}.tar", tuple(group[i : i + shard_size])))
    return plans


def _sidecar(name: str) -> str:
    return name[: -len(".tar")] + ".json"


def _atomic_write_bytes(fs, path: str, data: bytes) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with fs.open(tmp, "wb") as f:
        f.write(data)
    fs.mv(tmp, path)


def convert_shard(root: str, plan: ShardPlan, convert: Callable[[Job], dict]) -> dict:
    """Convert one shard (runs in a worker). Returns its sidecar record."""
    fs, path = fsspec.core.url_to_fs(root)
    start = time.perf_counter()
    rows, skipped = [], []
    class_counts = np.zeros(len(class_names()), dtype=np.int64)
    final = join(path, plan.name)
    tmp = f"{final}.tmp-{os.getpid()}"
    with fs.open(tmp, "wb") as f:
        writer = wds.TarWriter(f, encoder=False, mtime=0.0)
        for job in plan.jobs:
            try:
                members = convert(job)
            except SkipSample as e:
                skipped.append({"key": job.key, "reason": str(e), "source": job.source})
                continue
            meta = json.loads(members["json"])
            if "label.png" in members:
                label = decode_image(members["label.png"])
                counts = np.bincount(label[label != IGNORE_INDEX].ravel(), minlength=len(class_names()))
                class_counts += counts[: len(class_names())]
            writer.write(members)
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
        writer.close()
    if rows:
        fs.mv(tmp, final)
    else:  # an empty tar is useless to readers; record the skips only
        fs.rm(tmp)
    record = {
        "shard": plan.name,
        "rows": rows,
        "skipped": skipped,
        "class_counts": class_counts.tolist(),
        "seconds": time.perf_counter() - start,
    }
    _atomic_write_bytes(fs, join(path, _sidecar(plan.name)), json.dumps(record).encode())
    return record


def _load_finished(fs, path: str, plan: ShardPlan) -> dict | None:
    side = join(path, _sidecar(plan.name))
    if not fs.exists(side):
        return None
    try:
        with fs.open(side, "rb") as f:
            record = json.loads(f.read())
    except ValueError:
        return None
    expected = {j.key for j in plan.jobs}
    done = {r["key"] for r in record["rows"]} | {s["key"] for s in record["skipped"]}
    if done != expected or (record["rows"] and not fs.exists(join(path, plan.name))):
        return None  # written by a different plan, or the tar vanished: redo
    record["resumed"] = True
    return record


def _local_executor(procs: int) -> Callable[[Callable, list[tuple]], Iterator]:
    def run(fn: Callable, arglist: list[tuple]) -> Iterator:
        if procs <= 1 or len(arglist) <= 1:
            for args in arglist:
                yield fn(*args)
            return
        # spawn: workers must not inherit torch/thread state of the parent
        with ProcessPoolExecutor(max_workers=procs, mp_context=get_context("spawn")) as pool:
            futures = [pool.submit(fn, *args) for args in arglist]
            for fut in as_completed(futures):
                yield fut.result()

    return run


def write_shards(
    out: str,
    jobs: list[Job],
    convert: Callable[[Job], dict],
    *,
    shard_size: int = 64,
    procs: int | None = None,
    executor: Callable[[Callable, list[tuple]], Iterator] | None = None,
    max_skip_fraction: float = 0.05,
    desc: str = "prep",
    progress: bool = True,
    extra_report: dict | None = None,
) -> dict:
    """Convert ``jobs`` into shards under ``out`` (path or fsspec URL); return the report.

    Raises PrepError when there are no jobs, nothing could be converted, or more than
    ``max_skip_fraction`` of the jobs were skipped (the report is written first, so the
    reasons can be read).
    """
    if not jobs:
        raise PrepError(f"{desc}: found no input samples")
    start = time.perf_counter()
    fs, path = fsspec.core.url_to_fs(out)
    fs.makedirs(path, exist_ok=True)
    plans = plan_shards(jobs, shard_size)
    records, todo = [], []
    for plan in plans:
        rec = _load_finished(fs, path, plan)
        (records.append(rec) if rec is not None else todo.append(plan))
    run = executor or _local_executor(procs if procs is not None else max(1, os.cpu_count() or 1))
    bar = tqdm(total=len(jobs), initial=sum(len(r["rows"]) + len(r["skipped"]) for r in records),
               desc=desc, unit="sample", disable=not progress)
    for rec in run(convert_shard, [(out, plan, convert) for plan in todo]):
        records.append(rec)
        bar.update(len(rec["rows"]) + len(rec["skipped"]))
    bar.close()

    records.sort(key=lambda r: r["shard"])
    rows = [row for r in records for row in r["rows"]]
    skipped = [s for r in records for s in r["skipped"]]
    report = build_report(out, rows, skipped, records, time.perf_counter() - start, len(todo), extra_report)
    _atomic_write_bytes(fs, join(path, REPORT_NAME), json.dumps(report, indent=2).encode())
    if not rows:
        raise PrepError(f"{desc}: no usable samples in {len(jobs)} inputs; reasons in {join(out, REPORT_NAME)}")
    frac = len(skipped) / len(jobs)
    if frac > max_skip_fraction:
        raise PrepError(
            f"{desc}: skipped {len(skipped)} of {len(jobs)} inputs ({frac:.1%} > limit {max_skip_fraction:.1%}); "
            f"first: {skipped[0]['key']}: {skipped[0]['reason']} (all in {join(out, REPORT_NAME)})"
        )
    write_manifest(out, rows)
    return report


def build_report(out, rows, skipped, records, seconds, converted_shards, extra) -> dict:
    per_split = Counter(f"{r['domain']}/{r['split']}" for r in rows)
    counts = np.sum([r["class_counts"] for r in records], axis=0) if records else np.zeros(len(class_names()))
    total = max(int(np.sum(counts)), 1)
    report = {
        "out": out,
        "manifest": join(out, MANIFEST_NAME),
        "samples": len(rows),
        "samples_per_split": dict(sorted(per_split.items())),
        "labeled": sum(r["has_label"] for r in rows),
        "skipped": skipped,
        "num_skipped": len(skipped),
        "shards": len([r for r in records if r["rows"]]),
        "shards_converted_this_run": converted_shards,
        "class_frequency": {name: int(c) / total for name, c in zip(class_names(), counts)},
        "class_pixels": {name: int(c) for name, c in zip(class_names(), counts)},
        "seconds": seconds,
        "samples_per_second": len(rows) / seconds if seconds > 0 else float("nan"),
    }
    if extra:
        report.update(extra)
    return report


def format_report(report: dict) -> str:
    """One-screen summary table of a prep report."""
    lines = [f"wrote {report['samples']} samples in {report['shards']} shards to {report['out']} "
             f"({report['seconds']:.1f} s, {report['samples_per_second']:.1f} samples/s)"]
    for split, n in report["samples_per_split"].items():
        lines.append(f"  {split:<28} {n:>8}")
    lines.append(f"  labeled: {report['labeled']}   skipped: {report['num_skipped']}")
    for s in report["skipped"][:10]:
        lines.append(f"    skipped {s['key']}: {s['reason']}")
    freq = {k: v for k, v in report["class_frequency"].items() if v > 0}
    if freq:
        lines.append("  class frequency (% of labeled pixels):")
        lines.append("    " + ", ".join(f"{k} {100 * v:.1f}" for k, v in sorted(freq.items(), key=lambda kv: -kv[1])))
    return "\n".join(lines)
