"""Streaming, resumable, rank-balanced readers of the WebDataset shards.

``ShardStream`` feeds the training loops, ``ValLoader`` the evaluations and
``LabeledPool`` (``sdeseg.data.labeled``) the labeled subset of semi-supervised runs.
None of them imports Ray or ``torch.distributed``: the runtime passes ``rank`` and
``world_size`` in.

How ``ShardStream`` splits an epoch (the invariants the training loop relies on):

1. **Shard order.** Every epoch the shard list is shuffled with a generator seeded
   by ``(seed, epoch)``, the same on every rank. Concatenating the chosen samples of
   the shards in that order gives one sequence of N samples (N from the manifest).
2. **Ranges.** There are ``R = world_size * W`` readers, ``W = max(num_workers, 1)``. The sequence
   is truncated to a multiple of ``R * batch_size`` and cut into R equal contiguous
   ranges; reader ``rank * W + w`` owns range ``rank * W + w``. So no sample is seen
   twice per epoch and every reader yields the same number of batches:
   ``batches_per_epoch = W * (N // (R * batch_size))`` per rank, identical everywhere
   (unequal counts would hang the collective steps of DeepSpeed). The truncated tail
   changes from epoch to epoch because the shard order does.
3. **Shuffle.** Inside its range a reader emits samples in the order of a shuffle
   buffer of ``shuffle_buffer`` samples. The order is simulated on positions up front
   (seeded by ``(seed, epoch, rank, worker)``), so the reader streams the tar members of
   its range once, holds at most ``shuffle_buffer`` raw samples, and decodes a sample
   only when its turn comes (decode after the shuffle).
4. **Augmentation.** Output slot ``i`` of a reader's epoch draws its crop, flip and
   colour jitter from a generator seeded by ``(seed, epoch, rank, worker, i)``: any
   slot can be recreated without replaying the ones before it.
5. **Workers.** Each DataLoader worker runs one reader and assembles whole batches
   (``DataLoader(batch_size=None)``); the DataLoader returns them round-robin, so
   batch ``j`` of a rank comes from worker ``j % W``. One DataLoader iterator spans all
   epochs (workers keep running across epochs, like ``persistent_workers``). Workers ship
   images as uint8 (a quarter of the bytes through shared memory); the stream converts
   each batch to float32 in [0, 1] as it hands it out.
6. **Resume.** ``state_dict()`` is the position of what the caller has consumed:
   ``(epoch, batches_in_epoch)``. After ``load_state_dict`` worker ``w`` knows how many
   batches it had delivered, skips those slots without reading or decoding their
   samples (their tar members are passed over), and continues; physical worker 0 plays
   the reader whose batch is due next, so the round-robin order lines up again. The
   following batches are bit-identical to those of an uninterrupted stream. The position
   is exact for the same layout (world size, W, batch size, sample count, seed);
   ``load_state_dict`` refuses another layout unless ``strict=False`` (next epoch start).
   Maps joined from derived datasets (``derived=``) are functions of the keys, so they
   resume with the batches.
7. **Corrupt samples.** A sample whose members cannot be decoded (``SampleError``), or
   that sits in an unreadable part of a tar, is skipped, counted and logged. Its slot is
   filled by the next good sample of the reader's shuffled order (wrapping around to the
   start of the range at the end), which therefore appears twice in that epoch, with a
   different augmentation. Slots never move, so batch counts and resume stay exact.
   When more than ``max_corrupt_fraction`` of the samples a reader has seen were bad
   (judged after ``MIN_SEEN_FOR_FRACTION`` samples), it raises RuntimeError naming the
   last bad key and its shard. ``corrupt_count`` counts skips: a sample that stays bad is
   counted once in every epoch that reads it. A tar that ends cleanly before the manifest
   says, or holds another key at a position, is not corruption but a DatasetError.
8. **Derived maps.** ``derived={name: (root, member)}`` joins a member of a derived dataset
   (``sdeseg infer``: pseudo-depth, regions, pseudo-masks of the full stored images) to each
   batch by key, cropped and flipped like its images, as ``batch.derived[name]``. The reader
   (its worker) reads them, one read per derived dataset and batch, so the training loop
   never waits on that I/O; the stream refuses at construction a derived dataset that lacks
   one of its samples or records another size for it, and a reader a map of another size
   than its image.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from itertools import groupby
from typing import Any

import fsspec
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from sdeseg.config import AugmentConfig, DataConfig
from sdeseg.data.augment import apply_geometry, augment_sample
from sdeseg.data.batch import Batch
from sdeseg.data.codec import SampleError
from sdeseg.data.derived import DerivedDataset
from sdeseg.data.labeled import LabeledPool, labeled_keys_for, random_labeled_keys, read_key_list
from sdeseg.data.manifest import DatasetError, join
from sdeseg.data.shardio import (
    MIN_SEEN_FOR_FRACTION,
    BrokenShard,
    CorruptTracker,
    ShardIndex,
    collate,
    decode_members,
    scan_shard,
    seeded_rng,
)

log = logging.getLogger(__name__)

__all__ = [
    "ShardStream", "LabeledPool", "ValLoader", "make_loader", "random_labeled_keys", "read_key_list",
    "labeled_keys_for", "buffered_permutation",
]

# Distinct first entries keep the seed sequences of different purposes apart.
_SEED_SHARDS, _SEED_BUFFER, _SEED_AUG, _SEED_WORKER = 1, 2, 3, 4
_STATE_LAYOUT = ("world_size", "num_workers", "batch_size", "num_samples", "seed")


def buffered_permutation(n: int, buffer: int, rng: np.random.Generator) -> np.ndarray:
    """Output order of a streaming shuffle buffer of ``buffer`` items over ``0..n-1``.

    The buffer is filled with the first items; each step emits a uniformly chosen buffered
    item and refills its place with the next input. Hence ``out[i] < i + buffer``: a reader
    emitting in this order never holds more than ``buffer`` samples.

    Returns:
        (n,) int64 permutation.
    """
    buf = list(range(min(buffer, n)))
    nxt = len(buf)
    out = np.empty(n, dtype=np.int64)
    for i in range(n):
        j = int(rng.integers(len(buf)))
        out[i] = buf[j]
        if nxt < n:
            buf[j] = nxt
            nxt += 1
        else:
            buf[j] = buf[-1]
            buf.pop()
    return out


# ----------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class _Plan:
    """Everything a reader (in-process or in a worker) needs; small and picklable."""

    root: str
    selection: dict[str, list[int]]  # shard -> chosen tar positions
    shard_keys: dict[str, list[str]]  # shard -> every key in tar order (for validation)
    batch_size: int
    crop: tuple[int, int] | None
    augment: AugmentConfig | None
    frames: tuple[int, ...]
    labels: bool | frozenset[str]
    seed: int
    rank: int
    world_size: int
    workers: int  # readers per rank (max(num_workers, 1))
    shuffle_buffer: int
    max_corrupt_fraction: float
    epochs: int | None
    derived: tuple[tuple[str, str, str], ...] = ()  # (batch field, derived root, member)
    num_samples: int = field(init=False)
    samples_per_reader: int = field(init=False)

    def __post_init__(self) -> None:
        n = sum(len(v) for v in self.selection.values())
        readers = self.world_size * self.workers
        object.__setattr__(self, "num_samples", n)
        object.__setattr__(self, "samples_per_reader", (n // (readers * self.batch_size)) * self.batch_size)

    @property
    def batches_per_epoch(self) -> int:
        return self.workers * self.samples_per_reader // self.batch_size

    def shard_order(self, epoch: int) -> list[str]:
        names = sorted(self.selection)
        perm = seeded_rng(_SEED_SHARDS, self.seed, epoch).permutation(len(names))
        return [names[i] for i in perm]

    def epoch_items(self, epoch: int, worker: int) -> list[tuple[str, int]]:
        """(shard, tar position) of the samples of reader (rank, worker) in ``epoch``, stream order."""
        reader = self.rank * self.workers + worker
        start = reader * self.samples_per_reader
        stop = start + self.samples_per_reader
        items: list[tuple[str, int]] = []
        offset = 0
        for name in self.shard_order(epoch):
            idx = self.selection[name]
            lo, hi = max(start - offset, 0), min(stop - offset, len(idx))
            if lo < hi:
                items.extend((name, i) for i in idx[lo:hi])
            offset += len(idx)
            if offset >= stop:
                break
        return items


class _RawSource:
    """Raw members of one reader's range, streamed once in tar order and held until used."""

    def __init__(self, plan: _Plan, items: list[tuple[str, int]], wanted: Iterable[int]):
        self.plan = plan
        self.items = items
        self.wanted = sorted(set(int(p) for p in wanted))
        self.wanted_set = set(self.wanted)
        self.held: dict[int, Any] = {}
        self.cursor = -1  # last position the stream has delivered
        self.fs = fsspec.core.url_to_fs(plan.root)[0]
        self._stream = self._iterate()

    def key(self, pos: int) -> tuple[str, str]:
        shard, index = self.items[pos]
        return self.plan.shard_keys[shard][index], shard

    def _iterate(self) -> Iterator[tuple[int, Any]]:
        for shard, group in groupby(self.wanted, key=lambda p: self.items[p][0]):
            by_index = {self.items[p][1]: p for p in group}
            todo = dict(by_index)
            try:
                for index, members in scan_shard(
                    self.plan.root, shard, self.plan.shard_keys[shard], by_index, fs=self.fs
                ):
                    todo.pop(index)
                    yield by_index[index], members
            except BrokenShard as e:
                # every wanted sample the broken tar did not deliver is corrupt
                for index in sorted(todo):
                    yield by_index[index], e

    def get(self, pos: int) -> dict[str, Any]:
        """Members of position ``pos``; raises SampleError for an unreadable one."""
        if pos not in self.held and pos in self.wanted_set and pos > self.cursor:
            for p, members in self._stream:
                self.cursor = p
                self.held[p] = members
                if p == pos:
                    break
        if pos in self.held:
            members = self.held[pos]
        else:
            # Rare path: a corrupt sample's slot is filled from a sample this reader has
            # already passed (wrap-around at the end of the range): read it again.
            shard, index = self.items[pos]
            try:
                keys = self.plan.shard_keys[shard]
                members = next(iter(scan_shard(self.plan.root, shard, keys, [index], self.fs)))[1]
            except BrokenShard as e:
                members = e
        if isinstance(members, BrokenShard):
            raise SampleError(f"{self.key(pos)[0]}: {members}")
        return members

    def release(self, pos: int) -> None:
        self.held.pop(pos, None)


