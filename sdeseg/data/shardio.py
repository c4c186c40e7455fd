"""Reading shards against their manifest: selection, validation, tar scanning, collation.

Shared by the training stream (``reader.ShardStream``), the validation loader and the
labeled pool. Shards are opened with fsspec (local paths or URLs such as ``file://``,
``s3://``) and parsed as a tar *stream* by WebDataset's ``tar_file_iterator``, so a
remote shard is read front to back once, never seeked.
"""

from __future__ import annotations

import logging
import posixpath
import tarfile
from collections.abc import Iterable, Iterator
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
import torch
from webdataset.tariterators import base_plus_ext, tar_file_iterator

from sdeseg.data.batch import Batch
from sdeseg.data.classes import IGNORE_INDEX
from sdeseg.data.codec import FRAME_NAMES, INSTANCE_MEMBER, SampleError, decode_sample
from sdeseg.data.manifest import DatasetError, join, read_manifest

log = logging.getLogger(__name__)

# Below this many samples a reader does not judge the corrupt fraction yet: one bad
# sample among the first three would otherwise stop a healthy run.
MIN_SEEN_FOR_FRACTION = 16


# ----------------------------------------------------------------------------- manifest


@dataclass(frozen=True)
class ShardIndex:
    """The manifest of one dataset root, grouped by shard.

    ``shard_keys[name]`` lists every key of shard ``name`` in tar order (the manifest's
    ``index``); ``rows[key]`` is the manifest row of ``key``.
    """

    root: str
    shard_keys: dict[str, list[str]]
    rows: dict[str, dict[str, Any]]

    @classmethod
    def load(cls, root: str) -> ShardIndex:
        """Read and check ``<root>/manifest.parquet``: unique keys, indices 0..n-1 per shard."""
        manifest = join(root, "manifest.parquet")
        rows = read_manifest(root)
        by_key: dict[str, dict[str, Any]] = {}
        by_shard: dict[str, list[dict[str, Any]]] = {}
        for row in rows:
            if row["key"] in by_key:
                raise DatasetError(f"{manifest}: key {row['key']!r} appears twice")
            by_key[row["key"]] = row
            by_shard.setdefault(row["shard"], []).append(row)
        shard_keys = {}
        for name in sorted(by_shard):
            group = sorted(by_shard[name], key=lambda r: r["index"])
            if [r["index"] for r in group] != list(range(len(group))):
                raise DatasetError(f"{manifest}: indices of shard {name} are not 0..{len(group) - 1}")
            shard_keys[name] = [r["key"] for r in group]
        return cls(root, shard_keys, by_key)

    def select(
        self,
        split: str | None,
        domain: str | None = None,
        keys: Iterable[str] | None = None,
        exclude_keys: Iterable[str] | None = None,
    ) -> dict[str, list[int]]:
        """Indices (tar positions) of the chosen samples, per shard in name order.

        ``keys`` is a whitelist (each must exist in the split/domain, else DatasetError);
        ``exclude_keys`` a blacklist (unknown keys are ignored).
        """
        want = None if keys is None else set(keys)
        if want is not None:
            unknown = sorted(k for k in want if not self._matches(self.rows.get(k), split, domain))
            if unknown:
                raise unknown_keys_error(self.root, unknown, split, domain)
        drop = set(exclude_keys or ())
        out: dict[str, list[int]] = {}
        for name, skeys in self.shard_keys.items():
            idx = [
                i
                for i, k in enumerate(skeys)
                if self._matches(self.rows[k], split, domain) and (want is None or k in want)
                and k not in drop
            ]
            if idx:
                out[name] = idx
        return out

    @staticmethod
    def _matches(row: dict[str, Any] | None, split: str | None, domain: str | None) -> bool:
        return (
            row is not None
            and (split is None or row["split"] == split)
            and (domain is None or row["domain"] == domain)
        )

    def check_shards_exist(self, names: Iterable[str]) -> None:
        """Raise DatasetError naming the first shard file of ``names`` that is missing.

        One directory listing instead of one ``exists`` call per shard: on object storage
        that is one request instead of thousands.
        """
        fs, path = fsspec.core.url_to_fs(self.root)
        present = {posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False)}
        missing = sorted(n for n in names if n not in present)
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise DatasetError(
                f"shard {join(self.root, missing[0])} is listed in the manifest but does not exist{more}"
            )

    def check_sizes(self, selection: dict[str, list[int]], crop: tuple[int, int] | None) -> None:
        """Fail before reading anything when a sample is smaller than the crop or, without a
        crop, when the samples differ in size (they could not share a batch)."""
        rows = [self.rows[self.shard_keys[name][i]] for name, idx in selection.items() for i in idx]
        if crop is None:
            sizes = sorted({(r["height"], r["width"]) for r in rows})
            if len(sizes) > 1:
                raise DatasetError(f"{self.root}: the chosen samples mix image sizes {sizes[:4]}; "
                                   "full-size batches need one size (set a crop or choose a domain)")
            return
        for row in rows:
            if row["height"] < crop[0] or row["width"] < crop[1]:
                raise DatasetError(
                    f"{join(self.root, row['shard'])}: sample {row['key']} is {row['height']}x{row['width']}, "
                    f"smaller than the crop {crop[0]}x{crop[1]}"
                )


