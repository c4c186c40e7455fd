"""``manifest.parquet``: one row per sample of a shard directory."""

from __future__ import annotations

import posixpath
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

MANIFEST_NAME = "manifest.parquet"
MANIFEST_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("shard", pa.string()),  # file name relative to the dataset root
        ("index", pa.int32()),  # position of the sample inside its shard
        ("split", pa.string()),
        ("domain", pa.string()),
        ("has_label", pa.bool_()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("source", pa.string()),  # JSON: source file identifiers
    ]
)


class DatasetError(ValueError):
    """A dataset directory, shard or manifest is missing or inconsistent; names the file."""


def join(root: str, name: str) -> str:
    return posixpath.join(root.rstrip("/"), name)


def write_manifest(root: str, rows: list[dict[str, Any]]) -> str:
    """Write the manifest atomically (temporary name, then rename) and return its URL."""
    fs, path = fsspec.core.url_to_fs(root)
    fs.makedirs(path, exist_ok=True)
    table = pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)
    final = join(path, MANIFEST_NAME)
    tmp = final + ".tmp"
    with fs.open(tmp, "wb") as f:
        pq.write_table(table, f)
    fs.mv(tmp, final)
    return final


def read_manifest(root: str) -> list[dict[str, Any]]:
    """Rows of ``<root>/manifest.parquet``; clear errors for a missing dir or an empty manifest."""
    fs, path = fsspec.core.url_to_fs(root)
    if not fs.exists(path):
        raise DatasetError(f"dataset directory {root} does not exist (run `sdeseg prep ...` first)")
    mpath = join(path, MANIFEST_NAME)
    if not fs.exists(mpath):
        raise DatasetError(f"{join(root, MANIFEST_NAME)} does not exist: {root} is not a prepared shard directory")
    try:
        with fs.open(mpath, "rb") as f:
            table = pq.read_table(f)
    except Exception as e:
        raise DatasetError(f"{join(root, MANIFEST_NAME)} is not a readable parquet file ({e})") from e
    missing = set(MANIFEST_SCHEMA.names) - set(table.column_names)
    if missing:
        raise DatasetError(f"{join(root, MANIFEST_NAME)} lacks columns {sorted(missing)}")
    rows = table.to_pylist()
    if not rows:
        raise DatasetError(f"{join(root, MANIFEST_NAME)} is empty: the dataset holds no samples")
    return rows