class _Joiner:
    """The derived maps of a batch (see the module doc, 8.): per batch one read of each derived
    dataset, its members stacked and cropped and flipped like the batch's images."""

    def __init__(self, spec: tuple[tuple[str, str, str], ...]):
        self.spec = spec
        self.datasets: dict[str, DerivedDataset] = {}

    def __call__(self, keys: list[str], geometry: torch.Tensor,
                 sizes: list[tuple[int, int]]) -> dict[str, torch.Tensor]:
        """``sizes``: each sample's stored (H, W), which its maps must have."""
        out: dict[str, torch.Tensor] = {}
        for root in dict.fromkeys(r for _, r, _ in self.spec):
            if root not in self.datasets:
                self.datasets[root] = DerivedDataset(root)
            spec = [(name, member) for name, r, member in self.spec if r == root]
            uses = {member: name for name, member in spec}
            maps = self.datasets[root].stack(keys, uses, sizes, uses)
            for name, member in spec:
                out[name] = apply_geometry(torch.from_numpy(maps[member]), geometry)
        return out


def _seed_globals(plan: _Plan, epoch: int, worker: int) -> None:
    """Fresh global RNGs for a DataLoader worker, derived from (seed, epoch, rank, worker).

    The reader itself only uses explicit generators; this is for anything else that runs
    in the worker (and keeps forked workers from sharing the parent's RNG state).
    """
    s = int(seeded_rng(_SEED_WORKER, plan.seed, epoch, plan.rank, worker).integers(2**31))
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)