def unknown_keys_error(root: str, unknown: list[str], split: str | None, domain: str | None) -> DatasetError:
    parts = (f"split {split!r}" if split else "", f"domain {domain!r}" if domain else "")
    where = " and ".join(p for p in parts if p)
    shown = ", ".join(repr(k) for k in unknown[:5])
    return DatasetError(
        f"{len(unknown)} key(s) are not in {join(root, 'manifest.parquet')}"
        f"{' with ' + where if where else ''}: {shown}{', ...' if len(unknown) > 5 else ''}"
    )


# ----------------------------------------------------------------------------- tar scanning


class BrokenShard(Exception):
    """The tar stream itself cannot be read past some point (truncated, bad header)."""


class _Abort(Exception):
    """Raised inside WebDataset's member loop to stop it; the reason is kept outside."""


def scan_shard(
    root: str, shard: str, keys: list[str], wanted: Iterable[int], fs=None
) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(index, members)`` for the ``wanted`` tar positions of one shard, in order.

    ``keys`` are the manifest's keys of the shard (tar order). Members of unwanted samples
    are skipped without being read into memory or decoded; reading stops after the last
    wanted sample. ``members`` is ``{"__key__": key, "cur.png": bytes, "json": bytes, ...}``
    (what ``decode_sample`` takes).

    Raises:
        DatasetError: the tar disagrees with the manifest up to the last wanted position
            (another key at a position, or the tar ends early); names the file and key.
        BrokenShard: the tar stream is unreadable from some point on (truncated, bad header).
    """
    url = join(root, shard)
    wanted = sorted(set(wanted))
    if not wanted:
        return
    want = set(wanted)
    stop = wanted[-1] + 1
    if stop > len(keys):
        raise ValueError(f"{url}: position {stop - 1} requested, manifest lists {len(keys)} samples")
    st = {"pos": -1, "key": None, "error": None}

    def select(fname: str) -> bool:
        key, _ = base_plus_ext(fname)
        if key != st["key"]:
            st["pos"] += 1
            st["key"] = key
            pos = st["pos"]
            if pos >= stop:
                raise _Abort()  # past the last wanted sample: stop reading this shard
            if key != keys[pos]:
                st["error"] = (
                    f"shard {url} disagrees with its manifest: sample #{pos} is {key!r}, "
                    f"the manifest lists {keys[pos]!r} there (re-run data prep)"
                )
                raise _Abort()
        return st["pos"] in want

    def handler(exn: Exception) -> bool:
        # WebDataset passes exceptions from inside its member loop here; returning False
        # ends the loop. Anything but our own stop signal means the tar data is broken.
        if not isinstance(exn, _Abort):
            st["error_broken"] = f"{type(exn).__name__}: {exn}"
        return False

    fs = fs or fsspec.core.url_to_fs(root)[0]
    path = fsspec.core.url_to_fs(url)[1]
    current: dict[str, Any] | None = None
    current_pos = -1
    try:
        with fs.open(path, "rb") as f:
            for member in tar_file_iterator(f, select_files=select, handler=handler):
                key, suffix = base_plus_ext(member["fname"])
                if current is not None and key != current["__key__"]:
                    yield current_pos, current
                    current = None
                if current is None:
                    current, current_pos = {"__key__": key}, st["pos"]
                current[suffix.lower()] = member["data"]
    except (tarfile.TarError, EOFError, OSError) as e:
        if isinstance(e, FileNotFoundError):
            raise DatasetError(f"shard {url} does not exist") from e
        st["error_broken"] = f"{type(e).__name__}: {e}"
    if st["error"]:
        raise DatasetError(st["error"])
    if st.get("error_broken"):
        # The sample being assembled may have lost members: it is not delivered. The caller
        # treats every wanted sample it did not receive as corrupt.
        first = max(st["pos"], 0)
        raise BrokenShard(f"shard {url} is unreadable from sample #{first} on: {st['error_broken']}")
    if current is not None:
        yield current_pos, current
    if st["pos"] + 1 < stop:
        missing = keys[st["pos"] + 1]
        raise DatasetError(
            f"shard {url} disagrees with its manifest: it ends after {st['pos'] + 1} samples, "
            f"the manifest lists {len(keys)}; missing {missing!r}"
        )


# ----------------------------------------------------------------------------- decode + collate


def decode_members(members: dict[str, Any], frames: tuple[int, ...],
                   labels: bool | AbstractSet[str] = True) -> dict[str, Any]:
    """``decode_sample`` that insists on every requested frame (a batch needs all of them).

    ``labels=False`` drops ``label.png`` and ``instance.png`` before decoding (unlabeled streams
    never see labels); a set of keys keeps them only for those samples (the few labeled images
    met in a stream of the whole split).
    """
    if not isinstance(labels, bool):
        labels = members.get("__key__") in labels
    if not labels and ("label.png" in members or INSTANCE_MEMBER in members):
        members = {k: v for k, v in members.items() if k not in ("label.png", INSTANCE_MEMBER)}
    sample = decode_sample(members, frames)
    absent = [fid for fid in frames if fid not in sample["frames"]]
    if absent:
        names = ", ".join(FRAME_NAMES[f] for f in absent)
        raise SampleError(f"{sample['key']}: frames {names} requested (frames={frames}), not in the sample")
    return sample


def collate(samples: list[dict[str, Any]], frames: tuple[int, ...], as_float: bool = True) -> Batch:
    """Stack per-sample tensors (``augment.augment_sample`` layout) into a Batch.

    Shapes: images/images_aug {fid: (B,3,H,W)} float32 in [0,1] (uint8 with ``as_float=False``;
    see :meth:`Batch.as_float`), K/inv_K (B,3,3), label (B,H,W) int64 with 255 for unlabeled
    samples (None when no sample has one), depth (B,1,H,W) with 0 where a sample has none
    (None when none has), instance (B,H,W) int64 Cityscapes instanceIds with 0 ("unlabeled")
    for samples without a map (None when none has), T {fid: (B,4,4)} only when every sample
    has it, geometry (B,5) the crop and flip of each sample (``augment.apply_geometry``) when
    every sample records it.
    """
    images = {fid: torch.stack([s["images"][fid] for s in samples]) for fid in frames}
    if all(s["images_aug"] is None for s in samples):
        images_aug = images  # no jitter: the same tensors, no copy
    else:
        images_aug = {
            fid: torch.stack([(s["images_aug"] or s["images"])[fid] for s in samples]) for fid in frames
        }
    K = torch.stack([s["K"] for s in samples])
    inv_K = torch.linalg.inv(K.double()).float()  # float64 inverse: exact enough for any K
    h, w = images[frames[0]].shape[-2:]
    label = None
    if any(s["label"] is not None for s in samples):
        label = torch.stack(
            [s["label"] if s["label"] is not None else torch.full((h, w), IGNORE_INDEX, dtype=torch.int64)
             for s in samples]
        )
    depth = None
    if any(s["depth"] is not None for s in samples):
        depth = torch.stack([s["depth"] if s["depth"] is not None else torch.zeros(1, h, w) for s in samples])
    instance = None
    if any(s.get("instance") is not None for s in samples):
        instance = torch.stack([s["instance"] if s.get("instance") is not None
                                else torch.zeros(h, w, dtype=torch.int64) for s in samples])
    T = None
    neighbours = [fid for fid in frames if fid != 0]
    if neighbours and all(fid in s["T"] for s in samples for fid in neighbours):
        T = {fid: torch.stack([s["T"][fid] for s in samples]) for fid in neighbours}
    geometry = None
    if all("geometry" in s for s in samples):
        geometry = torch.stack([s["geometry"] for s in samples])
    batch = Batch(
        keys=[s["key"] for s in samples], images=images, images_aug=images_aug, K=K, inv_K=inv_K,
        label=label, depth=depth, T=T, geometry=geometry, instance=instance,
    )
    return batch.as_float() if as_float else batch


class CorruptTracker:
    """Counts skipped samples of one reader and fails past ``max_fraction`` of those seen."""

    def __init__(self, max_fraction: float, where: str):
        self.max_fraction = max_fraction
        self.where = where
        self.good = 0
        self.bad = 0
        self.last: str = ""

    def skip(self, key: str, shard: str, reason: str) -> None:
        self.bad += 1
        self.last = f"{key} in {shard} ({reason})"
        log.warning("skipping corrupt sample %s in %s: %s", key, shard, reason)

    def check(self, min_seen: int = MIN_SEEN_FOR_FRACTION) -> None:
        seen = self.good + self.bad
        if self.bad and seen >= min_seen and self.bad > self.max_fraction * seen:
            raise RuntimeError(
                f"{self.where}: {self.bad} of {seen} samples were corrupt ({self.bad / seen:.1%} > "
                f"max_corrupt_fraction {self.max_fraction:.1%}); last: {self.last}"
            )


def seeded_rng(*entropy: int) -> np.random.Generator:
    """A numpy Generator from a tuple of non-negative ints (order matters)."""
    return np.random.default_rng(np.random.SeedSequence([int(e) for e in entropy]))


__all__ = [
    "ShardIndex", "scan_shard", "BrokenShard", "decode_members", "collate",
    "CorruptTracker", "seeded_rng", "unknown_keys_error",
]
