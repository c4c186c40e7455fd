"""The labeled subset of a semi-supervised run: a list of keys, held in memory.

Selecting labels never rewrites shards (docs/architecture.md): a run names its labeled
samples by key (a text file, a seeded random draw, or the selection stage's output) and
``LabeledPool`` reads just those samples once, from just the shards that hold them, and
then serves endless random batches.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Any

import fsspec

from sdeseg.config import AugmentConfig, DataConfig
from sdeseg.data.augment import augment_sample
from sdeseg.data.batch import Batch
from sdeseg.data.classes import IGNORE_INDEX
from sdeseg.data.codec import SampleError
from sdeseg.data.manifest import DatasetError, join
from sdeseg.data.shardio import (
    BrokenShard,
    ShardIndex,
    collate,
    decode_members,
    scan_shard,
    seeded_rng,
    unknown_keys_error,
)

log = logging.getLogger(__name__)

_SEED_PICK, _SEED_ORDER, _SEED_AUG = 11, 12, 13
LARGE_POOL_BYTES = 2 << 30  # warn above this: the pool is meant for few labels


def read_key_list(path: str) -> list[str]:
    """Keys from a key file (path or fsspec URL): text, one key per line, ``#`` starts a
    comment; or JSON, a list of keys or an object with ``"keys"`` (the selection stage's
    ``selection/labeled_keys_<n>.json``).

    Raises DatasetError for a missing or malformed file or a key listed twice (naming the file).
    """
    try:
        with fsspec.open(path, "rt") as f:
            text = f.read()
    except FileNotFoundError as e:
        raise DatasetError(f"key list {path} does not exist") from e
    if str(path).endswith(".json"):
        return _json_key_list(path, text)
    lines = text.splitlines()
    keys: list[str] = []
    first_line: dict[str, int] = {}
    for n, line in enumerate(lines, 1):
        key = line.split("#", 1)[0].strip()
        if not key:
            continue
        if key in first_line:
            raise DatasetError(f"{path}:{n}: key {key!r} already listed on line {first_line[key]}")
        first_line[key] = n
        keys.append(key)
    return keys


def _json_key_list(path: str, text: str) -> list[str]:
    try:
        data = json.loads(text)
    except ValueError as e:
        raise DatasetError(f"key list {path}: not valid JSON ({e})") from e
    keys = data.get("keys") if isinstance(data, dict) else data
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise DatasetError(f"key list {path}: expected a JSON list of keys or an object with \"keys\": [...]")
    dupes = sorted(k for k, c in Counter(keys).items() if c > 1)
    if dupes:
        raise DatasetError(f"key list {path}: key {dupes[0]!r} is listed more than once")
    return list(keys)


def labeled_keys_for(cfg: DataConfig) -> list[str]:
    """The labeled subset a ``DataConfig`` names: ``labeled_keys`` (a key file) if set, else
    ``num_labeled`` keys of the training split drawn with ``labeled_seed`` (empty when 0)."""
    if cfg.labeled_keys is not None:
        return read_key_list(cfg.labeled_keys)
    if cfg.num_labeled == 0:
        return []
    return random_labeled_keys(cfg.root, cfg.train_split, cfg.num_labeled, cfg.labeled_seed, cfg.domain)


def labeled_candidates(root: str, split: str, domain: str | None = None) -> list[str]:
    """Every key of ``split`` (and ``domain``) whose sample has a label, sorted."""
    index = ShardIndex.load(root)
    return sorted(
        k for k, r in index.rows.items()
        if r["has_label"] and r["split"] == split and (domain is None or r["domain"] == domain)
    )


def random_labeled_keys(root: str, split: str, n: int, seed: int, domain: str | None = None) -> list[str]:
    """``n`` labeled keys of ``split`` drawn without replacement, seeded; returned sorted.

    The draw depends only on (manifest, split, domain, n, seed): every rank gets the same list.
    """
    candidates = labeled_candidates(root, split, domain)
    if n < 0 or n > len(candidates):
        raise DatasetError(
            f"cannot draw {n} labeled keys: {join(root, 'manifest.parquet')} has {len(candidates)} labeled "
            f"samples in split {split!r}{f' and domain {domain!r}' if domain else ''}"
        )
    pick = seeded_rng(_SEED_PICK, seed).choice(len(candidates), size=n, replace=False)
    return sorted(candidates[i] for i in pick)


def check_labeled_keys(index: ShardIndex, root: str, keys: list[str]) -> None:
    """Raise DatasetError unless ``keys`` is a non-empty list of distinct keys of labeled samples of ``root``."""
    if not keys:
        raise DatasetError("the labeled key list is empty")
    dupes = sorted(k for k, c in Counter(keys).items() if c > 1)
    if dupes:
        raise DatasetError(f"the labeled key list repeats {len(dupes)} key(s), e.g. {dupes[:5]}")
    unknown = sorted(k for k in keys if k not in index.rows)
    if unknown:
        raise unknown_keys_error(root, unknown, None, None)
    unlabeled = sorted(k for k in keys if not index.rows[k]["has_label"])
    if unlabeled:
        raise DatasetError(
            f"{len(unlabeled)} key(s) of the labeled list have no label in "
            f"{join(root, 'manifest.parquet')}: "
            f"{', '.join(unlabeled[:5])}{', ...' if len(unlabeled) > 5 else ''}"
        )


class LabeledPool:
    """Endless seeded batches drawn from a fixed list of labeled samples held in memory.

    The pool keeps the encoded members (PNG/JPEG bytes) and decodes on each draw, so it
    costs the shard size of the subset, not the decoded size. Every sample is decoded once
    when loading: a corrupt labeled sample is an error here (labels are scarce), never
    silently skipped.

    Draw order: the keys (sorted) are shuffled once per pool epoch with a generator seeded
    by ``(seed, pool epoch)`` and the shuffles are concatenated into one endless sequence.
    Draw ``t`` takes ``world_size * batch_size`` consecutive entries and rank ``r`` the
    ``r``-th ``batch_size`` of them, so the ranks see disjoint samples within a step (when
    the pool is large enough). Each sample's crop/flip comes from a generator seeded by its
    position in that sequence: the stream does not depend on how it is split across ranks.

    Args:
        root: dataset directory or URL. keys: the labeled subset.
        batch_size: samples per batch (per rank). crop: (h, w) or None for full size.
        augment: crop/flip/jitter settings (None: centred crop, nothing else).
        seed: base seed. frames: frame ids per sample ((0,) for segmentation).

    Batches: images (B,3,h,w) per frame, K/inv_K (B,3,3), label (B,h,w) int64, depth/T and
    instance maps when stored.
    """

    def __init__(
        self,
        root: str,
        keys: Iterable[str],
        *,
        batch_size: int,
        crop: tuple[int, int] | None,
        augment: AugmentConfig | None,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        frames: tuple[int, ...] = (0,),
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        if batch_size < 1 or seed < 0:
            raise ValueError("need batch_size >= 1 and seed >= 0")
        keys = list(keys)
        index = ShardIndex.load(root)
        check_labeled_keys(index, root, keys)
        self.keys = sorted(keys)
        self.root, self.batch_size, self.crop, self.augment = root, batch_size, crop, augment
        self.seed, self.rank, self.world_size, self.frames = seed, rank, world_size, tuple(frames)
        selection = index.select(None, keys=self.keys)
        index.check_shards_exist(selection)
        index.check_sizes(selection, crop)
        self._members = self._load(index, selection)
        self.drawn = 0  # batches drawn so far (per rank; the same count on every rank)
        self._order_cache: tuple[int, Any] | None = None

    def _load(self, index: ShardIndex, selection: dict[str, list[int]]) -> dict[str, dict[str, Any]]:
        fs = fsspec.core.url_to_fs(self.root)[0]
        members: dict[str, dict[str, Any]] = {}
        self._max_label = -1
        self._with_instance = 0
        for shard, wanted in selection.items():
            try:
                for _, m in scan_shard(self.root, shard, index.shard_keys[shard], wanted, fs=fs):
                    try:
                        decoded = decode_members(m, self.frames)
                    except SampleError as e:
                        where = join(self.root, shard)
                        raise DatasetError(f"labeled sample in {where} is corrupt: {e}") from e
                    members[m["__key__"]] = m
                    label = decoded["label"]
                    self._with_instance += decoded["instance"] is not None
                    if label is not None and (label != IGNORE_INDEX).any():
                        self._max_label = max(self._max_label, int(label[label != IGNORE_INDEX].max()))
            except BrokenShard as e:
                raise DatasetError(f"cannot load the labeled samples: {e}") from e
        size = sum(len(v) for m in members.values() for k, v in m.items() if k != "__key__")
        if size > LARGE_POOL_BYTES:
            log.warning("labeled pool holds %.1f GiB of encoded samples in memory (%d keys)", size / 2**30,
                        len(members))
        return members

    def max_label(self) -> int:
        """Largest class id (ignore excluded) in the pool's labels; -1 when all are ignore."""
        return self._max_label

    def instance_count(self) -> int:
        """Samples of the pool that carry an instance map (``instance.png``)."""
        return self._with_instance

    def __len__(self) -> int:
        """Number of labeled samples in the pool."""
        return len(self.keys)

    def _key_at(self, g: int) -> str:
        """Key at position ``g`` of the endless shuffled sequence."""
        n = len(self.keys)
        epoch, i = divmod(g, n)
        if self._order_cache is None or self._order_cache[0] != epoch:
            self._order_cache = (epoch, seeded_rng(_SEED_ORDER, self.seed, epoch).permutation(n))
        return self.keys[int(self._order_cache[1][i])]

    def next_batch(self) -> Batch:
        """The next batch of this rank (advances the state)."""
        base = (self.drawn * self.world_size + self.rank) * self.batch_size
        samples = []
        for g in range(base, base + self.batch_size):
            decoded = decode_members(self._members[self._key_at(g)], self.frames)
            rng = seeded_rng(_SEED_AUG, self.seed, g)
            samples.append(augment_sample(decoded, self.crop, self.augment, rng, self.frames))
        self.drawn += 1
        return collate(samples, self.frames)

    def __iter__(self) -> Iterator[Batch]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, Any]:
        return {"drawn": self.drawn, "seed": self.seed, "num_keys": len(self.keys)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue after ``state["drawn"]`` batches (same seed and key list expected)."""
        if state.get("seed") != self.seed or state.get("num_keys") != len(self.keys):
            raise ValueError(
                f"labeled pool state is for seed {state.get('seed')} and {state.get('num_keys')} keys, "
                f"this pool has seed {self.seed} and {len(self.keys)} keys"
            )
        self.drawn = int(state["drawn"])