def _run_epoch(
    plan: _Plan, worker: int, epoch: int, skip_batches: int, tracker: CorruptTracker, joiner: _Joiner | None = None
) -> Iterator[tuple[Batch, int]]:
    """Batches of reader (rank, worker) in ``epoch`` after its first ``skip_batches``.

    Yields ``(batch, corrupt)``: ``corrupt`` counts the samples newly skipped for it.
    """
    items = plan.epoch_items(epoch, worker)
    n = len(items)
    shuffle_rng = seeded_rng(_SEED_BUFFER, plan.seed, epoch, plan.rank, worker)
    perm = buffered_permutation(n, plan.shuffle_buffer, shuffle_rng)
    first = skip_batches * plan.batch_size
    source = _RawSource(plan, items, perm[first:])
    bad: set[int] = set()
    fresh_bad = 0
    samples: list[dict[str, Any]] = []
    sizes: list[tuple[int, int]] = []  # each sample's stored size (derived maps must have it)
    for slot in range(first, n):
        out = None
        for j in range(n):  # the slot's own sample, else the next good one (see module doc, 7.)
            pos = int(perm[(slot + j) % n])
            if pos in bad:
                continue
            try:
                decoded = decode_members(source.get(pos), plan.frames, plan.labels)
            except SampleError as e:
                bad.add(pos)
                fresh_bad += 1
                tracker.skip(*source.key(pos), str(e))
                tracker.check(min(MIN_SEEN_FOR_FRACTION, n))
                continue
            rng = seeded_rng(_SEED_AUG, plan.seed, epoch, plan.rank, worker, slot)
            out = augment_sample(decoded, plan.crop, plan.augment, rng, plan.frames)
            size = decoded["frames"][0].shape[:2]
            break
        if out is None:
            raise RuntimeError(f"{tracker.where}: every sample of its range in epoch {epoch} is corrupt; "
                               f"last: {tracker.last}")
        source.release(int(perm[slot]))
        tracker.good += 1
        tracker.check(min(MIN_SEEN_FOR_FRACTION, n))
        samples.append(out)
        sizes.append(size)
        if len(samples) == plan.batch_size:
            batch = collate(samples, plan.frames, as_float=False)
            if joiner is not None:
                batch.derived = joiner(batch.keys, batch.geometry, sizes)
            yield batch, fresh_bad
            samples, sizes, fresh_bad = [], [], 0


