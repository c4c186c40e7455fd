"""Derived datasets (``sdeseg infer``): predictions stored by source sample key, joined back by key.

A derived dataset has the layout of a shard dataset — tar shards and a ``manifest.parquet``
— whose keys are the keys of the source samples it was computed from (see ``sdeseg.infer``
for its members). Source shards are never rewritten: a consumer reads the source stream and
looks its keys up here.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch
from PIL import Image

from sdeseg.data.codec import decode_image, decode_instance
from sdeseg.data.manifest import DatasetError, join, write_manifest
from sdeseg.data.shardio import ShardIndex, decode_members, scan_shard


def decode_member(name: str, data: bytes) -> np.ndarray:
    """A derived member's array: ``.npy`` loaded (no pickle), ``.png`` decoded (a 16-bit
    grayscale PNG, e.g. ``regions.png``, as (H,W) int32)."""
    if name.endswith(".npy"):
        return np.load(io.BytesIO(data), allow_pickle=False)
    if name.endswith(".png"):
        with Image.open(io.BytesIO(data)) as img:
            sixteen_bit = img.mode in ("I;16", "I")
        return decode_instance(data) if sixteen_bit else decode_image(data)
    raise ValueError(f"unknown derived member type {name!r}")


class DerivedDataset:
    """Read-only view of a derived dataset by source key.

    ``info`` is its ``derived.json`` (the model, the source root and the outputs it was made with).
    """

    def __init__(self, root: str):
        import fsspec

        self.root = root
        self.index = ShardIndex.load(root)
        fs, path = fsspec.core.url_to_fs(root)
        try:
            self.info: dict[str, Any] = json.loads(fs.cat(join(path, "derived.json")))
        except FileNotFoundError as e:
            raise DatasetError(f"{join(root, 'derived.json')} does not exist: {root} is not a derived dataset") from e

    def __contains__(self, key: str) -> bool:
        return key in self.index.rows

    def __len__(self) -> int:
        return len(self.index.rows)

    def check_covers(self, rows: Iterable[dict[str, Any]], what: str, of: str = "samples") -> None:
        """DatasetError unless every source manifest row (``key``, ``height``, ``width``) has a
        derived sample here at the image's stored size; ``what`` names the member in the message
        (e.g. "depth"), ``of`` the rows (e.g. "source samples")."""
        rows = list(rows)
        missing = [r["key"] for r in rows if r["key"] not in self]
        if missing:
            raise DatasetError(f"{self.root} has no {what} for {len(missing)} of the {len(rows)} {of}, "
                               f"e.g. {missing[:3]}")
        for r in rows:
            d = self.index.rows[r["key"]]
            if (d["height"], d["width"]) != (r["height"], r["width"]):
                raise DatasetError(f"{self.root}: {what} of {r['key']} is {d['height']}x{d['width']}, the image is "
                                   f"{r['height']}x{r['width']}")

    def read(self, keys: Iterable[str]) -> dict[str, dict[str, np.ndarray]]:
        """``{key: {member name: array}}`` for ``keys``; DatasetError naming missing keys."""
        keys = list(keys)
        missing = [k for k in keys if k not in self.index.rows]
        if missing:
            raise DatasetError(f"{self.root} has no derived sample for {len(missing)} key(s), e.g. {missing[:3]} "
                               f"(made from {self.info.get('settings', {}).get('source')})")
        by_shard: dict[str, list[int]] = {}
        for k in keys:
            row = self.index.rows[k]
            by_shard.setdefault(row["shard"], []).append(int(row["index"]))
        out: dict[str, dict[str, np.ndarray]] = {}
        for shard, positions in by_shard.items():
            for _, members in scan_shard(self.root, shard, self.index.shard_keys[shard], positions):
                out[members["__key__"]] = {n: decode_member(n, d) for n, d in members.items() if n != "__key__"}
        return {k: out[k] for k in keys}

    def samples(self) -> Iterator[tuple[str, dict[str, np.ndarray]]]:
        """Every ``(key, {member name: array})`` of the dataset, shard by shard (one pass, one
        sample in memory at a time)."""
        for shard, keys in self.index.shard_keys.items():
            for _, members in scan_shard(self.root, shard, keys, range(len(keys))):
                yield members["__key__"], {n: decode_member(n, d) for n, d in members.items() if n != "__key__"}

    def stack(self, keys: Iterable[str], members: Iterable[str],
              sizes: Iterable[tuple[int, int]] | None = None, uses: dict[str, str] | None = None
              ) -> dict[str, np.ndarray]:
        """``{member: (B,...) array}``: each member of ``keys`` stacked along a new batch
        dimension, from one read. ``sizes`` (each key's image (H, W)) makes a map of another
        size a DatasetError naming the key, as a missing member is; ``uses`` (member -> what
        it is for) goes into that message."""
        keys = list(keys)
        samples = self.read(keys)
        sizes = list(sizes) if sizes is not None else [None] * len(keys)
        out = {}
        for member in members:
            maps = []
            for key, size in zip(keys, sizes):
                if member not in samples[key]:
                    use = f" (for {uses[member]!r})" if uses and member in uses else ""
                    raise DatasetError(f"{self.root}: no member {member!r}{use}; it holds {sorted(samples[key])}")
                m = samples[key][member]
                if size is not None and tuple(m.shape[-2:]) != tuple(size):
                    raise DatasetError(f"{self.root}: {member} of {key} is {m.shape[-2]}x{m.shape[-1]}, the image "
                                       f"is {size[0]}x{size[1]}")
                maps.append(m)
            out[member] = np.stack(maps)
        return out

    def join(self, keys: Iterable[str], member: str) -> torch.Tensor:
        """One member of ``keys`` stacked along a new batch dimension, e.g. ``join(batch.keys,
        "pseudo_depth.npy")`` -> (B,H,W) for a validation batch. The arrays are the model's
        outputs at the stored size: an augmented (cropped, flipped) batch needs the same
        transform applied to them (the training streams' ``derived=`` does)."""
        return torch.from_numpy(self.stack(keys, [member])[member])


def write_derived(source: str, out: str, members_of: Callable[[str, np.ndarray], dict[str, bytes]],
                  settings: dict[str, Any] | None = None) -> str:
    """A derived dataset of ``source`` made by a Python function instead of a model (maps
    precomputed by another tool, benchmarks, tests): sample ``key`` holds ``members_of(key,
    centre frame (H,W,3) uint8)``, encoded member bytes by name (``.npy`` or ``.png``); one tar
    per source shard, then the manifest and ``derived.json`` (``settings``), as ``sdeseg infer``
    lays them out. Returns ``out``."""
    import tarfile

    import fsspec

    from data_prep.shards import write_tar_sample

    index = ShardIndex.load(source)
    fs, path = fsspec.core.url_to_fs(out)
    fs.makedirs(path, exist_ok=True)
    rows = []
    for shard, keys in index.shard_keys.items():
        with fs.open(join(path, shard), "wb") as f, tarfile.open(fileobj=f, mode="w|") as tar:
            for position, members in scan_shard(source, shard, keys, range(len(keys))):
                key = members["__key__"]
                frame = decode_members(members, (0,), labels=False)["frames"][0]
                write_tar_sample(tar, {"__key__": key, **members_of(key, frame)})
                rows.append({**index.rows[key], "index": position, "has_label": False,
                             "height": int(frame.shape[0]), "width": int(frame.shape[1]),
                             "source": json.dumps({"root": source, "shard": shard, "index": position})})
    write_manifest(out, rows)
    with fs.open(join(path, "derived.json"), "w") as f:
        json.dump({"settings": {"source": source, **(settings or {})}}, f)
    return out