class _ReaderDataset(IterableDataset):
    """One reader per DataLoader worker (or in-process), starting at a consumed position."""

    def __init__(self, plan: _Plan, start_epoch: int, start_batch: int):
        super().__init__()
        self.plan = plan
        self.start_epoch = start_epoch
        self.start_batch = start_batch

    def __iter__(self) -> Iterator[tuple[Batch, int]]:
        info = get_worker_info()
        physical = 0 if info is None else info.id
        W = self.plan.workers
        # Batch j of the rank is due from reader j % W; the DataLoader asks physical worker 0
        # first, so it must play the reader of batch ``start_batch``.
        worker = (physical + self.start_batch) % W
        skip = len(range(worker, self.start_batch, W))  # batches this reader already delivered
        where = f"reader (rank {self.plan.rank}, worker {worker}) of {self.plan.root}"
        tracker = CorruptTracker(self.plan.max_corrupt_fraction, where)
        joiner = _Joiner(self.plan.derived) if self.plan.derived else None
        epoch = self.start_epoch
        while self.plan.epochs is None or epoch < self.plan.epochs:
            if info is not None:
                _seed_globals(self.plan, epoch, worker)
            yield from _run_epoch(self.plan, worker, epoch, skip if epoch == self.start_epoch else 0, tracker, joiner)
            epoch += 1


def _worker_init(_: int) -> None:
    # one intra-op thread per worker: the workers are the parallelism, oversubscribing
    # the cores with torch threads only slows the training process down
    torch.set_num_threads(1)


# ----------------------------------------------------------------------------- public


class ShardStream:
    """Endless (or ``epochs``-long) stream of training batches of one split; see the module doc.

    Args:
        root: dataset directory or fsspec URL holding ``manifest.parquet`` and the shards.
        split, domain: which samples (domain None: all).
        batch_size: samples per batch (per rank).
        crop: (h, w) training crop (random with ``augment.crop``, else centred); None keeps the
            stored size (every chosen sample must then have the same size).
        augment: flip / colour jitter settings; None: no augmentation (centred crop).
        rank, world_size: this process's place among the data-parallel ranks.
        num_workers: DataLoader worker processes (0: read in this process).
        shuffle_buffer: samples held per reader for shuffling.
        seed: base seed of every random choice.
        frames: frame ids of each sample (-1, 0, 1); (0,) for single-frame data.
        keys / exclude_keys: optional whitelist / blacklist of sample keys.
        labels: False drops labels (an unlabeled stream never decodes label.png); a collection of
            keys keeps only those samples' labels (the others' rows of ``batch.label`` are all
            ignore; ``batch.label`` is None for a batch with none of them).
        max_corrupt_fraction: fail when a reader skipped more than this fraction of its samples.
        epochs: stop after this many epochs (counted from 0); None: endless.
        derived: batch field -> (derived dataset root, member name), e.g. ``{"depth": (root,
            "pseudo_depth.npy")}``: ``batch.derived[field]`` (B,h,w) in the member's dtype, read
            by the reader and cropped and flipped like the images (module doc, 8.).
        as_float: images and images_aug as float32 in [0, 1] (the default); False: as uint8,
            which ``Batch.to(device)`` converts on ``device`` (module doc, 5.).
        pin_memory: batches in page-locked memory, for asynchronous copies to a GPU (needs CUDA).

    Batches: ``sdeseg.data.batch.Batch`` with images (B,3,h,w) per frame, K/inv_K (B,3,3),
    label (B,h,w) int64 or None, depth (B,1,h,w) or None, instance (B,h,w) int64 or None
    (cropped and flipped with the label; dropped with it when ``labels=False``),
    T {-1, 1: (B,4,4)} or None.
    """

    def __init__(
        self,
        root: str,
        split: str = "train",
        *,
        domain: str | None = None,
        batch_size: int = 8,
        crop: tuple[int, int] | None = (96, 192),
        augment: AugmentConfig | None = None,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 1,
        shuffle_buffer: int = 64,
        seed: int = 0,
        frames: tuple[int, ...] = (-1, 0, 1),
        keys: Iterable[str] | None = None,
        exclude_keys: Iterable[str] | None = None,
        labels: bool | Iterable[str] = True,
        max_corrupt_fraction: float = 0.01,
        epochs: int | None = None,
        derived: Mapping[str, tuple[str, str]] | None = None,
        as_float: bool = True,
        pin_memory: bool = False,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        if batch_size < 1 or num_workers < 0 or shuffle_buffer < 1 or seed < 0:
            raise ValueError("need batch_size >= 1, num_workers >= 0, shuffle_buffer >= 1, seed >= 0")
        if 0 not in frames:
            raise ValueError(f"frames must include the centre frame 0, got {frames}")
        index = ShardIndex.load(root)
        selection = index.select(split, domain, keys, exclude_keys)
        if not selection:
            raise DatasetError(f"{join(root, 'manifest.parquet')} has no samples of split {split!r}"
                               f"{f' and domain {domain!r}' if domain else ''}")
        index.check_shards_exist(selection)
        index.check_sizes(selection, crop)
        derived = tuple((name, str(root), member) for name, (root, member) in (derived or {}).items())
        if derived:
            rows = [index.rows[index.shard_keys[s][i]] for s, positions in selection.items() for i in positions]
            for where in dict.fromkeys(r for _, r, _ in derived):
                members = ", ".join(m for _, r, m in derived if r == where)
                DerivedDataset(where).check_covers(rows, members, of=f"samples of split {split!r} of {root}")
        self.plan = _Plan(
            root=root, selection=selection, shard_keys={s: index.shard_keys[s] for s in selection},
            batch_size=batch_size, crop=None if crop is None else (int(crop[0]), int(crop[1])),
            augment=augment, frames=tuple(frames), labels=labels if isinstance(labels, bool) else frozenset(labels),
            seed=seed, rank=rank, world_size=world_size,
            workers=max(num_workers, 1), shuffle_buffer=shuffle_buffer,
            max_corrupt_fraction=max_corrupt_fraction, epochs=epochs, derived=derived,
        )
        if self.plan.batches_per_epoch == 0:
            raise DatasetError(
                f"{root}: split {split!r} has {self.plan.num_samples} samples, fewer than "
                f"world_size * max(num_workers, 1) * batch_size = "
                f"{world_size * self.plan.workers * batch_size}: "
                "no rank would get a single batch"
            )
        self.num_workers = num_workers
        self.as_float, self.pin_memory = as_float, pin_memory
        self.epoch = 0
        self.batches_in_epoch = 0
        self.corrupt_count = 0
        self._active: object | None = None

    @property
    def batches_per_epoch(self) -> int:
        """Batches per epoch on this rank; the same on every rank (from the manifest)."""
        return self.plan.batches_per_epoch

    @property
    def num_samples(self) -> int:
        """Chosen samples of the split, before truncation to whole batches."""
        return self.plan.num_samples

    def state_dict(self) -> dict[str, Any]:
        """Position after the batches handed out so far, plus the layout it is valid for."""
        p = self.plan
        return {
            "epoch": self.epoch, "batches_in_epoch": self.batches_in_epoch,
            "corrupt_count": self.corrupt_count,
            "world_size": p.world_size, "num_workers": p.workers, "batch_size": p.batch_size,
            "num_samples": p.num_samples, "seed": p.seed,
        }

    def load_state_dict(self, state: dict[str, Any], strict: bool = True) -> None:
        """Continue after the consumed batches of ``state`` on the next ``iter()``.

        The position is only exact for the same layout (world size, readers per rank, batch
        size, sample count, seed). Otherwise ``strict`` raises; non-strict starts at the
        beginning of the next epoch with a warning (e.g. an elastic restart on fewer ranks).
        """
        mine = self.state_dict()
        diff = {k: (state.get(k), mine[k]) for k in _STATE_LAYOUT if state.get(k) != mine[k]}
        epoch, batch = int(state["epoch"]), int(state["batches_in_epoch"])
        if diff:
            msg = ", ".join(f"{k}: saved {a}, now {b}" for k, (a, b) in diff.items())
            if strict:
                raise ValueError(f"reader state does not fit this stream ({msg}); pass strict=False to "
                                 "restart at the next epoch boundary")
            epoch, batch = epoch + (batch > 0), 0
            log.warning("reader layout changed (%s): resuming at the start of epoch %d", msg, epoch)
        if not 0 <= batch < self.batches_per_epoch:
            raise ValueError(f"batches_in_epoch {batch} out of range [0, {self.batches_per_epoch})")
        self.epoch, self.batches_in_epoch = epoch, batch
        self.corrupt_count = int(state.get("corrupt_count", 0))
        self._active = None  # a running iterator is now stale

    def __iter__(self) -> Iterator[Batch]:
        return self._iterate()

    def _iterate(self) -> Iterator[Batch]:
        token = object()
        self._active = token
        dataset = _ReaderDataset(self.plan, self.epoch, self.batches_in_epoch)
        if self.num_workers == 0:
            source: Iterator[tuple[Batch, int]] | None = iter(dataset)
        else:
            source = iter(DataLoader(
                dataset, batch_size=None, num_workers=self.num_workers, worker_init_fn=_worker_init,
                prefetch_factor=2, pin_memory=self.pin_memory,
            ))
        try:
            for batch, corrupt in source:
                if self._active is not token:
                    raise RuntimeError("stale reader iterator: iter() or load_state_dict() was called since")
                if self.pin_memory and self.num_workers == 0:
                    batch = batch.pin_memory()
                if self.as_float:  # workers ship uint8: a quarter of the bytes
                    batch = batch.as_float()
                self.corrupt_count += corrupt
                # count the batch as consumed before handing it out: a checkpoint taken after the
                # caller trained on it must resume after it
                self.batches_in_epoch += 1
                if self.batches_in_epoch == self.batches_per_epoch:
                    self.epoch, self.batches_in_epoch = self.epoch + 1, 0
                yield batch
        except Exception as e:
            # The DataLoader's frames in the traceback hold its iterator: whoever keeps the
            # exception would keep the workers alive until a GC pass, whose shutdown then waits
            # 5 s per worker. The worker's traceback is already in the message.
            raise e.with_traceback(None) from e.__cause__
        finally:
            source = None  # shut the workers down now, not at some later GC

class ValLoader:
    """Deterministic evaluation batches at full resolution, split across ranks.

    Samples are taken in manifest order (shard name, tar position); sample ``i`` goes to
    rank ``i % world_size``, so the ranks' subsets are disjoint and cover the split. Ranks
    may get different batch counts (the last batch may be short): evaluations accumulate
    locally and reduce once, so nothing waits per batch. ``max_batches > 0`` caps the
    batches per rank. Corrupt samples are skipped and counted like in ``ShardStream``.

    Batches: images (B,3,H,W) per frame in ``frames`` (no augmentation, ``images_aug`` is
    ``images``), K/inv_K (B,3,3), label (B,H,W) int64 or None, depth (B,1,H,W) or None,
    instance (B,H,W) int64 Cityscapes instanceIds or None.
    """

    def __init__(
        self,
        root: str,
        split: str = "val",
        *,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        domain: str | None = None,
        max_batches: int = 0,
        frames: tuple[int, ...] = (0,),
        max_corrupt_fraction: float = 0.01,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        if batch_size < 1 or max_batches < 0:
            raise ValueError("need batch_size >= 1 and max_batches >= 0")
        index = ShardIndex.load(root)
        selection = index.select(split, domain)
        if not selection:
            raise DatasetError(f"{join(root, 'manifest.parquet')} has no samples of split {split!r}"
                               f"{f' and domain {domain!r}' if domain else ''}")
        index.check_shards_exist(selection)
        index.check_sizes(selection, None)
        items = [(name, i) for name in sorted(selection) for i in selection[name]]
        mine = items[rank::world_size]
        if max_batches:
            mine = mine[: max_batches * batch_size]
        self.root, self.split, self.batch_size, self.frames = root, split, batch_size, tuple(frames)
        self.rank, self.world_size, self.max_corrupt_fraction = rank, world_size, max_corrupt_fraction
        self.items = mine
        self.shard_keys = {s: index.shard_keys[s] for s in selection}
        self.num_samples = len(items)
        self.corrupt_count = 0

    def __len__(self) -> int:
        """Batches this rank yields (the last one may be short)."""
        return -(-len(self.items) // self.batch_size)

    @property
    def keys(self) -> list[str]:
        """Keys of this rank's samples, in order."""
        return [self.shard_keys[s][i] for s, i in self.items]

    def __iter__(self) -> Iterator[Batch]:
        fs = fsspec.core.url_to_fs(self.root)[0]
        where = f"validation reader (rank {self.rank}) of {self.root}"
        tracker = CorruptTracker(self.max_corrupt_fraction, where)
        self.corrupt_count = 0
        samples: list[dict[str, Any]] = []
        for shard, group in groupby(self.items, key=lambda it: it[0]):
            wanted = [i for _, i in group]
            got = set()
            try:
                for index, members in scan_shard(self.root, shard, self.shard_keys[shard], wanted, fs=fs):
                    got.add(index)
                    try:
                        decoded = decode_members(members, self.frames)
                    except SampleError as e:
                        self._skip(tracker, self.shard_keys[shard][index], shard, str(e))
                        continue
                    samples.append(augment_sample(decoded, None, None, np.random.default_rng(0), self.frames))
                    tracker.good += 1
                    if len(samples) == self.batch_size:
                        yield collate(samples, self.frames)
                        samples = []
            except BrokenShard as e:
                for index in wanted:
                    if index not in got:
                        self._skip(tracker, self.shard_keys[shard][index], shard, str(e))
            tracker.check()
        tracker.check(min_seen=1)
        if samples:
            yield collate(samples, self.frames)

    def _skip(self, tracker: CorruptTracker, key: str, shard: str, reason: str) -> None:
        tracker.skip(key, shard, reason)
        self.corrupt_count += 1


def make_loader(
    cfg: DataConfig,
    *,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    frames: tuple[int, ...] = (-1, 0, 1),
    **overrides: Any,
) -> ShardStream:
    """The training ``ShardStream`` described by a ``DataConfig`` (keyword overrides win)."""
    kwargs: dict[str, Any] = dict(
        split=cfg.train_split, domain=cfg.domain, batch_size=cfg.batch_size, crop=cfg.size,
        augment=cfg.augment, rank=rank, world_size=world_size, num_workers=cfg.num_workers,
        shuffle_buffer=cfg.shuffle_buffer, seed=seed, frames=frames,
        max_corrupt_fraction=cfg.max_corrupt_fraction,
    )
    kwargs.update(overrides)
    root = kwargs.pop("root", cfg.root)  # another dataset, e.g. a domain-adaptation source
    return ShardStream(root, **kwargs)
